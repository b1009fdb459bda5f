"""tdx_rules.rootfs.ext4 checked from outside: e2fsck, and debugfs listings, stats,
dumps and xattrs of the built image against the fixture image's model;
byte-identical rebuilds; no privileged operation."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.rootfs import ext4
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.tree import Entry, apply_layers
from tests import oci_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH = 1700000000
AGENT = b"#!/bin/sh\necho vm-agent\n"
DEBUGFS = shutil.which("debugfs") or "/usr/sbin/debugfs"
E2FSCK = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
TYPE_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
             "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def debugfs(image, commands):
    """Run read-only debugfs commands in one process; return each one's output."""
    fd, script = tempfile.mkstemp(suffix=".debugfs")
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(commands) + "\n")
    try:
        result = subprocess.run([DEBUGFS, "-f", script, str(image)], capture_output=True, text=True,
                                env=dict(os.environ, DEBUGFS_PAGER="__none__", PAGER="__none__"), check=True)
    finally:
        os.unlink(script)
    outputs = []
    for line in result.stdout.splitlines():
        if line.startswith("debugfs: "):
            outputs.append([])
        elif outputs:
            outputs[-1].append(line)
    assert len(outputs) == len(commands), result.stdout + result.stderr
    return ["\n".join(lines) for lines in outputs]


def q(path):
    return '"' + path.replace('"', '""') + '"'


def listing(image):
    """path -> (inode, mode, uid, gid) of everything in the image, via `ls -p`."""
    found = {"/": None}
    pending = ["/"]
    while pending:
        outputs = debugfs(image, [f"ls -p {q(d)}" for d in pending])
        next_round = []
        for directory, text in zip(pending, outputs):
            for line in text.splitlines():
                if not line.startswith("/"):
                    continue
                _, ino, mode, uid, gid, rest = line.split("/", 5)
                name = rest.rsplit("/", 2)[0]
                if name in ("", ".", ".."):
                    if directory == "/" and name == ".":
                        found["/"] = (int(ino), int(mode, 8), int(uid), int(gid))
                    continue
                path = directory.rstrip("/") + "/" + name
                found[path] = (int(ino), int(mode, 8), int(uid), int(gid))
                if stat.S_ISDIR(int(mode, 8)):
                    next_round.append(path)
        pending = next_round
    return found


def expected_model():
    """The fixture model plus what build_ext4 adds."""
    return fx.EXPECTED + [
        ("/lost+found", "dir", 0o700, 0, 0, None, (), None, None),
        ("/sbin", "dir", 0o755, 0, 0, None, (), None, None),
        ("/sbin/vm-agent", "file", 0o755, 0, 0, None, (), None, hashlib.sha256(AGENT).hexdigest()),
    ]


def write_inputs(directory, mtime=1700000000):
    """The fixture OCI layout and the agent in ``directory``; (layout path, agent path)."""
    os.makedirs(directory, exist_ok=True)
    fx.write_oci(os.path.join(directory, "image"), mtime=mtime)
    agent = os.path.join(directory, "agent")
    with open(agent, "wb") as out:
        out.write(AGENT)
    os.utime(agent, (mtime, mtime))
    return os.path.join(directory, "image"), agent


def build_fixture(directory, epoch=EPOCH, mtime=1700000000, **kw):
    image, agent = write_inputs(directory, mtime)
    with apply_layers(open_image(image)) as tree:
        return ext4.build_ext4(tree, agent, out=os.path.join(directory, "out", "rootfs.ext4"), epoch=epoch, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_fixture(str(tmp_path_factory.mktemp("ext4")))


def test_fsck_and_validity(built, tmp_path):
    assert subprocess.run([E2FSCK, "-fn", built.path], capture_output=True).returncode == 0
    assert ext4.is_valid_image(built.path)
    assert os.path.getsize(built.path) == built.size
    assert sorted(os.listdir(os.path.dirname(built.path))) == ["rootfs.ext4"]  # no temp left
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"\0" * 4096)
    assert not ext4.is_valid_image(garbage)
    damaged = tmp_path / "damaged.img"
    shutil.copy(built.path, damaged)
    with open(damaged, "r+b") as handle:  # the ext4 magic stays; the group descriptors do not
        handle.seek(4096)
        handle.write(os.urandom(4096))
    assert not ext4.is_valid_image(damaged)
    assert not ext4.is_valid_image(tmp_path / "missing.img")


