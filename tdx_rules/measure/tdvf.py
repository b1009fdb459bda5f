"""Read the TDVF metadata of an OVMF image: which parts of the file QEMU loads where.

An OVMF firmware built with Intel TDX support carries a *TDVF metadata*
table: a ``"TDVF"`` descriptor followed by 32-byte section entries.  Each
section says which bytes of the firmware file (``DataOffset``/``RawDataSize``)
go to which guest-physical pages (``MemoryAddress``/``MemoryDataSize``), what
kind of memory it is (``Type``) and whether the TDX module measures its bytes
into MRTD (``Attributes`` bit 0, MR_EXTEND) or the pages are only accepted at
run time and not measured at all (bit 1, PAGE_AUG).

Locating the descriptor (QEMU ``hw/i386/pc_sysfw_ovmf.c`` and ``hw/i386/tdvf.c``):

* The last 0x20 bytes of the image are the reset vector area.  Just before it,
  at ``end - 0x30``, sits the footer GUID 96b582de-1fb2-45f7-baea-a366c55a082d
  of OVMF's GUIDed table, preceded by the table's total length (16 bits,
  including the footer GUID and the length itself).
* Walking backwards from the footer, each entry ends with a 16-byte GUID
  preceded by the 16-bit length of the whole entry; the entry's data comes
  first.  The entry e47a6535-984a-4798-865e-4685a7bf8ec2 holds a 32-bit offset
  of the TDVF descriptor counted back from the end of the image.
* Older TDVF/td-shim images have no GUIDed table; there a 32-bit value at
  ``end - 0x20`` is the descriptor's offset from the start of the file (td-shim
  ``td-shim-interface/src/metadata.rs``); the TDVF metadata GUID
  e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae precedes the descriptor.

Only the tail of the image and the descriptor are read here; the section
bytes are streamed later by :mod:`tdx_rules.measure.mrtd`.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from dataclasses import dataclass

from tdx_rules.errors import TdxError

PAGE_SIZE = 0x1000

# GUIDs as they are stored in the image (UEFI GUIDs are little-endian in their first three fields).
OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
TDX_METADATA_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae").bytes_le

FOOTER_GUID_FROM_END = 0x30  # the footer GUID starts 0x30 bytes before the end
LEGACY_OFFSET_FROM_END = 0x20  # the legacy 32-bit descriptor offset
GUID_TABLE_MAX = 0xFFFF  # the table length is a 16-bit field
ENTRY_TRAILER = 18  # 2-byte length + 16-byte GUID that end every table entry

DESCRIPTOR = struct.Struct("<4sIII")  # Signature, Length, Version, NumberOfSectionEntries
SECTION = struct.Struct("<IIQQII")  # DataOffset, RawDataSize, MemoryAddress, MemoryDataSize, Type, Attributes
SIGNATURE = b"TDVF"
VERSION = 1
MAX_SECTIONS = 1024  # real firmware has fewer than ten; this only bounds what a corrupt file can make us read
GPA_LIMIT = 1 << 52  # MAXPHYADDR is at most 52 bits
# Guest memory added page by page (TDH.MEM.PAGE.ADD) before the TD runs: real TDVF firmware adds a few
# MiB; a corrupt size could otherwise make MRTD hash 2**40 page records. 4 GiB takes about a second.
ADDED_BYTES_LIMIT = 1 << 32

ATTR_MR_EXTEND = 0x1
ATTR_PAGE_AUG = 0x2
KNOWN_ATTRIBUTES = ATTR_MR_EXTEND | ATTR_PAGE_AUG

TYPE_BFV = 0
TYPE_CFV = 1
TYPE_TD_HOB = 2
TYPE_TEMP_MEM = 3
TYPE_PERM_MEM = 4
TYPE_PAYLOAD = 5
TYPE_PAYLOAD_PARAM = 6
TYPE_TD_INFO = 7
TYPE_TD_PARAMS = 8

# Names as the TDVF design guide and the td-shim specification spell them.
SECTION_TYPE_NAMES = {
    TYPE_BFV: "BFV",
    TYPE_CFV: "CFV",
    TYPE_TD_HOB: "TD_HOB",
    TYPE_TEMP_MEM: "TempMem",
    TYPE_PERM_MEM: "PermMem",
    TYPE_PAYLOAD: "Payload",
    TYPE_PAYLOAD_PARAM: "PayloadParam",
    TYPE_TD_INFO: "TD_INFO",
    TYPE_TD_PARAMS: "TD_PARAMS",
}
# Sections whose content comes from the firmware file (QEMU refuses them with RawDataSize 0).
TYPES_WITH_FILE_BYTES = (TYPE_BFV, TYPE_CFV)
# Sections that are plain memory (QEMU refuses them with RawDataSize != 0).
TYPES_WITHOUT_FILE_BYTES = (TYPE_TD_HOB, TYPE_TEMP_MEM, TYPE_PERM_MEM)

SPLIT_FIRMWARE_HINT = ("this looks like the CODE half of a split firmware (OVMF_CODE*.fd), whose section "
                       "offsets count from the start of the combined image: pass the combined OVMF.fd "
                       "(code and variable store in one file) instead")


@dataclass(frozen=True)
class TdvfSection:
    """One TDVF_SECTION entry, as stored (all sizes and offsets in bytes)."""

    index: int
    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    type: int
    attributes: int

    @property
    def type_name(self) -> str:
        return SECTION_TYPE_NAMES.get(self.type, f"type-{self.type}")

    @property
    def mr_extend(self) -> bool:
        """The section's bytes are measured into MRTD (TDH.MR.EXTEND)."""
        return bool(self.attributes & ATTR_MR_EXTEND)

    @property
    def page_aug(self) -> bool:
        """The pages are accepted by the guest at run time (TDH.MEM.PAGE.AUG): not measured."""
        return bool(self.attributes & ATTR_PAGE_AUG)

    @property
    def pages(self) -> int:
        return self.memory_data_size // PAGE_SIZE

    @property
    def file_range(self) -> tuple[int, int]:
        """[start, end) of the section's bytes in the firmware file (empty when it has none)."""
        return self.data_offset, self.data_offset + self.raw_data_size

    @property
    def memory_range(self) -> tuple[int, int]:
        """[start, end) guest-physical range of the section."""
        return self.memory_address, self.memory_address + self.memory_data_size

    def describe(self) -> str:
        flags = [name for bit, name in ((ATTR_MR_EXTEND, "MR_EXTEND"), (ATTR_PAGE_AUG, "PAGE_AUG"))
                 if self.attributes & bit]
        return (f"section {self.index} {self.type_name}: file 0x{self.data_offset:x}+0x{self.raw_data_size:x} "
                f"-> GPA 0x{self.memory_address:x}+0x{self.memory_data_size:x}"
                f"{' [' + ','.join(flags) + ']' if flags else ''}")


