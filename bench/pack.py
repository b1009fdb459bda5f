"""Benchmark: `tdx-rules pack` against the GNU cpio + gzip pipeline, in one run.

Generates a tree (default 200 MB in ~5000 files: text, binary-like and
random data, from a fixed seed), then times, run after run:

* ``pack --compress gzip --threads 1`` and ``--threads all`` against
  ``find . | LC_ALL=C sort | cpio -o -H newc --reproducible -R 0:0 | gzip -9n``
  (and the same with ``pigz -9n`` when pigz is installed);
* ``pack --compress none`` against the GNU cpio pipeline alone;
* with ``--formats``, also zstd/xz/lz4 against their CLIs on the GNU cpio stream.

Ratios are computed pair by pair within a run (ours / reference of the same
run), then the median over runs is printed; times are medians; peak RSS is
the maximum resident set of the pack process itself (os.wait4 of the child).

    .venv/bin/python bench/pack.py [--size-mb 200] [--files 5000] [--runs 3] [--formats gzip,none,zstd,lz4,xz]
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from child import timed as child_timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "import sys; from tdx_rules.initramfs.pack import main_pack; sys.exit(main_pack(sys.argv[1:]))"
GZIP_SETUP = ("from tdx_rules.initramfs import pgzip; "
              "print(f'{pgzip.compressor_identity()}, level {pgzip.DEFAULT_LEVEL}, {pgzip.DEFAULT_BLOCK_SIZE >> 10} KiB blocks')")
GNU_CPIO = "find . | LC_ALL=C sort | cpio -o -H newc --reproducible -R 0:0 --quiet"
REFERENCE = {  # compression -> (label, filter after GNU cpio)
    "gzip": ("gzip -9n", "gzip -9n"),
    "zstd": ("zstd -19 -T0", "zstd -q -19 -T0"),
    "xz": ("xz -6 --check=crc32", "xz -6 --check=crc32"),
    "lz4": ("lz4 -l -9", "lz4 -q -l -9"),
}


# --- the tree ----------------------------------------------------------------

def make_tree(root, size_mb, files, seed=20240601):
    """Deterministic tree; returns {kind: bytes} of what was written."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
             for _ in range(3000)]
    lines = []
    for _ in range(40000):
        indent = " " * (4 * rng.randint(0, 3))
        lines.append((indent + " ".join(rng.choices(words, k=rng.randint(1, 12))) + "\n").encode())
    tokens = [rng.randbytes(rng.randint(2, 12)) for _ in range(8192)]
    # Log-normal sizes scaled to the total, a few large files like real trees.
    raw = [rng.lognormvariate(0, 1.6) for _ in range(files)]
    scale = size_mb * 1_000_000 / sum(raw)
    sizes = [max(1, int(value * scale)) for value in raw]
    sizes[-1] += size_mb * 1_000_000 - sum(sizes)
    dirs = [os.path.join(top, f"pkg{index:03d}", sub) for top in ("usr/lib", "usr/share", "opt")
            for index in range(40) for sub in ("", "bin", "data")]
    written = {"text": 0, "binary-like": 0, "random": 0}
    for index, size in enumerate(sizes):
        kind = rng.choices(["text", "binary-like", "random"], weights=[45, 35, 20])[0]
        if kind == "text":
            parts, total = [], 0
            while total < size:
                chunk = b"".join(rng.choices(lines, k=256))
                parts.append(chunk)
                total += len(chunk)
            data = b"".join(parts)[:size]
        elif kind == "binary-like":
            parts, total = [], 0
            while total < size:
                chunk = b"".join(rng.choices(tokens, k=4096)) + rng.randbytes(2048)
                parts.append(chunk)
                total += len(chunk)
            data = b"".join(parts)[:size]
        else:
            data = rng.randbytes(size)
        directory = os.path.join(root, rng.choice(dirs))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"f{index:05d}" + (".txt" if kind == "text" else ""))
        with open(path, "wb") as handle:
            handle.write(data)
        if kind != "text" and index % 3 == 0:
            os.chmod(path, 0o755)
        written[kind] += size
    for index in range(0, files, 50):  # some symlinks, as in real trees
        os.symlink(f"../f{index:05d}", os.path.join(root, "opt", f"link{index:05d}"))
    return written