def test_image_matches_model(built, tmp_path):
    expected = expected_model()
    found = listing(built.path)
    assert sorted(found) == sorted(e[0] for e in expected)
    inode_of = {}
    for path, kind, mode, uid, gid, rdev, xattrs, target, content in expected:
        ino, got_mode, got_uid, got_gid = found[path]
        real_kind = "file" if kind == "hardlink" else kind
        assert (got_mode, got_uid, got_gid) == (TYPE_BITS[real_kind] | mode, uid, gid), path
        inode_of[path] = ino
    for path, kind, *_, target, _ in expected:
        if kind == "hardlink":
            assert inode_of[path] == inode_of[target], path

    paths = [e[0] for e in expected]
    stats = dict(zip(paths, debugfs(built.path, [f"stat {q(p)}" for p in paths])))
    xattr_lists = dict(zip(paths, debugfs(built.path, [f"ea_list {q(p)}" for p in paths])))
    commands = []
    for path, kind, mode, uid, gid, rdev, xattrs, target, content in expected:
        text = stats[path]
        for field in ("ctime", "atime", "mtime", "crtime"):
            assert f"{field}: 0x{EPOCH:08x}:00000000" in text, (path, field, text)
        assert "Generation: 0 " in text
        links = sum(1 for e in expected if e[0] == path or (e[1] == "hardlink" and e[7] == path))
        if kind == "file":
            assert f"Links: {links} " in text, (path, text)
        if kind == "symlink":
            assert f'Fast link dest: "{target}"' in text
        if kind in ("char", "block"):
            assert f"Device major/minor number: {rdev[0]:02}:{rdev[1]:02}" in text
        if content is not None:
            dumped = tmp_path / hashlib.sha256(path.encode()).hexdigest()
            commands.append(f"dump {q(path)} {q(str(dumped))}")
        names = [line.split()[0] for line in xattr_lists[path].splitlines()[1:] if line.startswith("  ")]
        assert sorted(names) == [name for name, _ in xattrs], (path, xattr_lists[path])
        for name, value in xattrs:
            commands.append(f"ea_get -f {q(str(tmp_path / (name + '.bin')))} {q(path)} {name}")
    debugfs(built.path, commands)
    for path, kind, mode, uid, gid, rdev, xattrs, target, content in expected:
        if content is not None:
            assert sha256(tmp_path / hashlib.sha256(path.encode()).hexdigest()) == content, path
        for name, value in xattrs:
            assert (tmp_path / (name + ".bin")).read_bytes() == value


def test_superblock_is_pinned(built):
    text = subprocess.run(["dumpe2fs", "-h", built.path], capture_output=True, text=True).stdout
    assert f"Filesystem UUID:          {built.uuid}" in text
    assert "Filesystem volume name:   rootfs" in text
    for field in ("Filesystem created:", "Last write time:", "Last checked:"):
        line = next(line for line in text.splitlines() if line.startswith(field))
        assert "Tue Nov 14 22:13:20 2023" in line, line  # EPOCH
    assert "orphan_file" not in text and "metadata_csum" in text


