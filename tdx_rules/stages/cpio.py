"""Stage 7: the uncompressed initramfs (``<name>-initramfs.cpio``).

Merges the stage fragments (base, modules, init), the workload and the
user's extra files into one deterministic newc archive: entries sorted,
every parent directory present, mtime ``SOURCE_DATE_EPOCH`` (else 0),
uid/gid 0, inode numbers in archive order, bodies streamed file by file.
Later inputs replace earlier ones of the same path: fragments in the order
given, then the workload, then extra files.
"""

import argparse
import os

from ..elf import check_static_x86_64
from ..errors import TdxError
from ..fsutil import atomic_output
from ..initramfs import newc
from ._entry import load_config, run


def host_mode(path: str) -> int:
    """0755 for executables, 0644 otherwise: the host's umask never leaks into the image."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def build_cpio(fragments, program, config: dict, out: str) -> None:
    """``program`` is None when the workload lives on a separate root filesystem."""
    layers = [list(newc.read_entries(fragment)) for fragment in fragments]
    if program is not None:
        check_static_x86_64(program, "binary")
        layers.append([newc.disk_file(config["program_path"], program, 0o755)])
    extra = []
    for guest, host in sorted(config.get("extra_files", {}).items()):
        if not os.path.isfile(host):
            raise TdxError(f"extra_files: {host} (for {guest}) does not exist or is not a file")
        extra.append(newc.disk_file(guest, host, host_mode(host)))
    layers.append(extra)
    entries = newc.merge(layers)
    with atomic_output(out) as sink:
        newc.write_archive(sink, entries, mtime=int(config.get("epoch", 0)))


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.cpio")
    parser.add_argument("--config", required=True)
    parser.add_argument("--program", help="the workload (omitted when it lives on the root filesystem)")
    parser.add_argument("--fragment", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build_cpio(args.fragment, args.program, load_config(args.config), args.out)


if __name__ == "__main__":
    run(main)
