"""Finalize: gzip the initramfs with the same parallel, deterministic deflate as
``tdx-rules pack`` (no name, mtime 0, identical bytes for any thread count)."""

import argparse
import os

from ..fsutil import atomic_output
from ..initramfs.pgzip import compress_gzip
from ._entry import run


def gzip_file(src: str, out: str, level: int = 9) -> None:
    """gzip with every core; the bytes are the same whatever the number of cores (see pgzip)."""
    with open(src, "rb") as inp, atomic_output(out) as raw:
        compress_gzip(inp, raw, level=level, threads="all")


def write_size(path: str, size_file: str) -> None:
    """Record a file's size on its own, so RTMR[1] (which reads only the size) can depend on it."""
    with atomic_output(size_file, "w") as out:
        out.write(f"{os.path.getsize(path)}\n")


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.compress")
    parser.add_argument("--level", type=int, default=9)
    parser.add_argument("--size-file", help="also write the compressed size here")
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    gzip_file(args.src, args.out, args.level)
    if args.size_file:
        write_size(args.out, args.size_file)


if __name__ == "__main__":
    run(main)
