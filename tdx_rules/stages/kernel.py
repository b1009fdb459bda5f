"""Stage 4: the kernel image and the tree its modules are read from.

``ubuntu-kernel:`` (linux-image-unsigned + linux-modules + linux-modules-extra,
as the reference downloads them), ``apt:`` packages (a meta-package such as
linux-image-6.12-amd64 is followed to the package that holds the kernel),
any ``.deb`` by ``https:``/``file:``, or a ``file:`` vmlinuz plus an optional
modules directory. Package contents are unpacked once into the download
cache, keyed by the packages' SHA-256, and shared by every image.

Outputs: the kernel (``<name>-vmlinuz``) and ``kernel.json`` with the release
and the modules tree for the modules stage.
"""

import hashlib
import os
import re
import shutil
import struct

import filelock

from ..errors import TdxError
from ..fsutil import cache_relative, copy_file, write_json
from ..upstream.debpkg import DebPackage, extract
from ..upstream.sources import materialize, parse
from ._entry import load_config, run
from .common import context, fetching_stage_arguments, input_record

_KEEP = re.compile(r"^(?:boot/vmlinu[xz]-[^/]+|(?:usr/)?lib/modules/[^/]+/(?:.+\.ko(?:\.xz|\.zst|\.gz)?|modules\.builtin|modules\.order))$")


def release_from_bzimage(path: str) -> str:
    """The kernel release string stored in a bzImage's setup header."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(0x210)
            if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
                raise TdxError(f"kernel: {path} is not a bzImage (no HdrS setup header); pass a vmlinuz")
            offset, = struct.unpack_from("<H", header, 0x20E)
            handle.seek(offset + 0x200)
            text = handle.read(256).split(b"\0")[0].decode("ascii", "replace")
    except OSError as error:
        raise TdxError(f"kernel: cannot read {path}: {error.strerror}") from None
    if not text.strip():
        raise TdxError(f"kernel: {path} carries no version string")
    return text.split()[0]


def _follow_meta(deb_path: str, ctx, depth: int = 0) -> list:
    """For an apt meta-package without a kernel, the resolved kernel package it depends on."""
    control = DebPackage(deb_path).control
    for dependency in control.get("Depends", "").split(","):
        name, _, constraint = dependency.strip().partition(" ")
        if name.startswith("linux-image-"):
            version = constraint.strip("() ").lstrip("= ").strip() if constraint.strip().startswith("(=") else ""
            spec = parse(f"apt:{name}={version}" if version else f"apt:{name}", "kernel")
            return materialize(spec, ctx, "kernel")
    raise TdxError(f"kernel: {os.path.basename(deb_path)} holds no kernel and depends on no linux-image package")


def _has_kernel(deb_path: str) -> bool:
    return any(info.name.startswith("boot/vmlinu") for info, _ in DebPackage(deb_path).iter_data())


def unpack_packages(debs: list, cache: str) -> str:
    """Unpack kernels and modules of ``debs`` into the cache once; return the tree."""
    key = hashlib.sha256("\n".join(sorted(r.sha256 for r in debs)).encode()).hexdigest()
    tree = os.path.join(cache, "kernels", key)
    os.makedirs(os.path.dirname(tree), exist_ok=True)
    with filelock.FileLock(tree + ".lock"):
        if not os.path.isdir(tree):
            part = tree + ".part"
            shutil.rmtree(part, ignore_errors=True)
            os.makedirs(part)
            for deb in debs:
                extract(deb.path, part, select=lambda name: bool(_KEEP.match(name)))
            # A kernel or module that is a symlink would make later stages read a host file.
            for top, _, names in os.walk(part):
                for name in names:
                    if os.path.islink(os.path.join(top, name)):
                        shutil.rmtree(part, ignore_errors=True)
                        rel = os.path.relpath(os.path.join(top, name), part)
                        raise TdxError(f"kernel: {rel} in the kernel packages is a symlink, not a file; "
                                       "refusing these packages")
            os.rename(part, tree)
    return tree


def _modules_root(base: str, release: str):
    for candidate in (os.path.join(base, "lib", "modules", release), os.path.join(base, "usr", "lib", "modules", release),
                      os.path.join(base, release)):
        if os.path.isdir(candidate):
            return candidate
    if os.path.isdir(os.path.join(base, "kernel")) or os.path.exists(os.path.join(base, "modules.builtin")):
        return base
    return None


def build_kernel(spec_text: str, modules_dir, ctx, out_kernel: str, out_info: str) -> None:
    spec = parse(spec_text, "kernel")
    resolved = materialize(spec, ctx, "kernel")
    records = [input_record(r) for r in resolved]
    debs = [r for r in resolved if r.path.endswith(".deb")]
    if spec.kind == "apt" and debs and not _has_kernel(debs[0].path):
        extra = _follow_meta(debs[0].path, ctx)
        debs += extra
        records += [input_record(r) for r in extra]
    if debs:
        tree = unpack_packages(debs, ctx.cache)
        kernels = sorted(os.listdir(os.path.join(tree, "boot"))) if os.path.isdir(os.path.join(tree, "boot")) else []
        if len(kernels) != 1:
            raise TdxError(f"kernel: {spec_text} holds {len(kernels)} kernel images; expected exactly one")
        vmlinuz = os.path.join(tree, "boot", kernels[0])
        release = kernels[0].split("-", 1)[1]
        modules_root = _modules_root(tree, release)
    else:
        vmlinuz = resolved[0].path
        release = release_from_bzimage(vmlinuz)
        modules_root = None
        if modules_dir:
            if not os.path.isdir(modules_dir):
                raise TdxError(f"modules_dir: {modules_dir} is not a directory")
            modules_root = _modules_root(modules_dir, release)
            if modules_root is None:
                raise TdxError(f"modules_dir: {modules_dir} holds no lib/modules/{release} (the kernel's release); "
                               "point it at a modules tree for this kernel")
    release_from_bzimage(vmlinuz)  # refuses anything that is not a bzImage
    copy_file(vmlinuz, out_kernel, mode=0o644)
    write_json(out_info, {"release": release, "modules_root": cache_relative(modules_root, ctx.cache),
                          "inputs": records})


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.kernel", argv)
    config = load_config(args.config)
    build_kernel(config["spec"], config.get("modules_dir"), context(args, config), args.out, args.info)


if __name__ == "__main__":
    run(main)
