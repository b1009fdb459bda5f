"""The default upstream downloads (Alpine, Ubuntu kernel, Canonical OVMF), offline.

Real scons runs in subprocesses build projects that use the rule's defaults,
with TDX_RULES_MIRROR pointing at a loopback server that serves files laid out
like the real upstreams (see tests/upstream_fixture.py). Every test has its
own download cache unless it tests cache reuse.
"""

import hashlib
import json
import os
import socket
import subprocess
import time

import pytest

from tdx_rules import settings
from tests.conftest import scons, stages_run, write_project
from tests.test_incremental import reran_for_new_initrd
from tests.upstream_fixture import (  # noqa: F401  (fixtures)
    KERNEL,
    OLD_KERNEL,
    OVMF_DEB,
    UBUNTU_ROOT,
    alpine_tarball,
    drop_stanza,
    gz,
    kernel_packages,
    packages_index,
    signing_key,
    upstream_mirror,
    upstream_tree,
    xz,
)

OPTIONS = "cmdline='console=ttyS0 panic=-1'"  # everything else: the defaults
RELEASE = "6.8.0-55-generic"
TARBALL = alpine_tarball("3.21.0")
TARBALL_320 = alpine_tarball("3.20.3")
KERNEL_DEBS = [rel for _, rel in kernel_packages(KERNEL)]
BIG_FILES = [TARBALL, OVMF_DEB] + KERNEL_DEBS
TDX_GUEST = f"lib/modules/{RELEASE}/kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko"


def environment(mirror_url: str, cache, **extra) -> dict:
    """The build environment: this mirror and cache, the test archive's key trusted, no TDX_IMAGE_*
    override from the caller's shell."""
    env = {s.env: "" for s in settings.SETTINGS if s.env}
    env.update(TDX_RULES_MIRROR=mirror_url, TDX_RULES_CACHE=str(cache), VERBOSE="",
               TDX_RULES_KEYRING=signing_key().public)
    env.update(extra)
    return env


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error_lines(result) -> list:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("scons: ***")]


def assert_one_clean_error(result) -> str:
    """The build failed with exactly one ``scons: ***`` line and no Python traceback; return that line."""
    assert result.returncode != 0, result.stdout
    lines = error_lines(result)
    assert len(lines) == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def cache_files(cache) -> list:
    return [os.path.join(top, name) for top, _, names in os.walk(cache) for name in names]


def initramfs_names(path) -> set:
    """Member names of a gzip'd newc archive, as GNU cpio lists them."""
    data = subprocess.run(["gzip", "-dc", path], check=True, capture_output=True).stdout
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, check=True, capture_output=True).stdout
    return set(listing.decode().splitlines())


def initramfs_member(path, name) -> bytes:
    data = subprocess.run(["gzip", "-dc", path], check=True, capture_output=True).stdout
    return subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", name], input=data, check=True,
                          capture_output=True).stdout


def out(project, name) -> str:
    return os.path.join(project, "build", "tdx", "hello", name)


def read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.fixture
def project(tmp_path):
    return write_project(tmp_path / "proj", OPTIONS)


def test_default_upstreams_build_a_complete_image(project, upstream_mirror, tmp_path):
    mirror, tree = upstream_mirror, upstream_mirror.tree
    result = scons(project, env=environment(mirror.url, tmp_path / "cache"))
    assert {"minirootfs", "kernel", "ovmf", "manifest"} <= stages_run(result)
    assert all(mirror.count(rel) == 1 for rel in BIG_FILES), dict(mirror.server.requests)

    manifest = json.loads(read(out(project, "hello-manifest.json")))
    inputs = manifest["inputs"]
    served = {tree.url(rel): sha256(tree.read(rel)) for rel in BIG_FILES}
    assert [(r["origin"], r["sha256"]) for r in inputs["minirootfs"]] == [
        ("https://dl-cdn.alpinelinux.org/alpine/v3.21/releases/x86_64/alpine-minirootfs-3.21.0-x86_64.tar.gz",
         served[tree.url(TARBALL)])]
    assert inputs["minirootfs"][0]["spec"] == "alpine:3.21.0"
    assert [(r["origin"], r["sha256"]) for r in inputs["kernel"]] == [
        (f"https://archive.ubuntu.com/ubuntu/pool/main/l/linux/{name}_6.8.0-55.57_amd64.deb",
         served[tree.url(rel)]) for name, rel in kernel_packages(KERNEL)]
    assert {r["spec"] for r in inputs["kernel"]} == {"ubuntu-kernel:6.8.0-55.57"}
    assert [(r["origin"], r["sha256"], r["member"]) for r in inputs["ovmf"]] == [
        (("https://ppa.launchpadcontent.net/kobuk-team/tdx-release/ubuntu/pool/main/e/edk2/"
          "ovmf_2024.02-3+tdx1.0_all.deb"), served[tree.url(OVMF_DEB)], "usr/share/ovmf/OVMF.fd")]
    text = json.dumps(manifest)
    assert "127.0.0.1" not in text and str(tmp_path) not in text

    initrd = out(project, "hello-initramfs.cpio.gz")
    names = initramfs_names(initrd)
    for name in ("etc/alpine-release", "bin/busybox", "lib/ld-musl-x86_64.so.1", "lib/libc.musl-x86_64.so.1",
                 f"lib/modules/{RELEASE}/modules.dep", TDX_GUEST):
        assert name in names, sorted(names)
    assert not any("sev-guest" in name for name in names)  # only the TDX modules and their dependencies
    assert initramfs_member(initrd, "etc/alpine-release") == b"3.21.0\n"
    dep = initramfs_member(initrd, f"lib/modules/{RELEASE}/modules.dep").decode()
    assert ("kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko: kernel/drivers/virt/coco/tsm.ko "
            "kernel/fs/configfs/configfs.ko\n") in dep
    assert read(out(project, "hello-vmlinuz")) == tree.vmlinuz
    assert read(out(project, "hello-ovmf.fd")) == tree.ovmf_fd


