"""Finalize: gzip the initramfs with the same parallel, deterministic deflate as
``tdx-rules pack`` (no name, mtime 0, identical bytes for any thread count or CPU).

``--compressor`` is the deflate library the build declared (and signed): the stage
stops unless it imports that one, and records it for the manifest (``--info``).
"""

import argparse
import os

from ..fsutil import atomic_output, write_json
from ..initramfs import pgzip
from ._entry import run


def gzip_file(src: str, out: str, level: int = pgzip.DEFAULT_LEVEL) -> None:
    """gzip with every core; the bytes are the same whatever the number of cores (see pgzip)."""
    with open(src, "rb") as inp, atomic_output(out) as raw:
        pgzip.compress_gzip(inp, raw, level=level, threads="all")


def write_info(out: str, level: int, info_file: str) -> None:
    """How ``out`` was compressed, for the manifest's ``initramfs`` object."""
    write_json(info_file, {"file": os.path.basename(out), "compression": "gzip", "level": level,
                           "block_size": pgzip.DEFAULT_BLOCK_SIZE, "compressor": pgzip.compressor_identity()})


def write_size(path: str, size_file: str) -> None:
    """Record a file's size on its own, so RTMR[1] (which reads only the size) can depend on it."""
    with atomic_output(size_file, "w") as out:
        out.write(f"{os.path.getsize(path)}\n")


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.compress")
    parser.add_argument("--level", type=int, default=pgzip.DEFAULT_LEVEL)
    parser.add_argument("--compressor", help="stop unless the deflate library is this one (see pgzip)")
    parser.add_argument("--size-file", help="also write the compressed size here")
    parser.add_argument("--info", help="also write how it was compressed here (JSON)")
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    if args.compressor is not None:
        pgzip.check_compressor(args.compressor)
    gzip_file(args.src, args.out, args.level)
    if args.info:
        write_info(args.out, args.level, args.info)
    if args.size_file:
        write_size(args.out, args.size_file)


if __name__ == "__main__":
    run(main)
