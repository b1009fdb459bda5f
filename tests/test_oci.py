"""tdx_rules.rootfs (formats, layers, tree): OCI layouts, docker save tarballs and overlay2 directories
applied to the same model; hostile and damaged layers refused."""

import gzip
import io
import json
import os
import pathlib
import shutil
import stat
import tarfile
import tracemalloc

import pytest
import zstandard

from tdx_rules.errors import TdxError
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.tree import apply_layers
from tests import oci_fixtures as fx

IS_ROOT = os.geteuid() == 0


def applied(path, tmp_path, **kw):
    staging = tmp_path / "staging"
    with apply_layers(open_image(path, **kw), staging) as tree:
        got = fx.model(tree.entries())
        assert_staging_safe(staging)
    assert not staging.exists()
    return got


def assert_staging_safe(staging):
    """Only plain files (0600) and directories (0700) below the staging directory."""
    for root, dirs, files in os.walk(staging):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o700, name
            else:
                assert stat.S_ISREG(st.st_mode), name
                assert stat.S_IMODE(st.st_mode) == 0o600, name


def listing(path):
    """Every path below ``path`` (for "nothing written outside" checks)."""
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, dirs, files in os.walk(path) for name in dirs + files)


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("compressions", [("gzip", "zstd", "tar"), ("zstd", "gzip", "gzip")])
def test_oci_layout(tmp_path, compressions):
    fx.write_oci(tmp_path / "image", compressions=compressions)
    assert applied(tmp_path / "image", tmp_path) == fx.EXPECTED


def test_oci_nested_index_picks_linux_amd64(tmp_path):
    fx.write_oci(tmp_path / "image", nested=True)
    layers = open_image(tmp_path / "image")
    assert len(layers) == 3 and layers[0].media_type.endswith("+gzip")
    assert applied(tmp_path / "image", tmp_path) == fx.EXPECTED
    with pytest.raises(TdxError, match=r"no linux/s390x image.*found: linux/amd64, linux/arm64"):
        open_image(tmp_path / "image", platform="linux/s390x")


@pytest.mark.parametrize("style", ["old", "new"])
def test_docker_save(tmp_path, style):
    path = fx.write_docker_save(tmp_path / "image.tar", style)
    layers = open_image(path)
    assert all(layer.digest.startswith("sha256:") for layer in layers)
    assert applied(path, tmp_path) == fx.EXPECTED


def test_oci_archive_tarball(tmp_path):
    """An OCI layout packed in a tar (skopeo's oci-archive), read in place."""
    fx.write_oci(tmp_path / "image")
    with tarfile.open(tmp_path / "image.tar", "w") as tar:
        tar.add(tmp_path / "image", arcname=".")
    shutil.rmtree(tmp_path / "image")
    assert applied(tmp_path / "image.tar", tmp_path) == fx.EXPECTED


def test_overlay2_with_wh_files(tmp_path):
    top = fx.write_overlay2(tmp_path / "overlay2")
    layers = open_image(top)
    assert len(layers) == 3 and layers[-1].path == os.path.join(top, "diff")
    got = applied(top, tmp_path)
    if IS_ROOT:
        assert got == fx.expected_overlay2()
    else:  # without root the fixture cannot chown or set security.* xattrs
        assert [e[:2] for e in got] == [e[:2] for e in fx.expected_overlay2()]


@pytest.mark.skipif(not IS_ROOT, reason="0:0 character devices and trusted.* xattrs need root")
def test_overlay2_with_char_device_whiteouts_and_opaque_xattr(tmp_path):
    top = fx.write_overlay2(tmp_path / "overlay2", real_whiteouts=True)
    diff2 = open_image(top)[1].path
    assert stat.S_ISCHR(os.lstat(os.path.join(diff2, "etc", "old")).st_mode)
    assert applied(top, tmp_path) == fx.expected_overlay2()


def test_overlay2_lower_order_bottom_first(tmp_path):
    top = fx.write_overlay2(tmp_path / "overlay2")
    layers = open_image(top)
    lower = pathlib.Path(top, "lower").read_text().split(":")
    resolved = [os.path.realpath(os.path.join(tmp_path / "overlay2", item)) for item in lower]
    assert [layer.path for layer in layers[:-1]] == list(reversed(resolved))


def test_overlay2_link_outside_refused(tmp_path):
    top = fx.write_overlay2(tmp_path / "overlay2")
    short = pathlib.Path(top, "lower").read_text().split(":")[0][2:]
    link = tmp_path / "overlay2" / "l" / short
    os.unlink(link)
    os.symlink("../../../etc", link)
    with pytest.raises(TdxError, match="not to a diff/ directory"):
        open_image(top)


