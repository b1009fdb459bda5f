"""Just enough ELF to decide whether a workload can run alone in the initramfs."""

import struct

from .errors import TdxError

PT_INTERP = 3
EM_X86_64 = 62


def check_static_x86_64(path, what: str = "program") -> None:
    """Raise TdxError unless ``path`` is an x86-64 ELF executable without an interpreter."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF":
                raise TdxError(f"{what}: {path} is not an ELF executable; build it as a static x86-64 Linux binary")
            if head[4] != 2 or head[5] != 1:
                raise TdxError(f"{what}: {path} is not a 64-bit little-endian ELF; build it for x86_64")
            e_type, e_machine = struct.unpack_from("<HH", head, 16)
            if e_machine != EM_X86_64:
                raise TdxError(f"{what}: {path} is built for ELF machine {e_machine}, not x86-64")
            if e_type not in (2, 3):
                raise TdxError(f"{what}: {path} is not an executable (ELF type {e_type})")
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            size = handle.seek(0, 2)
            if phentsize < 56 or phnum > 4096 or phoff + phentsize * phnum > size:
                raise TdxError(f"{what}: {path} has a corrupt ELF program header table")
            for index in range(phnum):
                handle.seek(phoff + index * phentsize)
                p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", handle.read(40))
                if p_type == PT_INTERP:
                    if p_offset + p_filesz > size or p_filesz > 4096:
                        raise TdxError(f"{what}: {path} has a corrupt ELF interpreter entry")
                    handle.seek(p_offset)
                    interp = handle.read(p_filesz).rstrip(b"\0").decode("utf-8", "replace")
                    raise TdxError(f"{what}: {path} is dynamically linked (interpreter {interp}); "
                                   "link it statically (musl-gcc -static, or RUSTFLAGS='-C target-feature=+crt-static')")
    except OSError as error:
        raise TdxError(f"{what}: cannot read {path}: {error.strerror}") from None
