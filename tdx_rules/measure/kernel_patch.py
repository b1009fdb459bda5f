"""The bytes QEMU writes into a Linux kernel's setup header before the firmware measures it.

QEMU's direct kernel boot (hw/i386/x86.c, later x86-common.c: x86_load_linux) reads the
first 8 KiB of the bzImage, edits the real-mode setup header and hands the firmware the
edited setup plus the untouched rest through fw_cfg.  OVMF glues both back into one
"kernel" file and measures its Authenticode digest, so the digest depends on:

- the command-line address (0x20000 for protocol >= 2.02 kernels with LOADED_HIGH);
- type_of_loader = 0xb0, loadflags |= CAN_USE_HEAP (0x80), heap_end_ptr;
- the initrd address and size, and the address depends on guest memory below 4 GiB:
  q35 (hw/i386/pc_q35.c, pc_q35_init) keeps all memory below 4 GiB when it is smaller
  than 0xb0000000 (2.75 GiB), otherwise it splits at 2 GiB; QEMU keeps the top
  acpi_data_size = 0x20000 + 0x8000 bytes of that for the firmware (PC_FW_DATA);
  initrd_max is the header's initrd_addr_max (UINT32_MAX when xloadflags has
  XLF_CAN_BE_LOADED_ABOVE_4G, bit 1), capped at below_4g - acpi_data_size - 1, and
  the initrd goes at (initrd_max - size) rounded down to 4 KiB;
- vid_mode, when the command line contains "vga=".

QEMU up to 10.1 does this for TDX guests too; 10.2 skips it for confidential guests
(commit "i386/x86-common: ... check machine->cgs", applied for 10.2), and OVMF that reads
the fw_cfg file etc/boot/kernel (QEMU >= 10.0) measures the unpatched file.  Which case
applies is decided in profiles.py; this module only computes the patch.
"""

import os
import re
import struct

from tdx_rules.errors import TdxError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# hw/i386/pc.c: "BIOS ACPI tables: 128K. Other BIOS datastructures: ... 32K".
ACPI_DATA_SIZE = 0x20000 + 0x8000
# hw/i386/pc_q35.c pc_q35_init: the below/above 4 GiB split.
Q35_SPLIT_THRESHOLD = 0xB0000000
Q35_SPLIT_LOWMEM = 0x80000000
# QEMU rounds -m up to this (system/vl.c set_memory_options, QEMU_ALIGN_UP(sz, 8192)).
RAM_ALIGN = 8192

HDRS_MAGIC = 0x53726448  # "HdrS" at 0x202
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
QEMU_LOADER_TYPE = 0xB0
HEADER_BYTES = 8192  # QEMU reads this much of the kernel as "header"

# Setup header field offsets (Documentation/arch/x86/boot.rst).
OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_HEADER_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_XLOADFLAGS = 0x236
OFF_OLD_CMDLINE_MAGIC = 0x20
OFF_OLD_CMDLINE_OFFSET = 0x22

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*$")
_UNIT = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_memory(text) -> int:
    """Guest memory in bytes from a QEMU ``-m`` value: "4G", "512M", "2048" (MiB, as QEMU reads it)."""
    if isinstance(text, bool):
        raise TdxError(f"memory {text!r} is not a size; write e.g. '4G' or '512M'")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise TdxError(f"memory {text!r} is not a size; write e.g. '4G' or '512M'")
        number, unit, byte_suffix = match.groups()
        if unit == "" and not byte_suffix:
            unit = "M"  # QEMU: a bare number is MiB ("legacy suffix-less format")
        scaled = _scale(number, _UNIT[unit.upper()])
        if scaled is None:
            raise TdxError(f"memory {text!r} is not a whole number of bytes; write e.g. '1536M' instead")
        value = scaled
    if value <= 0:
        raise TdxError(f"memory {text!r} must be more than zero; write e.g. '4G'")
    if value >= 1 << 52:
        raise TdxError(f"memory {text!r} is larger than any x86 guest can address; write e.g. '4G'")
    return value


def _scale(number, unit):
    whole, _, frac = number.partition(".")
    numerator = int(whole + frac) * unit
    denominator = 10 ** len(frac)
    if numerator % denominator:
        return None
    return numerator // denominator


def guest_ram_size(memory_bytes) -> int:
    """The RAM size QEMU actually configures for ``-m`` (rounded up to 8 KiB)."""
    size = parse_memory(memory_bytes)
    return (size + RAM_ALIGN - 1) // RAM_ALIGN * RAM_ALIGN


def below_4g_mem_size(memory_bytes) -> int:
    """Guest RAM mapped below 4 GiB on QEMU's q35 machine (default max-ram-below-4g)."""
    ram = guest_ram_size(memory_bytes)
    lowmem = Q35_SPLIT_LOWMEM if ram >= Q35_SPLIT_THRESHOLD else Q35_SPLIT_THRESHOLD
    return min(ram, lowmem)


def _read_header(kernel_path):
    try:
        with open(kernel_path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_BYTES)
    except OSError as error:
        raise TdxError(f"kernel: cannot read {kernel_path}: {error.strerror}") from None
    if len(header) < OFF_XLOADFLAGS + 2 or struct.unpack_from("<I", header, OFF_HEADER_MAGIC)[0] != HDRS_MAGIC:
        raise TdxError(f"kernel {kernel_path} has no Linux setup header (HdrS); give a bzImage (vmlinuz), "
                       "not an ELF vmlinux or a compressed file")
    return header, size


def vga_word(cmdline: str) -> str:
    """The only part of a command line that QEMU's setup-header edit reads for a kernel
    that loads high (``vga=…``, found as ``strstr`` finds it), or ''."""
    at = cmdline.find("vga=")
    return cmdline[at:].split(" ", 1)[0] if at >= 0 else ""


