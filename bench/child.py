"""One timed child process for the benchmark scripts: wall time and its own peak memory."""

import os
import subprocess
import time


def timed(command, cwd=None, env=None, sync=False):
    """(wall seconds, peak RSS in MiB of that child) of ``command``; exits the benchmark if it fails.
    ``sync`` first flushes what earlier commands left dirty, so none pays for another's writeback."""
    if sync:
        os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    return elapsed, usage.ru_maxrss / 1024
