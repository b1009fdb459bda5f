"""`pip install tdx-rules` from a wheel the project builds: the wheel carries the templates
and the SCons tool, ``tdx_rules.TOOLPATH`` finds the tool, and an image builds from a
directory outside the repository with nothing of the checkout on the path.

The wheel goes into a fresh virtualenv with ``--no-deps``; its dependencies (declared in
the wheel's metadata, checked below) are lent from this test environment through a .pth
file, so the test needs no package index.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import DOWNLOAD_CACHE, ROOT, write_project


def _clean_env():
    """The environment without this checkout on the path (PYTHONPATH) or an active virtualenv."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built by `python -m build` from the files git tracks (copied: the build
    writes egg-info beside the sources)."""
    source = tmp_path_factory.mktemp("source") / "tdx-rules"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(source / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), source / name)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)],
                            capture_output=True, text=True, env=dict(_clean_env(), PIP_RETRIES="0"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = [name for name in os.listdir(out) if name.endswith(".whl")]
    assert len(wheels) == 1, wheels
    return os.path.join(out, wheels[0])


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtualenv with the wheel installed; its python."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = os.path.join(venv, "bin", "python")
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                             wheel], capture_output=True, text=True, env=_clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    fresh_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(fresh_site, "lent-dependencies.pth"), "w") as handle:
        handle.write("\n".join(site.getsitepackages()) + "\n")
    return python


def test_wheel_carries_templates_and_the_scons_tool(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(os.listdir(os.path.join(ROOT, "tdx_rules", "templates")))
    assert templates and all(f"tdx_rules/templates/{name}" in names for name in templates)
    assert "tdx_rules/site_tools/tdx/__init__.py" in names
    assert any(name.endswith("entry_points.txt") for name in names)
    assert not any(name.startswith("tests/") for name in names)
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        declared = tomllib.load(handle)["project"]["dependencies"]
    assert sorted(r.replace(" ", "") for r in requires) == sorted(d.replace(" ", "") for d in declared)


def test_installed_package_builds_an_image_outside_the_repository(installed, tmp_path, small_kernel):
    outside = os.path.join(tmp_path, "project")
    options = (f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
               f"modules_dir={small_kernel['modules_dir']!r}, ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', "
               "cmdline='console=ttyS0'")
    write_project(outside, options)
    env = _clean_env()
    env["TDX_RULES_CACHE"] = DOWNLOAD_CACHE
    found = subprocess.run([installed, "-c", "import tdx_rules; print(tdx_rules.__file__, tdx_rules.TOOLPATH)"],
                           cwd=outside, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    where = found.stdout
    assert ROOT not in where and os.path.dirname(os.path.dirname(installed)) in where
    result = subprocess.run([installed, "-m", "SCons", "-Q", "hello"], cwd=outside, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = os.path.join(outside, "build", "tdx", "hello")
    for name in ("hello-initramfs.cpio.gz", "hello-launch-tdx.sh", "hello-manifest.json", "hello-rtmr2.hex"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    # The console script is installed too and runs from the wheel.
    cli = os.path.join(os.path.dirname(installed), "tdx-rules")
    listing = subprocess.run([cli, "measure", "--cmdline", "console=ttyS0"], env=env, capture_output=True,
                             text=True)
    assert listing.returncode == 0 and listing.stdout.startswith("RTMR[2]"), listing.stderr
