"""The promise behind docs/ci.md: a second, clean checkout in another directory that shares
the CacheDir and the download cache runs no stage and produces byte-identical outputs."""

import hashlib
import os
import re

from tests.conftest import ROOT, scons, stages_run, write_project


def cachedir_line() -> str:
    """The CacheDir line of the SConstruct in docs/ci.md, used as it is."""
    with open(os.path.join(ROOT, "docs", "ci.md"), encoding="utf-8") as handle:
        text = handle.read()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    return next(line for line in block.splitlines() if line.startswith("CacheDir("))


def outputs(project) -> dict:
    out = os.path.join(project, "build", "tdx", "hello")
    found = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                found[name] = hashlib.sha256(handle.read()).hexdigest()
    return found


def test_second_checkout_retrieves_every_stage_from_the_shared_cachedir(tmp_path, small_kernel):
    options = (f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
               f"modules_dir={small_kernel['modules_dir']!r}, ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', "
               "memory='1G', cmdline='console=ttyS0'")
    setup = "import os\n" + cachedir_line()
    env = {"SCONS_CACHE": str(tmp_path / "scons-cache"), "SOURCE_DATE_EPOCH": "1700000000"}
    first = write_project(tmp_path / "checkout-a", options, setup)
    built = scons(first, env=env)
    assert {"program", "cpio", "manifest"} <= stages_run(built)
    second = write_project(tmp_path / "elsewhere" / "checkout-b", options, setup)
    again = scons(second, env=env)
    assert stages_run(again) == set(), again.stdout
    assert "Retrieved" in again.stdout
    assert outputs(second) == outputs(first)
    assert len(outputs(first)) >= 8
