"""Stage: the shared-library closure of a dynamically linked program (``<program>.closure.frag``).

Reads the program's ``PT_INTERP`` and, transitively, every ``DT_NEEDED``, ``DT_RUNPATH`` and
``DT_RPATH`` (:mod:`tdx_rules.initramfs.closure`), in the packages of ``libs`` first (each
``apt:`` spec, or any spec of a ``.deb``, unpacked once into the download cache, keyed by its
SHA-256), then on the host. Writes the fragment the cpio stage merges (the interpreter at its
``PT_INTERP`` path, each library where the loader will look for it, symlinks kept) and
``<program>.closure.json``: the packages used, the interpreter and every library with its
SHA-256, image path and origin (host path, or package, version and member), for the manifest.

A name nothing provides stops the stage with one line naming it, who needs it and the fix.
"""

import os
import shutil

import filelock

from ..errors import TdxError
from ..fsutil import write_json
from ..initramfs import closure, newc
from ..upstream.debpkg import DebPackage, extract
from ..upstream.sources import materialize, parse
from ._entry import load_config, run
from .common import context, fetching_stage_arguments, input_record


def unpack_package(deb, cache: str) -> str:
    """The contents of the verified package ``deb`` (a Resolved), unpacked once into the cache."""
    tree = os.path.join(cache, "closure", deb.sha256)
    os.makedirs(os.path.dirname(tree), exist_ok=True)
    with filelock.FileLock(tree + ".lock"):
        if not os.path.isdir(tree):
            part = tree + ".part"
            shutil.rmtree(part, ignore_errors=True)
            os.makedirs(part)
            extract(deb.path, part)
            os.rename(part, tree)
    return tree


def package_trees(specs, ctx, what: str):
    """(trees, input records) of the packages ``specs`` name, in the order given."""
    trees, records = [], []
    for text in specs:
        for resolved in materialize(parse(text, f"{what} libs"), ctx, f"{what} libs"):
            if not resolved.path.endswith(".deb"):
                raise TdxError(f"{what}: libs entry {text!r} is not a Debian package; name one as apt:PACKAGE "
                               "(or a .deb by file: or https:)")
            control = DebPackage(resolved.path).control
            origin = (("package", resolved.package or control.get("Package", "")),
                      ("version", resolved.version or control.get("Version", "")), ("spec", text))
            trees.append(closure.Tree(unpack_package(resolved, ctx.cache), origin))
            records.append(input_record(resolved))
    return trees, records


def build_closure(binary: str, config: dict, ctx, out: str, info_out: str) -> None:
    """Resolve the closure of ``binary`` as ``config`` says and write the fragment and its record."""
    what = f"program {os.path.basename(config['program_path'])}"
    trees, records = package_trees(config.get("libs", []), ctx, what)
    result = closure.resolve(binary, config["program_path"], trees + [closure.HOST], config.get("conf_dirs", []))
    if result.interpreter is None:
        raise TdxError(f"{what}: {binary} is statically linked (no interpreter); pass it to TdxImage(binary=...) "
                       "directly, TdxProgram is for dynamically linked programs")
    if result.missing:
        raise TdxError(closure.missing_line(what, result.missing))
    newc.write_fragment(out, newc.merge([result.entries()]))
    write_json(info_out, {"inputs": records, "interpreter": result.interpreter,
                          "libraries": result.records(relative_to=os.getcwd())})


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.closure", argv, extra_inputs=("--binary",))
    config = load_config(args.config)
    build_closure(args.binary, config, context(args, config), args.out, args.info)


if __name__ == "__main__":
    run(main)
