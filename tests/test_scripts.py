"""The scripts stage: launch-tdx.sh and the self-extracting run-qemu.sh, run against a QEMU stand-in."""

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.stages import scripts as scripts_stage
from tests.conftest import fuzz_examples

BUSYBOX = "/bin/busybox"
CMDLINE = "console=ttyS0 ip=dhcp msg=\"two words\" it's 'single' $HOME `x` *"

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "w") as out:
    json.dump(sys.argv[1:], out)
"""


def config(**overrides) -> dict:
    base = {"name": "hello", "memory": "4G", "cpus": 4, "cmdline": CMDLINE, "ssh_forward": [2222, 22],
            "bundle_runner": True}
    base.update(overrides)
    return base


@pytest.fixture
def inputs(tmp_path):
    """Dummy firmware, kernel (> 1 MiB) and initramfs of random bytes, in a build directory with a space."""
    build = tmp_path / "build dir" / "parts"
    build.mkdir(parents=True)
    files = {}
    for role, name, size in (("ovmf", "OVMF.fd", 4096 + 3), ("kernel", "vmlinuz", (1 << 20) + 12345),
                             ("initrd", "initrd.img", 70001)):
        path = build / name
        path.write_bytes(os.urandom(size))
        files[role] = str(path)
    return files


@pytest.fixture
def recorder(tmp_path):
    program = tmp_path / "fake qemu"
    program.write_text(RECORDER.format(python=sys.executable))
    program.chmod(0o755)
    return str(program)


def render(tmp_path, inputs, cfg=None, label="out"):
    out = tmp_path / label
    launch, runner = out / "hello-launch-tdx.sh", out / "hello-run-qemu.sh"
    cfg = config() if cfg is None else cfg
    scripts_stage.build_scripts(cfg, inputs["ovmf"], inputs["kernel"], inputs["initrd"], str(launch),
                                str(runner) if cfg["bundle_runner"] else None)
    return launch, runner


def run_script(command, recorder, tmp_path, env=None, args=(), cwd=None):
    record = tmp_path / "argv.json"
    if record.exists():
        record.unlink()
    environ = {"PATH": os.environ["PATH"], "QEMU": recorder, "RECORD": str(record), "TMPDIR": str(tmp_path)}
    environ.update(env or {})
    done = subprocess.run([*command, *args], env=environ, capture_output=True, text=True, timeout=120,
                          cwd=cwd or tmp_path)
    argv = json.loads(record.read_text()) if record.exists() else None
    return done, argv


# The TD part of the default command line (qemu_version 8.2: Canonical's TDX build, whose documented
# command line is checked in tests/test_launch.py).
TD_OBJECT = ('{"qom-type":"tdx-guest","id":"tdx","sept-ve-disable":true,'
             '"quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}')


def expected(directory, memory="4G", cpus="4", port="2222", cid="3", cmdline=CMDLINE, kernel=None, extra=(),
             guest_port="22"):
    netdev = "user,id=net0" + (f",hostfwd=tcp::{port}-:{guest_port}" if port else "")
    argv = [
        "-smp", cpus,
        "-m", memory,
        "-kernel", kernel or os.path.join(directory, "vmlinuz"),
        "-initrd", os.path.join(directory, "initrd.img"),
        "-append", cmdline,
        "-nographic",
        "-nodefaults",
        "-serial", "mon:stdio",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
        "-accel", "kvm",
        "-object", TD_OBJECT,
        "-machine", "q35,kernel_irqchip=split,confidential-guest-support=tdx,hpet=off",
        "-cpu", "host,-pks,pmu=off",
        "-bios", os.path.join(directory, "OVMF.fd"),
    ]
    if cid:
        argv += ["-device", f"vhost-vsock-pci,guest-cid={cid}"]
    return argv + list(extra)


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def payload_offset(runner) -> int:
    data = runner.read_bytes()
    marker = b"\n" + scripts_stage.MARKER.encode() + b"\n"
    return data.index(marker) + len(marker)


def kept_dir(stderr: str) -> str:
    match = re.search(r": kept (.+)$", stderr, re.M)
    assert match, stderr
    return match.group(1)


def beside(launch, inputs):
    """Put the inputs beside the launch script, as the image rule does."""
    for path in inputs.values():
        os.link(path, launch.parent / os.path.basename(path))


# --- launch-tdx.sh --------------------------------------------------------------------------------------------------


def test_launch_defaults(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs)
    beside(launch, inputs)
    assert stat.S_IMODE(os.stat(launch).st_mode) == 0o755
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done, argv = run_script([str(launch)], recorder, tmp_path, args=["-snapshot", "extra arg"], cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert argv == expected(str(launch.parent), extra=["-snapshot", "extra arg"])


def test_launch_through_a_relative_path_and_a_symlink(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs)
    beside(launch, inputs)
    done, argv = run_script(["bash", "out/hello-launch-tdx.sh"], recorder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert argv == expected(str(launch.parent))
    link = tmp_path / "link-dir"
    link.symlink_to(launch.parent)
    done, argv = run_script([str(link / launch.name)], recorder, tmp_path)
    assert argv == expected(str(launch.parent))


def test_launch_environment_overrides(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs)
    beside(launch, inputs)
    other_kernel = tmp_path / "other kernel's file"
    other_kernel.write_bytes(b"k")
    env = {"MEMORY": "8G", "CPUS": "2", "SSH_PORT": "10022", "VSOCK_CID": "7", "KERNEL": str(other_kernel),
           "CMDLINE": "console=hvc0 \"quoted\" 'x'"}
    done, argv = run_script([str(launch)], recorder, tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert argv == expected(str(launch.parent), memory="8G", cpus="2", port="10022", cid="7",
                            kernel=str(other_kernel), cmdline=env["CMDLINE"])


def test_launch_empty_port_and_cid_disable_them(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs)
    beside(launch, inputs)
    done, argv = run_script([str(launch)], recorder, tmp_path, env={"SSH_PORT": "", "VSOCK_CID": ""})
    assert done.returncode == 0, done.stderr
    assert argv == expected(str(launch.parent), port="", cid="")
    # Empty MEMORY/CPUS/CMDLINE mean the built-in defaults.
    done, argv = run_script([str(launch)], recorder, tmp_path, env={"MEMORY": "", "CPUS": "", "CMDLINE": ""})
    assert argv == expected(str(launch.parent))


def test_launch_without_ssh_forward(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs, config(ssh_forward=None, memory="512M", cpus=1))
    beside(launch, inputs)
    assert "SSH_PORT" not in launch.read_text()
    done, argv = run_script([str(launch)], recorder, tmp_path, env={"SSH_PORT": "1234"})
    assert done.returncode == 0, done.stderr
    assert argv == expected(str(launch.parent), memory="512M", cpus="1", port="")


def test_launch_other_guest_port(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs, config(ssh_forward=[8022, 2200]))
    beside(launch, inputs)
    done, argv = run_script([str(launch)], recorder, tmp_path)
    assert argv == expected(str(launch.parent), port="8022", guest_port="2200")


def test_launch_missing_file_is_reported(tmp_path, inputs, recorder):
    launch, _ = render(tmp_path, inputs)
    done, argv = run_script([str(launch)], recorder, tmp_path)
    assert done.returncode == 1
    assert argv is None
    assert "OVMF.fd is not a readable file" in done.stderr and done.stderr.count("\n") == 1


@settings(max_examples=fuzz_examples(15), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmdline=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=60))
def test_any_cmdline_arrives_verbatim(tmp_path_factory, cmdline):
    tmp_path = tmp_path_factory.mktemp("cmdline")
    files = {}
    for role in ("ovmf", "kernel", "initrd"):
        files[role] = str(tmp_path / role)
        (tmp_path / role).write_bytes(b"x")
    recorder = tmp_path / "rec"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    launch, _ = render(tmp_path, files, config(cmdline=cmdline, bundle_runner=False))
    beside(launch, files)
    done, argv = run_script([str(launch)], str(recorder), tmp_path)
    assert done.returncode == 0, done.stderr
    index = argv.index("-append")
    # An empty command line means the built-in default, which is the (empty) rendered one.
    assert argv[index + 1] == cmdline


# --- run-qemu.sh --------------------------------------------------------------------------------------------------


def runner_shells():
    shells = [["sh"], ["bash"]]
    if os.access(BUSYBOX, os.X_OK):
        shells.append([BUSYBOX, "sh"])
    return shells


@pytest.mark.parametrize("shell", runner_shells(), ids=lambda s: " ".join(s))
def test_runner_keep(tmp_path, inputs, recorder, shell):
    launch, runner = render(tmp_path, inputs)
    assert stat.S_IMODE(os.stat(runner).st_mode) == 0o755
    beside(launch, inputs)
    _, launch_argv = run_script([str(launch)], recorder, tmp_path, args=["-S"])
    done, argv = run_script([*shell, str(runner)], recorder, tmp_path, env={"KEEP": "1"}, args=["-S"])
    assert done.returncode == 0, done.stderr
    kept = kept_dir(done.stderr)
    assert os.path.dirname(kept) == str(tmp_path)
    assert sorted(os.listdir(kept)) == ["OVMF.fd", "initrd.img", "vmlinuz"]
    for path in inputs.values():
        assert sha256(os.path.join(kept, os.path.basename(path))) == sha256(path)
    assert argv == [arg.replace(str(launch.parent), kept) for arg in launch_argv]
    assert argv == expected(kept, extra=["-S"])


def test_runner_with_busybox_tools_only(tmp_path, inputs, recorder):
    """The runner needs nothing beyond busybox: sh, tail, tar, mktemp, mkdir, rm."""
    if not os.access(BUSYBOX, os.X_OK):
        pytest.skip("needs /bin/busybox")
    _, runner = render(tmp_path, inputs)
    bindir = tmp_path / "bb"
    bindir.mkdir()
    for applet in ("sh", "tail", "tar", "mktemp", "mkdir", "rm", "printf", "dirname"):
        os.symlink(BUSYBOX, bindir / applet)
    done, argv = run_script([BUSYBOX, "sh", str(runner)], recorder, tmp_path, env={"PATH": str(bindir), "KEEP": "1"})
    assert done.returncode == 0, done.stderr
    kept = kept_dir(done.stderr)
    for path in inputs.values():
        assert sha256(os.path.join(kept, os.path.basename(path))) == sha256(path)
    assert argv == expected(kept)


def test_runner_removes_its_directory(tmp_path, inputs, recorder):
    _, runner = render(tmp_path, inputs)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done, argv = run_script([str(runner)], recorder, tmp_path, env={"TMPDIR": str(scratch), "MEMORY": "1G"})
    assert done.returncode == 0, done.stderr
    assert argv[argv.index("-m") + 1] == "1G"
    assert os.listdir(scratch) == []
    assert "kept" not in done.stderr


def test_runner_passes_on_the_qemu_status_and_cleans_up(tmp_path, inputs):
    _, runner = render(tmp_path, inputs)
    failing = tmp_path / "failing qemu"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done, _ = run_script([str(runner)], str(failing), tmp_path, env={"TMPDIR": str(scratch)})
    assert done.returncode == 3
    assert os.listdir(scratch) == []


def test_runner_extract_only(tmp_path, inputs, recorder):
    _, runner = render(tmp_path, inputs)
    target = tmp_path / "unpacked here" / "deeper"
    done, argv = run_script([str(runner)], recorder, tmp_path, env={"EXTRACT_ONLY": str(target)})
    assert done.returncode == 0, done.stderr
    assert argv is None
    assert sorted(os.listdir(target)) == ["OVMF.fd", "initrd.img", "vmlinuz"]
    for path in inputs.values():
        assert sha256(target / os.path.basename(path)) == sha256(path)
    text = runner.read_bytes()[:payload_offset(runner)].decode()
    assert "EXTRACT_ONLY=DIR" in text and "KEEP=1" in text


def test_runner_payload_is_a_deterministic_tar(tmp_path, inputs):
    _, runner = render(tmp_path, inputs)
    data = runner.read_bytes()
    offset = payload_offset(runner)
    header = data[:offset].decode()
    # `tail -n +N` starts at the line after the marker.
    line = int(re.search(r"^payload_line=(\d+)$", header, re.M).group(1))
    assert line == header.count("\n") + 1
    with tarfile.open(fileobj=io.BytesIO(data[offset:])) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["OVMF.fd", "initrd.img", "vmlinuz"]
        for member in members:
            assert member.isreg() and member.mode == 0o644 and member.mtime == 0
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
            assert member.pax_headers == {}
    assert b"PaxHeader" not in data[offset:offset + 1024]


def test_syntax_of_rendered_scripts(tmp_path, inputs):
    launch, runner = render(tmp_path, inputs)
    header = tmp_path / "header.sh"
    header.write_bytes(runner.read_bytes()[:payload_offset(runner)])
    checks = [(["bash", "-n"], launch), (["sh", "-n"], header), (["bash", "-n"], header)]
    if os.access(BUSYBOX, os.X_OK):
        checks += [([BUSYBOX, "sh", "-n"], header)]
    for command, path in checks:
        done = subprocess.run([*command, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, (command, path, done.stderr)


# --- determinism, paths, options ------------------------------------------------------------------------------------


def test_rendering_is_deterministic_and_path_free(tmp_path, inputs):
    launch1, runner1 = render(tmp_path, inputs, label="one")
    # Same bytes at another place: the outputs must not change.
    moved = {}
    for role, path in inputs.items():
        target = tmp_path / "moved" / os.path.basename(path)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(open(path, "rb").read())
        os.utime(target, (12345, 12345))
        moved[role] = str(target)
    launch2, runner2 = render(tmp_path, moved, label="two")
    assert launch1.read_bytes() == launch2.read_bytes()
    assert runner1.read_bytes() == runner2.read_bytes()
    for path in (launch1, runner1):
        data = path.read_bytes()
        assert str(tmp_path).encode() not in data
        assert b"build dir" not in data
    assert sorted(os.listdir(launch1.parent)) == sorted([launch1.name, runner1.name])


def test_bundle_runner_off(tmp_path, inputs):
    launch, runner = render(tmp_path, inputs, config(bundle_runner=False))
    assert launch.exists() and not runner.exists()
    with pytest.raises(TdxError, match="bundle_runner is off"):
        scripts_stage.build_scripts(config(bundle_runner=False), inputs["ovmf"], inputs["kernel"], inputs["initrd"],
                                    str(tmp_path / "l.sh"), str(tmp_path / "r.sh"))
    with pytest.raises(TdxError, match="--runner"):
        scripts_stage.build_scripts(config(), inputs["ovmf"], inputs["kernel"], inputs["initrd"],
                                    str(tmp_path / "l.sh"), None)


def cli(tmp_path, inputs, cfg, *extra):
    path = tmp_path / "scripts.json"
    path.write_text(json.dumps(cfg))
    profile = tmp_path / "ovmf.profile.json"
    profile.write_text(json.dumps({"ovmf_version": "2022.11", "firmware": "OVMF.fd", "tdx_only": False}))
    return subprocess.run([sys.executable, "-m", "tdx_rules.stages.scripts", "--config", str(path),
                           "--ovmf", inputs["ovmf"], "--kernel", inputs["kernel"], "--initrd", inputs["initrd"],
                           "--ovmf-profile", str(profile), *extra], capture_output=True, text=True)


def test_cli(tmp_path, inputs):
    out = tmp_path / "cli"
    done = cli(tmp_path, inputs, config(), "--launch", str(out / "l.sh"), "--runner", str(out / "r.sh"))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["l.sh", "r.sh"]
    done = cli(tmp_path, inputs, config(bundle_runner=False), "--launch", str(tmp_path / "cli2" / "l.sh"))
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "cli2") == ["l.sh"]
    done = cli(tmp_path, inputs, config(memory="lots"), "--launch", str(tmp_path / "cli3" / "l.sh"),
               "--runner", str(tmp_path / "cli3" / "r.sh"))
    assert done.returncode == 1
    assert done.stderr.startswith("tdx-rules: error: ") and done.stderr.count("\n") == 1
    assert "'lots'" in done.stderr
    assert not (tmp_path / "cli3" / "l.sh").exists()


@pytest.mark.parametrize("overrides, needle", [
    ({"memory": "4X"}, "memory"),
    ({"cpus": 0}, "cpus"),
    ({"ssh_forward": [70000, 22]}, "70000"),
    ({"cmdline": "a\0b"}, "NUL"),
    ({"cpus": None}, "cpus"),
])
def test_invalid_settings_are_refused(tmp_path, inputs, overrides, needle):
    with pytest.raises(TdxError) as info:
        render(tmp_path, inputs, config(**overrides))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_invalid_inputs_are_refused(tmp_path, inputs):
    clash = tmp_path / "other" / "vmlinuz"
    clash.parent.mkdir()
    clash.write_bytes(b"x")
    with pytest.raises(TdxError, match="distinct"):
        render(tmp_path, dict(inputs, initrd=str(clash)))
    with pytest.raises(TdxError, match="initrd input"):
        render(tmp_path, dict(inputs, initrd=str(tmp_path / "missing")))
    with pytest.raises(TdxError, match="not a regular file"):
        render(tmp_path, dict(inputs, ovmf=str(tmp_path)))


def test_quoted_file_names(tmp_path, recorder):
    """File names are user values too: they go through the sh filter."""
    build = tmp_path / "b"
    build.mkdir()
    names = {"ovmf": "OVMF it's.fd", "kernel": "vm $(linuz)", "initrd": "init `rd` *.img"}
    files = {}
    for role, name in names.items():
        (build / name).write_bytes(os.urandom(100))
        files[role] = str(build / name)
    launch, runner = render(tmp_path, files)
    beside(launch, files)
    done, argv = run_script([str(launch)], recorder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert argv[argv.index("-kernel") + 1] == str(launch.parent / "vm $(linuz)")
    done, argv = run_script([str(runner)], recorder, tmp_path, env={"KEEP": "1"})
    assert done.returncode == 0, done.stderr
    kept = kept_dir(done.stderr)
    assert argv[argv.index("-initrd") + 1] == os.path.join(kept, "init `rd` *.img")
    assert sorted(os.listdir(kept)) == sorted(names.values())


def test_payload_is_streamed(tmp_path):
    """Bundling a 24 MiB kernel must not hold it in memory."""
    files = {}
    for role, size in (("ovmf", 10), ("kernel", 24 << 20), ("initrd", 10)):
        path = tmp_path / role
        with open(path, "wb") as out:
            out.truncate(size)
        files[role] = str(path)
    tracemalloc.start()
    try:
        render(tmp_path, files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
