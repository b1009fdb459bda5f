"""Container images built in Python for the oci/ext4 tests.

:data:`LAYERS` describes three layers (several whiteouts, an opaque
directory, hard links, device nodes declared in tar headers, setuid/setgid
files, files owned by 1000:1000, xattrs, a name with spaces and quotes);
:data:`EXPECTED` is the filesystem they unpack to, written out by hand.
The writers lay the same layers out as an OCI image layout, as old and new
``docker save`` tarballs and as a Docker overlay2 directory.

Device nodes are only declared in tar headers; the overlay2 writer leaves
them out (creating them needs mknod) unless told to make the 0:0 whiteouts.
"""

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile

import zstandard

CAP_NET_RAW = b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12  # vfs_cap_data v2: cap_net_raw
BIG = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(10000))  # 320000 bytes


def F(name, data=b"", mode=0o644, uid=0, gid=0, xattrs=None):
    return {"name": name, "type": "file", "data": data, "mode": mode, "uid": uid, "gid": gid, "xattrs": xattrs or {}}


def D(name, mode=0o755, uid=0, gid=0, xattrs=None):
    return {"name": name, "type": "dir", "mode": mode, "uid": uid, "gid": gid, "xattrs": xattrs or {}}


def L(name, target, uid=0, gid=0):
    return {"name": name, "type": "symlink", "target": target, "mode": 0o777, "uid": uid, "gid": gid, "xattrs": {}}


def H(name, target):
    return {"name": name, "type": "hardlink", "target": target, "mode": 0o644, "uid": 0, "gid": 0, "xattrs": {}}


def DEV(name, kind, major, minor, mode=0o600, uid=0, gid=0):
    return {"name": name, "type": kind, "rdev": (major, minor), "mode": mode, "uid": uid, "gid": gid, "xattrs": {}}


LAYERS = [
    [
        D("./"),
        D("bin"), F("bin/tool", b"tool v1\n", 0o755), L("bin/sh", "tool"),
        D("etc"), F("etc/hostname", b"guest\n"), F("etc/old", b"old\n"), F("etc/shadow", b"root:*:1::::::\n", 0o640,
                                                                          gid=42),
        D("usr"), D("usr/bin"), F("usr/bin/su", b"su binary\n", 0o4755), F("usr/bin/sg", b"sg binary\n", 0o2755),
        F("usr/bin/ping", b"ping binary\n", 0o755, xattrs={"security.capability": CAP_NET_RAW,
                                                            "user.comment": b"hello"}),
        D("usr/lib"), F("usr/lib/big.bin", BIG), L("lib", "usr/lib"),
        D("tmp", 0o1777),
        D("home"), D("home/user", 0o750, 1000, 1000), F("home/user/notes", b"secret\n", 0o600, 1000, 1000),
        D("opt"), D("opt/dir"), F("opt/dir/a", b"a\n"), D("opt/dir/sub"), F("opt/dir/sub/b", b"b\n"),
        D("opt/gone"), F("opt/gone/x", b"x\n"),
        D("dev"), DEV("dev/null", "char", 1, 3, 0o666), DEV("dev/sda", "block", 8, 0, 0o660, gid=6),
        D("run"), DEV("run/initctl", "fifo", 0, 0, 0o600),
    ],
    [
        F("etc/.wh.old"),
        F("opt/dir/.wh..wh..opq"), F("opt/dir/c", b"c\n"),
        F("opt/.wh.gone"),
        F("bin/tool", b"tool v2\n", 0o755),
        H("usr/bin/su2", "usr/bin/su"),
        D("data"), F("data/x", b"linked\n", 0o644, 1000, 1000), H("data/y", "data/x"),
        F('etc/with space "q"', b"quoted\n"),
    ],
    [
        F("etc/hostname", b"guest2\n"),
        D("var"), D("var/log"),
        F("home/user/.wh.notes"),
        F("opt/dir/d", b"d\n"),
        F("usr/lib/libfoo.so.1", b"\x7fELF fake\n", 0o755), L("usr/lib/libfoo.so", "libfoo.so.1"),
    ],
]


def _sha(data):
    return hashlib.sha256(data).hexdigest()


