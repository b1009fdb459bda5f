"""Every example builds from a copy of its directory, as a user would run it; the Rust, Go and
container workloads then run (the Rust binary and the Go service on the host, then each image
in a QEMU boot) and print their markers."""

import os
import shutil
import subprocess
import threading
import urllib.request

import pytest

from tdx_rules import elf
from tdx_rules.boot import boot_image
from tdx_rules.stages import program
from tests.conftest import ROOT, scons, stages_run


def copy_example(name, tmp_path):
    project = str(tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "examples", name), project,
                    ignore=shutil.ignore_patterns("build", ".sconsign.dblite", ".tdx-csig.json", "target", ".tdx-go"))
    return project


def test_hello_example_builds(tmp_path):
    project = copy_example("hello", tmp_path)
    result = scons(project, "hello")
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    assert os.path.getsize(os.path.join(project, "build", "tdx", "hello", "hello-initramfs.cpio.gz")) > 0


@pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo is not installed")
def test_rust_example_builds_a_static_binary_and_says_which_target(tmp_path):
    project = copy_example("rust", tmp_path)
    result = scons(project, "hello-rust")
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    binary = os.path.join(project, "hello-tdx")
    elf.check_static_x86_64(binary, "hello-tdx")
    glibc = program.rust_build_target() == program.RUST_GLIBC_TARGET
    assert ("building a static glibc binary" in result.stdout) == glibc
    run = subprocess.run([binary], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "HELLO-FROM-RUST-IN-TDX" in run.stdout
    out = os.path.join(project, "build", "tdx", "hello-rust")
    assert stages_run(scons(project, "hello-rust")) == set()
    console = boot_image(os.path.join(out, "hello-rust-launch-tdx.sh"), until="RUST-DONE")
    assert "[tdx-init] starting /usr/bin/hello-tdx" in console and "HELLO-FROM-RUST-IN-TDX" in console


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (apt-get install golang-go)")
def test_go_example_serves_http_on_the_host_and_in_the_booted_image(tmp_path):
    project = copy_example("go", tmp_path)
    result = scons(project, "hello-go")
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    binary = os.path.join(project, "hello-go")
    elf.check_static_x86_64(binary, "hello-go")
    # On the host: the service on an ephemeral loopback port, asked by this test as well as by itself.
    service = subprocess.Popen([binary], env=dict(os.environ, LISTEN="127.0.0.1:0"), stdout=subprocess.PIPE,
                               text=True)
    timer = threading.Timer(60, service.kill)
    timer.start()
    try:
        lines = []
        for line in service.stdout:
            lines.append(line)
            if line.startswith("GO-SERVING"):
                break
        address = next(line.split()[1] for line in lines if line.startswith("GO-LISTENING"))
        with urllib.request.urlopen(f"http://{address}/", timeout=30) as response:
            body = response.read().decode()
    finally:
        timer.cancel()
        service.kill()
        service.wait()
    assert any(line.startswith("GO-SELF-REQUEST 200 hello from Go in TDX") for line in lines), lines
    assert body.startswith("hello from Go in TDX (configfs-tsm: ")
    out = os.path.join(project, "build", "tdx", "hello-go")
    assert stages_run(scons(project, "hello-go")) == set()
    console = boot_image(os.path.join(out, "hello-go-launch-tdx.sh"), until="GO-SERVING")
    assert "[tdx-init] starting /usr/bin/hello-go" in console
    assert "GO-SELF-REQUEST 200 hello from Go in TDX" in console and "GO-ERROR" not in console


def test_container_example_boots_and_runs_the_agent_from_the_image(tmp_path):
    project = copy_example("container", tmp_path)
    result = scons(project, "container", env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert {"program", "rootfs", "cpio", "manifest"} <= stages_run(result)
    out = os.path.join(project, "build", "tdx", "container")
    subprocess.run(["e2fsck", "-fn", os.path.join(project, "build", "rootfs.ext4")], check=True,
                   capture_output=True)
    console = boot_image(os.path.join(out, "container-launch-tdx.sh"), until="AGENT-DONE")
    assert "mounted through dm-verity" in console
    assert "AGENT-FROM-CONTAINER-ROOTFS" in console
    assert "container file: greetings from the container image's root filesystem" in console
