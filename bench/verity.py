"""Benchmark: the dm-verity hash tree of tdx-rules against `veritysetup format` (cryptsetup) of
the same file, in the same run.

Builds the 200 MB benchmark image the way bench/rootfs.py does (a tree of about 5,000 files,
half text, half random bytes, written by the rules' ext4 writer), then times, alternating,
median over several runs:
  - tdx-rules: tdx_rules.rootfs.verity.build_verity of the image (salt and UUID given);
  - veritysetup: `veritysetup format IMAGE HASH --salt=… --uuid=…` with the same salt and UUID,
    whose output is checked to be byte-identical to ours.
Prints each median, the throughput ratio (veritysetup's time / ours: 1.0 means the same speed,
above 1 faster) and the peak memory (max RSS) of each child process.

    .venv/bin/python bench/verity.py [--size-mb 200] [--files 5000] [--runs 5]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from child import timed
from rootfs import CHILD as EXT4_CHILD
from rootfs import make_tree, write_layout

SALT = "5a" * 32
UUID = "00010203-0405-0607-0809-0a0b0c0d0e0f"
CHILD = f"""import sys
from tdx_rules.rootfs import verity
verity.build_verity(sys.argv[1], sys.argv[2], bytes.fromhex({SALT!r}), bytes.fromhex({UUID.replace('-', '')!r}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("veritysetup") is None:
        raise SystemExit("veritysetup is not installed (Debian: apt-get install cryptsetup-bin)")
    work = tempfile.mkdtemp(prefix="tdx-bench-verity-")
    try:
        tree, layout, image = (os.path.join(work, name) for name in ("tree", "layout", "rootfs.ext4"))
        make_tree(tree, args.size_mb, args.files)
        write_layout(layout, tree=tree)
        agent = os.path.join(work, "agent")
        shutil.copy("/bin/true", agent)
        timed([sys.executable, "-c", EXT4_CHILD, layout, agent, image, "auto"])
        ours_times, theirs_times, ours_peak, theirs_peak = [], [], [], []
        for _ in range(args.runs):
            seconds, peak = timed([sys.executable, "-c", CHILD, image, os.path.join(work, "ours")], sync=True)
            ours_times.append(seconds)
            ours_peak.append(peak)
            seconds, peak = timed(["veritysetup", "format", image, os.path.join(work, "theirs"), f"--salt={SALT}",
                                   f"--uuid={UUID}"], sync=True)
            theirs_times.append(seconds)
            theirs_peak.append(peak)
            with open(os.path.join(work, "ours"), "rb") as a, open(os.path.join(work, "theirs"), "rb") as b:
                if a.read() != b.read():
                    raise SystemExit("the hash files differ: the benchmark compares different work")
        size = os.path.getsize(image) / (1 << 20)
        ratios = [theirs / ours for ours, theirs in zip(ours_times, theirs_times)]
        print(f"image {size:.0f} MiB, {args.runs} runs (alternating), hash files byte-identical")
        print(f"| tool | median s | MiB/s | peak MiB |")
        print(f"|---|---|---|---|")
        for label, times, peaks in (("tdx-rules build_verity", ours_times, ours_peak),
                                    ("veritysetup format", theirs_times, theirs_peak)):
            median = statistics.median(times)
            print(f"| {label} | {median:.3f} | {size / median:.0f} | {max(peaks):.1f} |")
        print(f"throughput of tdx-rules relative to veritysetup: {statistics.median(ratios):.2f}x "
              f"(median of run-by-run ratios; runs {', '.join(f'{r:.2f}' for r in ratios)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
