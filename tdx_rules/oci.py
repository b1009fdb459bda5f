"""Read container images and apply their layers to an in-memory filesystem model.

:func:`open_image` accepts three kinds of input and returns the image's layers,
bottom to top, as :class:`Layer` objects that are only read when applied:

* an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``):
  ``index.json`` leads to a manifest (through nested indexes; ``linux/amd64``
  is picked when there are several platforms), whose layers are returned in
  order. Every blob is checked against its SHA-256 digest as it is read;
* a ``docker save`` tarball, old style (``manifest.json`` naming
  ``<id>/layer.tar`` members, checked against the config's ``diff_ids``) or
  new style (Docker 25+: the same ``manifest.json`` pointing into an OCI
  layout stored in the tarball), or an OCI layout packed as a tar
  (``oci-archive``). Members are read in place by offset: the tarball is never
  extracted;
* a Docker ``overlay2`` layer directory (``<root>/<id>`` holding ``diff/``,
  ``link`` and ``lower``): the ``lower`` chain (``l/<short id>`` entries,
  topmost first, resolved through the ``<root>/l/`` symlinks) and the
  directory's own ``diff/`` become directory layers. Whiteouts there are
  character devices 0:0 or ``.wh.`` files; opaque directories carry the
  ``trusted.overlay.opaque`` (or ``user.overlay.opaque``) xattr, which is only
  readable with root rights: without them an opaque directory reads as a
  plain one (use ``docker save`` instead).

Layers may be plain tar, tar+gzip or tar+zstd (recognised by their magic
bytes, so a ``docker save`` ``layer.tar`` that is in fact compressed works too).

:func:`apply_layers` streams the layers into a :class:`Tree`. Bodies of an
uncompressed layer that lies in a file (an OCI blob, a member of a ``docker
save`` tarball) stay where they are: the tree records their offset in the
blob, after the blob's digest is checked (a thread hashes it while
:func:`scan_tar` reads the headers). Other bodies go to a
content-addressed store below a staging directory (mode 0600 files, 0700
directories: the real mode and owner live in the model only), while
paths, types, modes including setuid/setgid/sticky, owners, device numbers,
xattrs (PAX ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``), symlink targets
and hard links are kept in memory. Whiteouts follow the OCI rules
(``.wh.NAME`` hides NAME of lower layers, ``.wh..wh..opq`` hides a
directory's lower contents; neither hides what the same layer adds).

Nothing from an image is ever written outside the staging directory, no
symlink of an image is followed on the host, and device nodes are never
created: they exist only in the model. Every failure is a
:class:`~tdx_rules.errors.TdxError` naming the input (layer digest, blob,
path) and the fix.
"""

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import zlib
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import zstandard

from .errors import TdxError
from .fsutil import CHUNK, FileSlice, RangeHasher, expansion_exceeded

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

# Exceptions that mean "the bytes of a layer are damaged".
_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, tarfile.TarError, ValueError,
            UnicodeError, OverflowError)

