"""A build killed with SIGKILL at any point leaves no truncated stage output, and
the next build produces exactly what a clean build produces."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from tests.conftest import DOWNLOAD_CACHE, ROOT, scons


def artifacts(project):
    out = pathlib.Path(project) / "build" / "tdx" / "hello"
    # Temporary files and directories (dot names) of a killed stage are not outputs.
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def test_sigkill_at_ten_points_then_rebuild_gives_the_clean_build(fast_project, tmp_path):
    reference_project = tmp_path / "reference"
    shutil.copytree(fast_project, reference_project)
    start = time.monotonic()
    scons(str(reference_project))
    full = time.monotonic() - start
    reference = artifacts(reference_project)
    # Config files hold the project's own paths only relative to it; every other output must match exactly.
    points = [full * (index + 0.5) / 10 for index in range(10)]
    for index, delay in enumerate(points):
        project = tmp_path / f"killed{index}"
        shutil.copytree(fast_project, project)
        env = dict(os.environ, PYTHONPATH=ROOT, TDX_RULES_CACHE=DOWNLOAD_CACHE)
        proc = subprocess.Popen([sys.executable, "-m", "SCons", "-Q"], cwd=project, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for name, data in artifacts(project).items():
            assert data == reference[name], f"killed at {delay:.2f}s: {name} is left different (truncated?)"
        scons(str(project))
        rebuilt = artifacts(project)
        assert rebuilt.keys() == reference.keys(), f"killed at {delay:.2f}s"
        for name in reference:
            assert rebuilt[name] == reference[name], f"killed at {delay:.2f}s: {name} differs after the rebuild"
