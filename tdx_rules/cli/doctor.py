"""``tdx-rules doctor``: which host tools the rules use are present, and how to get the rest."""

import dataclasses
import importlib.util
import shutil
from typing import Callable, List, Optional

from ..stages import program


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    used_for: str
    install: str
    found: Callable[[], Optional[str]]   # where it was found, or None
    required: bool = True


def _command(name: str) -> Callable[[], Optional[str]]:
    return lambda: shutil.which(name)


def _module(name: str) -> Callable[[], Optional[str]]:
    def find():
        spec = importlib.util.find_spec(name)
        return spec.origin if spec else None
    return find


def _rust_target() -> Optional[str]:
    if not shutil.which("rustc"):
        return None
    return program.RUST_TARGET if program.rust_target_installed() else None


CHECKS = (
    Check("musl-gcc", "C programs (TdxStaticProgram)", "apt-get install musl-tools", _command("musl-gcc")),
    Check("cargo", "Rust programs (TdxStaticProgram with a Cargo.toml)", "https://rustup.rs or apt-get install cargo",
          _command("cargo"), required=False),
    Check(f"rust target {program.RUST_TARGET}", "static Rust programs", f"rustup target add {program.RUST_TARGET}",
          _rust_target, required=False),
    Check("go", "Go programs (TdxStaticProgram with a go.mod)", "apt-get install golang-go", _command("go"),
          required=False),
    Check("qemu-system-x86_64", "the launch scripts, ./run demo", "apt-get install qemu-system-x86",
          _command("qemu-system-x86_64"), required=False),
    Check("e2fsck", "container root filesystems (TdxExt4Rootfs): checks each image built or reused",
          "apt-get install e2fsprogs", _command("e2fsck")),
    Check("apt-get", "apt: sources (kernel, OVMF, busybox from Debian/Ubuntu)", "a Debian or Ubuntu host",
          _command("apt-get"), required=False),
    Check("gpgv", "signatures of alpine:, ubuntu-kernel: and canonical-ovmf: downloads", "apt-get install gpgv",
          _command("gpgv")),
    Check("gpg", "reading the trusted key files (fingerprints)", "apt-get install gpg", _command("gpg")),
    Check("python: cryptography", "tdx-rules verify (quotes, certificates)", "pip install cryptography",
          _module("cryptography")),
    Check("python: requests", "downloads", "pip install requests", _module("requests")),
    Check("python: jinja2", "the init and launch scripts", "pip install jinja2", _module("jinja2")),
    Check("python: filelock", "the shared download cache", "pip install filelock", _module("filelock")),
    Check("python: zstandard", "zstd kernels and --compress zstd", "pip install zstandard", _module("zstandard")),
    Check("python: lz4", "--compress lz4", "pip install lz4", _module("lz4")),
    Check("python: google_crc32c", "fast ext4 metadata checksums (a slow built-in fallback exists)",
          "pip install google-crc32c", _module("google_crc32c"), required=False),
    Check("python: SCons", "the build rules", "pip install scons", _module("SCons")),
)


def run_checks(checks=CHECKS) -> List[tuple]:
    """(check, where found or None) for every check."""
    return [(check, check.found()) for check in checks]


def report(results) -> List[str]:
    lines = []
    width = max(len(check.name) for check, _ in results)
    for check, where in results:
        if where:
            lines.append(f"ok       {check.name:{width}}  {where}")
        else:
            level = "MISSING " if check.required else "optional"
            lines.append(f"{level} {check.name:{width}}  for {check.used_for}: {check.install}")
    return lines


def missing_required(results) -> bool:
    return any(check.required and not where for check, where in results)

