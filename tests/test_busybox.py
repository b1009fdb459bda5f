"""Stages 2 and 3: the minirootfs and the busybox base fragment."""

import io
import subprocess
import tarfile

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.initramfs import newc
from tdx_rules.stages import busybox, minirootfs
from tests import debian


def test_applet_table_matches_what_busybox_itself_lists():
    listed = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert busybox.applet_names("/bin/busybox") == sorted(listed)


def test_non_busybox_binary_is_refused(tmp_path):
    with pytest.raises(TdxError, match="applet table"):
        busybox.applet_names("/bin/true")


@pytest.fixture(scope="module")
def debian_minirootfs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mr") / "minirootfs.tar.gz"
    minirootfs.compose_debian(debian.package("busybox-static"), debian.package("musl"), str(out))
    return out


def test_debian_minirootfs_has_the_alpine_layout_and_is_reproducible(debian_minirootfs, tmp_path):
    again = tmp_path / "again.tar.gz"
    minirootfs.compose_debian(debian.package("busybox-static"), debian.package("musl"), str(again))
    assert again.read_bytes() == debian_minirootfs.read_bytes()
    listing = subprocess.run(["tar", "-tvzf", str(debian_minirootfs)], capture_output=True, text=True, check=True).stdout
    assert "bin/busybox" in listing and "lib/ld-musl-x86_64.so.1" in listing
    assert "lib/libc.musl-x86_64.so.1 -> ld-musl-x86_64.so.1" in listing


def test_base_fragment_has_busybox_loader_and_applet_links(debian_minirootfs, tmp_path):
    frag = tmp_path / "base.frag"
    busybox.extract_base(str(debian_minirootfs), str(frag))
    entries = {e.name: e for e in newc.read_entries(frag)}
    assert newc.read_body(entries["bin/sh"]) == b"busybox"
    assert newc.read_body(entries["bin/modprobe"]) == b"busybox"
    assert entries["bin/busybox"].mode & 0o777 == 0o755
    unpacked = tmp_path / "deb"
    subprocess.run(["dpkg-deb", "-x", debian.package("busybox-static"), str(unpacked)], check=True)
    assert newc.read_body(entries["bin/busybox"]) == (unpacked / "bin" / "busybox").read_bytes()
    assert "lib/ld-musl-x86_64.so.1" in entries


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "bin/../../x"])
def test_unsafe_member_names_refuse_the_whole_archive(tmp_path, name):
    make_tar(tmp_path / "m.tar.gz", [(name, b"x"), ("bin/busybox", b"y")])
    with pytest.raises(TdxError, match="unsafe member"):
        busybox.extract_base(str(tmp_path / "m.tar.gz"), str(tmp_path / "out.frag"))
    assert not (tmp_path / "out.frag").exists()


def test_minirootfs_without_busybox_is_refused(tmp_path):
    make_tar(tmp_path / "m.tar.gz", [("etc/motd", b"x")])
    with pytest.raises(TdxError, match="no bin/busybox"):
        busybox.extract_base(str(tmp_path / "m.tar.gz"), str(tmp_path / "out.frag"))


def test_truncated_minirootfs_is_a_clear_error(debian_minirootfs, tmp_path):
    data = debian_minirootfs.read_bytes()
    (tmp_path / "t.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TdxError, match="corrupt or truncated"):
        busybox.extract_base(str(tmp_path / "t.tar.gz"), str(tmp_path / "out.frag"))
    assert not (tmp_path / "out.frag").exists()
