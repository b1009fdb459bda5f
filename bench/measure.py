"""Benchmark: measurement throughput against sha384sum, in one run.

RTMR[2] over a large initramfs (default 500 MB) is compared with GNU
`sha384sum` over the same bytes; MRTD of Debian's OVMF (or a given firmware)
is reported with its time. Medians over several runs; peak memory (max RSS)
of each measuring child process.

    ./run bench [--size-mb 500] [--runs 3] [--ovmf /usr/share/ovmf/OVMF.fd]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CHILD_RTMR2 = ("import sys; from tdx_rules.measure import rtmr; "
               "print(rtmr.replay(rtmr.rtmr2_events('console=ttyS0', sys.argv[1]))[2])")
CHILD_MRTD = "import sys; from tdx_rules.measure import mrtd; print(mrtd.compute_mrtd(sys.argv[1], 'two-pass').mrtd)"


def timed(command):
    """(seconds, peak RSS in MiB) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak, before) / 1024


def make_initrd(path, size_mb):
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        for index in range(size_mb):
            out.write(block[index % 7:] + block[:index % 7])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ovmf", default="/usr/share/ovmf/OVMF.fd")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = os.path.join(tmp, "initrd.img")
        make_initrd(initrd, args.size_mb)
        size = os.path.getsize(initrd)
        ours, theirs, peaks = [], [], []
        for _ in range(args.runs):
            seconds, peak = timed([sys.executable, "-c", CHILD_RTMR2, initrd])
            ours.append(seconds)
            peaks.append(peak)
            theirs.append(timed(["sha384sum", initrd])[0])
        mrtd_times = [timed([sys.executable, "-c", CHILD_MRTD, args.ovmf])[0] for _ in range(args.runs)]
    ours_t, theirs_t = statistics.median(ours), statistics.median(theirs)
    mb = size / 1e6
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'measurement':<34}{'median s':>10}{'MB/s':>10}{'vs sha384sum':>14}{'peak MiB':>10}")
    print(f"{'sha384sum (reference)':<34}{theirs_t:>10.3f}{mb / theirs_t:>10.1f}{1.0:>14.2f}{'':>10}")
    print(f"{'RTMR[2] over ' + str(args.size_mb) + ' MB initrd':<34}{ours_t:>10.3f}{mb / ours_t:>10.1f}"
          f"{theirs_t / ours_t:>14.2f}{max(peaks):>10.1f}")
    print(f"{'MRTD of ' + os.path.basename(args.ovmf):<34}{statistics.median(mrtd_times):>10.3f}")


if __name__ == "__main__":
    main()