def test_reproducible_across_dirs_umask_and_mtimes(built, tmp_path):
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, {root!r})
        os.umask(int(sys.argv[2], 8))
        from tests.test_ext4 import build_fixture
        result = build_fixture(sys.argv[1], mtime=int(sys.argv[3]))
        from tdx_rules.fsutil import sha256_file
        print(sha256_file(result.path))
    """).format(root=ROOT)
    digests = []
    for number, (umask, mtime) in enumerate((("077", 1000000000), ("002", 1650000000))):
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"b{number}" / "deep"), umask,
                                 str(mtime)], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        digests.append(result.stdout.strip())
    assert digests[0] == digests[1] == sha256(built.path)


def test_plain_and_compressed_layers_give_the_same_image(built, tmp_path):
    """Bodies read in place from plain tar layers or unpacked from gzip/zstd ones: same bytes."""
    image, agent = write_inputs(str(tmp_path))
    shutil.rmtree(image)
    fx.write_oci(image, compressions=("tar", "tar", "tar"))
    with apply_layers(open_image(image)) as tree:
        assert any(e.offset is not None for e in tree.entries())  # read in place
        plain = ext4.build_ext4(tree, agent, out=tmp_path / "plain.ext4", epoch=EPOCH)
    assert sha256(plain.path) == sha256(built.path)


def test_a_changed_body_of_the_same_size_changes_the_uuid(tmp_path):
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    uuids = []
    for number, data in enumerate((b"same size A", b"same size B")):
        body = tmp_path / f"body{number}"
        body.write_bytes(data)
        entries = [Entry("/", "dir", 0o755), Entry("/f", "file", 0o644, body=str(body), size=len(data))]
        uuids.append(ext4.build_ext4(entries, agent, out=tmp_path / f"{number}.ext4").uuid)
    assert uuids[0] != uuids[1]


def test_epoch_changes_image(built, tmp_path):
    other = build_fixture(str(tmp_path), epoch=EPOCH + 1)
    assert sha256(other.path) != sha256(built.path) and other.uuid != built.uuid
    assert f"mtime: 0x{EPOCH + 1:08x}:00000000" in debugfs(other.path, ["stat /etc/hostname"])[0]
    zero = build_fixture(str(tmp_path / "zero"), epoch=0)  # 0 is "unset" to libext2fs: checked inside
    assert "mtime: 0x00000000:00000000" in debugfs(zero.path, ["stat /dev/null"])[0]


def _big_entries(tmp_path, count=3, size=4 << 20):
    entries = [Entry("/", "dir", 0o755)]
    for number in range(count):
        body = tmp_path / f"body{number}"
        body.write_bytes(hashlib.sha256(str(number).encode()).digest() * (size // 32))
        entries.append(Entry(f"/blob{number}", "file", 0o644, body=str(body), size=size))
    return entries


def test_too_small_size_says_what_is_needed(tmp_path):
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    out = tmp_path / "out" / "small.ext4"
    with pytest.raises(TdxError, match=r"size 8 MiB is too small: the tree needs at least (\d+) MiB") as err:
        ext4.build_ext4(_big_entries(tmp_path), agent, out=out, size="8M")
    needed = int(err.value.args[0].split("needs at least ")[1].split()[0])
    assert needed > 12
    assert not out.exists() and not out.parent.exists()  # refused before anything was written
    result = ext4.build_ext4(_big_entries(tmp_path), agent, out=out, size=f"{needed}M")
    assert ext4.is_valid_image(result.path) and result.size == needed << 20


def test_running_out_of_space_while_writing_is_reported(tmp_path, monkeypatch):
    """When the estimate is wrong, the writer's own failure becomes the same one-line error."""
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    monkeypatch.setattr(ext4, "_needed_blocks", lambda content, inodes, size: 16)  # a far too low estimate
    out = tmp_path / "out" / "small.ext4"
    with pytest.raises(TdxError, match=r"size 9 MiB is too small: the tree needs at least (\d+) MiB \(out of blocks") as err:
        ext4.build_ext4(_big_entries(tmp_path), agent, out=out, size="9M")
    assert "\n" not in str(err.value) and int(err.value.args[0].split("at least ")[1].split()[0]) >= 12  # 12 MiB of data alone
    assert not out.exists() and os.listdir(out.parent) == []


def test_auto_size_headroom(built):
    minimum, auto = ext4.needed_size(100, 50)
    assert auto >= minimum + (16 << 20) and auto % (1 << 20) == 0
    minimum, auto = ext4.needed_size(1 << 18, 50)  # 1 GiB of data: 20 % dominates
    assert auto >= minimum * 1.2 - (1 << 20)
    assert built.size % (1 << 20) == 0 and built.size >= 16 << 20


def test_agent_follows_image_symlinks_and_odd_names(tmp_path):
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    entries = [Entry("/", "dir", 0o755), Entry("/sbin", "symlink", 0o777, target="usr/sbin"),
               Entry("/usr", "dir", 0o755), Entry("/usr/sbin", "dir", 0o711, 0, 0),
               Entry("/usr/sbin/vm-agent", "symlink", 0o777, target="old-agent"),
               Entry('/usr/a "b" c', "fifo", 0o600, 1000, 1000),
               Entry("/usr/\u00e9t\u00e9 \t tab", "dir", 0o755)]
    result = ext4.build_ext4(entries, agent, out=tmp_path / "a.ext4", epoch=5)
    found = listing(result.path)
    assert found["/sbin"][1] == stat.S_IFLNK | 0o777
    assert found["/usr/sbin/vm-agent"][1:] == (stat.S_IFREG | 0o755, 0, 0)
    assert found["/usr/sbin"][1] == stat.S_IFDIR | 0o711
    assert found['/usr/a "b" c'][1:] == (stat.S_IFIFO | 0o600, 1000, 1000)
    assert "/usr/\u00e9t\u00e9 \t tab" in found
    with pytest.raises(TdxError, match="longer than 255 bytes"):
        ext4.build_ext4(entries + [Entry("/usr/" + "n" * 256, "dir", 0o755)], agent, out=tmp_path / "b.ext4")
    newline = ext4.build_ext4(entries + [Entry("/usr/new\nline", "fifo", 0o644)], agent, out=tmp_path / "n.ext4")
    result = subprocess.run([DEBUGFS, "-R", "ls -p /usr", newline.path], capture_output=True)
    assert b"/new\nline/" in result.stdout  # ext4 names may hold any byte but '/' and NUL
    with pytest.raises(TdxError, match="is a file in the image"):
        ext4.build_ext4([Entry("/", "dir", 0o755), Entry("/sbin", "file", 0o644)], agent,
                        out=tmp_path / "c.ext4")
    assert not (tmp_path / "b.ext4").exists() and not (tmp_path / "c.ext4").exists()