def test_changed_alpine_release_reruns_exactly_the_minirootfs_chain(project, upstream_mirror, tmp_path):
    env = environment(upstream_mirror.url, tmp_path / "cache")
    scons(project, env=env)
    result = scons(project, env=dict(env, TDX_IMAGE_ALPINE_VERSION="3.20", TDX_IMAGE_ALPINE_MINOR="3"))
    assert reran_for_new_initrd(stages_run(result), {"minirootfs", "busybox", "cpio"})
    assert upstream_mirror.count(TARBALL_320) == 1 and upstream_mirror.count(TARBALL) == 1
    assert initramfs_member(out(project, "hello-initramfs.cpio.gz"), "etc/alpine-release") == b"3.20.3\n"
    record, = json.loads(read(out(project, "hello-manifest.json")))["inputs"]["minirootfs"]
    assert record["origin"] == upstream_mirror.tree.url(TARBALL_320)
    assert record["sha256"] == sha256(upstream_mirror.tree.read(TARBALL_320))
    assert stages_run(scons(project, env=dict(env, TDX_IMAGE_ALPINE_VERSION="3.20",
                                              TDX_IMAGE_ALPINE_MINOR="3"))) == set()


def test_second_project_with_the_same_cache_downloads_nothing(upstream_mirror, tmp_path):
    cache = tmp_path / "shared-cache"
    first = write_project(tmp_path / "one", OPTIONS)
    scons(first, env=environment(upstream_mirror.url, cache))
    before = upstream_mirror.total()
    assert all(upstream_mirror.count(rel) == 1 for rel in BIG_FILES)
    second = write_project(tmp_path / "two", OPTIONS)
    result = scons(second, env=environment(upstream_mirror.url, cache))
    assert {"minirootfs", "kernel", "ovmf"} <= stages_run(result)
    assert all(upstream_mirror.count(rel) == 1 for rel in BIG_FILES)
    assert upstream_mirror.total() == before  # not even the checksum files and indexes
    assert "[tdx] fetch" not in result.stdout
    for name in ("hello-vmlinuz", "hello-ovmf.fd", "hello-initramfs.cpio.gz"):
        assert read(out(second, name)) == read(out(first, name))


BAD_SHA = sha256(b"not the minirootfs")


@pytest.fixture
def tampered(project, upstream_mirror, tmp_path):
    """A failed build against a mirror whose .sha256 names a wrong hash; returns (result, cache)."""
    upstream_mirror.serve(TARBALL + ".sha256", f"{BAD_SHA}  alpine-minirootfs-3.21.0-x86_64.tar.gz\n".encode())
    cache = tmp_path / "cache"
    return scons(project, env=environment(upstream_mirror.url, cache), check=False), cache


def test_tampered_checksum_file_fails_cleanly_and_keeps_nothing(project, upstream_mirror, tampered):
    result, cache = tampered
    line = assert_one_clean_error(result)
    assert "alpine-minirootfs-3.21.0-x86_64.tar.gz" in line and BAD_SHA in line and "checksum mismatch" in line
    assert not os.path.exists(out(project, "work/minirootfs.tar.gz"))
    assert not os.path.exists(os.path.join(cache, "sha256", BAD_SHA))
    bad = upstream_mirror.tree.read(TARBALL)  # the bytes that failed verification
    assert not [path for path in cache_files(cache) if os.path.getsize(path) == len(bad) and read(path) == bad]