# (path, type, mode, uid, gid, rdev, xattrs, target, sha256 of the content)
EXPECTED = [
    ("/", "dir", 0o755, 0, 0, None, (), None, None),
    ("/bin", "dir", 0o755, 0, 0, None, (), None, None),
    ("/bin/sh", "symlink", 0o777, 0, 0, None, (), "tool", None),
    ("/bin/tool", "file", 0o755, 0, 0, None, (), None, _sha(b"tool v2\n")),
    ("/data", "dir", 0o755, 0, 0, None, (), None, None),
    ("/data/x", "file", 0o644, 1000, 1000, None, (), None, _sha(b"linked\n")),
    ("/data/y", "hardlink", 0o644, 1000, 1000, None, (), "/data/x", _sha(b"linked\n")),
    ("/dev", "dir", 0o755, 0, 0, None, (), None, None),
    ("/dev/null", "char", 0o666, 0, 0, (1, 3), (), None, None),
    ("/dev/sda", "block", 0o660, 0, 6, (8, 0), (), None, None),
    ("/etc", "dir", 0o755, 0, 0, None, (), None, None),
    ("/etc/hostname", "file", 0o644, 0, 0, None, (), None, _sha(b"guest2\n")),
    ("/etc/shadow", "file", 0o640, 0, 42, None, (), None, _sha(b"root:*:1::::::\n")),
    ('/etc/with space "q"', "file", 0o644, 0, 0, None, (), None, _sha(b"quoted\n")),
    ("/home", "dir", 0o755, 0, 0, None, (), None, None),
    ("/home/user", "dir", 0o750, 1000, 1000, None, (), None, None),
    ("/lib", "symlink", 0o777, 0, 0, None, (), "usr/lib", None),
    ("/opt", "dir", 0o755, 0, 0, None, (), None, None),
    ("/opt/dir", "dir", 0o755, 0, 0, None, (), None, None),
    ("/opt/dir/c", "file", 0o644, 0, 0, None, (), None, _sha(b"c\n")),
    ("/opt/dir/d", "file", 0o644, 0, 0, None, (), None, _sha(b"d\n")),
    ("/run", "dir", 0o755, 0, 0, None, (), None, None),
    ("/run/initctl", "fifo", 0o600, 0, 0, None, (), None, None),
    ("/tmp", "dir", 0o1777, 0, 0, None, (), None, None),
    ("/usr", "dir", 0o755, 0, 0, None, (), None, None),
    ("/usr/bin", "dir", 0o755, 0, 0, None, (), None, None),
    ("/usr/bin/ping", "file", 0o755, 0, 0, None,
     (("security.capability", CAP_NET_RAW), ("user.comment", b"hello")), None, _sha(b"ping binary\n")),
    ("/usr/bin/sg", "file", 0o2755, 0, 0, None, (), None, _sha(b"sg binary\n")),
    ("/usr/bin/su", "file", 0o4755, 0, 0, None, (), None, _sha(b"su binary\n")),
    ("/usr/bin/su2", "hardlink", 0o4755, 0, 0, None, (), "/usr/bin/su", _sha(b"su binary\n")),
    ("/usr/lib", "dir", 0o755, 0, 0, None, (), None, None),
    ("/usr/lib/big.bin", "file", 0o644, 0, 0, None, (), None, _sha(BIG)),
    ("/usr/lib/libfoo.so", "symlink", 0o777, 0, 0, None, (), "libfoo.so.1", None),
    ("/usr/lib/libfoo.so.1", "file", 0o755, 0, 0, None, (), None, _sha(b"\x7fELF fake\n")),
    ("/var", "dir", 0o755, 0, 0, None, (), None, None),
    ("/var/log", "dir", 0o755, 0, 0, None, (), None, None),
]

CONTENT = {}  # sha256 -> bytes, for checks of dumped files
for _layer in LAYERS:
    for _item in _layer:
        if _item["type"] == "file":
            CONTENT[_sha(_item["data"])] = _item["data"]


def model(entries):
    """Entries of a Tree in the tuple form of :data:`EXPECTED`."""
    result = []
    for e in entries:
        content = None
        if e.body is not None:  # a slice of an uncompressed layer or of the tree's bodies file
            with open(e.body, "rb") as handle:
                handle.seek(e.offset or 0)
                content = _sha(handle.read(e.size if e.offset is not None else -1))
        result.append((e.path, e.type, e.mode, e.uid, e.gid, e.rdev, e.xattrs, e.target, content))
    return result


