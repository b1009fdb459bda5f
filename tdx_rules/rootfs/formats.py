"""Container image formats: the layers of an image, bottom to top.

:func:`open_image` accepts three kinds of input and returns their layers as
:class:`~tdx_rules.rootfs.layers.Layer` objects that are only read when applied:

* an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``):
  ``index.json`` leads to a manifest (through nested indexes; ``linux/amd64``
  is picked when there are several platforms), whose layers are returned in
  order;
* a ``docker save`` tarball, old style (``manifest.json`` naming
  ``<id>/layer.tar`` members, checked against the config's ``diff_ids``) or
  new style (Docker 25+: the same ``manifest.json`` pointing into an OCI
  layout stored in the tarball), or an OCI layout packed as a tar
  (``oci-archive``). Members are read in place by offset: the tarball is never
  extracted;
* a Docker ``overlay2`` layer directory (``<root>/<id>`` holding ``diff/``,
  ``link`` and ``lower``): the ``lower`` chain (``l/<short id>`` entries,
  topmost first, resolved through the ``<root>/l/`` symlinks) and the
  directory's own ``diff/`` become directory layers.

Only small JSON documents are read here, each checked against its digest; layer
blobs are checked as they are read. A missing blob, an unsupported media type or a
damaged document raises :class:`~tdx_rules.errors.TdxError` naming it and the fix.
"""

import contextlib
import hashlib
import json
import os
import re
import tarfile
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import TdxError
from ..fsutil import FileSlice
from .layers import DirLayer, Layer, TarLayer

PLATFORM = "linux/amd64"
MAX_JSON = 16 << 20  # manifests, indexes and configs larger than this are refused
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHORT_ID = re.compile(r"^[A-Za-z0-9_-]+$")