def _vga_mode(cmdline):
    """QEMU's handling of "vga=" (first occurrence anywhere, as strstr finds it)."""
    at = cmdline.find("vga=")
    if at < 0:
        return None
    rest = cmdline[at + 4:]
    for word, mode in (("normal", 0xFFFF), ("ext", 0xFFFE), ("ask", 0xFFFD)):
        if rest.startswith(word):
            return mode
    match = re.match(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", rest)
    end = match.end() if match else 0
    if not match or (end < len(rest) and rest[end] != " "):
        raise TdxError(f"kernel command line: QEMU rejects 'vga={rest.split(' ')[0]}' (invalid 'vga=' kernel "
                       "parameter); use vga=normal, ext, ask or a number")
    text = match.group(1)
    value = int(text, 16) if text[:2] in ("0x", "0X") else int(text, 8) if text.startswith("0") else int(text)
    if value > 0xFFFFFFFF:
        raise TdxError(f"kernel command line: QEMU rejects 'vga={text}' (out of range); use a 16-bit mode number")
    return value & 0xFFFF


def qemu_setup_header_patch(kernel_path, initrd_size, memory_bytes, cmdline) -> dict:
    """{file offset: bytes} that QEMU (<= 10.1, q35) writes into the kernel's setup header.

    ``initrd_size`` is None when no ``-initrd`` is given (0 is an empty initrd file);
    ``memory_bytes`` is the ``-m`` value in bytes (or a string such as "4G");
    ``cmdline`` is the ``-append`` string.
    """
    if cmdline is None:
        cmdline = ""
    if not isinstance(cmdline, str) or "\0" in cmdline:
        raise TdxError("kernel command line must be text without NUL characters")
    if initrd_size is not None and (isinstance(initrd_size, bool) or not isinstance(initrd_size, int)
                                    or initrd_size < 0):
        raise TdxError(f"initrd size {initrd_size!r} is not a byte count")
    below_4g = below_4g_mem_size(memory_bytes)
    ram = guest_ram_size(memory_bytes)
    header, kernel_size = _read_header(kernel_path)

    protocol = struct.unpack_from("<H", header, OFF_VERSION)[0]
    loadflags = header[OFF_LOADFLAGS]
    cmdline_bytes = len(cmdline.encode("utf-8"))
    cmdline_size = (cmdline_bytes + 16) & ~15
    if protocol < 0x202 or not loadflags & LOADED_HIGH:  # low, or high but ancient kernel
        real_addr, cmdline_addr = 0x90000, 0x9A000 - cmdline_size
    else:  # high and recent kernel
        real_addr, cmdline_addr = 0x10000, 0x20000

    if protocol >= 0x20C and struct.unpack_from("<H", header, OFF_XLOADFLAGS)[0] & XLF_CAN_BE_LOADED_ABOVE_4G:
        initrd_max = 0xFFFFFFFF
    elif protocol >= 0x203:
        initrd_max = struct.unpack_from("<I", header, OFF_INITRD_ADDR_MAX)[0]
    else:
        initrd_max = 0x37FFFFFF
    if below_4g <= ACPI_DATA_SIZE:
        raise TdxError(f"memory of {ram} bytes is too small for QEMU to boot a kernel; raise memory")
    if initrd_max >= below_4g - ACPI_DATA_SIZE:
        initrd_max = below_4g - ACPI_DATA_SIZE - 1

    patch = {}
    if protocol >= 0x202:
        patch[OFF_CMD_LINE_PTR] = struct.pack("<I", cmdline_addr)
    else:
        patch[OFF_OLD_CMDLINE_MAGIC] = struct.pack("<H", 0xA33F)
        patch[OFF_OLD_CMDLINE_OFFSET] = struct.pack("<H", (cmdline_addr - real_addr) & 0xFFFF)
    vga = _vga_mode(cmdline)
    if vga is not None:
        patch[OFF_VID_MODE] = struct.pack("<H", vga)
    if protocol >= 0x200:
        patch[OFF_TYPE_OF_LOADER] = bytes([QEMU_LOADER_TYPE])
    if protocol >= 0x201:
        patch[OFF_LOADFLAGS] = bytes([loadflags | CAN_USE_HEAP])
        patch[OFF_HEAP_END_PTR] = struct.pack("<H", (cmdline_addr - real_addr - 0x200) & 0xFFFF)

    if initrd_size is not None:
        if protocol < 0x200:
            raise TdxError(f"kernel {kernel_path} is too old to load an initrd (boot protocol {protocol:#x})")
        if initrd_size >= initrd_max:
            raise TdxError(f"initrd of {initrd_size} bytes does not fit below {initrd_max:#x} for memory {ram} "
                           f"bytes; raise memory or shrink the initrd")
        initrd_addr = (initrd_max - initrd_size) & ~4095
        patch[OFF_RAMDISK_IMAGE] = struct.pack("<I", initrd_addr)
        patch[OFF_RAMDISK_SIZE] = struct.pack("<I", initrd_size)

    setup_sects = header[OFF_SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size > kernel_size:
        raise TdxError(f"kernel {kernel_path}: setup of {setup_size} bytes is longer than the file; QEMU calls "
                       "this an invalid kernel header")
    limit = min(HEADER_BYTES, setup_size)
    for offset, data in patch.items():
        if offset + len(data) > limit:  # QEMU copies only this much of its edited header back
            raise TdxError(f"kernel {kernel_path}: setup header field at {offset:#x} lies outside the "
                           f"{limit}-byte setup; the kernel header is corrupt")
    return dict(sorted(patch.items()))