def test_fixed_checksum_file_is_fetched_again(project, upstream_mirror, tampered):
    _, cache = tampered
    upstream_mirror.serve(TARBALL + ".sha256", upstream_mirror.tree.read(TARBALL + ".sha256"))
    result = scons(project, env=environment(upstream_mirror.url, cache), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def unlisted(project, upstream_mirror, tmp_path):
    """A failed build against a mirror whose noble-updates index (signed as the archive signs it)
    lacks linux-modules-extra."""
    package, deb = kernel_packages(KERNEL)[2]
    index = drop_stanza(upstream_mirror.tree.plain_indexes[packages_index(UBUNTU_ROOT, "noble-updates")], package)
    upstream_mirror.publish(UBUNTU_ROOT, "noble-updates", index)
    cache = tmp_path / "cache"
    return scons(project, env=environment(upstream_mirror.url, cache), check=False), cache, package, deb


def suite_dir(suite, root=UBUNTU_ROOT):
    return f"{root}/dists/{suite}/"


def test_kernel_deb_missing_from_the_index_is_refused(project, upstream_mirror, unlisted):
    result, _, package, deb = unlisted
    line = assert_one_clean_error(result)
    assert "cannot be verified" in line and f"{package} 6.8.0-55.57" in line and "kernel" in line
    assert upstream_mirror.count(deb) == 0  # an unverifiable file is never downloaded
    assert not os.path.exists(out(project, "hello-vmlinuz"))


def test_updated_index_is_fetched_again(project, upstream_mirror, unlisted):
    _, cache, _, _ = unlisted
    for rel in upstream_mirror.tree.files():
        if rel.startswith(suite_dir("noble-updates")):
            upstream_mirror.serve(rel, upstream_mirror.tree.read(rel))
    result = scons(project, env=environment(upstream_mirror.url, cache), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_kernel_version_is_a_clear_error_after_searching_every_suite(project, upstream_mirror, tmp_path):
    env = environment(upstream_mirror.url, tmp_path / "cache", TDX_IMAGE_KERNEL_VERSION="6.8.0-99",
                      TDX_IMAGE_KERNEL_ABI="101")
    result = scons(project, env=env, check=False)
    line = assert_one_clean_error(result)
    assert "linux-image-unsigned-6.8.0-99-generic 6.8.0-99.101" in line and "cannot be verified" in line
    assert "noble, noble-updates, noble-security" in line
    counts = {(suite, suffix): upstream_mirror.count(packages_index(UBUNTU_ROOT, suite, suffix))
              for suite in ("noble", "noble-updates", "noble-security") for suffix in (".xz", ".gz")}
    # An index is read in its .xz form only; noble-security's signed Release lists only a .gz. Each is
    # fetched once by the SHA-256 its Release gives it, although every InRelease is fetched twice
    # (the second pass asks for newer ones).
    assert counts == {("noble", ".xz"): 1, ("noble", ".gz"): 0, ("noble-updates", ".xz"): 1,
                      ("noble-updates", ".gz"): 0, ("noble-security", ".xz"): 0, ("noble-security", ".gz"): 1}
    assert upstream_mirror.count(suite_dir("noble") + "InRelease") == 2
    assert not any("6.8.0-99" in path for path in upstream_mirror.server.requests)
    assert not os.path.exists(out(project, "hello-vmlinuz"))


def test_kernel_from_the_release_pocket(project, upstream_mirror, tmp_path):
    env = environment(upstream_mirror.url, tmp_path / "cache", TDX_IMAGE_KERNEL_VERSION="6.8.0-31",
                      TDX_IMAGE_KERNEL_ABI="31")
    scons(project, "hello-modules", env=env)
    info = json.loads(read(out(project, "work/modules.info.json")))
    assert info["release"] == "6.8.0-31-generic"
    assert "tdx_guest" in {module["name"] for module in info["bundled"]}
    assert upstream_mirror.count(packages_index(UBUNTU_ROOT, "noble-updates", ".xz")) == 0
    kernel = json.loads(read(out(project, "work/kernel.info.json")))["inputs"]
    assert [r["sha256"] for r in kernel] == [sha256(upstream_mirror.tree.read(rel))
                                             for _, rel in kernel_packages(OLD_KERNEL)]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_mirror_is_one_clear_error(project, tmp_path):
    started = time.monotonic()
    result = scons(project, env=environment(f"http://127.0.0.1:{_closed_port()}/mirror", tmp_path / "cache"),
                   check=False)
    elapsed = time.monotonic() - started
    line = assert_one_clean_error(result)
    assert "cannot download" in line and "connection refused" in line
    assert f"mirror of https://{TARBALL}.sha256)" in line and "check the mirror" in line
    # fetch's defaults: 4 retries after 0.5, 1, 2, 4 s; the minirootfs stage is the first to download.
    assert result.stdout.count("[tdx] retry ") == 4
    assert elapsed < 30
    assert not os.path.exists(out(project, "work/minirootfs.tar.gz"))


def test_forbidden_index_is_reported_as_such(project, upstream_mirror, tmp_path):
    for suite in ("noble", "noble-updates", "noble-security"):
        for suffix in (".xz", ".gz"):
            upstream_mirror.serve(packages_index(UBUNTU_ROOT, suite, suffix), b"", status=403)
    result = scons(project, "hello-kernel", env=environment(upstream_mirror.url, tmp_path / "cache"), check=False)
    line = assert_one_clean_error(result)
    assert "HTTP 403" in line and "cannot be verified" not in line
