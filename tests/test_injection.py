"""User values reach the workload verbatim: a real image is built by scons, its /init is
run under the image's own busybox sh in a temporary root (not as PID 1), with the
workload replaced by a script that records its arguments and environment."""

import json
import os
import shutil
import stat
import subprocess

import pytest

from tdx_rules.initramfs import newc
from tests.conftest import scons

NASTY = ["it's", 'say "hi"', "$(touch /pwned)", "`touch /pwned2`", "*", "?", "[a]", "a b", "line1\nline2",
         "tab\there", "$HOME", "ünïcødé", "--", "-x", "; reboot", "|| true"]
RECORDER = """#!/bin/busybox sh
printf '%s\\0' "$@" > /argv.out
for name in {names}; do eval "printf '%s\\0' \\"\\$$name\\"" >> /env.out; done
"""


def unpack(initramfs, root):
    """Regular files, directories and symlinks of the image (no device node is created)."""
    raw = root.parent / "initramfs.cpio"
    raw.write_bytes(subprocess.run(["gzip", "-dc", str(initramfs)], capture_output=True, check=True).stdout)
    for entry in newc.read_entries(raw):
        path = root / entry.name
        if stat.S_ISDIR(entry.mode):
            path.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISLNK(entry.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(newc.read_body(entry).decode(), path)
        elif stat.S_ISREG(entry.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(newc.read_body(entry))
            path.chmod(stat.S_IMODE(entry.mode))


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_nasty_args_and_env_values_arrive_verbatim_in_the_built_image(fast_project, tmp_path):
    env_vars = {f"V{i}": value for i, value in enumerate(NASTY)}
    with open(os.path.join(fast_project, "opts.json"), "w") as handle:
        json.dump({"env_vars": env_vars}, handle)
    sconstruct = os.path.join(fast_project, "SConstruct")
    text = open(sconstruct).read().replace("cmdline=", "args=json.load(open('args.json')), cmdline=")
    open(sconstruct, "w").write(text)
    with open(os.path.join(fast_project, "args.json"), "w") as handle:
        json.dump(NASTY, handle)
    scons(fast_project)
    root = tmp_path / "root"
    unpack(os.path.join(fast_project, "build", "tdx", "hello", "hello-initramfs.cpio.gz"), root)
    workload = root / "usr" / "bin" / "hello"
    workload.write_text(RECORDER.format(names=" ".join(env_vars)))
    workload.chmod(0o755)
    result = subprocess.run([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/bin/busybox", "sh", "/init", "ignored-kernel-arg"],
                            capture_output=True, timeout=60, env={"PATH": "/bin"})
    assert result.returncode == 0, result.stderr
    argv = (root / "argv.out").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv] == NASTY  # args replace the kernel's arguments
    values = (root / "env.out").read_bytes().split(b"\0")[:-1]
    assert [v.decode() for v in values] == NASTY
    assert not (root / "pwned").exists() and not (root / "pwned2").exists()


def test_program_names_that_need_quoting_are_refused_when_the_sconstruct_is_read(fast_project):
    sconstruct = os.path.join(fast_project, "SConstruct")
    text = open(sconstruct).read().replace("binary=app", "binary=File('we ird*')")
    open(sconstruct, "w").write(text)
    result = scons(fast_project, check=False)
    assert result.returncode != 0 and "binary" in result.stderr and "Traceback" not in result.stderr


def test_extra_file_names_with_shell_characters_are_stored_verbatim_and_newlines_refused(fast_project):
    guest = "/etc/it's $(touch x) `y` *.conf"
    with open(os.path.join(fast_project, "data.txt"), "w") as handle:
        handle.write("payload\n")
    with open(os.path.join(fast_project, "opts.json"), "w") as handle:
        json.dump({"extra_files": {guest: "data.txt"}}, handle)
    scons(fast_project)
    raw = subprocess.run(["gzip", "-dc", os.path.join(fast_project, "build", "tdx", "hello", "hello-initramfs.cpio.gz")],
                         capture_output=True, check=True).stdout
    names = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    assert guest.lstrip("/") in names.splitlines()
    with open(os.path.join(fast_project, "opts.json"), "w") as handle:
        json.dump({"extra_files": {"/etc/two\nlines": "data.txt"}}, handle)
    result = scons(fast_project, check=False)
    assert result.returncode != 0 and "newline" in result.stderr and "Traceback" not in result.stderr
