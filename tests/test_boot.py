"""End to end: examples/hello from Debian parts, booted under QEMU software emulation.

The image is built by a real scons run exactly as the example declares it
(apt: kernel 6.12, Debian's OVMF, minirootfs='debian'), then booted by its own
launch script and by its self-extracting runner in local mode (TDX=0: OVMF as
firmware, QEMU under TCG). The serial console must show the workload's marker and
the loaded vsock and tsm modules.
"""

import json
import os
import shutil
import subprocess

import pytest

from tdx_rules.boot import boot_image
from tests import debian
from tests.conftest import ROOT, scons

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hello_image(tmp_path_factory):
    project = tmp_path_factory.mktemp("hello")
    for name in ("SConstruct", "hello.c"):
        shutil.copy(os.path.join(ROOT, "examples", "hello", name), project)
    scons(str(project))
    return os.path.join(project, "build", "tdx", "hello")


def assert_guest_ran(console):
    assert "HELLO-FROM-TDX-GUEST" in console, console[-3000:]
    assert "HELLO-DONE" in console
    for module in ("vsock", "vmw_vsock_virtio_transport", "tsm", "configfs"):
        assert f"module loaded: {module}\n" in console, (module, console[-3000:])
    assert "configfs-tsm: " in console


def test_launch_script_in_local_mode_runs_the_workload_with_tdx_modules_loaded(hello_image):
    console = boot_image(os.path.join(hello_image, "hello-launch-tdx.sh"), until="HELLO-DONE")
    assert_guest_ran(console)
    assert "[tdx-init] starting /usr/bin/hello" in console
    assert "TDX=0: image hello starts as an ordinary VM under tcg; its measurements do not apply" in console


def test_self_extracting_runner_in_local_mode_runs_the_workload(hello_image, tmp_path):
    console = boot_image(os.path.join(hello_image, "hello-run-qemu.sh"), until="HELLO-DONE",
                         env={"TMPDIR": str(tmp_path)})
    assert_guest_ran(console)
    assert os.listdir(tmp_path) == [], "the runner left its temporary directory behind"


def test_the_profile_takes_the_ovmf_release_of_the_package_the_image_uses(hello_image):
    # examples/hello says ovmf='apt:ovmf' and no ovmf_version: the host's package decides.
    manifest = json.load(open(os.path.join(hello_image, "hello-manifest.json")))
    assert manifest["measurements"]["profile"]["ovmf_version"] == debian.package_version("ovmf")
    assert manifest["inputs"]["ovmf"][0]["member"] == "usr/share/ovmf/OVMF.fd"


def test_self_extracting_runner_unpacks_the_three_files_intact(hello_image, tmp_path):
    recorder = tmp_path / "qemu"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n')
    recorder.chmod(0o755)
    env = dict(os.environ, QEMU=str(recorder), KEEP="1", RECORD=str(tmp_path / "args"))
    result = subprocess.run(["sh", os.path.join(hello_image, "hello-run-qemu.sh")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kept = [line.split()[-1] for line in (result.stdout + result.stderr).splitlines() if os.path.isdir(line.split()[-1] if line.split() else "/nonexistent")]
    assert kept, result.stdout + result.stderr
    for name in ("hello-ovmf.fd", "hello-vmlinuz", "hello-initramfs.cpio.gz"):
        with open(os.path.join(kept[-1], name), "rb") as a, open(os.path.join(hello_image, name), "rb") as b:
            assert a.read() == b.read(), name
    args = (tmp_path / "args").read_text().splitlines()
    assert '"qom-type":"tdx-guest"' in " ".join(args) and "1G" in args
    shutil.rmtree(kept[-1])


def test_rebuild_of_the_example_is_byte_identical(hello_image, tmp_path):
    project = tmp_path / "again"
    project.mkdir()
    for name in ("SConstruct", "hello.c"):
        shutil.copy(os.path.join(ROOT, "examples", "hello", name), project)
    scons(str(project))
    other = project / "build" / "tdx" / "hello"
    for name in sorted(os.listdir(hello_image)):
        if os.path.isfile(os.path.join(hello_image, name)):
            assert (other / name).read_bytes() == open(os.path.join(hello_image, name), "rb").read(), name


def test_until_is_found_when_the_console_arrives_a_few_bytes_at_a_time(tmp_path):
    """A guest that keeps running (a service) ends the boot only through ``until``; the
    serial console hands it over in small pieces. A stand-in script plays that console."""
    script = tmp_path / "slow-console.sh"
    script.write_text("#!/bin/sh\nprintf 'booting '\nfor byte in G O - S E R V I N G; do\n"
                      "  printf '%s' \"$byte\"; sleep 0.05\ndone\nexec sleep 600\n")
    script.chmod(0o755)
    console = boot_image(str(script), until="GO-SERVING", timeout=60)
    assert "GO-SERVING" in console
