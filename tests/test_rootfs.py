"""TdxExt4Rootfs as an SCons stage: content-keyed cache, incremental, and a real boot
of an image whose init mounts the ext4 disk and runs the injected agent."""

import os
import shutil
import subprocess

import pytest

from tdx_rules.boot import boot_image
from tests.conftest import ROOT, scons, stages_run
from tests.oci_fixtures import LAYERS, F, write_oci

SCONSTRUCT = """import tdx_rules
DefaultEnvironment(tools=[])
env = Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])
agent = env.TdxStaticProgram('agent', ['agent.c'])
rootfs = env.TdxExt4Rootfs('rootfs.ext4', 'image', agent=agent)
"""
AGENT_C = open(os.path.join(ROOT, "examples", "hello", "hello.c")).read()


def rootfs_project(path, layers=None):
    os.makedirs(path)
    write_oci(os.path.join(path, "image"), layers=layers)
    with open(os.path.join(path, "SConstruct"), "w") as handle:
        handle.write(SCONSTRUCT)
    with open(os.path.join(path, "agent.c"), "w") as handle:
        handle.write(AGENT_C)
    return str(path)


def debugfs(image, request):
    return subprocess.run(["debugfs", "-R", request, image], capture_output=True, text=True, check=True).stdout


def test_rootfs_stage_builds_a_checked_image_with_the_agent(tmp_path):
    project = rootfs_project(tmp_path / "p")
    result = scons(project, env={"TDX_RULES_CACHE": str(tmp_path / "cache")})
    assert {"program", "rootfs"} <= stages_run(result)
    image = os.path.join(project, "rootfs.ext4")
    subprocess.run(["e2fsck", "-fn", image], check=True, capture_output=True)
    agent = debugfs(image, "stat /sbin/vm-agent")
    assert "Mode:  0755" in agent and "User:     0   Group:     0" in agent
    dumped = tmp_path / "dumped"
    subprocess.run(["debugfs", "-R", f"dump /sbin/vm-agent {dumped}", image], check=True, capture_output=True)
    assert dumped.read_bytes() == open(os.path.join(project, "agent"), "rb").read()
    assert stages_run(scons(project, env={"TDX_RULES_CACHE": str(tmp_path / "cache")})) == set()


def test_same_content_elsewhere_comes_from_the_cache_byte_identical(tmp_path):
    cache = str(tmp_path / "cache")
    first = rootfs_project(tmp_path / "a")
    scons(first, env={"TDX_RULES_CACHE": cache})
    second = rootfs_project(tmp_path / "b")
    result = scons(second, env={"TDX_RULES_CACHE": cache})
    assert "[tdx] rootfs from cache" in result.stdout
    assert open(os.path.join(first, "rootfs.ext4"), "rb").read() == open(os.path.join(second, "rootfs.ext4"), "rb").read()


def test_changed_layer_content_rebuilds_the_image(tmp_path):
    cache = str(tmp_path / "cache")
    project = rootfs_project(tmp_path / "p")
    scons(project, env={"TDX_RULES_CACHE": cache})
    before = open(os.path.join(project, "rootfs.ext4"), "rb").read()
    shutil.rmtree(os.path.join(project, "image"))
    write_oci(os.path.join(project, "image"), layers=LAYERS + [[F("etc/added", b"new\n")]], compressions=("gzip",) * 4)
    result = scons(project, env={"TDX_RULES_CACHE": cache})
    assert stages_run(result) == {"rootfs"} and "from cache" not in result.stdout
    assert open(os.path.join(project, "rootfs.ext4"), "rb").read() != before
    assert "added" in debugfs(os.path.join(project, "rootfs.ext4"), "ls -l /etc")


