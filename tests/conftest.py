"""Shared fixtures: real scons runs in subprocesses on temporary projects."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tdx_rules.scons.tool import STAGE_CODE
from tests import debian

ROOT = debian.ROOT
DOWNLOAD_CACHE = os.path.join(debian.CACHE, "tdx-rules-cache")
STAGE_LINE = re.compile(r"^\[tdx\] (\w+) (\S+)$", re.M)


def scons(project, *args, env=None, check=True):
    """Run scons in ``project``; return the CompletedProcess (text)."""
    environ = dict(os.environ)
    environ.setdefault("TDX_RULES_CACHE", DOWNLOAD_CACHE)
    environ["PYTHONPATH"] = ROOT
    environ.pop("TDX_IMAGE_SKIP", None)
    environ.update(env or {})
    result = subprocess.run([sys.executable, "-m", "SCons", "-Q", *args], cwd=project, env=environ,
                            capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"scons {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(result) -> set:
    """The stages that ran, from their progress lines (`[tdx] cpio hello`)."""
    return {match.group(1) for match in STAGE_LINE.finditer(result.stdout) if match.group(1) in STAGE_CODE}


@pytest.fixture(scope="session")
def small_kernel(tmp_path_factory):
    """The Debian 6.12 kernel plus a modules tree holding only the TDX-related directories and
    those a root filesystem disk needs (virtio block, ext4, device-mapper, overlayfs, crc32c) and
    the virtio network driver."""
    tree = debian.kernel_tree()
    release = debian.kernel_release()
    out = tmp_path_factory.mktemp("kernel")
    src = os.path.join(tree, "lib", "modules", release)
    dst = os.path.join(out, "modules", "lib", "modules", release)
    for sub in ("kernel/fs/configfs", "kernel/drivers/virt", "kernel/net/vmw_vsock", "kernel/drivers/virtio",
                "kernel/drivers/block", "kernel/drivers/md", "kernel/fs/ext4", "kernel/fs/jbd2", "kernel/fs/overlayfs",
                "kernel/crypto", "kernel/lib"):
        shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
    # virtio_net and what it needs: the network of images with an SSH server.
    for name in ("kernel/fs/mbcache.ko.xz", "kernel/drivers/net/virtio_net.ko.xz",
                 "kernel/drivers/net/net_failover.ko.xz", "kernel/net/core/failover.ko.xz"):
        if os.path.exists(os.path.join(src, name)):
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    for name in ("modules.builtin", "modules.order"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)
    vmlinuz = os.path.join(out, "vmlinuz")
    shutil.copy(os.path.join(tree, "boot", f"vmlinuz-{release}"), vmlinuz)
    return {"vmlinuz": vmlinuz, "modules_dir": os.path.join(out, "modules"), "release": release}


HELLO_C = open(os.path.join(ROOT, "examples", "hello", "hello.c")).read()


def write_project(path, image_options: str, extra_setup: str = "") -> str:
    """A project with hello.c and an SConstruct declaring image 'hello' with ``image_options``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "hello.c"), "w") as handle:
        handle.write(HELLO_C)
    with open(os.path.join(path, "SConstruct"), "w") as handle:
        handle.write(
            "import tdx_rules\n"
            "DefaultEnvironment(tools=[])\n"
            "env = Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
            f"{extra_setup}\n"
            "app = env.TdxStaticProgram('hello', ['hello.c'])\n"
            f"env.TdxImage('hello', binary=app, {image_options})\n")
    return str(path)


# The SConstruct lines that read opts.json (tests change options by rewriting it).
FAST_SETUP = "import json, os\nOPTS = json.load(open('opts.json')) if os.path.exists('opts.json') else {}"


def fast_options(small_kernel) -> str:
    """TdxImage keywords for an image from Debian parts with the small modules tree (needs FAST_SETUP)."""
    return (f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
            f"modules_dir={small_kernel['modules_dir']!r}, ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', "
            "memory=OPTS.get('memory', '2G'), ssh_keys=OPTS.get('ssh_keys', []), env_vars=OPTS.get('env_vars', {}), "
            "extra_files=OPTS.get('extra_files', {}), cmdline='console=ttyS0 panic=-1'")


@pytest.fixture
def fast_project(tmp_path, small_kernel):
    """A complete image from Debian parts with a small modules tree: builds in seconds."""
    return write_project(tmp_path / "proj", fast_options(small_kernel), FAST_SETUP)


def fuzz_examples(default: int) -> int:
    """Examples per hypothesis fuzz test: ``default`` in CI; TDX_FUZZ_SCALE=100 runs 100 times as many."""
    return default * max(1, int(os.environ.get("TDX_FUZZ_SCALE", "1")))
