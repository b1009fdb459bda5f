"""Just enough ELF to decide how a workload runs in the initramfs, and what it loads.

The format is the System V ABI's ELF-64 (x86-64 psABI): the file header, the program
header table, ``PT_INTERP`` (the path of the dynamic loader the kernel starts) and
``PT_DYNAMIC`` (the dynamic section: ``DT_NEEDED``, ``DT_SONAME``, ``DT_RPATH``,
``DT_RUNPATH``, ``DT_FLAGS_1``, whose strings live in ``DT_STRTAB``, an address that the
``PT_LOAD`` segments map back to a file offset). Section headers are never read: a
stripped binary needs none, and the loader reads none either.

:func:`read_elf` reads only those structures, with bounds checked against the file's
size; a damaged or foreign file raises :class:`TdxError` with one line, never anything
else. Nothing is executed.
"""

import dataclasses
import mmap
import os
import struct
from typing import Optional, Tuple

from .errors import TdxError

PT_LOAD = 1
PT_DYNAMIC = 2
PT_INTERP = 3
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
DT_SONAME = 14
DT_RPATH = 15
DT_RUNPATH = 29
DT_FLAGS_1 = 0x6FFFFFFB
DF_1_NODEFLIB = 0x800

# Bounds on what a hostile file can make us read: a real interpreter path is under 100 bytes,
# a real dynamic section under a few hundred entries, its string table under a few MiB.
MAX_PHNUM = 4096
MAX_INTERP = 4096
MAX_DYNAMIC = 1 << 16
MAX_STRTAB = 64 << 20

STATIC_HINT = "link it statically (musl-gcc -static, or RUSTFLAGS='-C target-feature=+crt-static')"


@dataclasses.dataclass(frozen=True)
class ElfInfo:
    """What the kernel and the dynamic loader read from one x86-64 ELF file."""

    path: str
    type: int                            # ET_EXEC or ET_DYN
    interpreter: Optional[str] = None    # PT_INTERP
    needed: Tuple[str, ...] = ()         # DT_NEEDED, in file order
    soname: Optional[str] = None         # DT_SONAME
    rpath: Tuple[str, ...] = ()          # DT_RPATH, split at ':'
    runpath: Tuple[str, ...] = ()        # DT_RUNPATH, split at ':'
    flags_1: int = 0                     # DT_FLAGS_1
    dynamic: bool = False                # has a PT_DYNAMIC segment

    @property
    def nodeflib(self) -> bool:
        """DF_1_NODEFLIB: the loader skips its cache and default directories for this object's needs."""
        return bool(self.flags_1 & DF_1_NODEFLIB)


def _corrupt(what: str, path, part: str) -> TdxError:
    return TdxError(f"{what}: {path} has a corrupt ELF {part}; rebuild it or use another file")


def read_elf(path, what: str = "program") -> ElfInfo:
    """The header facts of the x86-64 ELF file ``path``; TdxError (naming ``what``) for anything else."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            # Mapped, not read: a no-op build reads the headers of a program's whole closure.
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size >= 64 else handle.read()
    except (OSError, ValueError) as error:
        raise TdxError(f"{what}: cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        return _read(data, path, what)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()


def _read(data, path, what: str) -> ElfInfo:
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise TdxError(f"{what}: {path} is not an ELF executable; build it as an x86-64 Linux binary")
    if data[4] != 2 or data[5] != 1:
        raise TdxError(f"{what}: {path} is not a 64-bit little-endian ELF; build it for x86_64")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise TdxError(f"{what}: {path} is built for ELF machine {e_machine}, not x86-64")
    if e_type not in (ET_EXEC, ET_DYN):
        raise TdxError(f"{what}: {path} is not an executable or shared object (ELF type {e_type})")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < 56 or phnum > MAX_PHNUM or phoff + phentsize * phnum > len(data):
        raise _corrupt(what, path, "program header table")
    loads, interp, dynamic = [], None, None
    for index in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + index * phentsize)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_INTERP and interp is None:
            if p_filesz > MAX_INTERP or p_offset + p_filesz > len(data):
                raise _corrupt(what, path, "interpreter entry")
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if not interp:
                raise _corrupt(what, path, "interpreter entry")
        elif p_type == PT_DYNAMIC and dynamic is None:
            if p_offset + p_filesz > len(data):
                raise _corrupt(what, path, "dynamic segment")
            dynamic = (p_offset, p_filesz)
    info = ElfInfo(str(path), e_type, interpreter=interp)
    if dynamic is None:
        return info
    return _read_dynamic(data, info, dynamic, loads, what)


def _read_dynamic(data: bytes, info: ElfInfo, dynamic, loads, what: str) -> ElfInfo:
    offset, size = dynamic
    count = min(size // 16, MAX_DYNAMIC)
    entries = []
    for index in range(count):
        tag, value = struct.unpack_from("<qQ", data, offset + 16 * index)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    values = {}
    for tag, value in entries:
        values.setdefault(tag, value)
    if DT_NEEDED in values or DT_SONAME in values or DT_RPATH in values or DT_RUNPATH in values:
        if DT_STRTAB not in values:
            raise _corrupt(what, info.path, "dynamic section (strings without DT_STRTAB)")
    strtab, strsz = values.get(DT_STRTAB), values.get(DT_STRSZ, 0)
    table = b""
    if strtab is not None:
        file_offset = next((strtab - vaddr + off for vaddr, off, filesz in loads if vaddr <= strtab < vaddr + filesz),
                           None)
        if file_offset is None or strsz > MAX_STRTAB or file_offset + strsz > len(data):
            raise _corrupt(what, info.path, "dynamic string table")
        table = data[file_offset:file_offset + strsz]

    def string(value: int) -> str:
        end = table.find(b"\0", value)
        if value >= len(table) or end < 0:
            raise _corrupt(what, info.path, "dynamic string reference")
        return table[value:end].decode("utf-8", "surrogateescape")

    def path_list(tag):
        return tuple(part for part in string(values[tag]).split(":") if part) if tag in values else ()

    return dataclasses.replace(
        info, dynamic=True, needed=tuple(string(value) for tag, value in entries if tag == DT_NEEDED),
        soname=string(values[DT_SONAME]) if DT_SONAME in values else None,
        rpath=path_list(DT_RPATH), runpath=path_list(DT_RUNPATH), flags_1=values.get(DT_FLAGS_1, 0))


def check_static_x86_64(path, what: str = "program") -> None:
    """Raise TdxError unless ``path`` is an x86-64 ELF executable without an interpreter."""
    info = read_elf(path, what)
    if info.interpreter is not None:
        raise TdxError(f"{what}: {path} is dynamically linked (interpreter {info.interpreter}); {STATIC_HINT}, "
                       "or pack it with its libraries: env.TdxProgram(target, binary)")


def check_dynamic_x86_64(path, what: str = "program") -> ElfInfo:
    """The facts of ``path`` if it is a dynamically linked x86-64 executable (with an interpreter)."""
    info = read_elf(path, what)
    if info.interpreter is None:
        raise TdxError(f"{what}: {path} is statically linked (no interpreter); pass it to TdxImage(binary=...) "
                       "directly, TdxProgram is for dynamically linked programs")
    return info
