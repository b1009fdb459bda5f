"""Hostile archives for the readers of tars, .debs and OCI layers, built in Python.

Every case of :data:`CASES` is a :class:`Case`; :func:`write_input` lays it
out as the input of one reader:

* ``minirootfs``: a compressed tarball for
  :func:`tdx_rules.stages.busybox.extract_base`;
* ``deb``: a ``.deb`` (ar of ``debian-binary``, ``control.tar.gz`` and
  ``data.tar[.gz|.xz|.zst]``) for :func:`tdx_rules.upstream.debpkg.extract` and
  :meth:`tdx_rules.upstream.debpkg.DebPackage.iter_data`;
* ``oci``: an OCI image layout directory with one layer, for
  :func:`tdx_rules.rootfs.formats.open_image` + :func:`tdx_rules.rootfs.tree.apply_layers`.

Tar-level cases apply to all three; container-level cases only to their
reader. Paths that a hostile archive aims at are given by ``outside``, a
directory the test watches. Nothing here is held in memory whole: the
decompression bomb (a gzip of 1 GiB of zeros, about 1 MiB) is written by
repeating one flushed deflate block.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import struct
import tarfile
import time
import zlib
from typing import Callable, Optional, Tuple

import zstandard

READERS = ("minirootfs", "deb", "oci")

APPLETS = [b"[", b"[[", b"ash", b"cat", b"cp", b"echo", b"ls", b"mkdir", b"mount", b"sh", b"sleep"]
# Just enough of a busybox for extract_base: an ELF magic and the packed applet table.
FAKE_BUSYBOX = b"\x7fELF" + b"\0" * 60 + b"\0".join(APPLETS) + b"\0\0" + b"\0" * 16
BOMB_SIZE = 1 << 30  # bytes of zeros in the decompression bomb's one member


# --------------------------------------------------------------------------- tar building

def _info(name, kind=tarfile.REGTYPE, size=0, linkname="", mode=0o644, devmajor=0, devminor=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = linkname
    info.mode = mode
    info.mtime = 0
    info.uname = info.gname = "root"
    info.devmajor, info.devminor = devmajor, devminor
    return info


def F(name, data=b"", mode=0o644):
    return _info(name, size=len(data), mode=mode), data


def D(name, mode=0o755):
    return _info(name, tarfile.DIRTYPE, mode=mode), None


def S(name, target):
    return _info(name, tarfile.SYMTYPE, linkname=target, mode=0o777), None


def H(name, target):
    return _info(name, tarfile.LNKTYPE, linkname=target), None


def DEV(name, kind, major, minor):
    return _info(name, kind, mode=0o666, devmajor=major, devminor=minor), None


BASE = [D("bin"), F("bin/busybox", FAKE_BUSYBOX, 0o755)]


def tar_bytes(entries, fmt=tarfile.GNU_FORMAT) -> bytes:
    """An uncompressed tar of ``(TarInfo, data)`` entries (names may hold surrogate-escaped bytes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _header(info, fmt=tarfile.GNU_FORMAT) -> bytes:
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def _raw(entries) -> bytes:
    """Headers and padded bodies of ``entries``, without the end-of-archive blocks."""
    out = b""
    for info, data in entries:
        out += _header(info) + (data or b"") + b"\0" * (-len(data or b"") % tarfile.BLOCKSIZE)
    return out


# --------------------------------------------------------------------------- payloads
# A payload is (format, writer): format is "tar" (uncompressed tar, compressed by
# the wrapper with gzip) or "gz"/"xz"/"zst" (a finished stream); writer(fileobj).

def _plain(build: Callable[[str], bytes]):
    return lambda outside: ("tar", lambda f: f.write(build(outside)))


def _compress(fmt: str, data: bytes) -> bytes:
    if fmt == "gz":
        return gzip.compress(data, mtime=0)
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if fmt == "zst":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)  # as the zstd tool writes it
    raise AssertionError(fmt)


def _corrupt(fmt: str):
    def build(outside):
        data = bytearray(_compress(fmt, tar_bytes(BASE + [F("usr/data", os.urandom(200000))])))
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
        return fmt, lambda f: f.write(bytes(data))
    return build


def _truncated(outside):
    data = tar_bytes(BASE + [F("usr/data", os.urandom(100000))])
    return "tar", lambda f: f.write(data[:len(data) - 60000])


def _huge_declared(outside):
    # GNU base-256 size field: 100 GB declared, 1 KiB actually there, no end of archive.
    header = _header(_info("usr/huge", size=100 * 10 ** 9))
    return "tar", lambda f: f.write(_raw(BASE) + header + b"\1" * 1024)


