"""Concurrent builds: two projects sharing one download cache, and -j 4 over several images."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, scons, write_project
from tests.test_upstream import BIG_FILES, OPTIONS, environment, out, read
from tests.upstream_fixture import upstream_mirror, upstream_tree  # noqa: F401  (fixtures)


def test_two_projects_sharing_a_cache_download_each_file_once(upstream_mirror, tmp_path):
    cache = tmp_path / "cache"
    projects = [write_project(tmp_path / name, OPTIONS) for name in ("one", "two")]
    env = dict(os.environ, PYTHONPATH=ROOT, **environment(upstream_mirror.url, cache))
    procs = [subprocess.Popen([sys.executable, "-m", "SCons", "-Q"], cwd=p, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in projects]
    results = [(proc.wait(timeout=600), proc.stderr.read()) for proc in procs]
    assert all(code == 0 for code, _ in results), results
    assert all(upstream_mirror.count(rel) == 1 for rel in BIG_FILES), dict(upstream_mirror.server.requests)
    for name in ("hello-initramfs.cpio.gz", "hello-vmlinuz", "hello-ovmf.fd", "hello-manifest.json",
                 "hello-mrtd.hex", "hello-rtmr1.hex", "hello-rtmr2.hex"):
        assert read(out(projects[0], name)) == read(out(projects[1], name)), name


def test_parallel_builds_of_several_images_succeed_repeatedly(small_kernel, tmp_path):
    images = "\n".join(
        f"env.TdxImage('img{i}', binary=app, minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
        f"modules_dir={small_kernel['modules_dir']!r}, ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', bundle_runner=False, "
        f"memory='2G', env_vars={{'RUN': OPTS['run']}})" for i in range(3))
    project = write_project(tmp_path / "multi", "minirootfs='debian'",
                            "import json\nOPTS = json.load(open('opts.json'))")
    sconstruct = os.path.join(project, "SConstruct")
    text = open(sconstruct).read()
    text = text.replace(text[text.index("env.TdxImage('hello'"):], images + "\n")
    open(sconstruct, "w").write(text)
    for run in range(20):
        with open(os.path.join(project, "opts.json"), "w") as handle:
            json.dump({"run": str(run % 2)}, handle)
        scons(project, "-j", "4")
    for i in range(3):
        manifest = json.load(open(os.path.join(project, "build", "tdx", f"img{i}", f"img{i}-manifest.json")))
        assert manifest["settings"]["env_vars"] == {"RUN": "1"}
    assert scons(project, "-q", "img0", "img1", "img2", check=False).returncode == 0
