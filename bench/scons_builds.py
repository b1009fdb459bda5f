"""Benchmark: what CI pays per push, against SCons's own floor, in one run.

Copies examples/hello (Debian parts; the downloads must already be in the
cache, e.g. after `./run demo`) to a temporary directory and prints medians:
  - a no-op `scons hello` against a no-op `scons` of an empty SConstruct;
  - a rebuild after changing the program's source against a full rebuild
    from a warm download cache.

    .venv/bin/python bench/scons_builds.py [--runs 5]
"""

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scons(cwd, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "SCons", "-Q", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project, empty = os.path.join(tmp, "hello"), os.path.join(tmp, "empty")
        shutil.copytree(os.path.join(ROOT, "examples", "hello"), project,
                        ignore=shutil.ignore_patterns("build", ".sconsign.dblite", "hello"))
        os.makedirs(empty)
        with open(os.path.join(empty, "SConstruct"), "w") as handle:
            handle.write("DefaultEnvironment(tools=[])\n")
        # Byte-compile the package as `pip install` does (this machine may run with
        # PYTHONDONTWRITEBYTECODE, which would recompile edited modules on every run).
        compileall.compile_dir(os.path.join(ROOT, "tdx_rules"), quiet=1)
        scons(project)
        scons(project, "hello")  # the first no-op remembers the signatures of fresh outputs
        pairs = [(scons(project, "hello"), scons(empty)) for _ in range(args.runs)]
        noop = statistics.median(ours for ours, _ in pairs)
        floor = statistics.median(base for _, base in pairs)
        ratio = statistics.median(ours / base for ours, base in pairs)
        edits, fulls = [], []
        for run in range(args.runs):
            with open(os.path.join(project, "hello.c"), "a") as handle:
                handle.write(f"\nint bench_marker_{run}(void) {{ return {run}; }}\n")
            edits.append(scons(project, "hello"))
            shutil.rmtree(os.path.join(project, "build"))
            os.remove(os.path.join(project, ".sconsign.dblite"))
            fulls.append(scons(project, "hello"))
    edit, full = statistics.median(edits), statistics.median(fulls)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; medians of {args.runs} runs")
    print(f"{'build':<52}{'median s':>10}{'ratio':>8}")
    print(f"{'no-op scons of an empty SConstruct (floor)':<52}{floor:>10.2f}{1.0:>8.2f}")
    print(f"{'no-op scons hello':<52}{noop:>10.2f}{ratio:>8.2f}  (vs floor, median of the run-by-run ratios)")
    print(f"{'full rebuild of hello, warm download cache':<52}{full:>10.2f}{1.0:>8.2f}")
    print(f"{'rebuild after a program source change':<52}{edit:>10.2f}{edit / full:>8.2f}  (vs full rebuild)")


if __name__ == "__main__":
    main()