def _pax_dotdot(outside):
    info = _info("innocent", size=4)
    info.pax_headers = {"path": "../pax-evil"}
    return "tar", lambda f: f.write(tar_bytes(BASE + [(info, b"evil")], tarfile.PAX_FORMAT))


def _gnu_longname_dotdot(outside):
    name = "../" + "l" * 120 + "/gnu-evil"
    return "tar", lambda f: f.write(tar_bytes(BASE + [F(name, b"evil")], tarfile.GNU_FORMAT))


def _bomb(outside):
    """gzip of a tar whose member usr/zeros holds BOMB_SIZE zeros (about 1 MiB compressed)."""
    def write(f):
        header = _raw(BASE) + _header(_info("usr/zeros", size=BOMB_SIZE))
        trailer = b"\0" * (2 * tarfile.BLOCKSIZE)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        chunk = bytes(1 << 20)
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, mtime 0
        f.write(compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH))
        crc = zlib.crc32(header)
        block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
        for _ in range(BOMB_SIZE // len(chunk)):
            f.write(block)
            crc = zlib.crc32(chunk, crc)
        f.write(compressor.compress(trailer) + compressor.flush(zlib.Z_FINISH))
        crc = zlib.crc32(trailer, crc)
        total = len(header) + BOMB_SIZE + len(trailer)
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF))
    return "gz", write


# --------------------------------------------------------------------------- cases

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    readers: Tuple[str, ...]
    payload: Optional[Callable] = None  # outside -> (format, writer), for tar-level cases
    special: Optional[Callable] = None  # (path, outside) -> path, for container-level cases
    slow: bool = False


def _tar_case(name, build, **kw):
    return Case(name, READERS, payload=build, **kw)


def _entries_case(name, entries_of, fmt=tarfile.GNU_FORMAT):
    return _tar_case(name, _plain(lambda outside: tar_bytes(BASE + entries_of(outside), fmt)))


# .deb-only cases -------------------------------------------------------------

def _ar(path, members, lie=None):
    """Write an ar archive; ``lie`` = (member index, declared size) falsifies one size field."""
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for index, (name, data) in enumerate(members):
            size = lie[1] if lie and lie[0] == index else len(data)
            out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{size:<10}`\n".encode("ascii"))
            out.write(data + (b"\n" if len(data) % 2 else b""))
    return path


def _control_tar() -> bytes:
    control = b"Package: hostile\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: x\n"
    return gzip.compress(tar_bytes([D("."), F("./control", control)]), mtime=0)


def write_deb(path, data_stream_writer, fmt: str) -> str:
    suffix = {"tar": "", "gz": ".gz", "xz": ".xz", "zst": ".zst"}[fmt]
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for name, data in (("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar())):
            out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode("ascii"))
            out.write(data + (b"\n" if len(data) % 2 else b""))
        start = out.tell()
        out.write(b"\0" * 60)
        data_writer_start = out.tell()
        data_stream_writer(out)
        size = out.tell() - data_writer_start
        if size % 2:
            out.write(b"\n")
        out.seek(start)
        out.write(f"{'data.tar' + suffix:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{size:<10}`\n".encode("ascii"))
    return path


def _deb_no_data(path, outside):
    return _ar(path, [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar())])


def _deb_size_too_big(path, outside):
    data = gzip.compress(tar_bytes(BASE), mtime=0)
    return _ar(path, [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar()), ("data.tar.gz", data)],
               lie=(2, len(data) + 10 ** 9))


def _deb_size_too_small(path, outside):
    data = gzip.compress(tar_bytes(BASE), mtime=0)
    return _ar(path, [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar()), ("data.tar.gz", data)],
               lie=(1, 40))


def _deb_size_not_a_number(path, outside):
    data = gzip.compress(tar_bytes(BASE), mtime=0)
    with open(_ar(path, [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar()),
                         ("data.tar.gz", data)]), "r+b") as handle:
        handle.seek(8 + 48)
        handle.write(b"-1        ")
    return path


# OCI-only cases --------------------------------------------------------------

def _blob(root, data: bytes) -> Tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    directory = os.path.join(root, "blobs", "sha256")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, digest), "wb") as handle:
        handle.write(data)
    return "sha256:" + digest, len(data)


