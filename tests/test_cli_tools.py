"""`tdx-rules inspect | diff | fetch | cache | doctor`: real archives written by GNU cpio and
the compressors' own CLIs, real builds, a real HTTP server on loopback."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT, scons
from tests.httpserver import HttpServer

TREE = {
    "etc/hostname": b"guest\n",
    "bin/tool": bytes(range(256)) * 300,
    "usr/share/data.bin": os.urandom(70_000),
}


def cli(*args, env=None):
    environ = dict(os.environ, PYTHONPATH=ROOT)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "tdx_rules", *args], capture_output=True, text=True, env=environ)


def make_tree(root, files=TREE, link=("bin/sh", "tool")):
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    if "bin/tool" in files:
        os.chmod(os.path.join(root, "bin", "tool"), 0o755)
    if link:
        os.symlink(link[1], os.path.join(root, link[0]))
    return root


def gnu_cpio(root, out):
    """A newc archive of ``root`` written by GNU cpio (the reference writer)."""
    subprocess.run(f"cd '{root}' && find . | LC_ALL=C sort | cpio -o -H newc --quiet > '{out}'", shell=True,
                   check=True)
    return out


def expected_from_disk(root):
    """What inspect must report, read from the filesystem with os.lstat."""
    expected = {}
    for top, dirs, names in os.walk(root):
        for name in dirs + names:
            full = os.path.join(top, name)
            st = os.lstat(full)
            entry = {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir")
            else:
                entry.update(type="file", size=st.st_size, sha256=hashlib.sha256(open(full, "rb").read()).hexdigest())
            expected[os.path.relpath(full, root)] = entry
    return expected


def listing(image):
    result = cli("inspect", image, "--hash", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("compressor", [None, ["gzip", "-9n"], ["zstd", "-q", "-19"], ["xz", "--check=crc32"],
                                        ["bzip2"], ["lz4", "-l", "-q"]])
def test_inspect_lists_what_gnu_cpio_archived_under_each_compression(tmp_path, compressor):
    if compressor and shutil.which(compressor[0]) is None:
        pytest.skip(f"{compressor[0]} is not installed")
    root = make_tree(str(tmp_path / "root"))
    image = gnu_cpio(root, str(tmp_path / "image.cpio"))
    if compressor:
        with open(image, "rb") as inp, open(image + ".c", "wb") as out:
            subprocess.run(compressor + ["-c"], stdin=inp, stdout=out, check=True)
        image += ".c"
    members = {m["path"].removeprefix("./"): m for m in listing(image) if m["path"] != "."}
    expected = expected_from_disk(root)
    assert set(members) == set(expected)
    for path, want in expected.items():
        for key, value in want.items():
            assert members[path][key] == value, (path, key)


def test_inspect_reads_concatenated_archives_as_the_kernel_does(tmp_path):
    """An uncompressed early archive (as microcode is shipped) followed by a gzip archive
    and a zstd one: every member of all three, in order, with its segment."""
    first = make_tree(str(tmp_path / "early"), {"kernel/x86/microcode/GenuineIntel.bin": b"ucode"}, link=None)
    second = make_tree(str(tmp_path / "main"))
    third = make_tree(str(tmp_path / "extra"), {"etc/hostname": b"override\n"}, link=None)
    parts = [gnu_cpio(first, str(tmp_path / "a.cpio"))]
    for root, tool in ((second, ["gzip", "-9n", "-c"]), (third, ["zstd", "-q", "-c"])):
        plain = gnu_cpio(root, str(tmp_path / (os.path.basename(root) + ".cpio")))
        with open(plain, "rb") as inp, open(plain + ".c", "wb") as out:
            subprocess.run(tool, stdin=inp, stdout=out, check=True)
        parts.append(plain + ".c")
    image = str(tmp_path / "initrd.img")
    with open(image, "wb") as out:
        for part in parts:
            out.write(open(part, "rb").read())
            out.write(b"\0" * 64)  # padding between segments is allowed
    members = listing(image)
    assert {m["segment"] for m in members} == {0, 1, 2}
    assert [m["compression"] for m in members if m["path"].endswith("GenuineIntel.bin")] == ["none"]
    hostnames = [m for m in members if m["path"].endswith("etc/hostname")]
    assert [h["sha256"] for h in hostnames] == [hashlib.sha256(b"guest\n").hexdigest(),
                                                 hashlib.sha256(b"override\n").hexdigest()]


def test_inspect_plain_output_is_one_line_per_member_like_ls(tmp_path):
    root = make_tree(str(tmp_path / "root"))
    image = gnu_cpio(root, str(tmp_path / "image.cpio"))
    result = cli("inspect", image)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    reference = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(image, "rb"), capture_output=True,
                               text=True, check=True).stdout.split()
    assert len(lines) == len(reference)
    assert any(line.startswith("lrwxrwxrwx") and line.endswith(" bin/sh -> tool") for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" bin/tool") for line in lines)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-gzip"])
def test_inspect_bad_images_get_one_line(tmp_path, damage):
    root = make_tree(str(tmp_path / "root"))
    image = gnu_cpio(root, str(tmp_path / "image.cpio"))
    data = open(image, "rb").read()
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = b"MZ" + os.urandom(1000)
    else:
        data = b"\x1f\x8b\x08\x00" + os.urandom(500)
    with open(image, "wb") as out:
        out.write(data)
    result = cli("inspect", image)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tdx-rules: error: "), result.stderr
    assert "Traceback" not in result.stderr


def test_diff_images_names_added_removed_and_changed_members(tmp_path):
    old = make_tree(str(tmp_path / "old"))
    new = make_tree(str(tmp_path / "new"))
    with open(os.path.join(new, "etc", "hostname"), "wb") as handle:
        handle.write(b"other\n")
    os.unlink(os.path.join(new, "usr", "share", "data.bin"))
    with open(os.path.join(new, "etc", "added"), "wb") as handle:
        handle.write(b"x")
    os.chmod(os.path.join(new, "bin", "tool"), 0o700)
    a, b = gnu_cpio(old, str(tmp_path / "a.cpio")), gnu_cpio(new, str(tmp_path / "b.cpio"))
    result = cli("diff", a, b)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert "+ etc/added" in lines
    assert "- usr/share/data.bin" in lines
    assert any(line.startswith("~ bin/tool: mode 100755 -> 100700") for line in lines)
    assert any(line.startswith("~ etc/hostname: size 6 -> 6, sha256 ") or
               line.startswith("~ etc/hostname: sha256 ") for line in lines)
    assert cli("diff", a, a).returncode == 0 and cli("diff", a, a).stdout == ""


def test_diff_manifests_names_the_settings_and_the_measurement_event_that_changed(fast_project, tmp_path):
    scons(fast_project)
    manifest = os.path.join(fast_project, "build", "tdx", "hello", "hello-manifest.json")
    before = str(tmp_path / "before.json")
    shutil.copy(manifest, before)
    with open(os.path.join(fast_project, "opts.json"), "w") as handle:
        json.dump({"memory": "1G"}, handle)
    scons(fast_project)
    result = cli("diff", before, manifest)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert '~ settings.memory: "2G" -> "1G"' in out
    assert "~ measurements.rtmr1: " in out
    # the kernel event (its digest depends on memory), named with its register
    assert any(line.startswith("~ measurements.events[") and "(RTMR[1] kernel Authenticode" in line
               for line in out.splitlines())
    assert "measurements.rtmr2" not in out and "measurements.mrtd:" not in out
    mixed = cli("diff", before, os.path.join(fast_project, "build", "tdx", "hello", "hello-initramfs.cpio.gz"))
    assert mixed.returncode == 2 and mixed.stderr.startswith("tdx-rules: error: ")


def test_fetch_fills_the_cache_and_a_second_fetch_needs_no_network(tmp_path):
    body = os.urandom(5000)
    digest = hashlib.sha256(body).hexdigest()
    cache_dir = str(tmp_path / "cache")
    with HttpServer() as server:
        url = server.add("/fw.fd", body)
        first = cli("fetch", f"{url}#sha256={digest}", "--cache", cache_dir)
        assert first.returncode == 0, first.stderr
        assert server.count("/fw.fd") == 1
        bad = cli("fetch", f"{url}#sha256={'0' * 64}", "--cache", cache_dir)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
        errors = [line for line in bad.stderr.splitlines() if line.startswith("tdx-rules: error: ")]
        assert len(errors) == 1 and "sha256" in errors[0].lower(), bad.stderr
    second = cli("fetch", f"{url}#sha256={digest}", "--cache", cache_dir)  # server is gone
    assert second.returncode == 0, second.stderr
    path = second.stdout.split()[1]
    assert second.stdout.split()[0] == digest and open(path, "rb").read() == body


def test_cache_list_and_clean(tmp_path):
    body = b"cached bytes"
    digest = hashlib.sha256(body).hexdigest()
    cache_dir = str(tmp_path / "cache")
    with HttpServer() as server:
        url = server.add("/a.bin", body)
        assert cli("fetch", f"{url}#sha256={digest}", "--cache", cache_dir).returncode == 0
    listed = cli("cache", "list", "--cache", cache_dir)
    assert f"sha256/{digest}/a.bin" in listed.stdout
    kept = cli("cache", "clean", "--older-than", "1", "--cache", cache_dir)
    assert kept.returncode == 0 and "removed 0 entries" in kept.stdout
    assert os.path.exists(os.path.join(cache_dir, "sha256", digest, "a.bin"))
    cleaned = cli("cache", "clean", "--cache", cache_dir)
    assert "removed 1 entries" in cleaned.stdout
    assert not os.path.exists(os.path.join(cache_dir, "sha256", digest))


def test_doctor_names_what_is_missing_and_how_to_install_it(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python3")
    result = cli("doctor", env={"PATH": str(bare)})
    assert result.returncode == 1
    assert any(line.startswith("MISSING") and "musl-gcc" in line and "apt-get install musl-tools" in line
               for line in result.stdout.splitlines())
    assert any(line.startswith("ok") and "python: SCons" in line for line in result.stdout.splitlines())
    if all(shutil.which(tool) for tool in ("musl-gcc", "e2fsck")):
        assert cli("doctor").returncode == 0


@pytest.mark.parametrize("command", ["measure", "pack", "inspect", "diff", "fetch", "cache", "doctor"])
def test_every_subcommand_help_has_an_example(command):
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout and f"tdx-rules {command}" in result.stdout


def run_on_a_terminal(args, env):
    """Run ``python -m tdx_rules ARGS`` with stdout on a pseudo-terminal; (exit status, output)."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.execve(sys.executable, [sys.executable, "-m", "tdx_rules", *args], env)
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


def test_downloads_show_a_progress_bar_on_a_terminal_and_one_line_otherwise(tmp_path):
    body = os.urandom(3 << 20)
    digest = hashlib.sha256(body).hexdigest()
    with HttpServer() as server:
        url = server.add("/big.bin", body)
        env = dict(os.environ, PYTHONPATH=ROOT)
        status, output = run_on_a_terminal(["fetch", f"{url}#sha256={digest}", "--cache", str(tmp_path / "a")], env)
        assert status == 0, output
        assert "\r[tdx] big.bin [" in output and "100% 3.1/3.1 MB" in output
        plain = cli("fetch", f"{url}#sha256={digest}", "--cache", str(tmp_path / "b"))
        assert plain.returncode == 0
        assert "\r" not in plain.stdout + plain.stderr and "%" not in plain.stdout + plain.stderr
        assert plain.stderr.count("[tdx] fetch ") == 1