# --- timing ------------------------------------------------------------------

def debootstrap_tree(root):
    """The cached Debian root filesystem of bench/rootfs.py, unpacked at ``root`` without /dev,
    its hard links made copies (pack copies them, GNU cpio would store them once: both archives
    then hold the same bytes)."""
    from rootfs import DEBIAN_MIRROR, debootstrap_tar

    os.makedirs(root)
    subprocess.run(["tar", "-xf", debootstrap_tar(DEBIAN_MIRROR), "-C", root, "--no-same-owner",
                    "--exclude=./dev/*"], check=True)
    files = sizes = 0
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            if os.path.isfile(path) and not os.path.islink(path):
                if os.stat(path).st_nlink > 1:
                    shutil.copy2(path, path + ".copy")
                    os.replace(path + ".copy", path)
                files += 1
                sizes += os.path.getsize(path)
    return {f"debootstrap --variant=minbase bookworm, {files} files": sizes}


def timed(command, cwd=None):
    return child_timed(command, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT))


def gzip_setup() -> str:
    """The deflate library and the defaults `pack --compress gzip` runs with."""
    return subprocess.run([sys.executable, "-c", GZIP_SETUP], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, check=True).stdout.strip()


def ours(tree, out, compression, threads):
    return [sys.executable, "-c", CHILD, tree, "-o", out, "--compress", compression, "--threads", threads]


