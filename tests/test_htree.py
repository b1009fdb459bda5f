"""Hashed directories (dir_index) in the rules' ext4 images, checked against e2fsprogs: the
name hash against `debugfs dx_hash`, the index of 100,000-entry directories (one and two
index levels) and of hash collisions split across leaves by `e2fsck -fn`, every name listed
back by `debugfs ls`, and the index layout by `debugfs htree_dump`."""

import os
import random
import re
import shutil
import struct
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.boot import boot_image
from tdx_rules.rootfs import ext4, ext4_writer, htree
from tdx_rules.rootfs.tree import Entry
from tests.conftest import fuzz_examples, scons
from tests.oci_fixtures import D, F, write_oci

DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"
E2FSCK = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
# Bytes debugfs's command line takes as one word (no blanks, quotes or backslashes), high bytes included.
WORD_BYTES = bytes(b for b in range(0x21, 0x100) if b not in b"\"'\\/")


def debugfs_hashes(names, seed):
    """(hash, minor hash) of each name by ``debugfs dx_hash -h half_md4``, all in one debugfs run."""
    script = "/tmp/tdx-htree-test.debugfs"
    with open(script, "wb") as handle:
        handle.write(b"".join(f"dx_hash -h half_md4 -s {seed} ".encode() + name + b"\n" for name in names))
    try:
        out = subprocess.run([DEBUGFS, "-f", script, "/dev/null"], capture_output=True).stdout
    finally:
        os.unlink(script)
    found = re.findall(rb"Hash of (.*) is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)\n", out)
    assert [name for name, _, _ in found] == list(names)
    return [(int(major, 16), int(minor, 16)) for _, major, minor in found]