# --------------------------------------------------------------------------- tar layers

def layer_tar(items, mtime=1700000000) -> bytes:
    """One layer as an uncompressed PAX tar (devices only declared in headers)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            info = tarfile.TarInfo(item["name"])
            info.mode = item["mode"]
            info.uid, info.gid = item["uid"], item["gid"]
            info.mtime = mtime
            info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                for k, v in item["xattrs"].items()}
            data = None
            kind = item["type"]
            if kind == "file":
                data = item["data"]
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, item["target"]
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, item["target"]
            elif kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = item["rdev"]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def raw_tar(members) -> bytes:
    """A tar of ``(TarInfo, data)`` pairs, for hostile layers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
         "tar": "application/vnd.oci.image.layer.v1.tar"}


def _put_blob(root, data: bytes) -> dict:
    digest = "sha256:" + _sha(data)
    path = os.path.join(root, "blobs", "sha256")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, digest[7:]), "wb") as out:
        out.write(data)
    return {"digest": digest, "size": len(data)}


def write_oci(root, layers=None, compressions=("gzip", "zstd", "tar"), blobs=None, nested=False, mtime=1700000000):
    """An OCI image layout at ``root``; return the layer digests.

    ``blobs`` (raw layer bytes, already compressed as ``compressions`` says)
    overrides the layers, for damaged input. ``nested`` puts an index with
    several platforms (and an attestation) between index.json and the manifest.
    """
    layers = LAYERS if layers is None else layers
    os.makedirs(root, exist_ok=True)
    tars = [layer_tar(items, mtime) for items in layers]
    raws = blobs if blobs is not None else [compress(t, c) for t, c in zip(tars, compressions)]
    diff_ids = ["sha256:" + _sha(t) for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_desc = dict(_put_blob(root, config), mediaType="application/vnd.oci.image.config.v1+json")
    layer_descs = [dict(_put_blob(root, raw), mediaType=MEDIA[how]) for raw, how in zip(raws, compressions)]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_desc, "layers": layer_descs}).encode()
    manifest_desc = dict(_put_blob(root, manifest), mediaType="application/vnd.oci.image.manifest.v1+json")
    if nested:
        # An arm64 manifest (with a layer that is never read) and an attestation before amd64.
        other = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "config": config_desc, "layers": []}).encode()
        other_desc = dict(_put_blob(root, other), mediaType="application/vnd.oci.image.manifest.v1+json")
        inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            dict(other_desc, platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            dict(other_desc, platform={"os": "unknown", "architecture": "unknown"},
                 annotations={"vnd.docker.reference.type": "attestation-manifest"}),
            dict(manifest_desc, platform={"os": "linux", "architecture": "amd64"}),
        ]}
        inner_desc = dict(_put_blob(root, json.dumps(inner).encode()),
                          mediaType="application/vnd.oci.image.index.v1+json")
        index = {"schemaVersion": 2, "manifests": [inner_desc]}
    else:
        index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    with open(os.path.join(root, "index.json"), "w") as out:
        json.dump(index, out)
    with open(os.path.join(root, "oci-layout"), "w") as out:
        json.dump({"imageLayoutVersion": "1.0.0"}, out)
    return [d["digest"] for d in layer_descs]


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1700000000
    tar.addfile(info, io.BytesIO(data))


def write_docker_save(path, style="old", layers=None):
    """A ``docker save`` tarball: ``old`` (``<id>/layer.tar``) or ``new``
    (Docker 25+: blobs of an OCI layout inside, plus manifest.json)."""
    layers = LAYERS if layers is None else layers
    tars = [layer_tar(items) for items in layers]
    diff_ids = ["sha256:" + _sha(t) for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        if style == "old":
            names = []
            for number, data in enumerate(tars):
                layer_id = _sha(f"layer{number}".encode())
                _tar_add(tar, f"{layer_id}/VERSION", b"1.0")
                _tar_add(tar, f"{layer_id}/layer.tar", data)
                names.append(f"{layer_id}/layer.tar")
            config_name = _sha(config) + ".json"
            _tar_add(tar, config_name, config)
        else:
            names = []
            for data in tars:
                _tar_add(tar, f"blobs/sha256/{_sha(data)}", data)
                names.append(f"blobs/sha256/{_sha(data)}")
            config_name = f"blobs/sha256/{_sha(config)}"
            _tar_add(tar, config_name, config)
            manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                              "digest": "sha256:" + _sha(config), "size": len(config)},
                                   "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                               "digest": "sha256:" + _sha(t), "size": len(t)} for t in tars]}).encode()
            _tar_add(tar, f"blobs/sha256/{_sha(manifest)}", manifest)
            _tar_add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + _sha(manifest),
                 "size": len(manifest)}]}).encode())
            _tar_add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _tar_add(tar, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": ["test:latest"],
                                                    "Layers": names}]).encode())
    return path


