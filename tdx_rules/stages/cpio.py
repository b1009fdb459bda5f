"""Stage 7: the uncompressed initramfs (``<name>-initramfs.cpio``).

Merges the stage fragments (base, modules, init), the workload and the
user's extra files into one deterministic newc archive: entries sorted,
every parent directory present, mtime ``SOURCE_DATE_EPOCH`` (else 0),
uid/gid 0, inode numbers in archive order, bodies streamed file by file.
Later inputs replace earlier ones of the same path: fragments in the order
given, then the workload, then extra files. A dynamically linked workload comes
with its closure fragment (its loader and libraries), an image with ``ssh_keys`` with the SSH
server's fragment: no file of these may stand where the base fragments put one (musl's loader
and glibc's live apart), and the two may share only identical files.
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


def _check_interpreter(closure: str, program: str) -> None:
    """The closure fragment of ``program`` holds the loader the program names."""
    interpreter = check_dynamic_x86_64(program, "binary").interpreter
    if not any(entry.name == interpreter.lstrip("/") for entry in newc.read_entries(closure)):
        raise TdxError(f"binary: {program} needs the loader {interpreter}, which its closure {closure} does not "
                       "hold; build the program and its TdxProgram closure again")


def _library_layers(libraries, layers) -> list:
    """The entries of the library fragments ((label, path): the closure of a dynamically linked
    program, the SSH server's), checked: no file or link replaces an entry of the base ``layers``;
    two library fragments share a path only when they put the same member there (the loader and
    libc of both)."""
    out, seen = [], {}
    for label, fragment in libraries:
        entries = list(newc.read_entries(fragment))
        names = {entry.name: entry for entry in entries}
        for layer in layers:
            for entry in layer:
                if not entry.is_dir and entry.name in names and not names[entry.name].is_dir:
                    raise TdxError(f"image path /{entry.name} comes both from the base of the image and from "
                                   f"{label}; the two cannot share a path")
        for entry in entries:
            if entry.is_dir:
                continue
            if entry.name in seen and not newc.same_member(seen[entry.name][1], entry):
                raise TdxError(f"image path /{entry.name} comes from {seen[entry.name][0]} and from {label}, "
                               "as two different files; build both from the same host libraries (or the same "
                               "packages in libs= and ssh_libs)")
            seen.setdefault(entry.name, (label, entry))
        out.append(entries)
    return out


def build_cpio(fragments, program, config: dict, out: str, closure=None, ssh=None) -> None:
    """``program`` is None when the workload lives on a separate root filesystem; ``closure``: the
    closure fragment of a dynamically linked ``program``; ``ssh``: the SSH server's fragment."""
    layers = [list(newc.read_entries(fragment)) for fragment in fragments]
    libraries = []
    if program is not None:
        if closure is not None:
            _check_interpreter(closure, program)
            libraries.append((f"the libraries of {os.path.basename(program)}", closure))
        else:
            check_static_x86_64(program, "binary")
    if ssh is not None:
        libraries.append(("the SSH server", ssh))
    layers += _library_layers(libraries, layers)
    if program is not None:
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
    parser.add_argument("--ssh", help="the SSH server's fragment (dropbear and its libraries)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build_cpio(args.fragment, args.program, load_config(args.config), args.out, args.closure, args.ssh)


if __name__ == "__main__":
    run(main)