def test_bad_arguments(tmp_path):
    entries = [Entry("/", "dir", 0o755)]
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    with pytest.raises(TdxError, match="agent .*no such file"):
        ext4.build_ext4(entries, tmp_path / "nope", out=tmp_path / "x.ext4")
    with pytest.raises(TdxError, match="not a size"):
        ext4.build_ext4(entries, agent, out=tmp_path / "x.ext4", size="lots")
    with pytest.raises(TdxError, match="epoch"):
        ext4.build_ext4(entries, agent, out=tmp_path / "x.ext4", epoch=-1)
    with pytest.raises(TdxError, match="agent_guest_path"):
        ext4.build_ext4(entries, agent, "relative/agent", out=tmp_path / "x.ext4")
    assert os.listdir(tmp_path) == ["agent"]


def test_no_privileged_operation_in_process(tmp_path, monkeypatch):
    """build_ext4 calls no chown/mknod/mount and runs one program: e2fsck, to check the result."""
    def forbidden(*args, **kw):
        raise AssertionError(f"privileged call {args}")
    for name in ("chown", "lchown", "fchown", "mknod", "mkfifo", "system"):
        monkeypatch.setattr(os, name, forbidden)
    ran = []
    real_run = subprocess.run

    def run(cmd, *args, **kw):
        ran.append(os.path.basename(cmd[0]))
        return real_run(cmd, *args, **kw)
    monkeypatch.setattr(subprocess, "run", run)
    result = build_fixture(str(tmp_path))
    assert ran == ["e2fsck"]
    assert ext4.is_valid_image(result.path)


def _python_for(user_env):
    for python in (sys.executable, "/usr/bin/python3"):
        check = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                                "import tdx_rules.rootfs.ext4"], capture_output=True, env=user_env, cwd="/")
        if check.returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to switch to an unprivileged user with setpriv")
def test_build_as_unprivileged_user_is_identical(built, tmp_path):
    """nobody:nogroup builds the same image root built: the product needs no privilege."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT, "HOME": "/nonexistent"}
    python = _python_for(env)
    if python is None:
        pytest.skip("no python that the unprivileged user can run with tdx_rules importable")
    shared = tempfile.mkdtemp(prefix="tdx-ext4-nobody-", dir="/tmp")
    try:
        os.chmod(shared, 0o755)
        agent = os.path.join(shared, "agent")
        with open(agent, "wb") as out:
            out.write(AGENT)
        fx.write_oci(os.path.join(tmp_path, "image"))
        with apply_layers(open_image(os.path.join(tmp_path, "image"))) as tree:
            entries = []
            for number, entry in enumerate(tree.entries()):
                item = {k: getattr(entry, k) for k in ("path", "type", "mode", "uid", "gid", "rdev", "target", "size",
                                                       "body")}
                item["xattrs"] = [(name, value.hex()) for name, value in entry.xattrs]
                if entry.body is not None:  # the bytes, wherever the tree keeps them, as a file of their own
                    item["body"] = os.path.join(shared, f"body{number}")
                    with open(entry.body, "rb") as handle, open(item["body"], "wb") as out:
                        handle.seek(entry.offset or 0)
                        out.write(handle.read(entry.size if entry.offset is not None else -1))
                    os.chmod(item["body"], 0o644)
                entries.append(item)
        with open(os.path.join(shared, "entries.json"), "w") as out:
            json.dump(entries, out)
        work = os.path.join(shared, "out")
        os.mkdir(work)
        os.chown(work, 65534, 65534)  # the test's own setup, as root
        script = textwrap.dedent(f"""
            import json, types
            from tdx_rules.rootfs import ext4
            entries = []
            for item in json.load(open({os.path.join(shared, 'entries.json')!r})):
                item["xattrs"] = tuple((n, bytes.fromhex(v)) for n, v in item["xattrs"])
                item["rdev"] = tuple(item["rdev"]) if item["rdev"] else None
                entries.append(types.SimpleNamespace(**item))
            result = ext4.build_ext4(entries, {agent!r}, out={os.path.join(work, 'rootfs.ext4')!r}, epoch={EPOCH})
            print(result.path)
        """)
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
                                capture_output=True, text=True, env=env, cwd=shared)
        assert result.returncode == 0, result.stderr
        image = result.stdout.strip()
        assert os.stat(image).st_uid == 65534
        assert sha256(image) == sha256(built.path)
    finally:
        shutil.rmtree(shared)


def test_host_acls_and_xattrs_do_not_leak(built, tmp_path):
    """The image's temporary file inherits a default ACL of the output directory;
    nothing of the host's xattrs reaches the image: it is the same as without."""
    import struct
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in (
        (0x01, 7, 0xFFFFFFFF), (0x02, 7, 1234), (0x04, 5, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)))
    directory = tmp_path / "acl"
    (directory / "out").mkdir(parents=True)
    try:
        os.setxattr(directory / "out", "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here ({exc})")
    probe = directory / "out" / "probe"
    probe.write_bytes(b"")
    assert "system.posix_acl_access" in os.listxattr(probe)
    probe.unlink()
    result = build_fixture(str(directory))
    assert sha256(result.path) == sha256(built.path)


