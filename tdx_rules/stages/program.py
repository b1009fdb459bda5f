"""Stage 1: a static x86-64 workload binary.

C sources are compiled with ``musl-gcc -static`` and flags that keep build
paths and build IDs out of the binary; a Rust crate is built with cargo for
``x86_64-unknown-linux-musl`` when that target is installed, else for the host's
``x86_64-unknown-linux-gnu`` as a static glibc binary (``-C target-feature=+crt-static``);
a prebuilt binary is only checked. Every result must be a static x86-64 ELF, except
for ``dynamic``: a prebuilt dynamically linked one, whose libraries the closure stage packs.
"""

import argparse
import os
import shutil
import subprocess
import tempfile

from ..elf import check_dynamic_x86_64, check_static_x86_64
from ..errors import TdxError
from ..fsutil import copy_file
from ._entry import run

RUST_TARGET = "x86_64-unknown-linux-musl"
RUST_GLIBC_TARGET = "x86_64-unknown-linux-gnu"
REPRODUCIBLE_CFLAGS = ["-static", "-s", "-Wl,--build-id=none", "-fno-ident"]


def compile_c(cc: str, cflags, sources, out: str) -> None:
    """Compile C ``sources`` into the static binary ``out`` (written atomically)."""
    if shutil.which(cc) is None:
        raise TdxError(f"compiler {cc} not found; install it (Debian: apt-get install musl-tools) or set TDX_CC")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=".program.", dir=os.path.dirname(os.path.abspath(out)) or ".") as tmp:
        binary = os.path.join(tmp, "a.out")
        command = [cc, *cflags, *REPRODUCIBLE_CFLAGS, f"-ffile-prefix-map={cwd}=.", "-o", binary, *sources]
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if result.returncode:
            message = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()[-1:]
            raise TdxError(f"{os.path.basename(out)}: {cc} failed: {message[0] if message else 'exit status ' + str(result.returncode)}")
        check_static_x86_64(binary, os.path.basename(out))
        copy_file(binary, out, mode=0o755)


def rust_target_installed(target: str = RUST_TARGET) -> bool:
    try:
        sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return os.path.isdir(os.path.join(sysroot, "lib", "rustlib", target, "lib"))


def rust_build_target() -> str:
    """The musl target when installed, else the glibc one (linked statically)."""
    return RUST_TARGET if rust_target_installed(RUST_TARGET) else RUST_GLIBC_TARGET


def build_rust(manifest: str, binary_name: str, out: str, target: str = RUST_TARGET) -> None:
    """Build ``binary_name`` of the crate at ``manifest`` for ``target``, statically linked."""
    if shutil.which("cargo") is None:
        raise TdxError(f"{manifest}: cargo not found; install Rust to build this crate")
    if not rust_target_installed(target):
        raise TdxError(f"{manifest}: the Rust target {target} is not installed; run `rustup target add {target}`")
    if target == RUST_GLIBC_TARGET:
        print(f"[tdx] program {binary_name}: Rust target {RUST_TARGET} is not installed; building a static glibc "
              f"binary (-C target-feature=+crt-static) for {target} (`rustup target add {RUST_TARGET}` for musl)",
              flush=True)
    crate = os.path.dirname(os.path.abspath(manifest))
    env = dict(os.environ)
    env["RUSTFLAGS"] = " ".join([f"--remap-path-prefix={crate}=.", "--remap-path-prefix=" + os.path.expanduser("~") + "=~",
                                 "-C", "strip=symbols", "-C", "link-arg=-Wl,--build-id=none", "-C", "target-feature=+crt-static"])
    env["SOURCE_DATE_EPOCH"] = env.get("SOURCE_DATE_EPOCH", "0")
    target_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "cargo-target")
    command = ["cargo", "build", "--release", "--manifest-path", manifest, "--target", target,
               "--target-dir", target_dir, "--bin", binary_name]
    if os.path.exists(os.path.join(crate, "Cargo.lock")):
        command.append("--locked")
    result = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error")] or result.stderr.splitlines()[-1:]
        raise TdxError(f"{manifest}: cargo build failed: {lines[0] if lines else result.returncode}")
    built = os.path.join(target_dir, target, "release", binary_name)
    check_static_x86_64(built, binary_name)
    copy_file(built, out, mode=0o755)


def check_prebuilt(path: str, out: str) -> None:
    check_static_x86_64(path, "binary")
    copy_file(path, out, mode=0o755)


def check_dynamic(path: str, out: str) -> None:
    check_dynamic_x86_64(path, "binary")
    copy_file(path, out, mode=0o755)


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.program")
    parser.add_argument("kind", choices=("c", "rust", "prebuilt", "dynamic"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cc", default="musl-gcc")
    parser.add_argument("--cflags", default="")
    parser.add_argument("--bin", help="binary name (rust)")
    parser.add_argument("--target", default=RUST_TARGET, help="Rust target triple (rust)")
    parser.add_argument("sources", nargs="+")
    args = parser.parse_args(argv)
    if args.kind == "c":
        compile_c(args.cc, args.cflags.split(), args.sources, args.out)
    elif args.kind == "rust":
        build_rust(args.sources[0], args.bin or os.path.basename(args.out), args.out, args.target)
    elif args.kind == "dynamic":
        check_dynamic(args.sources[0], args.out)
    else:
        check_prebuilt(args.sources[0], args.out)


if __name__ == "__main__":
    run(main)
