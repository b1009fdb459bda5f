"""Compressed layers, decompressed in a thread of their own while their headers are read
(tdx_rules.rootfs.decompress, tdx_rules.rootfs.layers): fixtures made by the real tools
(GNU gzip, the zstd CLI), multi-member streams, damaged and tampered layers refused with
one line and nothing left behind, and the same image whatever the layer's compression."""

import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import tracemalloc

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.fsutil import CHUNK
from tdx_rules.rootfs import ext4
from tdx_rules.rootfs.decompress import QUEUE_DEPTH, Decompressor
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.tree import apply_layers
from tdx_rules.stages.rootfs import build_rootfs
from tests import oci_fixtures as fx

pytestmark = pytest.mark.skipif(not (shutil.which("gzip") and shutil.which("zstd")), reason="needs gzip and zstd")

# The fixture's three layers; the first also with two bodies that span many chunks of the decompressor.
TEXT = b"".join(b"line %d of a configuration file\n" % i for i in range(150000))
BINARY = b"".join(fx.BIG[i:] + fx.BIG[:i] for i in range(0, 160000, 16000))  # 3.2 MB, poorly compressible
LAYERS = [fx.LAYERS[0] + [fx.F("usr/share/text.txt", TEXT), fx.F("usr/lib/blob.bin", BINARY)],
          fx.LAYERS[1], fx.LAYERS[2]]


def gnu_gzip(data: bytes, *flags: str) -> bytes:
    return subprocess.run(["gzip", "-c", *flags], input=data, capture_output=True, check=True).stdout