def shell(tree, pipeline, out):
    return ["sh", "-c", f"cd '{tree}' && {pipeline} > '{out}'"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--formats", default="gzip,none", help="comma-separated: gzip, none, zstd, xz, lz4")
    parser.add_argument("--tree", choices=("generated", "debootstrap"), default="generated",
                        help="debootstrap: a Debian root filesystem (bench/rootfs.py's cached minbase bookworm, "
                             "/dev left out: pack refuses device nodes)")
    args = parser.parse_args()
    formats = [name for name in args.formats.split(",") if name]
    for tool in ("cpio", "gzip", "find", "sort"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    pigz = shutil.which("pigz")
    cpus = len(os.sched_getaffinity(0))

    with tempfile.TemporaryDirectory(prefix="tdx-pack-bench.") as tmp:
        tree = os.path.join(tmp, "tree")
        start = time.perf_counter()
        if args.tree == "debootstrap":
            mix = debootstrap_tree(tree)
        else:
            mix = make_tree(tree, args.size_mb, args.files)
        generated = time.perf_counter() - start
        jobs = []  # (label, command, output path)
        pairs = []  # (ours, reference): ratios are computed per run
        gz_refs = ["gzip -9n pipeline"] + (["pigz -9n pipeline"] if pigz else [])
        if "gzip" in formats:
            jobs += [("pack --compress gzip --threads 1", ours(tree, f"{tmp}/t1.gz", "gzip", "1"), f"{tmp}/t1.gz"),
                     (f"pack --compress gzip --threads all ({cpus})", ours(tree, f"{tmp}/tall.gz", "gzip", "all"),
                      f"{tmp}/tall.gz"),
                     ("gzip -9n pipeline", shell(tree, f"{GNU_CPIO} | gzip -9n", f"{tmp}/ref.gz"), f"{tmp}/ref.gz")]
            if pigz:
                jobs.append(("pigz -9n pipeline", shell(tree, f"{GNU_CPIO} | pigz -9n", f"{tmp}/pigz.gz"),
                             f"{tmp}/pigz.gz"))
            pairs += [(jobs[index][0], ref) for index in (0, 1) for ref in gz_refs]
        for name in ("zstd", "xz", "lz4"):
            if name in formats:
                label, tool = REFERENCE[name]
                mine = f"pack --compress {name}" + ("" if name == "xz" else " --threads all")
                jobs += [(mine, ours(tree, f"{tmp}/ours.{name}", name, "all"), f"{tmp}/ours.{name}"),
                         (f"{label} pipeline", shell(tree, f"{GNU_CPIO} | {tool}", f"{tmp}/ref.{name}"),
                          f"{tmp}/ref.{name}")]
                pairs.append((mine, f"{label} pipeline"))
        if "none" in formats:
            jobs += [("pack --compress none", ours(tree, f"{tmp}/ours.cpio", "none", "1"), f"{tmp}/ours.cpio"),
                     ("GNU cpio pipeline", shell(tree, GNU_CPIO, f"{tmp}/ref.cpio"), f"{tmp}/ref.cpio")]
            pairs.append(("pack --compress none", "GNU cpio pipeline"))
        outputs = {label: path for label, _, path in jobs}
        is_ours = {label: command[0] != "sh" for label, command, _ in jobs}

        times = {label: [] for label, _, _ in jobs}
        rss = {label: [] for label, _, _ in jobs}
        ratios = {pair: [] for pair in pairs}
        for run in range(args.runs):
            this = {}
            for label, command, _ in jobs:
                seconds, peak = timed(command)
                this[label] = seconds
                times[label].append(seconds)
                rss[label].append(peak)
            for pair in pairs:
                ratios[pair].append(this[pair[0]] / this[pair[1]])
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{label} {this[label]:.1f}s" for label in this),
                  file=sys.stderr, flush=True)
        sizes = {label: os.path.getsize(path) for label, path in outputs.items()}

        def read(label):
            with open(outputs[label], "rb") as handle:
                return handle.read()

        checks = []
        if "gzip" in formats:
            same = read(jobs[0][0]) == read(jobs[1][0])
            checks.append(f"gzip --threads 1 and --threads all outputs byte-identical: {'yes' if same else 'NO'}")
        if "gzip" in formats and "none" in formats:
            unpacked = subprocess.run(["gzip", "-dc", outputs[jobs[0][0]]], capture_output=True, check=True).stdout
            same = unpacked == read("pack --compress none")
            checks.append(f"gzip -dc of pack's gzip == pack's plain archive: {'yes' if same else 'NO'}")

    total = sum(mix.values())
    if args.tree == "debootstrap":
        what = f"{total / 1e6:.1f} MB ({next(iter(mix))}; unpacked in {generated:.0f}s)"
    else:
        what = (f"{total / 1e6:.1f} MB in {args.files} files + {len(range(0, args.files, 50))} symlinks "
                f"({', '.join(f'{kind} {100 * size / total:.0f}%' for kind, size in mix.items())}; generated in "
                f"{generated:.0f}s)")
    print(f"tree: {what}; {cpus} CPUs; median of {args.runs} runs; ratios pair by pair within each run")
    header = ("command", "seconds", "MB/s", "time vs reference", "output bytes", "size vs reference",
              "peak RSS MiB")
    rows = []
    for label, _, _ in jobs:
        seconds = statistics.median(times[label])
        head = [label, f"{seconds:.2f}", f"{total / 1e6 / seconds:.1f}"]
        tail = f"{max(rss[label]):.0f}" if is_ours[label] else "-"
        mine = [pair for pair in pairs if pair[0] == label]
        if not mine:
            rows.append(head + ["(reference)", f"{sizes[label]:,}", "", tail])
        for _, ref in mine:
            rows.append(head + [f"{statistics.median(ratios[(label, ref)]):.2f}x {ref}", f"{sizes[label]:,}",
                                f"{100 * (sizes[label] / sizes[ref] - 1):+.2f}% vs {ref}", tail])
            head = ["", "", ""]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    print("| " + " | ".join(cell.ljust(width) for cell, width in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |")
    if "gzip" in formats:
        print(f"pack's gzip: {gzip_setup()}")
    if "gzip" in formats and not pigz:
        print("pigz not installed (no pigz row)")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