def write_overlay2(root, layers=None, real_whiteouts=False):
    """Docker overlay2 storage below ``root``; return the top layer's directory.

    Each ``diff/`` holds what its layer changes, as Docker leaves it: parent
    directories copied up with their metadata, a hard link to a lower file
    copied up with its target. Ownership is applied only when running as
    root. With ``real_whiteouts`` (root only) whiteouts are 0:0 character
    devices and the opaque directory carries ``trusted.overlay.opaque``;
    otherwise ``.wh.`` files stay as they are. Character and block devices are
    left out (see the module doc).
    """
    layers = LAYERS if layers is None else layers
    is_root = os.geteuid() == 0
    os.makedirs(os.path.join(root, "l"), exist_ok=True)
    known = {}  # name -> latest item of any layer so far
    shorts = []
    top = None

    def meta(path, item):
        if is_root:
            os.chown(path, item["uid"], item["gid"], follow_symlinks=False)
        if item["type"] != "symlink":
            os.chmod(path, item["mode"])
        for name, value in item["xattrs"].items():  # last: chown drops security.capability
            if is_root or name.startswith("user."):
                os.setxattr(path, name, value, follow_symlinks=False)

    for number, items in enumerate(layers):
        layer_id = _sha(f"overlay{number}".encode())
        short = f"SHORT{number:02d}ABCDEFGHIJKLMNOPQR"
        top = os.path.join(root, layer_id)
        diff = os.path.join(top, "diff")
        os.makedirs(diff)
        os.symlink(f"../{layer_id}/diff", os.path.join(root, "l", short))
        with open(os.path.join(top, "link"), "w") as out:
            out.write(short)
        if shorts:
            with open(os.path.join(top, "lower"), "w") as out:
                out.write(":".join(f"l/{s}" for s in reversed(shorts)))
        shorts.append(short)
        own = {item["name"].rstrip("/"): item for item in items}
        dirs = set()
        for name, item in own.items():
            parts = name.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            if item["type"] == "dir" and name not in (".", ""):
                dirs.add(name)
        for name in sorted(dirs):
            os.makedirs(os.path.join(diff, name), exist_ok=True)
        for name, item in own.items():
            path = os.path.join(diff, name)
            kind = item["type"]
            base = os.path.basename(name)
            if real_whiteouts and base == ".wh..wh..opq":
                os.setxattr(os.path.dirname(path), "trusted.overlay.opaque", b"y")
            elif real_whiteouts and base.startswith(".wh."):
                os.mknod(os.path.join(os.path.dirname(path), base[4:]), stat.S_IFCHR | 0o600, os.makedev(0, 0))
            elif kind == "file":
                with open(path, "wb") as out:
                    out.write(item["data"])
                meta(path, item)
            elif kind == "symlink":
                os.symlink(item["target"], path)
                meta(path, item)
            elif kind == "hardlink":
                source = os.path.join(diff, item["target"])
                if not os.path.lexists(source):  # copy-up of a lower file
                    lower = known[item["target"]]
                    with open(source, "wb") as out:
                        out.write(lower["data"])
                    meta(source, lower)
                os.link(source, path)
            elif kind == "fifo":
                os.mkfifo(path)
                meta(path, item)
        for name in sorted(dirs, reverse=True):
            meta(os.path.join(diff, name), own.get(name) or known.get(name) or D(name))
        if "." in own or "./" in own or "" in own:
            meta(diff, own.get(".") or own.get(""))
        known.update(own)
    return top


def expected_overlay2():
    """:data:`EXPECTED` without the device nodes the overlay2 writer leaves out."""
    return [e for e in EXPECTED if e[1] not in ("char", "block")]