def zstd_cli(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def pieces(data: bytes, count: int):
    """``data`` cut into ``count`` pieces at offsets that are not tar block boundaries."""
    cuts = [0] + [len(data) * i // count + 7 for i in range(1, count)] + [len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def go_style_member(data: bytes) -> bytes:
    """A gzip member with the header fields Go's compress/gzip writes when a Header is set
    (FEXTRA, FNAME, FCOMMENT; OS 255 'unknown'; XFL 0) around GNU gzip's deflate data."""
    member = gnu_gzip(data, "-n")
    assert member[3] == 0  # no optional fields: the deflate data starts at byte 10
    extra = b"TD\x04\x00tdx!"  # one extra subfield: id 'TD', 4 bytes
    header = (b"\x1f\x8b\x08\x1c" + member[4:8] + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
              + b"layer.tar\0" + b"written member by member\0")
    return header + member[10:]


def tars(layers=LAYERS):
    return [fx.layer_tar(items) for items in layers]


def write_image(root, blobs, compressions, layers=LAYERS):
    return fx.write_oci(root, layers=layers, compressions=compressions, blobs=blobs)


def tree_model(image, tmp_path):
    with apply_layers(open_image(image), tmp_path / "staging") as tree:
        return fx.model(tree.entries())


def expected_model(tmp_path):
    write_image(tmp_path / "plain", tars(), ("tar",) * 3)
    return tree_model(tmp_path / "plain", tmp_path)


def test_multi_member_gzip_layers_read_as_gzip_reads_them(tmp_path):
    """Members cut anywhere in the tar: by GNU gzip (one invocation per piece; also with NUL
    padding between members, which Python's gzip module skips, as the layer reader always
    did), by Go-style writers (optional header fields), and zstd frames one after another."""
    first, second, third = tars()
    gnu = b"".join(gnu_gzip(piece, "-1") for piece in pieces(first, 5))
    assert subprocess.run(["gzip", "-dc"], input=gnu, capture_output=True, check=True).stdout == first
    padded = gnu_gzip(second[:3000]) + b"\0" * 1000 + gnu_gzip(second[3000:], "-9") + b"\0" * 512
    go_style = b"".join(go_style_member(piece) for piece in pieces(third, 3))
    write_image(tmp_path / "multi", [gnu, padded, go_style], ("gzip",) * 3)
    assert tree_model(tmp_path / "multi", tmp_path) == expected_model(tmp_path)
    frames = b"".join(zstd_cli(piece) for piece in pieces(first, 4))
    write_image(tmp_path / "frames", [frames, zstd_cli(second), zstd_cli(third)], ("zstd",) * 3)
    assert tree_model(tmp_path / "frames", tmp_path) == expected_model(tmp_path)


def test_bodies_of_a_compressed_layer_are_slices_of_its_uncompressed_tar(tmp_path):
    first, second, third = tars()
    write_image(tmp_path / "image", [gnu_gzip(first), zstd_cli(second), gnu_gzip(third)], ("gzip", "zstd", "gzip"))
    with apply_layers(open_image(tmp_path / "image"), tmp_path / "staging") as tree:
        text = tree.get("/usr/share/text.txt")
        assert os.path.basename(text.body) == "layer1.tar" and os.path.getsize(text.body) == len(first)
        assert first[text.offset:text.offset + text.size] == TEXT
        assert sorted(os.listdir(tree.store)) == ["layer1.tar", "layer2.tar", "layer3.tar"]
        for name in os.listdir(tree.store):
            assert os.stat(os.path.join(tree.store, name)).st_mode & 0o777 == 0o600


def _refused(tmp_path, image, message):
    """apply_layers and the rootfs stage both refuse ``image`` with one line naming
    ``message``; neither leaves anything behind (staging, image, cache entry) or a thread."""
    threads = threading.active_count()
    with pytest.raises(TdxError, match=message) as err:
        apply_layers(open_image(image), tmp_path / "staging")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "staging").exists()
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent")
    out, cache = tmp_path / "out" / "rootfs.ext4", tmp_path / "cache"
    out.parent.mkdir(exist_ok=True)
    config = {"agent_path": "/sbin/vm-agent", "size": "auto", "epoch": 0}
    with pytest.raises(TdxError, match=message) as err:
        build_rootfs(str(image), str(agent), config, str(out), str(cache), log=lambda line: None)
    assert "\n" not in str(err.value)
    assert os.listdir(out.parent) == []
    assert not [name for name in os.listdir(cache / "rootfs") if not name.endswith(".lock")]
    assert threading.active_count() == threads  # the decompressor thread stopped
    return str(err.value)


def test_gzip_layer_whose_tar_is_not_its_diff_id_is_refused(tmp_path):
    """The blob matches the manifest, the tar inside it does not match the config's diff_id:
    one body byte differs, every header is valid."""
    first, second, third = tars()
    at = first.index(TEXT[:4096]) + 100
    tampered = first[:at] + bytes([first[at] ^ 1]) + first[at + 1:]
    (digest, _, _) = write_image(tmp_path / "image", [gnu_gzip(tampered), gnu_gzip(second), gnu_gzip(third)],
                                 ("gzip",) * 3)
    message = _refused(tmp_path, tmp_path / "image", f"layer {digest}: uncompressed content has digest sha256:")
    assert "not the diff_id" in message


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_blob_that_is_not_the_manifests_digest_is_refused(tmp_path, how):
    """Bytes appended to a blob that leave its tar unchanged: an empty gzip member, a zstd
    skippable frame (both read as part of the stream)."""
    first, second, third = tars()
    compress = gnu_gzip if how == "gzip" else zstd_cli
    (digest, _, _) = write_image(tmp_path / "image", [compress(t) for t in (first, second, third)], (how,) * 3)
    blob = tmp_path / "image" / "blobs" / "sha256" / digest[7:]
    appended = gnu_gzip(b"") if how == "gzip" else b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"tdx!"
    blob.write_bytes(blob.read_bytes() + appended)
    _refused(tmp_path, tmp_path / "image", f"layer {digest}: content has digest sha256:.* not the one the manifest")


@pytest.mark.parametrize("cut", ["in-the-deflate-data", "in-the-trailer", "in-the-second-members-header",
                                 "crc-flipped", "length-flipped"])
def test_damaged_gnu_gzip_layer_is_refused(tmp_path, cut):
    first, second, third = tars()
    one, two = gnu_gzip(first[:20000]), gnu_gzip(first[20000:])
    blob = {"in-the-deflate-data": one + two[:len(two) // 2],
            "in-the-trailer": one + two[:-3],
            "in-the-second-members-header": one + two[:5],
            "crc-flipped": one + two[:-8] + bytes([two[-8] ^ 1]) + two[-7:],
            "length-flipped": one + two[:-4] + bytes([two[-4] ^ 1]) + two[-3:]}[cut]
    (digest, _, _) = write_image(tmp_path / "image", [blob, gnu_gzip(second), gnu_gzip(third)], ("gzip",) * 3)
    message = _refused(tmp_path, tmp_path / "image", f"layer {digest}: corrupt or truncated")
    if cut == "crc-flipped":
        assert "CRC check failed" in message


def test_truncated_zstd_layer_is_refused(tmp_path):
    first, second, third = tars()
    blob = zstd_cli(first)
    (digest, _, _) = write_image(tmp_path / "image", [blob[:len(blob) - 10], zstd_cli(second), zstd_cli(third)],
                                 ("zstd",) * 3)
    _refused(tmp_path, tmp_path / "image", f"layer {digest}: corrupt or truncated")


def test_same_image_from_the_layers_plain_gzip_and_zstd(tmp_path):
    """Byte-identical ext4 images from the same tars stored plain, GNU gzip (-1 and -9, one
    member and many) and zstd."""
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF agent " * 100)
    first, second, third = tars()
    stored = {
        "tar": ([first, second, third], ("tar",) * 3),
        "gzip": ([gnu_gzip(t, "-9") for t in (first, second, third)], ("gzip",) * 3),
        "gzip-members": ([b"".join(gnu_gzip(p, "-1") for p in pieces(t, 3)) for t in (first, second, third)],
                         ("gzip",) * 3),
        "zstd": ([zstd_cli(t) for t in (first, second, third)], ("zstd",) * 3),
        "mixed": ([zstd_cli(first), second, gnu_gzip(third)], ("zstd", "tar", "gzip")),
    }
    images = {}
    for name, (blobs, compressions) in stored.items():
        write_image(tmp_path / name, blobs, compressions)
        with apply_layers(open_image(tmp_path / name), tmp_path / "staging", defer_checks=True) as tree:
            out = tmp_path / f"{name}.ext4"
            ext4.build_ext4(tree, agent, out=out, size="64M")
        images[name] = out.read_bytes()
    assert len(images["tar"]) == 64 << 20
    assert {name for name, data in images.items() if data != images["tar"]} == set()


def test_layer_members_without_a_spool_leave_nothing_behind(tmp_path, monkeypatch):
    """Read outside a tree (as the rootfs stage's cache key does for layers without a digest),
    a compressed layer is spooled to a temporary file that goes when the iteration ends."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    first, second, third = tars()
    write_image(tmp_path / "image", [gnu_gzip(first), gnu_gzip(second), gnu_gzip(third)], ("gzip",) * 3)
    layer = open_image(tmp_path / "image")[0]
    bodies = {member.name: reader.read() for member, reader in layer.members() if reader is not None}
    assert bodies["usr/share/text.txt"] == TEXT and bodies["usr/lib/blob.bin"] == BINARY
    assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tar"), reason="needs root (chown) and GNU tar")
@pytest.mark.parametrize("how", ["gzip", "plain-in-place-checks-deferred"])
def test_layer_partly_left_to_tarfile(tmp_path, how):
    """GNU tar's base-256 owner (uid 3000000) and sparse member, in the middle of a layer
    (gzip, or plain and read in place while its digest check runs on): the members before
    them come from the streaming scan, the rest from tarfile over the complete tar; each
    member once, with its owner and bytes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-first.txt").write_bytes(TEXT[:5000])
    (src / "m-owned.txt").write_bytes(b"owned by a large uid\n")
    os.chown(src / "m-owned.txt", 3000000, 3000001)
    with open(src / "s-sparse.bin", "wb") as out:
        out.truncate(1 << 20)
        out.seek(700000)
        out.write(b"the only data")
    (src / "z-last.txt").write_bytes(BINARY[:9000])
    layer = subprocess.run(["tar", "--format=gnu", "--sparse", "--numeric-owner", "--sort=name", "-C", str(src),
                            "-cf", "-", "."], capture_output=True, check=True).stdout
    assert b"\x80" in layer  # a base-256 number: the scanner leaves the archive to tarfile there
    items = [fx.D("./")]  # the layer's diff_id is of GNU tar's bytes, not of a fixture's
    gzip = how == "gzip"
    write_image(tmp_path / "image", [gnu_gzip(layer) if gzip else layer], ("gzip" if gzip else "tar",),
                layers=[items])
    layers = open_image(tmp_path / "image")
    layers[0].diff_id = None if gzip else layers[0].blob_digest
    checks = None if gzip else []
    names = [member.name for member, _ in layers[0].members(checks)]
    assert names == [".", "./a-first.txt", "./m-owned.txt", "./s-sparse.bin", "./z-last.txt"]
    assert checks in (None, [])  # the digest check was finished where tarfile took over
    with apply_layers(layers, tmp_path / "staging", defer_checks=not gzip) as tree:
        tree.verify()
        files = {e.path: e for e in tree.entries() if e.type == "file"}
        assert sorted(files) == ["/a-first.txt", "/m-owned.txt", "/s-sparse.bin", "/z-last.txt"]

        def content(entry):
            with open(entry.body, "rb") as handle:
                handle.seek(entry.offset)
                return handle.read(entry.size)
        assert content(files["/a-first.txt"]) == TEXT[:5000]
        assert (files["/m-owned.txt"].uid, files["/m-owned.txt"].gid) == (3000000, 3000001)
        assert content(files["/m-owned.txt"]) == b"owned by a large uid\n"
        assert content(files["/s-sparse.bin"]) == bytes(700000) + b"the only data" + bytes((1 << 20) - 700013)
        assert content(files["/z-last.txt"]) == BINARY[:9000]


def test_the_decompressor_runs_only_a_few_chunks_ahead(tmp_path):
    """A consumer that stops reading holds up the decompressor: memory stays at a few chunks
    however large the output (here 64 MiB of zeros from a 64 KB gzip)."""
    blob = tmp_path / "zeros.gz"
    blob.write_bytes(gnu_gzip(bytes(64 << 20)))
    tracemalloc.start()
    try:
        decompressor = Decompressor(lambda: open(blob, "rb"), "zeros.gz")
        decompressor.start()
        assert decompressor.next_chunk() == bytes(CHUNK)
        time.sleep(1.0)  # long enough to inflate all of it, were it allowed to
        _, peak = tracemalloc.get_traced_memory()
        decompressor.stop()
    finally:
        tracemalloc.stop()
    assert peak < (QUEUE_DEPTH + 4) * CHUNK, peak
    assert not decompressor.is_alive()