def test_empty_layer_and_large_file_streamed(tmp_path):
    """An all-zero tar is an empty layer; a 24 MiB body never sits in memory whole."""
    big = b"\x5a" * (24 << 20)
    empty = b"\0" * 1024
    fx.write_oci(tmp_path / "image", layers=[[fx.F("big", big)], []], compressions=("gzip", "tar"),
                 blobs=[gzip.compress(fx.layer_tar([fx.F("big", big)])), empty])
    layers = open_image(tmp_path / "image")
    layers[1].diff_id = None  # the fixture's diff_id is of tarfile's own (longer) empty tar
    tracemalloc.start()
    try:
        with apply_layers(layers, tmp_path / "staging") as tree:
            _, peak = tracemalloc.get_traced_memory()
            (entry,) = [e for e in tree.entries() if e.path == "/big"]
            assert entry.size == len(big) and os.path.getsize(entry.body) >= entry.offset + len(big)
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_directory_replaces_symlink_without_touching_host(tmp_path):
    """A member below an image symlink shadows it with a directory; the host
    path the symlink names is never written."""
    outside = tmp_path / "outside"
    first = [fx.D("./"), fx.L("evil", str(outside))]
    second = [fx.F("evil/file", b"data")]
    fx.write_oci(tmp_path / "image", layers=[first, second], compressions=("gzip", "gzip"))
    with apply_layers(open_image(tmp_path / "image"), tmp_path / "staging") as tree:
        kinds = {e.path: e.type for e in tree.entries()}
    assert kinds == {"/": "dir", "/evil": "dir", "/evil/file": "file"}
    assert not outside.exists()


def test_same_layer_whiteout_keeps_own_files(tmp_path):
    """OCI: a whiteout hides lower layers only, whatever the member order."""
    first = [fx.D("./"), fx.D("d"), fx.F("d/lower", b"1"), fx.F("f", b"old")]
    second = [fx.F("d/new", b"2"), fx.F(".wh.d"), fx.F("f", b"new"), fx.F(".wh.f")]
    fx.write_oci(tmp_path / "image", layers=[first, second], compressions=("tar", "tar"))
    with apply_layers(open_image(tmp_path / "image"), tmp_path / "staging") as tree:
        assert [(e.path, e.size) for e in tree.entries()] == [("/", 0), ("/d", 0), ("/d/new", 1), ("/f", 3)]


# --------------------------------------------------------------------------- hostile layers

