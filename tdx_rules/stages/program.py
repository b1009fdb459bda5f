"""Stage 1: a static x86-64 workload binary.

C sources are compiled with ``musl-gcc -static`` and flags that keep build
paths and build IDs out of the binary; a Rust crate is built with cargo for
``x86_64-unknown-linux-musl`` when that target is installed, else for the host's
``x86_64-unknown-linux-gnu`` as a static glibc binary (``-C target-feature=+crt-static``);
a Go module (its go.mod) is built with ``CGO_ENABLED=0``, ``-trimpath``, ``-buildvcs=false`` and an
empty build ID, offline (``GOPROXY=off``, ``-mod=vendor`` when it has a vendor/ directory), with
its build cache and GOPATH beside the output; a prebuilt binary is only checked. Every result
must be a static x86-64 ELF, except for ``dynamic``: a prebuilt dynamically linked one, whose
libraries the closure stage packs.
"""

import argparse
import os
import re
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
# -s -w: no symbol table or DWARF (as the C and Rust builds strip theirs); -buildid=: no Go build ID
# note; -trimpath: no file system paths; -buildvcs=false: no VCS stamp (it would differ between checkouts).
GO_BUILD_FLAGS = ["-trimpath", "-buildvcs=false", "-ldflags=-s -w -buildid="]
# The whole environment of `go build` besides PATH (and GOROOT, TMPDIR when set): the user's go env
# file, GOFLAGS and workspace are not read, the target is fixed, nothing is fetched, no toolchain switch.
GO_ENV = {"CGO_ENABLED": "0", "GOOS": "linux", "GOARCH": "amd64", "GOAMD64": "v1", "GO111MODULE": "on",
          "GOENV": "off", "GOWORK": "off", "GOPROXY": "off", "GOSUMDB": "off", "GOTOOLCHAIN": "local"}
# Where a Go program's build cache and GOPATH go, beside its output (a dot directory: Go and
# go_module_inputs skip it, so an output inside the module is no input of it).
GO_WORK_DIR = ".tdx-go"


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


def go_module_inputs(gomod: str) -> list:
    """The files of the Go module of ``gomod`` that ``go build`` reads: go.mod, go.sum,
    vendor/modules.txt and every non-test ``.go`` and ``.s`` file (in a fixed order: directories
    and names sorted).

    Left out as Go leaves them out: directories starting with ``.`` or ``_``, ``testdata``,
    and nested modules (a directory with its own go.mod, outside vendor/).
    """
    module = os.path.dirname(os.path.abspath(gomod))
    files = [os.path.join(module, name) for name in ("go.mod", "go.sum", os.path.join("vendor", "modules.txt"))
             if os.path.isfile(os.path.join(module, name))]
    for top, dirs, names in os.walk(module):
        in_vendor = os.path.relpath(top, module).split(os.sep)[0] == "vendor"
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")) and d != "testdata"
                         and (in_vendor or not os.path.isfile(os.path.join(top, d, "go.mod"))))
        files += [os.path.join(top, name) for name in sorted(names)
                  if name.endswith((".go", ".s")) and not name.endswith("_test.go")]
    return files


def go_version() -> str:
    """``go env GOVERSION`` as the build will see it, or ``"none"`` when go is not on PATH."""
    try:
        result = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, timeout=60,
                                env=_go_environ({}))
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return result.stdout.strip() if result.returncode == 0 else "none"


def _go_environ(extra: dict) -> dict:
    env = {name: os.environ[name] for name in ("PATH", "GOROOT", "TMPDIR") if name in os.environ}
    env.update(GO_ENV)
    env.update(extra)
    return env


def _first_go_error(stderr: str) -> str:
    """The first compiler error (``file.go:line:col: message``), else the first ``go:`` line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith("#")]
    for pattern in (r"^\S+\.(go|s):\d+", r"^go: "):
        for line in lines:
            if re.match(pattern, line):
                return line
    return lines[0] if lines else ""


def build_go(gomod: str, out: str) -> None:
    """Build the main package of the module of ``gomod`` into the static binary ``out``.

    The build cache and GOPATH are in ``.tdx-go/<name>/`` beside ``out``; nothing is fetched
    (``GOPROXY=off``), so dependencies come from vendor/ (then ``-mod=vendor``) or that cache.
    """
    name = os.path.basename(out)
    if shutil.which("go") is None:
        raise TdxError(f"{gomod}: go not found; install Go (Debian: apt-get install golang-go) or put it on PATH")
    module = os.path.dirname(os.path.abspath(gomod))
    outdir = os.path.dirname(os.path.abspath(out))
    work = os.path.join(outdir, GO_WORK_DIR, name)
    goflags = ["-modcacherw"] + (["-mod=vendor"] if os.path.isdir(os.path.join(module, "vendor")) else [])
    env = _go_environ({"GOCACHE": os.path.join(work, "cache"), "GOPATH": os.path.join(work, "gopath"),
                       "GOMODCACHE": os.path.join(work, "gopath", "pkg", "mod"), "GOFLAGS": " ".join(goflags)})
    with tempfile.TemporaryDirectory(prefix=".program.", dir=outdir) as tmp:
        binary = os.path.join(tmp, "a.out")
        result = subprocess.run(["go", "build", *GO_BUILD_FLAGS, "-o", binary, "."], cwd=module, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode:
            raise TdxError(f"{gomod}: go build failed: {_first_go_error(result.stdout) or result.returncode}")
        check_static_x86_64(binary, name)
        copy_file(binary, out, mode=0o755)


def check_prebuilt(path: str, out: str) -> None:
    check_static_x86_64(path, "binary")
    copy_file(path, out, mode=0o755)


def check_dynamic(path: str, out: str) -> None:
    check_dynamic_x86_64(path, "binary")
    copy_file(path, out, mode=0o755)


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.program")
    parser.add_argument("kind", choices=("c", "rust", "go", "prebuilt", "dynamic"))
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
    elif args.kind == "go":
        build_go(args.sources[0], args.out)
    elif args.kind == "dynamic":
        check_dynamic(args.sources[0], args.out)
    else:
        check_prebuilt(args.sources[0], args.out)


if __name__ == "__main__":
    run(main)
