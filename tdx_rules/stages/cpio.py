"""Stage 7: the uncompressed initramfs (``<name>-initramfs.cpio``).

Merges the stage fragments (base, modules, init), the workload and the
user's extra files into one deterministic newc archive: entries sorted,
every parent directory present, mtime ``SOURCE_DATE_EPOCH`` (else 0),
uid/gid 0, inode numbers in archive order, bodies streamed file by file.
Later inputs replace earlier ones of the same path: fragments in the order
given, then the workload, then extra files. A dynamically linked workload comes
with its closure fragment (its loader and libraries): no file of it may stand
where a fragment already puts one (musl's loader and glibc's live apart).
"""

import argparse
import os

from ..elf import check_dynamic_x86_64, check_static_x86_64
from ..errors import TdxError
from ..fsutil import atomic_output
from ..initramfs import newc
from ._entry import load_config, run


def host_mode(path: str) -> int:
    """0755 for executables, 0644 otherwise: the host's umask never leaks into the image."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _closure_layer(closure: str, program: str, layers) -> list:
    """The closure fragment's entries, checked: it holds the program's interpreter, and none of
    its files or links replaces an entry of another fragment."""
    entries = list(newc.read_entries(closure))
    interpreter = check_dynamic_x86_64(program, "binary").interpreter
    names = {entry.name: entry for entry in entries}
    if interpreter.lstrip("/") not in names:
        raise TdxError(f"binary: {program} needs the loader {interpreter}, which its closure {closure} does not "
                       "hold; build the program and its TdxProgram closure again")
    for layer in layers:
        for entry in layer:
            if not entry.is_dir and entry.name in names and not names[entry.name].is_dir:
                raise TdxError(f"image path /{entry.name} comes both from the base of the image and from the "
                               f"libraries of {os.path.basename(program)}; the two cannot share a path")
    return entries


def build_cpio(fragments, program, config: dict, out: str, closure=None) -> None:
    """``program`` is None when the workload lives on a separate root filesystem; ``closure``: the
    closure fragment of a dynamically linked ``program``."""
    layers = [list(newc.read_entries(fragment)) for fragment in fragments]
    if program is not None:
        if closure is not None:
            layers.append(_closure_layer(closure, program, layers))
        else:
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
    parser.add_argument("--closure", help="the closure fragment of a dynamically linked program")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build_cpio(args.fragment, args.program, load_config(args.config), args.out, args.closure)


if __name__ == "__main__":
    run(main)
