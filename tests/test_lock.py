"""tdx.lock: every upstream input resolved once, then used exactly, without an index, from the
archive or from the snapshot archive of its distribution. Real scons runs against the loopback
mirror of tests/upstream_fixture.py, and the host's own apt with a private repository."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT, scons, stages_run, write_project
from tests.httpserver import HttpServer
from tests.test_launch import private_apt
from tests.test_upstream import KERNEL_DEBS, OPTIONS, TARBALL, assert_one_clean_error, environment, out, read
from tests.upstream_fixture import OVMF_DEB, PPA_ROOT, UBUNTU_ROOT, packages_index, upstream_mirror, upstream_tree  # noqa: F401  (fixtures)


def locked_project(tmp_path, mirror, name="proj"):
    project = write_project(tmp_path / name, OPTIONS)
    scons(project, "--tdx-lock", env=environment(mirror.url, tmp_path / "lock-cache"))
    return project


def load(project):
    return json.load(open(os.path.join(project, "tdx.lock")))


def test_the_lock_pins_every_upstream_input_with_its_url_size_and_sha256(tmp_path, upstream_mirror):
    project = locked_project(tmp_path, upstream_mirror)
    lock = load(project)
    assert set(lock["specs"]) == {"alpine:3.21.0", "ubuntu-kernel:6.8.0-55.57", "canonical-ovmf:2024.02-3+tdx1.0"}
    tree = upstream_mirror.tree
    for spec, rels in (("alpine:3.21.0", [TARBALL]), ("ubuntu-kernel:6.8.0-55.57", KERNEL_DEBS),
                       ("canonical-ovmf:2024.02-3+tdx1.0", [OVMF_DEB])):
        files = lock["specs"][spec]
        assert [f["url"] for f in files] == [tree.url(rel) for rel in rels]
        assert [f["sha256"] for f in files] == [hashlib.sha256(tree.read(rel)).hexdigest() for rel in rels]
        assert [f["size"] for f in files] == [len(tree.read(rel)) for rel in rels]
    assert lock["specs"]["ubuntu-kernel:6.8.0-55.57"][0]["snapshot"] == {
        "archive": "ubuntu", "path": KERNEL_DEBS[0][len(UBUNTU_ROOT) + 1:]}
    text = open(os.path.join(project, "tdx.lock")).read()
    assert text == json.dumps(lock, indent=1, sort_keys=True) + "\n"  # sorted, one entry a line
    # Refreshing an unchanged lock changes nothing, not even its time.
    scons(project, "--tdx-lock", env=environment(upstream_mirror.url, tmp_path / "lock-cache"))
    assert open(os.path.join(project, "tdx.lock")).read() == text


def only_pool(mirror):
    """The mirror answers for the files themselves, not for any index, checksum or signature."""
    for rel in mirror.tree.files():
        if "/dists/" in rel or rel.endswith((".sha256", ".asc")):
            mirror.serve(rel, b"", status=404)


def test_a_locked_build_uses_only_the_locked_files_and_no_index(tmp_path, upstream_mirror):
    project = locked_project(tmp_path, upstream_mirror)
    only_pool(upstream_mirror)
    before = dict(upstream_mirror.server.requests)
    result = scons(project, env=environment(upstream_mirror.url, tmp_path / "fresh-cache", TDX_RULES_KEYRING=""))
    assert {"minirootfs", "kernel", "ovmf", "manifest"} <= stages_run(result)
    asked = {path for path, count in upstream_mirror.server.requests.items() if count > before.get(path, 0)}
    assert asked and not [path for path in asked if "/dists/" in path or path.endswith((".sha256", ".asc"))]
    manifest = json.load(open(out(project, "hello-manifest.json")))
    assert manifest["lock"]["sha256"] == hashlib.sha256(read(os.path.join(project, "tdx.lock"))).hexdigest()


def test_a_spec_that_is_not_in_the_lock_is_refused(tmp_path, upstream_mirror):
    project = locked_project(tmp_path, upstream_mirror)
    result = scons(project, env=environment(upstream_mirror.url, tmp_path / "cache", TDX_IMAGE_ALPINE_VERSION="3.20",
                                            TDX_IMAGE_ALPINE_MINOR="3"), check=False)
    line = assert_one_clean_error(result)
    assert "alpine:3.20.3 is not in" in line and "tdx.lock" in line and "scons --tdx-lock" in line
    assert stages_run(result) == set()


def test_a_locked_file_the_archive_dropped_comes_from_the_snapshot_archive(tmp_path, upstream_mirror):
    project = locked_project(tmp_path, upstream_mirror)
    locked = load(project)["locked"]
    deb = KERNEL_DEBS[0]
    snapshot = f"snapshot.ubuntu.com/ubuntu/{locked}/{deb[len(UBUNTU_ROOT) + 1:]}"
    upstream_mirror.serve(snapshot, upstream_mirror.tree.read(deb))
    upstream_mirror.serve(deb, b"", status=404)
    before = upstream_mirror.count(deb)
    scons(project, "hello-kernel", env=environment(upstream_mirror.url, tmp_path / "fresh-cache"))
    assert upstream_mirror.count(snapshot) == 1 and upstream_mirror.count(deb) == before + 1


def test_two_checkouts_with_the_same_lock_build_the_same_image(tmp_path, upstream_mirror):
    first = locked_project(tmp_path, upstream_mirror, "first")
    second = write_project(tmp_path / "second" / "deeper", OPTIONS)
    shutil.copy(os.path.join(first, "tdx.lock"), second)
    for project, cache in ((first, "cache-1"), (second, "cache-2")):
        scons(project, env=environment(upstream_mirror.url, tmp_path / cache))
    for name in sorted(os.listdir(out(first, ""))):
        if os.path.isfile(out(first, name)):
            assert read(out(first, name)) == read(out(second, name)), name


def test_lock_check_says_whether_the_lock_is_current(tmp_path, upstream_mirror):
    project = locked_project(tmp_path, upstream_mirror)
    env = dict(os.environ, PYTHONPATH=ROOT, **environment(upstream_mirror.url, tmp_path / "lock-cache"))
    check = [sys.executable, "-m", "tdx_rules", "lock", "--check", "-C", project]
    assert subprocess.run(check, env=env, capture_output=True, text=True).returncode == 0
    # The PPA rebuilt its ovmf package (same version, other bytes) and re-signed its index.
    original = upstream_mirror.tree.read(OVMF_DEB)
    (tmp_path / "old.deb").write_bytes(original)
    subprocess.run(["dpkg-deb", "-R", str(tmp_path / "old.deb"), str(tmp_path / "tree")], check=True)
    (tmp_path / "tree" / "usr" / "share" / "doc" / "ovmf" / "README.Debian").write_text("rebuilt\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zzstd", "-b", str(tmp_path / "tree"), str(tmp_path / "new.deb")],
                   check=True, capture_output=True)
    rebuilt = read(tmp_path / "new.deb")
    plain = upstream_mirror.tree.plain_indexes[packages_index(PPA_ROOT, "noble")].decode()
    old_sha = hashlib.sha256(original).hexdigest()
    plain = plain.replace(old_sha, hashlib.sha256(rebuilt).hexdigest())
    plain = plain.replace(f"Size: {len(original)}\n", f"Size: {len(rebuilt)}\n")
    upstream_mirror.serve(OVMF_DEB, rebuilt)
    upstream_mirror.publish(PPA_ROOT, "noble", plain.encode())
    done = subprocess.run(check, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "canonical-ovmf:2024.02-3+tdx1.0 resolve to other files now" in done.stdout + done.stderr
    assert json.load(open(os.path.join(project, "tdx.lock")))["specs"]["canonical-ovmf:2024.02-3+tdx1.0"][0][
        "sha256"] == old_sha  # --check writes nothing


def test_a_locked_apt_package_the_host_no_longer_offers_comes_from_the_snapshot_archive(tmp_path, small_kernel):
    """The host's own apt with a private repository: locked, then the package leaves the repository."""
    from tests import debian

    deb = debian.sid_deb("ovmf-inteltdx")
    apt_config = private_apt(tmp_path, [deb, debian.package("busybox-static"), debian.package("musl")])
    project = write_project(tmp_path / "proj", (
        f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', modules_dir={small_kernel['modules_dir']!r}, "
        "ovmf='apt:ovmf-inteltdx', cmdline='console=ttyS0'"),
        f"env['ENV']['APT_CONFIG'] = {apt_config!r}")
    cache = {"TDX_RULES_CACHE": str(tmp_path / "cache")}
    scons(project, "--tdx-lock", env=cache)
    item = load(project)["specs"]["apt:ovmf-inteltdx"][0]
    assert item["package"] == "ovmf-inteltdx" and item["version"].startswith("2026.")
    # The package leaves the repository; apt no longer offers it.
    os.unlink(tmp_path / "repo" / os.path.basename(deb))
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=tmp_path / "repo", capture_output=True,
                           text=True, check=True).stdout
    (tmp_path / "repo" / "Packages").write_text(index)
    subprocess.run(["apt-get", "update", "-q"], env=dict(os.environ, APT_CONFIG=apt_config), check=True,
                   capture_output=True)
    with HttpServer() as server:
        path = f"/snap/{load(project)['locked']}/{item['snapshot']['path'].lstrip('./')}"
        server.add(path, open(deb, "rb").read())
        archive = item["snapshot"]["archive"]
        result = scons(project, "hello-ovmf", env=dict(cache, TDX_RULES_CACHE=str(tmp_path / "fresh"),
                                                       TDX_RULES_SNAPSHOT=f"{archive}={server.base}/snap"))
        assert "ovmf" in stages_run(result) and server.count(path) == 1
