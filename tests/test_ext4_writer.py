"""tdx_rules.rootfs.ext4_writer at the edges the container fixtures do not reach, checked
with e2fsck and debugfs: several block groups, extent leaf blocks, inode tables
spanning groups, xattr blocks, POSIX ACLs, large device numbers, long symlinks,
random trees; and its CRC-32C against the published check value."""

import dataclasses
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.rootfs import ext4, ext4_writer
from tdx_rules.rootfs.tree import Entry
from tests.conftest import fuzz_examples
from tests.test_ext4 import listing

DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"
E2FSCK = shutil.which("e2fsck") or "/usr/sbin/e2fsck"


def debugfs(image, request):
    return subprocess.run([DEBUGFS, "-R", request, str(image)], capture_output=True, text=True, check=True).stdout


def fsck(image):
    result = subprocess.run([E2FSCK, "-fn", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_crc32c_matches_the_published_check_value_with_and_without_the_library(monkeypatch):
    # CRC-32C (Castagnoli) of "123456789" is 0xE3069283 (RFC 3720, appendix B.4 conventions):
    # the kernel's crc32c_le starts from ~0 and the standard CRC inverts the result.
    assert ext4_writer.crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    data = os.urandom(5000)
    fast = ext4_writer.crc32c(0x12345678, data)
    monkeypatch.setattr(ext4_writer, "google_crc32c", None)
    monkeypatch.setattr(ext4_writer, "_TABLE", ext4_writer._crc_table())
    assert ext4_writer.crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert ext4_writer.crc32c(0x12345678, data) == fast


def acl_entries(value):
    """(tag, perm, id) of a POSIX ACL in the xattr form; the id only counts for named users and groups."""
    assert struct.unpack_from("<I", value)[0] == 2
    return [(tag, perm, ident if tag in (0x02, 0x08) else None)
            for tag, perm, ident in struct.iter_unpack("<HHI", value[4:])]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 700 MiB file (more than 4 extents: a leaf block), 10,000 empty files (inode
    tables of two groups), an xattr block, an ACL, a large device number, a long symlink."""
    tmp = tmp_path_factory.mktemp("big")
    body = tmp / "body"
    with open(body, "wb") as out:  # sparse on the host, with marks to find again
        for mib in range(0, 700, 100):
            out.seek(mib << 20)
            out.write(hashlib.sha256(str(mib).encode()).digest())
        out.truncate(700 << 20)
    digest = hashlib.sha256()
    with open(body, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (0x01, 7, 0xFFFFFFFF), (0x02, 6, 1234), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))
    entries = [Entry("/", "dir", 0o755),
               Entry("/big", "file", 0o600, 5, 6, body=str(body), size=700 << 20),
               Entry("/dev", "dir", 0o755),
               Entry("/dev/nvme", "block", 0o660, 0, 6, rdev=(259, 300000)),
               Entry("/long", "symlink", 0o777, target="/" + "t" * 100),
               Entry("/many", "dir", 0o755),
               Entry("/xattrs", "dir", 0o750, xattrs=(("system.posix_acl_access", acl),
                                                           ("user.big", b"v" * 1000)))]
    entries += [Entry(f"/many/e{number:05}", "file", 0o644) for number in range(10000)]
    agent = tmp / "agent"
    agent.write_bytes(b"#!/bin/sh\n")
    result = ext4.build_ext4(entries, agent, out=tmp / "big.ext4", epoch=1)
    yield result, digest.hexdigest(), acl, tmp
    os.unlink(result.path)


def test_several_groups_and_extent_leaves_pass_fsck_and_read_back(big):
    result, digest, _, tmp = big
    report = fsck(result.path)
    assert "10011/" not in report  # counted, not a guess: 10,007 files, dirs and the agent's
    header = subprocess.run(["dumpe2fs", "-h", result.path], capture_output=True, text=True).stdout
    groups = subprocess.run(["dumpe2fs", result.path], capture_output=True, text=True).stdout
    assert groups.count("\nGroup ") >= 6 and "Backup superblock at 32768" in groups
    inodes_per_group = int(next(l for l in header.splitlines() if l.startswith("Inodes per group:")).split()[-1])
    assert inodes_per_group < 10000  # so the empty files' inodes span two groups
    extents = debugfs(result.path, "ex /big")
    assert re.search(r"^\s*0/\s*1\s", extents, re.M), extents  # level 0 of a depth-1 tree: an index
    assert len(re.findall(r"^\s*1/\s*1\s", extents, re.M)) > 4  # more extents than an inode holds
    dumped = tmp / "dumped"
    debugfs(result.path, f"dump /big {dumped}")
    with open(dumped, "rb") as handle:
        assert hashlib.file_digest(handle, "sha256").hexdigest() == digest
    os.unlink(dumped)
    assert len([l for l in debugfs(result.path, "ls /many").split() if l.startswith("e")]) >= 10000


def test_xattr_block_acl_device_and_long_symlink_read_back(big):
    result, _, acl, tmp = big
    stat = debugfs(result.path, "stat /xattrs")
    assert "File ACL: 0" not in stat  # the xattrs did not fit the inode: a block holds them
    out = tmp / "acl.bin"
    debugfs(result.path, f"ea_get -f {out} /xattrs system.posix_acl_access")
    assert acl_entries(out.read_bytes()) == acl_entries(acl)  # debugfs turns ext4's on-disk ACL back
    debugfs(result.path, f"ea_get -f {out} /xattrs user.big")
    assert out.read_bytes() == b"v" * 1000
    assert "Device major/minor number: 259:300000" in debugfs(result.path, "stat /dev/nvme")
    assert "Type: symlink" in debugfs(result.path, "stat /long")
    debugfs(result.path, f"dump /long {out}")  # a slow symlink: its target lives in a data block
    assert out.read_bytes() == b"/" + b"t" * 100


# --------------------------------------------------------------------------- random trees

NAME = st.text(st.sampled_from("abcxyz019 _-.é€"), min_size=1, max_size=40).filter(lambda n: n not in (".", ".."))


@st.composite
def trees(draw):
    """A random tree as oci entries (bodies written under a temporary directory later)."""
    entries, dirs, files = [Entry("/", "dir", 0o755)], ["/"], []
    for _ in range(draw(st.integers(1, 40))):
        parent = draw(st.sampled_from(dirs))
        path = parent.rstrip("/") + "/" + draw(NAME)
        if any(e.path == path for e in entries):
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "fifo", "char", "block", "hardlink"]))
        mode = draw(st.integers(0, 0o7777))
        owner = dict(uid=draw(st.integers(0, (1 << 32) - 1)), gid=draw(st.integers(0, 70000)))
        xattrs = tuple(sorted(draw(st.dictionaries(st.sampled_from(["user.a", "user.bb", "security.x", "trusted.t"]),
                                                   st.binary(max_size=draw(st.sampled_from([8, 60, 900]))),
                                                   max_size=3)).items()))
        if kind == "hardlink":
            if not files:
                continue
            entries.append(Entry(path, "hardlink", 0, target=draw(st.sampled_from(files))))
            continue
        if kind == "dir":
            dirs.append(path)
            entries.append(Entry(path, "dir", mode, xattrs=xattrs, **owner))
        elif kind == "file":
            files.append(path)
            entries.append(Entry(path, "file", mode, xattrs=xattrs, size=draw(st.sampled_from([0, 1, 4095, 4096,
                                                                                                 9000])), **owner))
        elif kind == "symlink":
            target = "t" * draw(st.sampled_from([1, 59, 60, 300]))
            entries.append(Entry(path, "symlink", 0o777, target=target, xattrs=xattrs, **owner))
        else:
            rdev = (draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1))) if kind != "fifo" else None
            entries.append(Entry(path, kind, mode, rdev=rdev, xattrs=xattrs, **owner))
    return entries


@settings(max_examples=fuzz_examples(25), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees())
def test_random_trees_pass_fsck_and_list_back_as_built(tmp_path_factory, entries):
    tmp = tmp_path_factory.mktemp("random")
    written = []
    for number, entry in enumerate(entries):
        if entry.type == "file":
            body = tmp / f"body{number}"
            body.write_bytes(bytes([number % 251]) * entry.size)
            entry = dataclasses.replace(entry, body=str(body))
        written.append(entry)
    agent = tmp / "agent"
    agent.write_bytes(b"#!/bin/sh\n")
    result = ext4.build_ext4(written, agent, out=tmp / "r.ext4", epoch=3)  # e2fsck -fn runs inside
    fsck(result.path)
    found = listing(result.path)
    by_path = {e.path: e for e in written}
    for entry in written:
        ino, mode, uid, gid = found[entry.path]
        if entry.type == "hardlink":
            assert ino == found[entry.target][0], entry.path
            continue
        kind = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
                "char": stat.S_IFCHR, "block": stat.S_IFBLK}[entry.type]
        # debugfs prints owners as signed 32-bit numbers
        assert (mode, uid & 0xFFFFFFFF, gid) == (kind | entry.mode, entry.uid, entry.gid), entry.path
    assert set(found) - set(by_path) == {"/lost+found", "/sbin", "/sbin/vm-agent"} - set(by_path)
    os.unlink(result.path)
