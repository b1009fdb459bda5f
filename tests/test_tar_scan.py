"""Uncompressed layers are read in place: tdx_rules.rootfs.tarscan.scan_tar against the
standard library's tarfile (the reference reader), and bodies left in the blob."""

import io
import os
import tarfile
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.rootfs import ext4
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.layers import _tar_member
from tdx_rules.rootfs.tarscan import scan_tar
from tdx_rules.rootfs.tree import apply_layers
from tests import oci_fixtures as fx
from tests.conftest import fuzz_examples

NAMES = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40)
PATHS = st.lists(NAMES, min_size=1, max_size=9).map("/".join)  # up to ~370 characters: prefix, L and pax paths
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                         tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
MEMBER = st.tuples(PATHS, KINDS, st.integers(0, 0o7777), st.integers(0, 1 << 24), st.integers(0, 5000),
                   st.binary(max_size=3000), st.dictionaries(st.sampled_from(["user.a", "security.capability"]),
                                                             st.binary(max_size=40), max_size=2),
                   st.booleans())


def reference(data):
    """(Member, data offset) of every member as tarfile reads it."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", errors="surrogateescape") as tar:
        return [(_tar_member(info), info.offset_data) for info in tar]


# The model type of each tar type the strategy writes.
WRITTEN_TYPE = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def round_trips(members, data) -> bool:
    """Whether tarfile reads back the types it wrote. It does not, for one, when an old-style
    ('\\0') file's 100-byte header name is cut just after a '/': the header then reads as a
    directory, its body as a damaged header, where tarfile silently stops."""
    return [member.type for member, _ in reference(data)] == [WRITTEN_TYPE[kind] for _, kind, *_ in members]


def archive(members, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tar:
        for name, kind, mode, uid, gid, body, xattrs, slash in members:
            info = tarfile.TarInfo(name + ("/" if slash and kind == tarfile.DIRTYPE else ""))
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = name[::-1]
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = gid % 4096, uid % 2000000
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("latin-1") for k, v in xattrs.items()}
            if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                tar.addfile(info)
    return buf.getvalue()


@settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MEMBER, max_size=6), st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
# Found by this test: a GNU long name whose 100-byte header name ends in '/' (see round_trips).
@example(members=[("0", tarfile.REGTYPE, 0, 0, 0, b"", {}, False),
                  ("a" * 99 + "/" + "b" * 20, tarfile.AREGTYPE, 0, 0, 0, b"\x01", {}, False)], fmt=tarfile.GNU_FORMAT)
def test_scan_agrees_with_tarfile_or_leaves_the_archive_to_it(tmp_path_factory, members, fmt):
    try:
        data = archive(members, fmt)
    except ValueError:
        return  # a name or number this format cannot hold: tarfile refuses to write it
    path = tmp_path_factory.mktemp("scan") / "layer.tar"
    path.write_bytes(b"PREFIX" + data)
    with open(path, "rb") as handle:
        scanned = scan_tar(handle.fileno(), 6, len(data))
    if scanned is None:  # left to tarfile: only for what the scanner does not read itself
        assert (fmt == tarfile.GNU_FORMAT and any(uid >= 0o7777777 or gid >= 0o7777777
                                                  for _, _, _, uid, gid, *_ in members)) or not round_trips(members, data)
        return
    assert scanned == reference(data)


def test_pax_global_headers_and_damaged_headers():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"uid": "4242", "SCHILY.xattr.user.g": "global"}) as tar:
        info = tarfile.TarInfo("a")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        scanned = scan_tar(handle.fileno(), 0, len(data))
        assert scanned == reference(data) and scanned[0][0].uid == 4242
        assert scanned[0][0].xattrs == {"user.g": b"global"}
        damaged = bytearray(data)
        damaged[1024 + 10] ^= 0xFF  # the member's header, not its checksum
        handle.seek(0)
        handle.write(damaged)
        handle.flush()
        assert scan_tar(handle.fileno(), 0, len(data)) is None  # tarfile then reports the damage
        assert scan_tar(handle.fileno(), 0, 1536) is None  # no end-of-archive block


def test_uncompressed_layer_bodies_stay_in_the_blob(tmp_path):
    """Plain tar layers are not unpacked: every body is a slice of its blob (its
    bytes checked against the fixture by fx.model); the tree's store stays empty."""
    fx.write_oci(tmp_path / "image", compressions=("tar", "tar", "tar"))
    with apply_layers(open_image(tmp_path / "image")) as tree:
        files = [e for e in tree.entries() if e.type == "file"]
        assert files and all(e.offset is not None and "/blobs/sha256/" in e.body for e in files)
        assert fx.model(tree.entries()) == fx.EXPECTED
        stored = [name for _, _, names in os.walk(tree.store) for name in names]
        assert stored == []


def _tamper_a_body(image):
    """Flip one byte inside a file body of a plain layer blob: headers stay valid, the digest does not."""
    blobs = image / "blobs" / "sha256"
    for blob in sorted(blobs.iterdir()):
        data = blob.read_bytes()
        if data[257:262] != b"ustar":
            continue
        with open(blob, "rb") as handle:
            scanned = scan_tar(handle.fileno(), 0, len(data))
        body = next(((offset, member.size) for member, offset in scanned if member.type == "file" and member.size),
                    None)
        if body:
            damaged = bytearray(data)
            damaged[body[0]] ^= 0x01
            blob.write_bytes(bytes(damaged))
            return "sha256:" + blob.name
    raise AssertionError("no plain layer with a file body in the fixture")


def test_a_tampered_plain_layer_is_refused_before_anything_is_published(tmp_path):
    fx.write_oci(tmp_path / "image", compressions=("tar", "tar", "tar"))
    digest = _tamper_a_body(tmp_path / "image")
    with pytest.raises(TdxError, match=f"layer {digest}: content has digest"):
        apply_layers(open_image(tmp_path / "image"))  # checked before the first member
    agent = tmp_path / "agent"
    agent.write_bytes(b"#!/bin/sh\n")
    out = tmp_path / "out" / "rootfs.ext4"
    with apply_layers(open_image(tmp_path / "image"), defer_checks=True) as tree:
        assert tree.pending  # the check still runs while the image is written
        with pytest.raises(TdxError, match=f"layer {digest}: content has digest"):
            ext4.build_ext4(tree, agent, out=out)
    assert os.listdir(out.parent) == []  # neither the image nor its temporary file