def _blob_from_writer(root, writer) -> Tuple[str, int]:
    directory = os.path.join(root, "blobs", "sha256")
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "tmp")

    class _Hashing:
        def __init__(self, handle):
            self.handle, self.sha, self.size = handle, hashlib.sha256(), 0

        def write(self, data):
            self.sha.update(data)
            self.size += len(data)
            return self.handle.write(data)

    with open(tmp, "wb") as handle:
        hashing = _Hashing(handle)
        writer(hashing)
    os.rename(tmp, os.path.join(directory, hashing.sha.hexdigest()))
    return "sha256:" + hashing.sha.hexdigest(), hashing.size


def write_oci(root, layer_writer, fmt: str, missing_manifest=False, wrong_layer_digest=False) -> str:
    os.makedirs(root)
    with open(os.path.join(root, "oci-layout"), "w") as handle:
        json.dump({"imageLayoutVersion": "1.0.0"}, handle)
    layer_digest, layer_size = _blob_from_writer(root, layer_writer)
    if wrong_layer_digest:
        # A valid layer of the same size, but not the one the digest names.
        path = os.path.join(root, "blobs", "sha256", layer_digest.split(":")[1])
        with open(path, "rb") as handle:
            data = handle.read()
        other = gzip.compress(tar_bytes(BASE + [F("etc/y", b"x" * 1000)]), mtime=0)
        assert other != data
        with open(path, "wb") as handle:
            handle.write(other)
    config_digest, config_size = _blob(root, json.dumps({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode())
    media = "application/vnd.oci.image.layer.v1.tar+zstd" if fmt == "zst" else \
        "application/vnd.oci.image.layer.v1.tar+gzip"
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": media, "digest": layer_digest, "size": layer_size}]}).encode()
    if missing_manifest:
        manifest_digest, manifest_size = "sha256:" + hashlib.sha256(manifest).hexdigest(), len(manifest)
    else:
        manifest_digest, manifest_size = _blob(root, manifest)
    with open(os.path.join(root, "index.json"), "w") as handle:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": manifest_size, "platform": {"os": "linux", "architecture": "amd64"}}]}, handle)
    return root


def _gz_layer(outside, entries):
    data = gzip.compress(tar_bytes(BASE + entries), mtime=0)
    return lambda f: f.write(data)


def _oci_missing_blob(path, outside):
    return write_oci(path, _gz_layer(outside, []), "gz", missing_manifest=True)


def _oci_missing_layer(path, outside):
    write_oci(path, _gz_layer(outside, [F("etc/x", b"x")]), "gz")
    manifest_dir = os.path.join(path, "blobs", "sha256")
    for name in os.listdir(manifest_dir):  # drop the layer blob (the only gzip one)
        with open(os.path.join(manifest_dir, name), "rb") as handle:
            if handle.read(2) == b"\x1f\x8b":
                os.unlink(os.path.join(manifest_dir, name))
    return path


def _oci_digest_mismatch(path, outside):
    return write_oci(path, _gz_layer(outside, [F("etc/x", b"x" * 1000)]), "gz", wrong_layer_digest=True)


def _oci_whiteout_dotdot(path, outside):
    return write_oci(path, _gz_layer(outside, [F("../.wh.x")]), "gz")


def _oci_whiteout_names_dotdot(path, outside):
    return write_oci(path, _gz_layer(outside, [D("etc"), F("etc/.wh..."), F("etc/.wh..")]), "gz")


# --------------------------------------------------------------------------- the corpus

CASES = [
    _entries_case("dotdot_name", lambda o: [F("../evil", b"evil")]),
    _entries_case("absolute_name", lambda o: [F(os.path.join(o, "abs-evil"), b"evil")]),
    _entries_case("dot_slash_dotdot", lambda o: [F("./../dotslash-evil", b"evil")]),
    _entries_case("nested_dotdot", lambda o: [D("lib"), F("lib/../../nested-evil", b"evil")]),
    _entries_case("symlink_absolute_outside", lambda o: [S("lib", o)]),
    _entries_case("symlink_relative_outside", lambda o: [S("lib", "../../../../../../../../" + o.lstrip("/"))]),
    _entries_case("hardlink_relative_outside", lambda o: [H("lib/stolen", "../../outside/victim")]),
    _entries_case("hardlink_absolute_outside", lambda o: [H("lib/stolen", os.path.join(o, "victim"))]),
    _entries_case("hardlink_to_symlink", lambda o: [S("lib", os.path.join(o, "victim")), H("stolen", "lib")]),
    _entries_case("symlink_then_write_through", lambda o: [S("lib", o), F("lib/ld-musl-x86_64.so.1", b"evil")]),
    _entries_case("relsymlink_then_write_through", lambda o: [S("lib", "../../outside"), F("lib/evil", b"evil")]),
    _entries_case("symlink_then_dir_same_name", lambda o: [S("lib", o), D("lib"),
                                                            F("lib/ld-musl-x86_64.so.1", b"loader")]),
    _entries_case("char_device", lambda o: [D("dev"), DEV("dev/null", tarfile.CHRTYPE, 1, 3),
                                            DEV("lib/ld-musl-x86_64.so.1", tarfile.CHRTYPE, 1, 1)]),
    _entries_case("block_device", lambda o: [D("dev"), DEV("dev/sda", tarfile.BLKTYPE, 8, 0)]),
    _entries_case("fifo", lambda o: [D("run"), DEV("run/fifo", tarfile.FIFOTYPE, 0, 0),
                                     DEV("etc/alpine-release", tarfile.FIFOTYPE, 0, 0)]),
    _tar_case("setuid_setgid", _plain(lambda o: tar_bytes([D("bin"), F("bin/busybox", FAKE_BUSYBOX, 0o6755),
                                                           D("etc", 0o2777)]))),
    _entries_case("newline_in_name", lambda o: [D("etc"), F("etc/evil\nname", b"x"), F("etc/\n", b"y")]),
    _entries_case("invalid_utf8_name", lambda o: [D("etc"), F("etc/\udcff\udcfe-bad", b"x")]),
    _tar_case("duplicate_member", _plain(lambda o: tar_bytes(
        BASE + [D("etc"), F("etc/alpine-release", b"first\n"), F("etc/alpine-release", b"second\n")]))),
    _tar_case("huge_declared_size", _huge_declared),
    _tar_case("decompression_bomb", _bomb, slow=True),
    _tar_case("truncated_tar", _truncated),
    _tar_case("corrupt_gzip", _corrupt("gz")),
    _tar_case("corrupt_xz", _corrupt("xz")),
    _tar_case("corrupt_zstd", _corrupt("zst")),
    _tar_case("pax_path_dotdot", _pax_dotdot),
    _tar_case("gnu_longname_dotdot", _gnu_longname_dotdot),
    _tar_case("empty_archive", _plain(lambda o: b"\0" * 10240)),
    _tar_case("zero_bytes", _plain(lambda o: b"")),
    _tar_case("not_a_tar", _plain(lambda o: b"hello, this is not a tar archive\n" * 40)),
    Case("deb_data_tar_missing", ("deb",), special=_deb_no_data),
    Case("deb_ar_size_too_big", ("deb",), special=_deb_size_too_big),
    Case("deb_ar_size_too_small", ("deb",), special=_deb_size_too_small),
    Case("deb_ar_size_negative", ("deb",), special=_deb_size_not_a_number),
    Case("oci_index_points_to_missing_blob", ("oci",), special=_oci_missing_blob),
    Case("oci_layer_blob_missing", ("oci",), special=_oci_missing_layer),
    Case("oci_layer_digest_mismatch", ("oci",), special=_oci_digest_mismatch),
    Case("oci_whiteout_dotdot_path", ("oci",), special=_oci_whiteout_dotdot),
    Case("oci_whiteout_names_dotdot", ("oci",), special=_oci_whiteout_names_dotdot),
]
BY_NAME = {case.name: case for case in CASES}


def write_input(case: Case, reader: str, workdir: str, outside: str) -> str:
    """Lay ``case`` out in ``workdir`` as the input of ``reader``; return its path."""
    os.makedirs(workdir, exist_ok=True)
    ext = {"minirootfs": "minirootfs.tar.gz", "deb": "hostile.deb", "oci": "oci-layout-dir"}[reader]
    path = os.path.join(workdir, f"{case.name}.{ext}")
    if case.special is not None:
        return case.special(path, outside)
    fmt, writer = case.payload(outside)
    if fmt == "tar":  # uncompressed tar: every reader gets it gzip-compressed
        raw = io.BytesIO()
        writer(raw)
        data = gzip.compress(raw.getvalue(), mtime=0)
        fmt, writer = "gz", (lambda f: f.write(data))
    if reader == "minirootfs":
        with open(path, "wb") as handle:
            writer(handle)
        return path
    if reader == "deb":
        return write_deb(path, writer, fmt)
    return write_oci(path, writer, fmt)


if __name__ == "__main__":  # python -m tests.hostile_corpus DIR: write every input, for a look
    import sys
    target = sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus"
    outside = os.path.abspath(os.path.join(target, "outside"))
    for case in CASES:
        for reader in case.readers:
            started = time.monotonic()
            write_input(case, reader, os.path.join(target, reader), outside)
            print(f"{case.name:40} {reader:10} {time.monotonic() - started:.2f}s")