def test_hard_links_into_full_directories(tmp_path):
    """Hard links (to a file, a symlink, a fifo, a device) spread over the blocks of a
    directory that takes several: one inode, the right link count, every name listed."""
    agent = tmp_path / "agent"
    agent.write_bytes(AGENT)
    body = tmp_path / "body"
    body.write_bytes(b"shared\n")
    entries = [Entry("/", "dir", 0o755), Entry("/many", "dir", 0o755),
               Entry("/many/a-dev", "char", 0o600, rdev=(4, 64)), Entry("/many/a-fifo", "fifo", 0o644),
               Entry("/many/a-file", "file", 0o640, 7, 8, body=str(body), size=7),
               Entry("/many/a-link", "symlink", 0o777, target="a-file")]
    # 212-byte entries (203-byte names): 19 fill each 4084-byte block, so the names span 4 blocks.
    for number in range(54):
        entries.append(Entry(f"/many/n{number:03}".ljust(209, "n"), "file", 0o644, body=str(body), size=7))
    links = {}
    for kind in ("dev", "fifo", "file", "link"):
        links[kind] = [f"/many/z-{kind}-{number}-".ljust(209, "z") for number in range(3)]
        entries += [Entry(path, "hardlink", 0, target=f"/many/a-{kind}") for path in links[kind]]
    entries.sort(key=lambda e: e.path)
    result = ext4.build_ext4(entries, agent, out=tmp_path / "links.ext4", epoch=7)
    found = listing(result.path)
    for kind in ("dev", "fifo", "file", "link"):
        assert len({found[path][0] for path in links[kind]} | {found[f"/many/a-{kind}"][0]}) == 1, kind
        assert "Links: 4 " in debugfs(result.path, [f"stat /many/a-{kind}"])[0]
    assert found[links["file"][2]][1:] == (stat.S_IFREG | 0o640, 7, 8)
    assert len([p for p in found if p.startswith("/many/")]) == 4 + 54 + 12


def test_the_callers_files_are_left_as_they_were(tmp_path):
    """Building reads the agent and the bodies; it never changes their mode, times or content."""
    directory = str(tmp_path / "p")
    image, agent = write_inputs(directory)
    os.chmod(agent, 0o750)
    os.utime(agent, (1234567, 7654321))
    before = os.stat(agent)
    with apply_layers(open_image(image)) as tree:
        ext4.build_ext4(tree, agent, out=os.path.join(directory, "out.ext4"), epoch=EPOCH)
    after = os.stat(agent)
    assert (after.st_mode, after.st_mtime_ns, after.st_nlink) == (before.st_mode, before.st_mtime_ns, before.st_nlink)
    with open(agent, "rb") as handle:
        assert handle.read() == AGENT


def test_tree_and_its_entry_list_give_the_same_image(tmp_path):
    """A tree (bodies read where it keeps them) and the plain list of its entries are the same bytes."""
    directory = str(tmp_path / "p")
    image, agent = write_inputs(directory)
    with apply_layers(open_image(image)) as tree:
        from_tree = ext4.build_ext4(tree, agent, out=os.path.join(directory, "tree.ext4"), epoch=EPOCH)
        from_list = ext4.build_ext4(tree.entries(), agent, out=os.path.join(directory, "list.ext4"), epoch=EPOCH)
    assert sha256(from_tree.path) == sha256(from_list.path)