INDEX_TYPES = frozenset((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
MANIFEST_TYPES = frozenset((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
LAYER_TYPES = frozenset((
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
))


def open_image(path, platform: str = PLATFORM) -> List[Layer]:
    """Layers (bottom to top) of the image at ``path``: an OCI layout directory,
    a ``docker save`` / OCI archive tarball, or a Docker overlay2 layer directory.

    Only small JSON documents are read here (and checked against their
    digests); layer blobs are opened, checked and streamed by :func:`apply_layers`.
    A missing blob raises TdxError naming its digest.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "oci-layout")):
            return _oci_layers(_DirBlobs(path), path, platform)
        if os.path.isdir(os.path.join(path, "diff")):
            return _overlay2_layers(path)
        raise TdxError(f"{path}: neither an OCI image layout (no oci-layout file) nor an overlay2 layer "
                       "directory (no diff/); pass the image directory, a 'docker save' tarball or an overlay2 "
                       "layer directory")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        raise TdxError(f"{path}: no such image file or directory; check the path") from None
    except OSError as exc:
        raise TdxError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from None
    if head[:2] == b"\x1f\x8b" or head == b"\x28\xb5\x2f\xfd" or head[:3] == b"BZh" or head == b"\xfd7zX":
        raise TdxError(f"{path}: a compressed tarball; decompress it first (e.g. gunzip), the image tarball "
                       "is read in place by offset")
    archive = _TarArchive(path)
    if "manifest.json" in archive.members:
        return _docker_save_layers(archive, platform)
    if "oci-layout" in archive.members and "index.json" in archive.members:
        return _oci_layers(archive, path, platform)
    raise TdxError(f"{path}: a tar without manifest.json or index.json; pass a 'docker save' or OCI archive "
                   "tarball")


def _check_digest(digest, where: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise TdxError(f"{where}: unsupported or malformed digest {digest!r} (only sha256 is supported); "
                       "rebuild or re-save the image")
    return digest


class _DirBlobs:
    """Blobs of an OCI layout directory."""

    def __init__(self, root: str):
        self.root = root

    def label(self, name: str) -> str:
        return os.path.join(self.root, name)

    def blob_path(self, digest: str) -> str:
        algorithm, hexdigest = digest.split(":", 1)
        return os.path.join(self.root, "blobs", algorithm, hexdigest)

    def read_file(self, name: str) -> Optional[bytes]:
        try:
            with open(os.path.join(self.root, name), "rb") as handle:
                return handle.read(MAX_JSON + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TdxError(f"{self.label(name)}: cannot read ({exc.strerror or exc}); check permissions") from None

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def read_blob(self, digest: str) -> Optional[bytes]:
        algorithm, hexdigest = digest.split(":", 1)
        return self.read_file(os.path.join("blobs", algorithm, hexdigest))

    def opener(self, digest: str) -> Callable:
        path = self.blob_path(digest)
        return lambda: open(path, "rb")

    def location(self, digest: str) -> Tuple[str, int, Optional[int]]:
        return self.blob_path(digest), 0, None


class _TarArchive:
    """An uncompressed tarball whose members are read in place (by offset)."""

    def __init__(self, path: str):
        self.path = path
        self.members: Dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, "r:", errors="surrogateescape") as tar:
                for info in tar:
                    self.members[_normalise(info.name)] = info
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise TdxError(f"{path}: not a readable image tarball ({exc}); save the image again") from None
        except OSError as exc:
            raise TdxError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from None

    def label(self, name: str) -> str:
        return f"{self.path}:{name}"

    def _resolve(self, name: str) -> Optional[tarfile.TarInfo]:
        for _ in range(16):
            info = self.members.get(name)
            if info is None:
                return None
            if info.isreg():
                return info if info.type not in (tarfile.GNUTYPE_SPARSE,) and not info.sparse else None
            if info.islnk():
                name = _normalise(info.linkname)
            elif info.issym():
                name = _normalise(os.path.normpath(os.path.join(os.path.dirname(name), info.linkname)))
            else:
                return None
        return None

    def _open(self, info: tarfile.TarInfo):
        @contextlib.contextmanager
        def opener():
            with open(self.path, "rb") as handle:
                yield FileSlice(handle, info.offset_data, info.size)
        return opener

    def read_file(self, name: str) -> Optional[bytes]:
        info = self._resolve(name)
        if info is None:
            return None
        if info.size > MAX_JSON:
            return b" " * (MAX_JSON + 1)
        try:
            with self._open(info)() as stream:
                return stream.read()
        except OSError as exc:
            raise TdxError(f"{self.path}: cannot read ({exc.strerror or exc}); check the file") from None

    @staticmethod
    def blob_name(digest: str) -> str:
        return "blobs/" + digest.replace(":", "/", 1)

    def has_blob(self, digest: str) -> bool:
        return self._resolve(self.blob_name(digest)) is not None

    def read_blob(self, digest: str) -> Optional[bytes]:
        return self.read_file(self.blob_name(digest))

    def member_opener(self, name: str) -> Optional[Callable]:
        info = self._resolve(name)
        return None if info is None else self._open(info)

    def opener(self, digest: str) -> Callable:
        return self.member_opener(self.blob_name(digest))

    def member_location(self, name: str) -> Optional[Tuple[str, int, Optional[int]]]:
        info = self._resolve(name)
        return None if info is None else (self.path, info.offset_data, info.size)

    def location(self, digest: str) -> Optional[Tuple[str, int, Optional[int]]]:
        return self.member_location(self.blob_name(digest))


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _load_json(data: Optional[bytes], where: str):
    if data is None:
        return None
    if len(data) > MAX_JSON:
        raise TdxError(f"{where}: larger than {MAX_JSON >> 20} MiB; not an image document")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TdxError(f"{where}: not valid JSON ({exc}); save or pull the image again") from None


def _blob_json(blobs, descriptor, where: str):
    """Read and check a small JSON blob named by ``descriptor``."""
    if not isinstance(descriptor, dict):
        raise TdxError(f"{where}: malformed descriptor {descriptor!r}; rebuild or re-save the image")
    digest = _check_digest(descriptor.get("digest"), where)
    data = blobs.read_blob(digest)
    if data is None:
        raise TdxError(f"blob {digest} ({where}) is missing from the image; pull or save the image again")
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise TdxError(f"blob {digest} ({where}) has digest {got}; the image is corrupt: pull or save it again")
    size = descriptor.get("size")
    if isinstance(size, int) and size != len(data):
        raise TdxError(f"blob {digest} ({where}) has {len(data)} bytes, its descriptor says {size}; "
                       "the image is corrupt: pull or save it again")
    return _load_json(data, f"blob {digest}")


def _platform_of(descriptor) -> str:
    platform = descriptor.get("platform") or {}
    return f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"


def _pick_manifest(descriptors, platform: str, where: str):
    if not isinstance(descriptors, list) or not descriptors:
        raise TdxError(f"{where}: lists no manifests; rebuild or re-save the image")
    candidates = [d for d in descriptors if isinstance(d, dict)
                  and (d.get("annotations") or {}).get("vnd.docker.reference.type") != "attestation-manifest"
                  and _platform_of(d) != "unknown/unknown"]
    with_platform = [d for d in candidates if d.get("platform")]
    matching = [d for d in with_platform if _platform_of(d) == platform]
    if matching:
        return matching[0]
    if len(candidates) == 1 and not candidates[0].get("platform"):
        return candidates[0]  # a single manifest that does not say its platform
    found = ", ".join(sorted({_platform_of(d) for d in candidates})) or "none"
    raise TdxError(f"{where}: no {platform} image among its manifests (found: {found}); "
                   f"pull or save the {platform} image")


def _oci_layers(blobs, where: str, platform: str) -> List[Layer]:
    layout = _load_json(blobs.read_file("oci-layout"), blobs.label("oci-layout"))
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise TdxError(f"{blobs.label('oci-layout')}: not an OCI layout marker; pass an OCI image layout")
    index = _load_json(blobs.read_file("index.json"), blobs.label("index.json"))
    if index is None:
        raise TdxError(f"{blobs.label('index.json')}: missing; pass a complete OCI image layout")
    label = blobs.label("index.json")
    for _ in range(8):
        if not isinstance(index, dict):
            raise TdxError(f"{label}: not an image index; rebuild or re-save the image")
        descriptor = _pick_manifest(index.get("manifests"), platform, label)
        digest = _check_digest(descriptor.get("digest"), label)
        label = f"blob {digest}"
        document = _blob_json(blobs, descriptor, f"manifest of {where}")
        media_type = descriptor.get("mediaType") or (document or {}).get("mediaType")
        if media_type in INDEX_TYPES or (isinstance(document, dict) and "manifests" in document
                                         and "layers" not in document):
            index = document
            continue
        return _manifest_layers(blobs, document, label)
    raise TdxError(f"{where}: image indexes nested too deeply; rebuild or re-save the image")


def _manifest_layers(blobs, manifest, label: str) -> List[Layer]:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise TdxError(f"{label}: not an image manifest (no layers); rebuild or re-save the image")
    media_type = manifest.get("mediaType")
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise TdxError(f"{label}: unsupported manifest type {media_type!r}; rebuild or re-save the image")
    config = _blob_json(blobs, manifest.get("config"), f"config of {label}")
    diff_ids = _diff_ids(config, len(manifest["layers"]), label)
    layers: List[Layer] = []
    for number, descriptor in enumerate(manifest["layers"]):
        if not isinstance(descriptor, dict):
            raise TdxError(f"{label}: malformed layer descriptor {descriptor!r}; rebuild or re-save the image")
        digest = _check_digest(descriptor.get("digest"), f"{label} layer {number}")
        layer_type = descriptor.get("mediaType")
        if layer_type not in LAYER_TYPES:
            raise TdxError(f"layer {digest}: unsupported media type {layer_type!r} (tar, tar+gzip and tar+zstd "
                           "layers are supported); rebuild the image without it")
        if not blobs.has_blob(digest):
            raise TdxError(f"blob {digest} (layer {number}) is missing from the image; pull or save the image again")
        size = descriptor.get("size")
        layers.append(TarLayer(digest, blobs.opener(digest), layer_type, size if isinstance(size, int) else None,
                               blob_digest=digest, diff_id=diff_ids[number] if diff_ids else None,
                               location=blobs.location(digest)))
    return layers


def _diff_ids(config, count: int, label: str) -> Optional[List[str]]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if diff_ids is None:
        return None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise TdxError(f"{label}: the config lists {len(diff_ids) if isinstance(diff_ids, list) else '?'} "
                       f"diff_ids for {count} layers; rebuild or re-save the image")
    return [_check_digest(d, f"{label} config") for d in diff_ids]


def _docker_save_layers(archive: _TarArchive, platform: str) -> List[Layer]:
    where = archive.label("manifest.json")
    manifest = _load_json(archive.read_file("manifest.json"), where)
    if not isinstance(manifest, list) or not manifest:
        raise TdxError(f"{where}: not a docker save manifest; save the image again")
    if len(manifest) != 1:
        tags = [", ".join(m.get("RepoTags") or ["<untagged>"]) for m in manifest if isinstance(m, dict)]
        raise TdxError(f"{where}: holds {len(manifest)} images ({'; '.join(tags)}); 'docker save' one image per tarball")
    entry = manifest[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("Layers"), list) or not isinstance(
            entry.get("Config"), str):
        raise TdxError(f"{where}: entry lacks Config or Layers; save the image again")
    config_name = _normalise(entry["Config"])
    config_data = archive.read_file(config_name)
    if config_data is None:
        raise TdxError(f"{archive.label(config_name)}: the image config is missing; save the image again")
    expected = _digest_of_name(config_name)
    if expected and "sha256:" + hashlib.sha256(config_data).hexdigest() != expected:
        raise TdxError(f"blob {expected} (image config) does not match its digest; the tarball is corrupt: "
                       "save the image again")
    config = _load_json(config_data, archive.label(config_name))
    diff_ids = _diff_ids(config, len(entry["Layers"]), where)
    sources = entry.get("LayerSources") if isinstance(entry.get("LayerSources"), dict) else {}
    layers: List[Layer] = []
    for number, name in enumerate(entry["Layers"]):
        if not isinstance(name, str):
            raise TdxError(f"{where}: layer {number} is not a path; save the image again")
        name = _normalise(name)
        blob_digest = _digest_of_name(name)
        diff_id = diff_ids[number] if diff_ids else None
        label = blob_digest or diff_id or archive.label(name)
        opener = archive.member_opener(name)
        if opener is None:
            raise TdxError(f"blob {label} (layer {number}, {name}) is missing from {archive.path}; "
                           "save the image again")
        media_type = (sources.get(diff_id) or {}).get("mediaType") if diff_id else None
        layers.append(TarLayer(label, opener, media_type, blob_digest=blob_digest, diff_id=diff_id,
                               location=archive.member_location(name)))
    return layers


def _digest_of_name(name: str) -> Optional[str]:
    match = re.match(r"^(?:blobs/sha256/([0-9a-f]{64})|([0-9a-f]{64})\.json)$", name)
    if not match:
        return None
    return "sha256:" + (match.group(1) or match.group(2))


def _overlay2_layers(path: str) -> List[Layer]:
    path = os.path.abspath(path)
    root = os.path.dirname(path)
    links_dir = os.path.join(root, "l")
    lower = ""
    try:
        with open(os.path.join(path, "lower"), "r", encoding="ascii") as handle:
            lower = handle.read().strip()
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise TdxError(f"{path}/lower: cannot read ({exc}); check the overlay2 directory") from None
    diffs = []
    for item in [part for part in lower.split(":") if part]:
        short = item[2:] if item.startswith("l/") else ""
        if not short or not _SHORT_ID.match(short):
            raise TdxError(f"{path}/lower: entry {item!r} is not of the form l/<id>; check the overlay2 directory")
        link = os.path.join(links_dir, short)
        try:
            target = os.readlink(link)
        except OSError as exc:
            raise TdxError(f"{link}: cannot resolve lower layer {item!r} ({exc.strerror or exc}); "
                           "check the overlay2 directory (l/ links)") from None
        resolved = os.path.normpath(os.path.join(links_dir, target))
        layer_dir = os.path.dirname(resolved)
        if (os.path.basename(resolved) != "diff" or os.path.dirname(layer_dir) != root
                or not os.path.isdir(resolved) or os.path.islink(layer_dir) or os.path.islink(resolved)):
            raise TdxError(f"{link}: points to {target!r}, not to a diff/ directory of a layer beside {path}; "
                           "check the overlay2 directory")
        diffs.append(resolved)
    diffs.reverse()  # `lower` lists the nearest layer first
    own = os.path.join(path, "diff")
    if os.path.islink(own):
        raise TdxError(f"{own}: is a symlink, not a layer directory; check the overlay2 directory")
    diffs.append(own)
    return [DirLayer(d) for d in diffs]