def e2fsck(image):
    result = subprocess.run([E2FSCK, "-fn", str(image)], capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def names_in(image, directory):
    """Names debugfs lists in ``directory`` (``ls -p``: /inode/mode/uid/gid/name/size/), but for
    the index nodes' empty records (inode 0), which debugfs lists too."""
    out = subprocess.run([DEBUGFS, "-R", f"ls -p {directory}", str(image)], capture_output=True, check=True).stdout
    names = set()
    for line in out.split(b"\n"):  # names may hold any other byte, carriage returns among them
        if line.startswith(b"/"):
            _, ino, _, _, _, rest = line.split(b"/", 5)
            if ino != b"0":
                names.add(rest.rsplit(b"/", 2)[0])
    return names - {b".", b".."}


def hash_seed_of(image):
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    return uuid.UUID(re.search(r"Directory Hash Seed:\s+(\S+)", out)[1])


def build(tmp_path, names, directory="/wide", extra=()):
    agent = tmp_path / "agent"
    agent.write_bytes(b"#!/bin/sh\n")
    entries = [Entry("/", "dir", 0o755), Entry(directory, "dir", 0o755), *extra]
    entries += [Entry(f"{directory}/{os.fsdecode(name)}", "file", 0o644) for name in names]
    return ext4.build_ext4(entries, agent, out=tmp_path / "wide.ext4", epoch=7).path


def root_info(image, directory):
    dump = subprocess.run([DEBUGFS, "-R", f"htree_dump {directory}", str(image)], capture_output=True,
                          text=True).stdout
    levels = int(re.search(r"Indirect levels: (\d+)", dump)[1])
    version = int(re.search(r"Hash Version: (\d+)", dump)[1])
    return dump, levels, version


# --- the hash ------------------------------------------------------------------------------------

def test_the_name_hash_is_the_one_debugfs_computes_for_half_md4():
    rng = random.Random(2024)
    names = [b"a", b"lost+found", b"x" * 31, b"y" * 32, b"z" * 33, b"q" * 64, b"w" * 255,
             bytes([0xFF, 0x80, 0x7F]), "h\u00e9llo-w\u00f6rld".encode()]
    names += [bytes(rng.choice(WORD_BYTES) for _ in range(rng.randint(1, 255))) for _ in range(150)]
    seeds = [uuid.UUID(int=0), uuid.UUID(bytes=bytes(rng.randrange(256) for _ in range(16))),
             uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")]
    for seed in seeds:
        expected = debugfs_hashes(names, seed)
        assert [htree.name_hash(name, htree.seed_words(seed.bytes)) for name in names] == expected, seed


# --- whole directories ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, levels", [("f{:06d}", 0), ("a-longer-name-for-entry-{:06d}.txt", 1)])
def test_a_directory_of_100000_entries_is_indexed_checked_by_e2fsck_and_lists_back(tmp_path, pattern, levels):
    names = [pattern.format(i).encode() for i in range(100000)]
    image = build(tmp_path, names, extra=[Entry("/small", "dir", 0o755), Entry("/small/one", "file", 0o644)])
    code, report = e2fsck(image)
    assert code == 0, report
    dump, found_levels, version = root_info(image, "/wide")
    assert (found_levels, version) == (levels, 1)  # half-MD4; two levels once the root's 507 entries are not enough
    assert names_in(image, "/wide") == set(names)
    # A directory of one block stays linear: htree_dump refuses it.
    flags = subprocess.run([DEBUGFS, "-R", "stat /small", image], capture_output=True, text=True).stdout
    assert "Flags: 0x80000" in flags and "Flags: 0x81000" in subprocess.run(
        [DEBUGFS, "-R", "stat /wide", image], capture_output=True, text=True).stdout


def test_a_deep_tree_with_indexed_directories_at_every_level_passes_e2fsck(tmp_path):
    entries, path = [], ""
    for depth in range(40):
        path += f"/level-{depth:02d}"
        entries.append(Entry(path, "dir", 0o755))
        entries += [Entry(f"{path}/file-{depth:02d}-{i:04d}", "file", 0o644) for i in range(300)]
    agent = tmp_path / "agent"
    agent.write_bytes(b"#!/bin/sh\n")
    image = ext4.build_ext4([Entry("/", "dir", 0o755)] + entries, agent, out=tmp_path / "deep.ext4").path
    code, report = e2fsck(image)
    assert code == 0, report
    assert root_info(image, path)[1] == 0
    assert names_in(image, path) == {f"file-39-{i:04d}".encode() for i in range(300)}


def test_e2fsck_notices_an_index_entry_that_points_at_the_wrong_hashes(tmp_path):
    """The checks above can fail: the same image with two leaves' index entries swapped is refused."""
    image = build(tmp_path, [f"f{i:05d}".encode() for i in range(3000)])
    dump, _, _ = root_info(image, "/wide")
    entries = re.findall(r"Entry #(\d+): Hash 0x([0-9a-f]+), block (\d+)", dump)
    assert len(entries) > 4
    blocks = subprocess.run([DEBUGFS, "-R", "blocks /wide", image], capture_output=True, text=True).stdout.split()
    with open(image, "r+b") as handle:
        handle.seek(int(blocks[0]) * 4096 + 0x20 + 8 * 2 + 4)  # entry #2's child block
        handle.write(struct.pack("<I", int(entries[3][2])))
    code, report = e2fsck(image)
    assert code != 0 and "HTREE" in report.upper(), report


def colliding_names(seed, rng):
    """Two names whose 31-bit hashes collide under ``seed``, in the upper half (a birthday search)."""
    seen = {}
    while True:
        name = f"c{rng.getrandbits(40):x}".encode()
        major = htree.name_hash(name, seed)[0]
        if seen.get(major, name) != name and major > 1 << 31:
            return seen[major], name
        seen[major] = name


def names_below(collision, seed, length, count):
    """``count`` names of ``length`` bytes whose hashes are below ``collision``."""
    names, number = [], 0
    while len(names) < count:
        number += 1
        name = f"{length}{number:0{length - 1}x}".encode()
        if htree.name_hash(name, seed)[0] < collision:
            names.append(name)
    return names


def test_colliding_hashes_split_across_two_leaves_carry_the_continuation_bit(tmp_path):
    """Fills the first leaf exactly up to the first of two names with the same hash, so the
    second begins the next leaf: its index entry has the low bit set, which e2fsck accepts."""
    hash_seed = bytes(range(16))
    seed = htree.seed_words(hash_seed)
    rng = random.Random(7)
    first, second = sorted(colliding_names(seed, rng), key=lambda n: (htree.name_hash(n, seed), n))
    collision = htree.name_hash(first, seed)[0]
    room = htree.BLOCK - htree.DIR_TAIL - htree.rec_len(first)
    twelves = next(b for b in range(4) if (room - 12 * b) % 16 == 0)  # names of 4 bytes take 12, of 8 take 16
    fillers = names_below(collision, seed, 4, twelves) + names_below(collision, seed, 8, (room - 12 * twelves) // 16)
    later = []
    while len(later) < 200:
        name = f"z{rng.getrandbits(32):x}".encode()
        if htree.name_hash(name, seed)[0] > collision:
            later.append(name)
    names = fillers + [first, second] + later
    root = ext4_writer.Node("dir", children={})
    lost = ext4_writer.Node("dir", 0o700, children={})
    wide = ext4_writer.Node("dir", children={})
    root.children.update({b"lost+found": lost, b"wide": wide})
    files = [ext4_writer.Node("file", 0o644) for _ in names]
    wide.children.update(zip(names, files))
    image = tmp_path / "collide.ext4"
    with open(image, "wb") as handle:
        ext4_writer.write_image(handle.fileno(), 4096, 1024, [root, lost, wide, *files], hash_seed=hash_seed,
                                identity=lambda: bytes(range(100, 116)), label=b"t", epoch=1)
    code, report = e2fsck(image)
    assert code == 0, report
    assert hash_seed_of(image).bytes == hash_seed
    dump, _, _ = root_info(image, "/wide")
    assert f"Entry #1: Hash 0x{collision | 1:08x}, block 2" in dump, dump
    leaf = dump[dump.index("Entry #1: Hash"):]
    assert re.search(rf"Reading directory block 2.*?\n.*?{second.decode()}", leaf, re.S), dump
    assert names_in(image, "/wide") == set(names)


NAMES = st.binary(min_size=1, max_size=255).map(lambda b: bytes(c for c in b if c not in b"/\0\n")).filter(
    lambda n: n and n not in (b".", b".."))


@settings(max_examples=fuzz_examples(10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sets(NAMES, min_size=20, max_size=1500), st.binary(min_size=16, max_size=16))
def test_random_names_and_seeds_make_directories_e2fsck_accepts(tmp_path_factory, names, hash_seed):
    tmp = tmp_path_factory.mktemp("names")
    root = ext4_writer.Node("dir", children={})
    lost = ext4_writer.Node("dir", 0o700, children={})
    wide = ext4_writer.Node("dir", children={})
    root.children.update({b"lost+found": lost, b"wide": wide})
    files = [ext4_writer.Node("file", 0o644) for _ in names]
    wide.children.update(zip(sorted(names), files))
    image = tmp / "random.ext4"
    with open(image, "wb") as handle:
        ext4_writer.write_image(handle.fileno(), 8192, 2048, [root, lost, wide, *files], hash_seed=hash_seed,
                                identity=lambda: bytes(16), label=b"r", epoch=0)
    code, report = e2fsck(image)
    assert code == 0, report
    assert names_in(image, "/wide") == set(names)
    os.unlink(image)


# --- the guest kernel ----------------------------------------------------------------------------

WIDE_AGENT_C = r"""
/* Opens every name of the 100,000-entry directory by name, reads one file's bytes, checks
 * that a name not there is not found, counts what readdir lists, then powers the guest off. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/reboot.h>

int main(void)
{
    char path[64], content[64] = "";
    int missing = 0, listed = 0, absent;
    for (int i = 0; i < 100000; i++) {
        snprintf(path, sizeof path, "/wide/entry-%06d", i);
        int fd = open(path, O_RDONLY);
        if (fd < 0) {
            if (missing++ < 5)
                printf("WIDE-MISSING %s errno %d\n", path, errno);
            continue;
        }
        if (i == 54321) {
            ssize_t n = read(fd, content, sizeof content - 1);
            content[n > 0 ? n : 0] = 0;
        }
        close(fd);
    }
    absent = open("/wide/entry-100000", O_RDONLY) < 0 && errno == ENOENT;
    DIR *dir = opendir("/wide");
    while (dir && readdir(dir))
        listed++;
    printf("WIDE-RESULT missing=%d absent=%d listed=%d content=%s\n", missing, absent, listed, content);
    printf("WIDE-DONE\n");
    fflush(stdout);
    if (getpid() == 1)
        reboot(RB_POWER_OFF);
    return 0;
}
"""


@pytest.mark.slow
def test_the_guest_kernel_opens_every_name_of_a_100000_entry_directory(tmp_path):
    project = tmp_path / "wide"
    items = [D("wide")] + [F(f"wide/entry-{i:06d}", b"found-by-name" if i == 54321 else b"") for i in range(100000)]
    write_oci(project / "image", layers=[items], compressions=("tar",))
    (project / "agent.c").write_text(WIDE_AGENT_C)
    (project / "SConstruct").write_text(
        "import tdx_rules\n"
        "DefaultEnvironment(tools=[])\n"
        "env = Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
        "agent = env.TdxStaticProgram('agent', ['agent.c'])\n"
        "rootfs = env.TdxExt4Rootfs('rootfs.ext4', 'image', agent=agent, verity=True)\n"
        "env.TdxImage('wide', rootfs=rootfs, minirootfs='debian', kernel='apt:linux-image-6.12-amd64', "
        "ovmf='apt:ovmf', memory='1G', cmdline='console=ttyS0 panic=-1')\n")
    scons(str(project))
    image = str(project / "rootfs.ext4")
    assert root_info(image, "/wide")[1] == 0 and "Flags: 0x81000" in subprocess.run(
        [DEBUGFS, "-R", "stat /wide", image], capture_output=True, text=True).stdout  # indexed
    console = boot_image(str(project / "build" / "tdx" / "wide" / "wide-launch-tdx.sh"), until="WIDE-DONE",
                         timeout=600)
    assert "WIDE-RESULT missing=0 absent=1 listed=100002 content=found-by-name" in console, console[-3000:]