def _info(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


HOSTILE = {
    "dotdot": ([(_info("../evil"), b"x")], "contains '..'"),
    "dotdot-inner": ([(_info("a/../../evil"), b"x")], "contains '..'"),
    "absolute": ([(_info("/etc/evil"), b"x")], "absolute path"),
    "whiteout-dotdot": ([(_info("etc/.wh..."), b"")], "outside the tree"),
    "whiteout-dot": ([(_info(".wh.."), b"")], "outside the tree"),
    "whiteout-parent": ([(_info("../.wh.etc"), b"")], "contains '..'"),
    "hardlink-outside": ([(_info("link", tarfile.LNKTYPE, "../../etc/passwd"), None)], "contains '..'"),
    "hardlink-absolute": ([(_info("link", tarfile.LNKTYPE, "/etc/passwd"), None)], "absolute path"),
    "hardlink-missing": ([(_info("link", tarfile.LNKTYPE, "nothere"), None)], "not in the image"),
    "hardlink-directory": ([(_info("d", tarfile.DIRTYPE), None), (_info("link", tarfile.LNKTYPE, "d"), None)],
                           "a directory"),
    "root-not-dir": ([(_info("./"), b"x")], "root entry"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_refused(tmp_path, case):
    members, message = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    good = fx.layer_tar([fx.D("./"), fx.F("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")])
    blob = fx.raw_tar(members)
    digests = fx.write_oci(work / "image", layers=[[], []], compressions=("gzip", "gzip"),
                           blobs=[gzip.compress(good), gzip.compress(blob)])
    for layer in (layers := open_image(work / "image")):
        layer.diff_id = None
    before = listing(tmp_path)
    with pytest.raises(TdxError, match=message) as err:
        apply_layers(layers, work / "staging")
    assert digests[1] in str(err.value) and "\n" not in str(err.value)
    assert listing(tmp_path) == before  # nothing written outside staging, staging removed


def test_missing_blob_names_digest(tmp_path):
    digests = fx.write_oci(tmp_path / "image")
    os.unlink(tmp_path / "image" / "blobs" / "sha256" / digests[1][7:])
    with pytest.raises(TdxError, match=f"blob {digests[1]} .*missing"):
        open_image(tmp_path / "image")


def test_missing_manifest_blob(tmp_path):
    fx.write_oci(tmp_path / "image")
    manifest = json.loads((tmp_path / "image" / "index.json").read_text())["manifests"][0]["digest"]
    os.unlink(tmp_path / "image" / "blobs" / "sha256" / manifest[7:])
    with pytest.raises(TdxError, match=f"blob {manifest} .*missing"):
        open_image(tmp_path / "image")


def test_digest_mismatch_names_digest(tmp_path):
    digests = fx.write_oci(tmp_path / "image", compressions=("gzip", "gzip", "gzip"))
    other = gzip.compress(fx.layer_tar(fx.LAYERS[1]) + b"\0" * 512)
    with open(tmp_path / "image" / "blobs" / "sha256" / digests[1][7:], "wb") as out:
        out.write(other)
    layers = open_image(tmp_path / "image")
    with pytest.raises(TdxError, match=f"layer {digests[1]}: content has digest sha256:"):
        apply_layers(layers, tmp_path / "staging")
    assert not (tmp_path / "staging").exists()


def test_docker_save_diff_id_mismatch(tmp_path):
    path = fx.write_docker_save(tmp_path / "image.tar", "old")
    data = bytearray(pathlib.Path(path).read_bytes())
    at = data.index(b"tool v1\n")
    data[at:at + 8] = b"tool v9\n"
    pathlib.Path(path).write_bytes(bytes(data))
    layers = open_image(path)
    with pytest.raises(TdxError, match=f"not the diff_id {layers[0].digest}"):
        apply_layers(layers, tmp_path / "staging")


def _damaged(kind):
    tar = fx.layer_tar(fx.LAYERS[0])
    if kind == "gzip-corrupt":
        blob = bytearray(gzip.compress(tar))
        for i in range(len(blob) // 2, len(blob) // 2 + 64):
            blob[i] ^= 0x55
        return bytes(blob), "gzip"
    if kind == "gzip-truncated":
        blob = gzip.compress(tar)
        return blob[:len(blob) * 2 // 3], "gzip"
    if kind == "zstd-truncated":
        blob = zstandard.ZstdCompressor().compress(tar)
        return blob[:len(blob) * 2 // 3], "zstd"
    if kind == "tar-truncated-mid-file":
        return tar[:len(tar) // 2 + 100], "tar"
    if kind == "tar-truncated-at-member":  # cut where a header would start: no end-of-archive block
        at = tar.index(b"usr/lib/big.bin")  # the name field opens that member's header block
        assert at % 512 == 0
        return tar[:at], "tar"
    if kind == "garbage":
        return os.urandom(4096), "tar"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gzip-corrupt", "gzip-truncated", "zstd-truncated", "tar-truncated-mid-file",
                                  "tar-truncated-at-member", "garbage"])
def test_damaged_layer_names_digest(tmp_path, kind):
    blob, how = _damaged(kind)
    (digest,) = fx.write_oci(tmp_path / "image", layers=[fx.LAYERS[0]], compressions=(how,), blobs=[blob])
    layers = open_image(tmp_path / "image")
    with pytest.raises(TdxError, match=f"layer {digest}: corrupt or truncated") as err:
        apply_layers(layers, tmp_path / "staging")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "staging").exists()


def test_unsupported_media_type(tmp_path):
    fx.write_oci(tmp_path / "image", layers=[fx.LAYERS[0]], compressions=("gzip",))
    digest = json.loads((tmp_path / "image" / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((tmp_path / "image" / "blobs" / "sha256" / digest[7:]).read_bytes())
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+encrypted"
    data = json.dumps(manifest).encode()
    digest = fx._put_blob(tmp_path / "image", data)
    with open(tmp_path / "image" / "index.json", "w") as out:
        json.dump({"schemaVersion": 2,
                   "manifests": [dict(digest, mediaType="application/vnd.oci.image.manifest.v1+json")]}, out)
    with pytest.raises(TdxError, match="unsupported media type"):
        open_image(tmp_path / "image")


def test_not_an_image(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(TdxError, match="neither an OCI image layout"):
        open_image(tmp_path / "dir")
    with pytest.raises(TdxError, match="no such image"):
        open_image(tmp_path / "missing")
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(TdxError, match="compressed tarball"):
        open_image(tmp_path / "x.tar.gz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("hello"), io.BytesIO(b""))
    (tmp_path / "plain.tar").write_bytes(buf.getvalue())
    with pytest.raises(TdxError, match="without manifest.json or index.json"):
        open_image(tmp_path / "plain.tar")