def test_corrupt_cached_image_is_not_reused(tmp_path):
    cache = tmp_path / "cache"
    first = rootfs_project(tmp_path / "a")
    scons(first, env={"TDX_RULES_CACHE": str(cache)})
    [cached] = list((cache / "rootfs").glob("*.ext4"))
    data = bytearray(cached.read_bytes())
    data[1080:1082] = b"\0\0"  # break the ext4 magic
    cached.write_bytes(bytes(data))
    second = rootfs_project(tmp_path / "b")
    result = scons(second, env={"TDX_RULES_CACHE": str(cache)})
    assert "from cache" not in result.stdout
    subprocess.run(["e2fsck", "-fn", os.path.join(second, "rootfs.ext4")], check=True, capture_output=True)


def test_missing_blob_is_one_scons_line_and_no_image(tmp_path):
    project = rootfs_project(tmp_path / "p")
    blobs = os.path.join(project, "image", "blobs", "sha256")
    os.remove(os.path.join(blobs, sorted(os.listdir(blobs))[0]))
    result = scons(project, check=False, env={"TDX_RULES_CACHE": str(tmp_path / "cache")})
    errors = [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]
    assert result.returncode and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(os.path.join(project, "rootfs.ext4"))


@pytest.mark.slow
def test_image_boots_from_the_ext4_disk_and_runs_the_agent(tmp_path):
    project = rootfs_project(tmp_path / "p")
    with open(os.path.join(project, "SConstruct"), "a") as handle:
        handle.write("env.TdxImage('withdisk', rootfs=rootfs, unmeasured_rootfs=True, minirootfs='debian', "
                     "kernel='apt:linux-image-6.12-amd64', ovmf='apt:ovmf', memory='1G', "
                     "cmdline='console=ttyS0 panic=-1')\n")
    scons(project)
    out = os.path.join(project, "build", "tdx", "withdisk")
    console = boot_image(os.path.join(out, "withdisk-launch-tdx.sh"), until="HELLO-DONE")
    assert "root filesystem /dev/vda mounted" in console, console[-3000:]
    assert "[tdx-init] starting /sbin/vm-agent" in console
    assert "HELLO-FROM-TDX-GUEST" in console and "HELLO-DONE" in console
    launch = open(os.path.join(out, "withdisk-launch-tdx.sh")).read()
    assert "virtio-blk-pci,drive=rootfs" in launch and "rootfs.ext4" in launch


def test_overlay2_source_tracks_edits_in_its_lower_layers(tmp_path):
    from tests.oci_fixtures import write_overlay2

    project = rootfs_project(tmp_path / "p")
    top = write_overlay2(str(tmp_path / "p" / "overlay2"))
    with open(os.path.join(project, "SConstruct"), "a") as handle:
        handle.write(f"env.TdxExt4Rootfs('ov.ext4', {top!r}, agent=agent)\n")
    cache = str(tmp_path / "cache")
    scons(project, "ov.ext4", env={"TDX_RULES_CACHE": cache})
    assert stages_run(scons(project, "ov.ext4", env={"TDX_RULES_CACHE": cache})) == set()
    lower_diffs = sorted(p for p in (tmp_path / "p" / "overlay2").glob("*/diff") if str(p.parent) != top)
    marker = lower_diffs[0] / "lower-edit.txt"
    marker.write_text("edited\n")
    assert stages_run(scons(project, "ov.ext4", env={"TDX_RULES_CACHE": cache})) == {"rootfs"}
    listing = debugfs(os.path.join(project, "ov.ext4"), "ls -l /")
    assert "lower-edit.txt" in listing


def test_docker_save_tarball_source(tmp_path):
    from tests.oci_fixtures import write_docker_save

    project = rootfs_project(tmp_path / "p")
    write_docker_save(os.path.join(project, "saved.tar"))
    with open(os.path.join(project, "SConstruct"), "a") as handle:
        handle.write("env.TdxExt4Rootfs('saved.ext4', 'saved.tar', agent=agent, size='64M')\n")
    scons(project, "saved.ext4", env={"TDX_RULES_CACHE": str(tmp_path / "cache")})
    image = os.path.join(project, "saved.ext4")
    assert os.path.getsize(image) == 64 << 20
    subprocess.run(["e2fsck", "-fn", image], check=True, capture_output=True)