@dataclass(frozen=True)
class TdvfMetadata:
    """The TDVF descriptor of one firmware file."""

    path: str
    file_size: int
    descriptor_offset: int  # file offset of the "TDVF" signature
    locator: str  # "guid-table" or "legacy"
    version: int
    sections: tuple[TdvfSection, ...]

    def by_type(self, type_name: str) -> tuple[TdvfSection, ...]:
        return tuple(s for s in self.sections if s.type_name == type_name)


def parse_tdvf(path) -> TdvfMetadata:
    """Parse and validate the TDVF metadata of the OVMF image at ``path``.

    Every problem (missing file, not OVMF, no TDX support, corrupt or truncated
    metadata, a CODE-only half of a split firmware) raises :class:`TdxError`.
    """
    path = os.fspath(path)
    with open_firmware(path) as handle:
        return parse_open(handle, path)


def open_firmware(path):
    """Open ``path`` for reading as a firmware image, or raise TdxError."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        raise TdxError(f"firmware {path} does not exist: give the path of an OVMF.fd built with TDX support") from None
    except IsADirectoryError:
        raise TdxError(f"firmware {path} is a directory: give the path of the OVMF.fd file inside it") from None
    except OSError as error:
        raise TdxError(f"firmware {path}: {error.strerror}: make it readable") from None
    try:
        regular = stat.S_ISREG(os.fstat(handle.fileno()).st_mode)
    except OSError as error:
        handle.close()
        raise TdxError(f"firmware {path}: {error.strerror}: make it readable") from None
    if not regular:
        handle.close()
        raise TdxError(f"firmware {path} is not a regular file: give the path of an OVMF.fd file")
    return handle


def parse_open(handle, path) -> TdvfMetadata:
    """Parse the TDVF metadata from an open binary ``handle`` (``path`` only names it in errors)."""
    size = _file_size(handle, path)
    if size < FOOTER_GUID_FROM_END + 2:
        raise TdxError(f"firmware {path} has only {size} bytes, too few for an OVMF image: "
                       "give the path of an OVMF.fd built with TDX support")
    tail_len = min(size, FOOTER_GUID_FROM_END + 2 + GUID_TABLE_MAX)
    tail_base = size - tail_len
    tail = _read_at(handle, path, tail_base, tail_len)

    def tail_bytes(offset, length):  # offset is absolute; always inside the tail by construction
        start = offset - tail_base
        return tail[start:start + length]

    descriptor_offset, locator = _locate_descriptor(handle, path, size, tail_bytes)

    header = _read_at(handle, path, descriptor_offset, DESCRIPTOR.size)
    signature, length, version, count = DESCRIPTOR.unpack(header)
    if signature != SIGNATURE:
        raise TdxError(f"firmware {path}: the TDVF metadata at offset 0x{descriptor_offset:x} has signature "
                       f"{signature!r}, not b'TDVF': the file is corrupt or not a TDX-capable OVMF; "
                       "use an OVMF.fd built with TDX support")
    if version != VERSION:
        raise TdxError(f"firmware {path}: TDVF metadata version {version} is not supported (only version "
                       f"{VERSION} is defined): use an OVMF.fd whose TDVF metadata is version {VERSION}")
    if count == 0:
        raise TdxError(f"firmware {path}: the TDVF metadata lists no sections: the firmware is corrupt; "
                       "use an intact OVMF.fd built with TDX support")
    if count > MAX_SECTIONS:
        raise TdxError(f"firmware {path}: the TDVF metadata claims {count} sections (more than {MAX_SECTIONS}): "
                       "the firmware is corrupt; use an intact OVMF.fd")
    expected_length = DESCRIPTOR.size + count * SECTION.size
    if length != expected_length:
        raise TdxError(f"firmware {path}: the TDVF metadata length is {length} bytes but {count} sections need "
                       f"{expected_length}: the firmware is corrupt; use an intact OVMF.fd")
    if descriptor_offset + length > size:
        raise TdxError(f"firmware {path}: the TDVF metadata at offset 0x{descriptor_offset:x} runs past the end "
                       f"of the file ({size} bytes): the file is truncated; use the complete OVMF.fd")
    table = _read_at(handle, path, descriptor_offset + DESCRIPTOR.size, count * SECTION.size)
    sections = tuple(TdvfSection(index, *SECTION.unpack_from(table, index * SECTION.size))
                     for index in range(count))
    for section in sections:
        _check_section(path, size, section)
    _check_overlaps(path, sections)
    added = sum(s.memory_data_size for s in sections if not s.page_aug)
    if added > ADDED_BYTES_LIMIT:
        raise TdxError(f"firmware {path}: the TDVF sections add 0x{added:x} bytes of guest memory page by page "
                       f"before the TD runs, more than 0x{ADDED_BYTES_LIMIT:x} (real firmware adds a few MiB): the "
                       "firmware is corrupt; use an intact OVMF.fd")
    return TdvfMetadata(path=path, file_size=size, descriptor_offset=descriptor_offset, locator=locator,
                        version=version, sections=sections)


def _file_size(handle, path) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise TdxError(f"firmware {path}: {error.strerror}: make it readable") from None


def _read_at(handle, path, offset, length) -> bytes:
    try:
        handle.seek(offset)
        data = handle.read(length)
    except OSError as error:
        raise TdxError(f"firmware {path}: reading {length} bytes at 0x{offset:x} failed ({error.strerror}): "
                       "check the file and the disk") from None
    if len(data) != length:
        raise TdxError(f"firmware {path} ended while reading {length} bytes at 0x{offset:x} (the file shrank "
                       "or is truncated): use the complete OVMF.fd and do not modify it while it is read")
    return data


def _locate_descriptor(handle, path, size, tail_bytes):
    """Return (file offset of the "TDVF" descriptor, how it was found)."""
    footer_at = size - FOOTER_GUID_FROM_END
    if tail_bytes(footer_at, 16) == OVMF_TABLE_FOOTER_GUID:
        found = _find_in_guid_table(path, size, footer_at, tail_bytes)
        if found is not None:
            return found, "guid-table"
    legacy = _legacy_offset(handle, path, size, tail_bytes)
    if legacy is not None:
        return legacy, "legacy"
    raise TdxError(f"firmware {path}: no TDVF metadata found (no TDX entry in the OVMF GUIDed table at the end "
                   "of the file, and no legacy TDVF offset at end-0x20): this is not a TDX-capable OVMF image "
                   "or it is truncated; use the complete OVMF.fd of an OVMF built with TDX support")


def _find_in_guid_table(path, size, footer_at, tail_bytes) -> int | None:
    table_end = footer_at - 2  # entries end where the table length field starts
    (total,) = struct.unpack("<H", tail_bytes(table_end, 2))
    if total < ENTRY_TRAILER or total - ENTRY_TRAILER > table_end:
        raise TdxError(f"firmware {path}: the OVMF GUIDed table at the end of the file claims {total} bytes, "
                       "which does not fit: the file is corrupt or truncated; use the complete OVMF.fd")
    table_start = table_end - (total - ENTRY_TRAILER)
    end = table_end
    while end - table_start >= ENTRY_TRAILER:
        guid = tail_bytes(end - 16, 16)
        (entry_len,) = struct.unpack("<H", tail_bytes(end - ENTRY_TRAILER, 2))
        if entry_len < ENTRY_TRAILER or entry_len > end - table_start:
            raise TdxError(f"firmware {path}: an entry of the OVMF GUIDed table at 0x{end - ENTRY_TRAILER:x} "
                           f"claims {entry_len} bytes, which does not fit the table: the file is corrupt; "
                           "use an intact OVMF.fd")
        if guid == TDX_METADATA_OFFSET_GUID:
            data = tail_bytes(end - entry_len, entry_len - ENTRY_TRAILER)
            if len(data) < 4:
                raise TdxError(f"firmware {path}: the TDX metadata entry of the OVMF GUIDed table holds "
                               f"{len(data)} bytes, fewer than its 4-byte offset: the file is corrupt; "
                               "use an intact OVMF.fd")
            (from_end,) = struct.unpack_from("<I", data, 0)
            if from_end == 0 or from_end > size:
                raise TdxError(f"firmware {path}: the TDVF metadata offset 0x{from_end:x} (counted from the end) "
                               f"points outside the {size}-byte file: the file is truncated or corrupt; "
                               "use the complete OVMF.fd")
            offset = size - from_end
            if offset + DESCRIPTOR.size > size:
                raise TdxError(f"firmware {path}: the TDVF metadata at offset 0x{offset:x} runs past the end of "
                               "the file: the file is truncated or corrupt; use the complete OVMF.fd")
            return offset
        end -= entry_len
    return None


def _legacy_offset(handle, path, size, tail_bytes) -> int | None:
    (offset,) = struct.unpack("<I", tail_bytes(size - LEGACY_OFFSET_FROM_END, 4))
    if offset < 16 or offset + DESCRIPTOR.size > size - LEGACY_OFFSET_FROM_END:
        return None
    # The legacy pointer has no GUID of its own (in a current OVMF those bytes are reset-vector code):
    # only trust it when the TDVF metadata GUID and the "TDVF" signature are where it points.
    window = _read_at(handle, path, offset - 16, 16 + len(SIGNATURE))
    if window[:16] == TDX_METADATA_GUID and window[16:] == SIGNATURE:
        return offset
    return None


def _check_section(path, size, s: TdvfSection) -> None:
    where = f"firmware {path}: TDVF {s.describe()}"
    if s.type not in SECTION_TYPE_NAMES:
        raise TdxError(f"{where} has unknown type {s.type} (known: "
                       f"{', '.join(f'{k} {v}' for k, v in SECTION_TYPE_NAMES.items())}): the firmware is "
                       "corrupt or newer than tdx-rules; use an OVMF.fd with standard TDVF metadata")
    if s.attributes & ~KNOWN_ATTRIBUTES:
        raise TdxError(f"{where} has unknown attribute bits 0x{s.attributes & ~KNOWN_ATTRIBUTES:x}: the firmware "
                       "is corrupt or newer than tdx-rules; use an OVMF.fd with standard TDVF metadata")
    if s.mr_extend and s.page_aug:
        raise TdxError(f"{where} is marked both MR_EXTEND and PAGE_AUG, but pages accepted at run time cannot "
                       "be measured: the firmware is corrupt; use an intact OVMF.fd")
    if s.memory_address % PAGE_SIZE:
        raise TdxError(f"{where}: MemoryAddress 0x{s.memory_address:x} is not 4 KiB aligned: the firmware is "
                       "corrupt; use an intact OVMF.fd")
    if s.memory_data_size % PAGE_SIZE:
        raise TdxError(f"{where}: MemoryDataSize 0x{s.memory_data_size:x} is not a multiple of 4 KiB: the "
                       "firmware is corrupt; use an intact OVMF.fd")
    if s.memory_address + s.memory_data_size > GPA_LIMIT:
        raise TdxError(f"{where}: the guest-physical range ends past 2**52 (it overflows the address space): "
                       "the firmware is corrupt; use an intact OVMF.fd")
    if s.type == TYPE_TD_INFO:
        # td-shim: TD_INFO lives inside the BFV and is not loaded by itself (MemoryAddress/Size are 0).
        if s.memory_data_size or s.memory_address:
            raise TdxError(f"{where}: a TD_INFO section must not have guest memory: the firmware is corrupt; "
                           "use an intact image")
    elif s.raw_data_size > s.memory_data_size:
        raise TdxError(f"{where}: RawDataSize 0x{s.raw_data_size:x} exceeds MemoryDataSize "
                       f"0x{s.memory_data_size:x}: the firmware is corrupt; use an intact OVMF.fd")
    if s.type in TYPES_WITH_FILE_BYTES and s.raw_data_size == 0:
        raise TdxError(f"{where}: a {s.type_name} section needs file bytes but RawDataSize is 0: the firmware "
                       "is corrupt; use an intact OVMF.fd")
    if s.type in TYPES_WITHOUT_FILE_BYTES and s.raw_data_size != 0:
        raise TdxError(f"{where}: a {s.type_name} section must not carry file bytes (RawDataSize "
                       f"0x{s.raw_data_size:x}): the firmware is corrupt; use an intact OVMF.fd")
    if s.mr_extend and s.raw_data_size == 0:
        raise TdxError(f"{where} is marked MR_EXTEND but has no file bytes, so its measured content is not in "
                       "the firmware file: use an OVMF.fd whose measured sections come from the image")
    file_end = s.data_offset + s.raw_data_size
    if s.raw_data_size and file_end > size:
        raise TdxError(f"{where}: its bytes end at 0x{file_end:x} but the file has only 0x{size:x} bytes; "
                       f"{SPLIT_FIRMWARE_HINT}")
    # QEMU hands KVM MemoryDataSize bytes starting at DataOffset, and TDH.MR.EXTEND measures all of them.
    measured_end = s.data_offset + s.memory_data_size
    if s.mr_extend and measured_end > size:
        raise TdxError(f"{where}: its measured bytes end at 0x{measured_end:x} but the file has only "
                       f"0x{size:x} bytes; {SPLIT_FIRMWARE_HINT}")


def _check_overlaps(path, sections) -> None:
    def first_overlap(ranges):
        ranges = sorted(r for r in ranges if r[1] > r[0])
        for (a_start, a_end, a), (b_start, b_end, b) in zip(ranges, ranges[1:]):
            if b_start < a_end:
                return a, b
        return None

    clash = first_overlap((s.memory_address, s.memory_address + s.memory_data_size, s) for s in sections)
    if clash:
        a, b = clash
        raise TdxError(f"firmware {path}: TDVF sections {a.index} ({a.type_name}) and {b.index} ({b.type_name}) "
                       "claim overlapping guest memory: the firmware is corrupt; use an intact OVMF.fd")
    # TD_INFO lies inside the BFV by design (td-shim); every other pair of file ranges must be disjoint.
    clash = first_overlap((s.data_offset, s.data_offset + s.raw_data_size, s)
                          for s in sections if s.type != TYPE_TD_INFO)
    if clash:
        a, b = clash
        raise TdxError(f"firmware {path}: TDVF sections {a.index} ({a.type_name}) and {b.index} ({b.type_name}) "
                       "use overlapping bytes of the file: the firmware is corrupt; use an intact OVMF.fd")
