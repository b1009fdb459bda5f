"""Finalize: gzip the initramfs, byte-identical across runs (no name, mtime 0)."""

import argparse
import gzip

from ..fsutil import CHUNK, atomic_output
from ._entry import run


def gzip_file(src: str, out: str, level: int = 9) -> None:
    with open(src, "rb") as inp, atomic_output(out) as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as gz:
            for chunk in iter(lambda: inp.read(CHUNK), b""):
                gz.write(chunk)


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.compress")
    parser.add_argument("--level", type=int, default=9)
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    gzip_file(args.src, args.out, args.level)


if __name__ == "__main__":
    run(main)
