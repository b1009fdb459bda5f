"""The newc writer, checked against GNU cpio (the outside reference)."""

import os
import subprocess

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.initramfs import newc


def write(path, entries, mtime=0):
    with open(path, "wb") as out:
        newc.write_archive(out, newc.merge([entries]), mtime=mtime)


def gnu_listing(path):
    """(mode string, owner, size, name) per member as `cpio -itv` prints them."""
    out = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(path)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((parts[0], parts[2], parts[3], parts[4], parts[8]))
    return rows


def test_gnu_cpio_reads_our_archive_with_parents_sorted_and_owned_by_root(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    write(tmp_path / "a.cpio", [
        newc.blob("usr/share/x.txt", b"hello\n"),
        newc.disk_file("usr/bin/big", str(big), 0o755),
        newc.symlink("bin/sh", "busybox"),
        newc.blob("init", b"#!/bin/sh\n", 0o755),
    ])
    rows = gnu_listing(tmp_path / "a.cpio")
    names = [r[4] for r in rows]
    assert names == ["bin", "bin/sh", "init", "usr", "usr/bin", "usr/bin/big", "usr/share", "usr/share/x.txt"]
    assert all(r[1] == "root" and r[2] == "root" for r in rows)
    modes = {r[4]: r[0] for r in rows}
    assert modes["usr/bin/big"] == "-rwxr-xr-x" and modes["bin"] == "drwxr-xr-x" and modes["bin/sh"].startswith("l")
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "-F", str(tmp_path / "a.cpio")], cwd=extract, check=True)
    assert (extract / "usr/bin/big").read_bytes() == big.read_bytes()
    assert os.readlink(extract / "bin/sh") == "busybox"


def test_gnu_cpio_reproducible_and_ours_agree_on_names_modes_and_data(tmp_path):
    """GNU cpio --reproducible -R 0:0 over the same sorted tree writes the same members.

    (Both number inodes differently, so the comparison uses the listing and data.)
    """
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_bytes(b"welcome\n")
    os.chmod(tree / "etc", 0o755)
    os.chmod(tree / "etc" / "motd", 0o644)
    names = subprocess.run("find . -mindepth 1 | LC_ALL=C sort", shell=True, cwd=tree, capture_output=True,
                           text=True, check=True).stdout
    gnu = subprocess.run(["cpio", "-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"], input=names.encode(),
                         cwd=tree, capture_output=True, check=True).stdout
    (tmp_path / "gnu.cpio").write_bytes(gnu)
    subprocess.run(["touch", "-d", "@0", str(tree / "etc"), str(tree / "etc" / "motd")], check=True)
    write(tmp_path / "ours.cpio", [newc.directory("etc"), newc.disk_file("etc/motd", str(tree / "etc" / "motd"))])
    ours = [(e.name, e.mode, e.size, newc.read_body(e)) for e in newc.read_entries(tmp_path / "ours.cpio")]
    theirs = [(e.name.removeprefix("./"), e.mode, e.size, newc.read_body(e)) for e in newc.read_entries(tmp_path / "gnu.cpio")]
    assert ours == theirs


def test_same_entries_give_identical_bytes_and_mtime_comes_from_the_epoch(tmp_path):
    entries = [newc.blob("b", b"2"), newc.blob("a/c", b"1")]
    write(tmp_path / "1.cpio", entries, mtime=1700000000)
    write(tmp_path / "2.cpio", list(reversed(entries)), mtime=1700000000)
    assert (tmp_path / "1.cpio").read_bytes() == (tmp_path / "2.cpio").read_bytes()
    out = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(tmp_path / "1.cpio")], capture_output=True, text=True).stdout
    assert "2023" in out  # 1700000000 is November 2023


def test_later_layer_replaces_earlier_entry():
    merged = newc.merge([[newc.blob("etc/a", b"old")], [newc.blob("etc/a", b"new")]])
    assert [newc.read_body(e) for e in merged if e.name == "etc/a"] == [b"new"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "", "a//b", "x\ny", "./"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(TdxError):
        newc.check_name(name)


def test_file_under_a_file_is_refused():
    with pytest.raises(TdxError, match="directory"):
        newc.merge([[newc.blob("etc", b"x"), newc.blob("etc/passwd", b"y")]])


def test_truncated_archive_is_reported(tmp_path):
    write(tmp_path / "a.cpio", [newc.blob("x", b"y" * 1000)])
    data = (tmp_path / "a.cpio").read_bytes()
    (tmp_path / "t.cpio").write_bytes(data[:300])
    with pytest.raises(TdxError, match="truncated"):
        list(newc.read_entries(tmp_path / "t.cpio"))