# Entry types of the model.
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "file", "dir", "symlink", "hardlink", "char", "block", "fifo"
TYPES = (FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
# xattrs of overlay2 directories that describe the storage, not the image.
_HOST_XATTRS = ("trusted.overlay.", "user.overlay.", "security.selinux")


# --------------------------------------------------------------------------- layers

@dataclasses.dataclass
class Member:
    """One entry of a layer, whatever its source (tar header or directory entry).

    ``name`` is relative to the image root and not yet checked; whiteouts are
    ordinary members whose last component starts with ``.wh.``.
    """

    name: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    rdev: Tuple[int, int] = (0, 0)
    linkname: str = ""
    size: int = 0
    xattrs: Dict[str, bytes] = dataclasses.field(default_factory=dict)


class Layer:
    """One layer of an image, read only when iterated with :meth:`members`.

    ``digest`` names the layer in messages: ``sha256:…`` for blobs, the
    ``diff_id`` or member path for old ``docker save`` layers, the directory
    for overlay2 layers.
    """

    def __init__(self, digest: str, media_type: Optional[str] = None, size: Optional[int] = None):
        self.digest = digest
        self.media_type = media_type
        self.size = size

    def members(self, checks: Optional[list] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """Yield ``(Member, reader)``; ``reader`` is set for regular files and
        valid until the next member is requested. A layer may leave its digest
        check running and append it to ``checks`` (a list of :class:`DigestCheck`)
        instead of finishing it before the first member."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.digest!r})"


class _HashingReader(io.RawIOBase):
    """Raw reader that hashes (SHA-256) and counts every byte handed out."""

    def __init__(self, inner, bomb_check=None, where: str = ""):
        super().__init__()
        self._inner = inner
        self._bomb_check = bomb_check  # total -> True when the output is out of proportion
        self._where = where
        self.sha256 = hashlib.sha256()
        self.total = 0
        self.nonzero = False  # whether any byte so far was not NUL (an empty tar is all NULs)

    def _account(self, data) -> None:
        self.sha256.update(data)
        self.total += len(data)
        if self._bomb_check is not None and self._bomb_check(self.total):
            raise TdxError(f"{self._where}: decompresses to more than {self.total} bytes, out of proportion to "
                           "its compressed size (a decompression bomb?); refusing this image")
        if not self.nonzero and bytes(data).strip(b"\0"):
            self.nonzero = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._account(data)
        return n

    def read(self, size: int = -1) -> bytes:  # tarfile calls read() directly
        data = self._inner.read(size) if size is not None and size >= 0 else self._inner.read()
        self._account(data)
        return data


def _decompressed(buffered: io.BufferedReader):
    head = buffered.peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    return buffered


def _drain(stream) -> None:
    while stream.read(CHUNK):
        pass


_TAR_KINDS = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.LNKTYPE: HARDLINK, tarfile.CHRTYPE: CHAR,
              tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO}


def _tar_member(info: tarfile.TarInfo) -> Member:
    # isreg() also covers the old '\0' and contiguous-file types, so it is asked first.
    kind = FILE if info.isreg() else _TAR_KINDS.get(info.type)
    if kind is None:
        raise ValueError(f"member {info.name!r} has unsupported tar type {info.type!r}")
    xattrs = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            xattrs[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return Member(info.name, kind, info.mode & 0o7777, info.uid, info.gid, (info.devmajor, info.devminor),
                  info.linkname, info.size if kind == FILE else 0, xattrs)


class BodyRef:
    """A regular file's bytes left where they are: ``size`` bytes at ``offset`` of
    the host file ``path`` (an uncompressed layer blob). Readable like any member body."""

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size
        self._handle = None
        self._stream = None

    def read(self, size: int = -1) -> bytes:
        if self._stream is None:
            self._handle = open(self.path, "rb")
            self._stream = FileSlice(self._handle, self.offset, self.size)
        data = self._stream.read(size)
        if not data:
            self._handle.close()
        return data


class _Window(io.RawIOBase):
    """Seekable view of ``size`` bytes at ``base`` of an open file, positions relative to ``base``."""

    def __init__(self, handle, base: int, size: int):
        super().__init__()
        self._handle, self._base, self._size, self._pos = handle, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        if not want:
            return 0
        self._handle.seek(self._base + self._pos)
        n = self._handle.readinto(memoryview(buffer)[:want])
        self._pos += n
        return n


_SCAN_KINDS = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCK,
               b"5": DIR, b"6": FIFO}
_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> Optional[int]:
    """A header number as tarfile reads it (up to a NUL, blanks around), or None."""
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0 if field[:1] not in (b"\x80", b"\xff") else None
    if not text.isdigit():
        return None  # base-256, a sign, an underscore: left to tarfile
    try:
        return int(text, 8)
    except ValueError:
        return None


def _pax_records(payload: bytes) -> Optional[Dict[str, bytes]]:
    records: Dict[str, bytes] = {}
    pos = 0
    while pos < len(payload) and payload[pos:pos + 1] != b"\0":
        space = payload.find(b" ", pos)
        if space < 0 or not payload[pos:space].isdigit():
            return None
        end = pos + int(payload[pos:space])
        equals = payload.find(b"=", space)
        if end > len(payload) or end <= space or payload[end - 1:end] != b"\n" or not space < equals < end:
            return None
        records[payload[space + 1:equals].decode("utf-8", "surrogateescape")] = payload[equals + 1:end - 1]
        pos = end
    return records


class _Sequential:
    """Reads ``size`` bytes at ``base`` of ``fd`` front to back in CHUNK-sized reads,
    stepping over what :meth:`skip` passes."""

    def __init__(self, fd: int, base: int, size: int):
        self._fd, self._base, self._size = fd, base, size
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)[:0]
        self._read = 0  # bytes read from the file so far
        self.pos = 0  # archive offset of the next byte handed out

    def _fill(self) -> bool:
        want = min(CHUNK, self._size - self._read)
        if want <= 0:
            return False
        n = os.preadv(self._fd, [memoryview(self._buffer)[:want]], self._base + self._read)
        if n <= 0:
            return False
        self._read += n
        self._view = memoryview(self._buffer)[:n]
        return True

    def take(self, count: int) -> Optional[bytes]:
        """The next ``count`` bytes, or None when the file ends first."""
        if count <= len(self._view):  # the usual case: all buffered
            part = bytes(self._view[:count])
            self._view = self._view[count:]
            self.pos += count
            return part
        parts = []
        while count:
            if not self._view and not self._fill():
                return None
            part = self._view[:count]
            parts.append(bytes(part))
            self._view = self._view[len(part):]
            self.pos += len(part)
            count -= len(part)
        return b"".join(parts)

    def skip(self, count: int) -> bool:
        """Step over the next ``count`` bytes (what is not buffered is not read); False past the end."""
        buffered = min(count, len(self._view))
        self._view = self._view[buffered:]
        self._read += count - buffered
        self.pos += count
        return self._read <= self._size


def scan_tar(fd: int, base: int, size: int) -> Optional[List[Tuple[Member, int]]]:
    """Every member of the uncompressed tar at ``base`` of ``fd`` with its data offset (from
    ``base``), in one sequential read; None when the archive uses something left to
    :mod:`tarfile` (sparse files, base-256 numbers, unknown types, a damaged header, no
    end-of-archive block)."""
    members: List[Tuple[Member, int]] = []
    global_pax: Dict[str, bytes] = {}
    pending: Dict[str, bytes] = {}
    stream = _Sequential(fd, base, size)
    while True:
        block = stream.take(512)
        if block is None:
            return None
        if block == _ZERO_BLOCK:
            return members
        if _octal(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
            return None
        length = _octal(block[124:136])
        if length is None:
            return None
        data = stream.pos
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            payload = stream.take(length)
            if payload is None or not stream.skip(-length % 512):
                return None
            if kind in (b"x", b"g"):
                records = _pax_records(payload)
                if records is None or any(key.startswith("GNU.sparse") for key in records):
                    return None
                (pending if kind == b"x" else global_pax).update(records)
            else:
                pending["path" if kind == b"L" else "linkpath"] = payload.split(b"\0", 1)[0]
            continue
        member_kind = _SCAN_KINDS.get(kind)
        if member_kind is None:
            return None
        mode, uid, gid = _octal(block[100:108]), _octal(block[108:116]), _octal(block[116:124])
        major = minor = 0
        if member_kind in (CHAR, BLOCK):
            major, minor = _octal(block[329:337]), _octal(block[337:345])
        if mode is None or uid is None or gid is None or major is None or minor is None:
            return None
        # As tarfile reads a header: a V7 directory is a file named with a slash; a
        # directory's slashes go; a ustar prefix is joined; pax "path" loses its slashes.
        name = block[0:100].split(b"\0", 1)[0]
        if kind == b"\0" and name.endswith(b"/"):
            member_kind = DIR
        if member_kind == DIR:
            name = name.rstrip(b"/")
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        linkname = block[157:257].split(b"\0", 1)[0]
        pax = dict(global_pax, **pending) if global_pax else pending
        pending = {}
        try:
            name = pax["path"].rstrip(b"/") if "path" in pax else name
            linkname = pax.get("linkpath", linkname)
            uid = int(pax.get("uid", uid))
            gid = int(pax.get("gid", gid))
            length = int(pax.get("size", length))
        except ValueError:
            return None
        xattrs = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr."):]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                xattrs[urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])] = base64.b64decode(
                    value + b"=" * (-len(value) % 4))
        text = name.decode("utf-8", "surrogateescape")
        if member_kind == DIR:
            text = text.rstrip("/")
        if member_kind == FILE and not stream.skip(length + (-length % 512)):
            return None
        members.append((Member(text, member_kind, mode & 0o7777, uid, gid, (major, minor),
                               linkname.decode("utf-8", "surrogateescape"), length if member_kind == FILE else 0,
                               xattrs), data))


class DigestCheck:
    """The digest check of an uncompressed layer blob, hashed in a thread from creation on."""

    def __init__(self, layer: "TarLayer", path: str, base: int, size: int):
        self._layer, self._size = layer, size
        self._hasher = RangeHasher([(path, base, size)])
        self._hasher.start()

    def wait(self, tar_check=None, quiet: bool = False) -> None:
        """Wait for the hash; raise TdxError naming the layer unless it matches the image
        (or, ``quiet``, just wait)."""
        try:
            got = "sha256:" + self._hasher.result()[0]
        except (OSError, EOFError) as exc:
            if quiet:
                return
            raise TdxError(f"layer {self._layer.digest}: cannot read ({getattr(exc, 'strerror', None) or exc}); "
                           "check that the image file is readable") from None
        if not quiet:
            try:
                self._layer._check_in_place(got, self._size, tar_check)
            except _CORRUPT as exc:
                raise self._layer._corrupt(exc) from None


class TarLayer(Layer):
    """A layer stored as a (possibly compressed) tar stream.

    ``opener()`` returns a context manager yielding the raw blob bytes.
    ``blob_digest`` (of the raw bytes) and ``diff_id`` (of the uncompressed
    tar) are checked when given. ``location`` is ``(host file, offset, size or
    None)`` of the raw blob when it lies in a file: an uncompressed blob there
    is read in place (hashed once, then its members' bodies are handed out as
    :class:`BodyRef`, never copied).
    """

    def __init__(self, digest: str, opener: Callable, media_type: Optional[str] = None,
                 size: Optional[int] = None, blob_digest: Optional[str] = None, diff_id: Optional[str] = None,
                 location: Optional[Tuple[str, int, Optional[int]]] = None):
        super().__init__(digest, media_type, size)
        self._opener = opener
        self.blob_digest = blob_digest
        self.diff_id = diff_id
        self.location = location

    def _corrupt(self, why) -> TdxError:
        return TdxError(f"layer {self.digest}: corrupt or truncated ({why}); pull or save the image again")

    def members(self, checks: Optional[list] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        if self.location is not None:
            try:
                with open(self.location[0], "rb") as handle:
                    handle.seek(self.location[1])
                    head = handle.read(4)
            except OSError as exc:
                raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                               "check that the image file is readable") from None
            if head[:2] != b"\x1f\x8b" and head != b"\x28\xb5\x2f\xfd":
                yield from self._members_in_place(checks)
                return
        try:
            with self._opener() as raw:
                hashing = _HashingReader(raw)
                buffered = io.BufferedReader(hashing, CHUNK)
                stream = _decompressed(buffered)
                diff = _HashingReader(stream, bomb_check=lambda total: expansion_exceeded(hashing.total, total),
                                      where=f"layer {self.digest}")
                try:
                    try:
                        tar = tarfile.open(fileobj=diff, mode="r|", errors="surrogateescape")
                    except tarfile.ReadError:
                        if diff.nonzero or diff.total < 2 * tarfile.BLOCKSIZE:
                            raise
                        tar = None  # an empty layer: nothing but end-of-archive blocks
                    while tar is not None:
                        info = tar.next()
                        tar.members.clear()  # a stream of many members must not pile up TarInfo objects
                        if info is None:
                            if diff.total < tar.offset + tarfile.BLOCKSIZE:
                                raise EOFError("the tar stream ends before its end-of-archive block")
                            break
                        member = _tar_member(info)
                        yield member, (_TarFileReader(tar.extractfile(info), self) if member.type == FILE else None)
                    _drain(diff)  # the rest (padding, trailer): lets gzip check its CRC
                    _drain(buffered)
                finally:
                    if stream is not buffered:
                        stream.close()
                self._verify(hashing, diff)
        except _CORRUPT as exc:
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None

    def _members_in_place(self, checks: Optional[list]) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """An uncompressed blob in a host file: its members read in place.

        One sequential read scans the headers while a thread hashes the whole
        blob. Without ``checks`` the digest is checked before the first member;
        with it, the check keeps running and is appended to ``checks`` (the
        caller waits for it before it publishes anything). The bodies' own
        digests are left to the consumer (``Entry.sha256`` is None):
        :func:`tdx_rules.ext4.build_ext4` works them out while it copies them.
        """
        path, base, size = self.location
        try:
            with open(path, "rb") as handle:
                if size is None:
                    size = os.fstat(handle.fileno()).st_size - base
                check = DigestCheck(self, path, base, size)
                try:
                    scanned = scan_tar(handle.fileno(), base, size) if size else []
                except BaseException:
                    check.wait(quiet=True)
                    raise
                if scanned is None:  # something only tarfile reads: it checks the whole archive first
                    check.wait(tar_check=lambda: self._members_by_tarfile(handle, base, size))
                    yield from self._members_by_tarfile(handle, base, size)
                    return
                if checks is None:
                    check.wait()
                else:
                    checks.append(check)
                for member, data in scanned:
                    yield member, (BodyRef(path, base + data, member.size) if member.type == FILE else None)
        except _CORRUPT as exc:
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None

    def _check_in_place(self, got: str, size: int, tar_check=None) -> None:
        """The blob's size and digests; ``tar_check`` (members from tarfile, read to the end)
        runs between the blob digest and the diff_id, so a damaged tar is named as such."""
        if self.size is not None and size != self.size:
            raise TdxError(f"layer {self.digest}: {size} bytes, the manifest says {self.size}; "
                           "the image is corrupt: pull or save it again")
        if self.blob_digest is not None and got != self.blob_digest:
            raise TdxError(f"layer {self.digest}: content has digest {got}, not the one the manifest names; "
                           "the image is corrupt: pull or save it again")
        if tar_check is not None:
            for _ in tar_check():
                pass
        if self.diff_id is not None and got != self.diff_id:
            raise TdxError(f"layer {self.digest}: content has digest {got}, not the diff_id {self.diff_id} of the "
                           "image config; the image is corrupt: pull or save it again")

    def _members_by_tarfile(self, handle, base: int, size: int):
        tar = tarfile.open(fileobj=_Window(handle, base, size), mode="r:", errors="surrogateescape")
        while True:
            info = tar.next()
            tar.members.clear()
            if info is None:
                if size < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError("the tar stream ends before its end-of-archive block")
                return
            member = _tar_member(info)
            reader = None
            if member.type == FILE:
                reader = _TarFileReader(tar.extractfile(info), self)
            yield member, reader

    def _verify(self, hashing: _HashingReader, diff: _HashingReader) -> None:
        if self.blob_digest is not None:
            got = "sha256:" + hashing.sha256.hexdigest()
            if got != self.blob_digest:
                raise TdxError(f"layer {self.blob_digest}: content has digest {got}, not the one the manifest names; "
                               "the image is corrupt: pull or save it again")
        if self.size is not None and hashing.total != self.size:
            raise TdxError(f"layer {self.digest}: {hashing.total} bytes, the manifest says {self.size}; "
                           "the image is corrupt: pull or save it again")
        if self.diff_id is not None:
            got = "sha256:" + diff.sha256.hexdigest()
            if got != self.diff_id:
                raise TdxError(f"layer {self.digest}: uncompressed content has digest {got}, not the diff_id "
                               f"{self.diff_id} of the image config; the image is corrupt: pull or save it again")


class _TarFileReader:
    """Body of a tar member; damaged data raises TdxError naming the layer."""

    def __init__(self, inner, layer: TarLayer):
        self._inner, self._layer = inner, layer

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except _CORRUPT as exc:
            raise self._layer._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self._layer.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None


class DirLayer(Layer):
    """A layer stored as a directory tree (Docker overlay2 ``diff/``).

    Read with ``O_NOFOLLOW`` relative to directory descriptors: symlinks of
    the layer are read as data, never followed. Character devices 0:0 are
    whiteouts; an opaque xattr on a directory adds a ``.wh..wh..opq`` member.
    """

    def __init__(self, path: str):
        super().__init__(f"overlay2 layer {path}")
        self.path = path

    def _fail(self, rel: str, exc: OSError) -> TdxError:
        where = os.path.join(self.path, rel) if rel else self.path
        if isinstance(exc, PermissionError):
            return TdxError(f"{where}: permission denied; read Docker's storage as root or use 'docker save' "
                            "to get a tarball")
        return TdxError(f"{where}: cannot read ({exc.strerror or exc}); check the overlay2 directory")

    @staticmethod
    def _xattrs(target) -> Dict[str, bytes]:
        result = {}
        try:
            names = os.listxattr(target, follow_symlinks=False) if isinstance(target, str) else os.listxattr(target)
        except OSError:
            return result
        for name in sorted(names):
            if name.startswith(_HOST_XATTRS):
                continue
            try:
                result[name] = (os.getxattr(target, name, follow_symlinks=False) if isinstance(target, str)
                                else os.getxattr(target, name))
            except OSError:
                continue
        return result

    @staticmethod
    def _opaque(fd: int) -> bool:
        for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
            try:
                if os.getxattr(fd, name) == b"y":
                    return True
            except OSError:
                continue
        return False

    def members(self, checks: Optional[list] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            root = os.open(self.path, flags)
        except OSError as exc:
            raise self._fail("", exc) from None
        seen: Dict[Tuple[int, int], str] = {}
        stack: List[Tuple[int, str]] = [(root, "")]
        try:
            while stack:
                dirfd, rel = stack.pop()
                try:
                    try:
                        names = sorted(os.listdir(dirfd))
                    except OSError as exc:
                        raise self._fail(rel, exc) from None
                    subdirs = []
                    for name in names:
                        child = f"{rel}/{name}" if rel else name
                        try:
                            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                        except OSError as exc:
                            raise self._fail(child, exc) from None
                        yield from self._entry(dirfd, name, child, st, seen, subdirs)
                    for name, child in reversed(subdirs):
                        try:
                            stack.append((os.open(name, flags, dir_fd=dirfd), child))
                        except OSError as exc:
                            raise self._fail(child, exc) from None
                finally:
                    os.close(dirfd)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _entry(self, dirfd: int, name: str, rel: str, st: os.stat_result, seen, subdirs):
        mode = stat.S_IMODE(st.st_mode)
        full = os.path.join(self.path, rel)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            try:
                xattrs, opaque = self._xattrs(fd), self._opaque(fd)
            finally:
                os.close(fd)
            yield Member(rel, DIR, mode, st.st_uid, st.st_gid, xattrs=xattrs), None
            if opaque:
                yield Member(f"{rel}/{OPAQUE}", FILE), io.BytesIO(b"")
            subdirs.append((name, rel))
            return
        if fmt == stat.S_IFCHR and st.st_rdev == 0:
            parent, _, base = rel.rpartition("/")
            yield Member(f"{parent}/{WHITEOUT}{base}" if parent else WHITEOUT + base, FILE), io.BytesIO(b"")
            return
        if fmt == stat.S_IFSOCK:
            return  # sockets have no tar form; Docker drops them too
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            yield Member(rel, HARDLINK, mode, st.st_uid, st.st_gid, linkname=seen[key]), None
            return
        if st.st_nlink > 1:
            seen[key] = rel
        if fmt == stat.S_IFREG:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            with os.fdopen(fd, "rb") as handle:
                yield Member(rel, FILE, mode, st.st_uid, st.st_gid, size=st.st_size,
                             xattrs=self._xattrs(handle.fileno())), _GuardedReader(handle, self, rel)
        elif fmt == stat.S_IFLNK:
            try:
                target = os.readlink(name, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            yield Member(rel, SYMLINK, mode, st.st_uid, st.st_gid, linkname=target, xattrs=self._xattrs(full)), None
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = CHAR if fmt == stat.S_IFCHR else BLOCK
            yield Member(rel, kind, mode, st.st_uid, st.st_gid, (os.major(st.st_rdev), os.minor(st.st_rdev)),
                         xattrs=self._xattrs(full)), None
        elif fmt == stat.S_IFIFO:
            yield Member(rel, FIFO, mode, st.st_uid, st.st_gid, xattrs=self._xattrs(full)), None


class _GuardedReader:
    """File reader of a directory layer; read errors become TdxError."""

    def __init__(self, handle, layer: DirLayer, rel: str):
        self._handle, self._layer, self._rel = handle, layer, rel

    def read(self, size: int = -1) -> bytes:
        try:
            return self._handle.read(size)
        except OSError as exc:
            raise self._layer._fail(self._rel, exc) from None


# --------------------------------------------------------------------------- image formats

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


# --------------------------------------------------------------------------- the model

@dataclasses.dataclass(frozen=True)
class Entry:
    """One path of the final filesystem.

    ``path`` is absolute inside the image (``/`` is the root). ``type`` is one
    of :data:`TYPES`. For ``hardlink`` entries ``target`` is the path of the
    entry that carries the inode (the first of its names in sorted order) and
    the other fields repeat that inode's metadata. ``target`` of a symlink is
    its target, verbatim. ``body`` is the host file that holds a regular
    file's bytes, ``size`` of them from ``offset`` (None: the whole file): an
    uncompressed layer blob or the tree's bodies file. ``rdev`` is
    ``(major, minor)`` for devices. ``xattrs`` is a sorted tuple of
    ``(name, value bytes)``.
    """

    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: Optional[Tuple[int, int]] = None
    xattrs: Tuple[Tuple[str, bytes], ...] = ()
    target: Optional[str] = None
    body: Optional[str] = None
    size: int = 0
    offset: Optional[int] = None


class _Node:
    """An inode of the model; hard links are several directory entries sharing one."""

    __slots__ = ("type", "mode", "uid", "gid", "rdev", "xattrs", "target", "body", "size", "offset",
                 "children")

    def __init__(self, kind: str, mode: int, uid: int = 0, gid: int = 0):
        self.type = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev: Optional[Tuple[int, int]] = None
        self.xattrs: Dict[str, bytes] = {}
        self.target: Optional[str] = None
        self.body: Optional[str] = None
        self.size = 0
        self.offset: Optional[int] = None
        self.children: Optional[Dict[str, "_Node"]] = {} if kind == DIR else None


def _sort_key(name: str) -> bytes:
    return os.fsencode(name)


class Tree:
    """The filesystem an image unpacks to: a model in memory, bodies on disk.

    ``staging`` is the directory holding ``store/bodies``, the one private
    file (mode 0600) the bodies of compressed and directory layers are
    appended to; entries point into it by offset, as into a plain layer blob.
    :meth:`cleanup` (or leaving the ``with`` block) removes what this tree
    wrote there.
    """

    def __init__(self, staging: Optional[str] = None):
        if staging is None:
            self.staging = tempfile.mkdtemp(prefix="tdx-oci-")
            self._own = True
        else:
            self.staging = os.path.abspath(os.fspath(staging))
            self._own = not os.path.exists(self.staging)
            os.makedirs(self.staging, mode=0o700, exist_ok=True)
        self.store = os.path.join(self.staging, "store")
        if self._own:
            os.chmod(self.staging, 0o700)
        os.makedirs(self.store, mode=0o700, exist_ok=True)
        os.chmod(self.store, 0o700)
        self.bodies = os.path.join(self.store, "bodies")
        self._spool = None  # the bodies file, opened at the first body
        self._spool_size = 0
        self.root = _Node(DIR, 0o755)
        self.pending: List[DigestCheck] = []  # layer digest checks still running (apply_layers(defer_checks=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the bodies (and the staging directory if this tree created it)."""
        for check in self.pending:
            check.wait(quiet=True)
        self.pending.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        shutil.rmtree(self.staging if self._own else self.store, ignore_errors=True)

    def verify(self) -> None:
        """Wait for the layer digest checks still running; TdxError naming the layer if one
        does not match. Whatever was made from the tree must not be published before."""
        while self.pending:
            self.pending.pop(0).wait()

    # ---- lookups

    def _node(self, parts: List[str]) -> Optional[_Node]:
        node = self.root
        for part in parts:
            if node.type != DIR:
                return None
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def entries(self) -> List[Entry]:
        """Every path, sorted (depth first, names in byte order), root first."""
        result: List[Entry] = []
        first_path: Dict[int, str] = {}
        # First pass: the first name (in sorted order) of every multiply-linked inode.
        order: List[Tuple[str, _Node]] = []
        stack = [("/", self.root)]
        while stack:
            path, node = stack.pop()
            order.append((path, node))
            if node.type == DIR:
                prefix = path if path.endswith("/") else path + "/"
                for name in sorted(node.children, key=_sort_key, reverse=True):
                    stack.append((prefix + name, node.children[name]))
        for path, node in order:
            primary = first_path.setdefault(id(node), path)
            kind, target = node.type, node.target
            if primary != path:
                kind, target = HARDLINK, primary
            result.append(Entry(path, kind, node.mode, node.uid, node.gid, node.rdev,
                                tuple(sorted(node.xattrs.items())), target, node.body, node.size,
                                node.offset))
        return result

    def get(self, path: str) -> Optional[Entry]:
        """The entry at an absolute image path (no symlink is followed), or None."""
        for entry in self.entries():
            if entry.path == path:
                return entry
        return None

    # ---- storing bodies

    def _store(self, reader) -> Tuple[int, int]:
        """Append a body to the bodies file; its (offset, size) there."""
        if self._spool is None:
            fd = os.open(self.bodies, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self._spool = os.fdopen(fd, "wb", buffering=0)
        offset = self._spool_size
        if reader is not None:
            while True:
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[self._spool.write(view):]
                self._spool_size += len(chunk)
        return offset, self._spool_size - offset


def _parts(name: str, layer: Layer, what: str = "member") -> List[str]:
    if "\0" in name:
        raise TdxError(f"layer {layer.digest}: {what} {name!r} contains a NUL byte; refusing this image")
    if name.startswith("/"):
        raise TdxError(f"layer {layer.digest}: {what} {name!r} has an absolute path; refusing this image")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TdxError(f"layer {layer.digest}: {what} {name!r} contains '..'; refusing this image")
    return parts


def apply_layers(layers, staging_dir=None, defer_checks: bool = False) -> Tree:
    """Apply ``layers`` (bottom first) and return the resulting :class:`Tree`.

    With ``defer_checks``, the digest checks of plain layers read in place keep
    running after this returns (their headers are read and checked for safety
    all the same); :meth:`Tree.verify` waits for them, and a caller must call
    it before it publishes anything made from the tree, as
    :func:`tdx_rules.ext4.build_ext4` does.

    Reads every layer once (an uncompressed one in a file: its headers, then its
    bytes hashed in two threads): bodies stay in such a layer, else go to the
    tree's staging directory (``staging_dir``, or a new temporary directory);
    never a whole layer in memory. Refuses (TdxError) absolute or ``..`` names, whiteouts that name
    nothing inside the tree, hard links to missing, directory or outside
    targets; a damaged layer raises TdxError naming its digest. On failure the
    staging files are removed.
    """
    tree = Tree(staging_dir)
    try:
        for layer in layers:
            _Applier(tree, layer, tree.pending if defer_checks else None).run()
    except BaseException:
        tree.cleanup()
        raise
    return tree


class _Applier:
    """Applies one layer to a tree (OCI whiteout rules: a whiteout hides only
    what lower layers put there, never what this layer adds)."""

    def __init__(self, tree: Tree, layer: Layer, checks: Optional[list] = None):
        self.tree = tree
        self.layer = layer
        self.checks = checks
        self.fresh: set = set()  # paths (tuples) this layer wrote, and their ancestors

    def _refuse(self, what: str) -> TdxError:
        return TdxError(f"layer {self.layer.digest}: {what}; refusing this image")

    def run(self) -> None:
        try:
            with contextlib.closing(self.layer.members(self.checks)) as members:
                for member, reader in members:
                    self.member(member, reader)
        except OSError as exc:
            raise TdxError(f"layer {self.layer.digest}: cannot write the staging directory {self.tree.staging} "
                           f"({exc.strerror or exc}); check free space and permissions") from None

    def mark(self, parts: List[str]) -> None:
        for i in range(len(parts), 0, -1):
            key = tuple(parts[:i])
            if key in self.fresh:
                break
            self.fresh.add(key)

    def ensure_dir(self, parts: List[str]) -> _Node:
        node = self.tree.root
        for part in parts:
            child = node.children.get(part)
            if child is None or child.type != DIR:
                # Missing, or a non-directory below which the layer writes: a new
                # directory shadows it, as the overlay2 union does.
                child = _Node(DIR, 0o755)
                node.children[part] = child
            node = child
        return node

    def prune(self, node: _Node, parts: Tuple[str, ...]) -> None:
        """Drop what lower layers put below directory ``node`` (at ``parts``)."""
        for name in list(node.children):
            key = parts + (name,)
            child = node.children[name]
            if key not in self.fresh:
                del node.children[name]
            elif child.type == DIR:
                self.prune(child, key)

    def whiteout(self, parts: List[str]) -> None:
        parent = self.tree._node(parts[:-1])
        if parent is None or parent.type != DIR:
            return
        child = parent.children.get(parts[-1])
        if child is None:
            return
        if tuple(parts) not in self.fresh:
            del parent.children[parts[-1]]
        elif child.type == DIR:
            self.prune(child, tuple(parts))

    def member(self, member: Member, reader) -> None:
        parts = _parts(member.name, self.layer)
        if not parts:
            if member.type != DIR:
                raise self._refuse(f"the root entry {member.name!r} is not a directory")
            _set_meta(self.tree.root, member)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT):
            if base == OPAQUE:
                directory = self.ensure_dir(parts[:-1])
                self.mark(parts[:-1])
                self.prune(directory, tuple(parts[:-1]))
            elif not base.startswith(WHITEOUT + WHITEOUT):  # .wh..wh.plnk etc.: AUFS metadata, not content
                hidden = base[len(WHITEOUT):]
                if hidden in ("", ".", ".."):
                    raise self._refuse(f"whiteout {member.name!r} names {hidden!r}, which is outside the tree")
                self.whiteout(parts[:-1] + [hidden])
            return
        parent = self.ensure_dir(parts[:-1])
        if member.type == DIR:
            node = parent.children.get(base)
            if node is None or node.type != DIR:
                node = _Node(DIR, 0)
                parent.children[base] = node
            _set_meta(node, member)
        elif member.type == HARDLINK:
            target_parts = _parts(member.linkname, self.layer, "hard link target")
            target = self.tree._node(target_parts) if target_parts else None
            if target is None or target.type == DIR:
                what = "a directory" if target is not None else "not in the image"
                raise self._refuse(f"hard link {member.name!r} points to {member.linkname!r}, which is {what}")
            parent.children[base] = target
        else:
            node = _Node(member.type, 0)
            _set_meta(node, member)
            if member.type == FILE and isinstance(reader, BodyRef):
                node.body, node.offset, node.size = reader.path, reader.offset, reader.size
            elif member.type == FILE:
                node.offset, node.size = self.tree._store(reader)
                node.body = self.tree.bodies
            elif member.type == SYMLINK:
                if not member.linkname:
                    raise self._refuse(f"symlink {member.name!r} has an empty target")
                node.target = member.linkname
            elif member.type in (CHAR, BLOCK):
                node.rdev = (int(member.rdev[0]), int(member.rdev[1]))
            parent.children[base] = node
        self.mark(parts)


def _set_meta(node: _Node, member: Member) -> None:
    node.mode = member.mode & 0o7777
    node.uid = member.uid
    node.gid = member.gid
    node.xattrs = dict(member.xattrs)
