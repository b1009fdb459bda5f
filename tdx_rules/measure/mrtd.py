"""Predict MRTD, the TDX build-time measurement of the firmware, from an OVMF image.

While QEMU builds a TD, the TDX module extends MRTD (SHA-384) with:

* TDH.MEM.PAGE.ADD, once per 4 KiB page added: a 128-byte record, bytes 0-11
  ``MEM.PAGE.ADD``, bytes 16-23 the page's guest-physical address (little
  endian), every other byte zero;
* TDH.MR.EXTEND, once per 256-byte chunk of a page whose section carries the
  MR_EXTEND attribute: a 128-byte record, bytes 0-8 ``MR.EXTEND``, bytes 16-23
  the chunk's GPA, the rest zero, followed by the 256 bytes of the chunk.

QEMU passes every TDVF section, in metadata order, to KVM_TDX_INIT_MEM_REGION:
all its pages are added (TD_HOB and TempMem included, as zero pages), and
those of MR_EXTEND sections are measured.  The measured bytes are the firmware
file's bytes from DataOffset on, MemoryDataSize of them.  Sections with the
PAGE_AUG attribute (td-shim PermMem) are not added at build time and leave no
record.  What differs between hypervisor stacks is the order *within* a section:

``two-pass``  QEMU 8.x TDX trees (the tdx-qemu-upstream-v5 series that Canonical's
              8.2.2 for Ubuntu 24.04 carries): per section, KVM_MEMORY_MAPPING
              adds every page, then KVM_TDX_EXTEND_MEMORY extends every page of
              that same section; then the next section.  It is *not* "all
              sections added, then all extended".
``interleaved``  QEMU 9 and later, including upstream QEMU's TDX support with
              upstream KVM (KVM_TDX_INIT_MEM_REGION with the measure flag):
              each page is added and then extended before the next page.

The same firmware therefore has two MRTDs; ask for the one of the host's QEMU.
The firmware is streamed; only one read chunk is in memory at a time.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

from tdx_rules.errors import TdxError
from tdx_rules.measure.tdvf import PAGE_SIZE, open_firmware, parse_open

ORDERS = ("two-pass", "interleaved")
ORDER_HELP = "'two-pass' (QEMU 8.x TDX builds) or 'interleaved' (QEMU 9 and later)"

RECORD_SIZE = 128
EXTEND_CHUNK = 256
READ_PAGES = 256  # 1 MiB per read

_GPA = struct.Struct("<Q")
_PAGE_ADD_HEAD = b"MEM.PAGE.ADD".ljust(16, b"\0")
_EXTEND_HEAD = b"MR.EXTEND".ljust(16, b"\0")
_RECORD_TAIL = bytes(RECORD_SIZE - 16 - _GPA.size)


def page_add_record(gpa: int) -> bytes:
    """The 128 bytes TDH.MEM.PAGE.ADD extends MRTD with for the page at ``gpa``."""
    return _PAGE_ADD_HEAD + _GPA.pack(gpa) + _RECORD_TAIL


def extend_record(gpa: int) -> bytes:
    """The 128-byte header TDH.MR.EXTEND extends MRTD with before the 256-byte chunk at ``gpa``."""
    return _EXTEND_HEAD + _GPA.pack(gpa) + _RECORD_TAIL


@dataclass(frozen=True)
class MrtdResult:
    """The predicted MRTD and, per TDVF section, what went into it."""

    mrtd: str  # 96 lowercase hex digits
    order: str  # "two-pass" or "interleaved"
    path: str
    transcript: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        """A human-readable breakdown, one line per section, then the MRTD."""
        lines = [f"MRTD ({self.order}) of {self.path}:"]
        for entry in self.transcript:
            what = []
            if entry["added"]:
                what.append(f"{entry['pages']} MEM.PAGE.ADD")
            else:
                what.append("not added (PAGE_AUG)")
            if entry["extended"]:
                what.append(f"MR.EXTEND of {entry['bytes_measured']} bytes from file offset 0x{entry['data_offset']:x}")
            lines.append(f"  [{entry['index']}] {entry['type']:<12} GPA 0x{entry['gpa']:x} "
                         f"pages {entry['pages']}: {', '.join(what)}")
        lines.append(f"  mrtd {self.mrtd}")
        return "\n".join(lines)


def compute_mrtd(path, order: str) -> MrtdResult:
    """Predict the MRTD QEMU/KVM/TDX produce for the OVMF image at ``path``.

    ``order`` is ``"two-pass"`` or ``"interleaved"`` (see the module docstring).
    Raises :class:`TdxError` on any bad input.
    """
    if order not in ORDERS:
        raise TdxError(f"MRTD page order {order!r} is unknown: use {ORDER_HELP}")
    path = os.fspath(path)
    digest = hashlib.sha384()
    transcript = []
    with open_firmware(path) as handle:
        metadata = parse_open(handle, path)
        for section in metadata.sections:
            added = not section.page_aug
            extended = section.mr_extend
            gpa = section.memory_address
            pages = section.pages
            if order == "two-pass":
                if added:
                    for page in range(pages):
                        digest.update(page_add_record(gpa + page * PAGE_SIZE))
                if extended:
                    for page, data in _section_pages(handle, path, section):
                        _extend_page(digest, gpa + page * PAGE_SIZE, data)
            elif extended:
                for page, data in _section_pages(handle, path, section):
                    if added:
                        digest.update(page_add_record(gpa + page * PAGE_SIZE))
                    _extend_page(digest, gpa + page * PAGE_SIZE, data)
            elif added:
                for page in range(pages):
                    digest.update(page_add_record(gpa + page * PAGE_SIZE))
            transcript.append({
                "index": section.index,
                "type": section.type_name,
                "gpa": gpa,
                "pages": pages,
                "added": added,
                "extended": extended,
                "data_offset": section.data_offset,
                "bytes_measured": pages * PAGE_SIZE if extended else 0,
            })
        _check_unchanged(handle, path, metadata.file_size)
    return MrtdResult(mrtd=digest.hexdigest(), order=order, path=path, transcript=transcript)


def _extend_page(digest, gpa: int, data: bytes) -> None:
    for chunk in range(0, PAGE_SIZE, EXTEND_CHUNK):
        digest.update(extend_record(gpa + chunk))
        digest.update(data[chunk:chunk + EXTEND_CHUNK])


def _section_pages(handle, path, section):
    """Yield (page number, 4096 bytes) of a measured section, reading the file in 1 MiB pieces."""
    page = 0
    total = section.pages
    while page < total:
        count = min(READ_PAGES, total - page)
        offset = section.data_offset + page * PAGE_SIZE
        try:
            handle.seek(offset)
            block = handle.read(count * PAGE_SIZE)
        except OSError as error:
            raise TdxError(f"firmware {path}: reading at 0x{offset:x} failed ({error.strerror}): "
                           "check the file and the disk") from None
        if len(block) != count * PAGE_SIZE:
            raise TdxError(f"firmware {path} ended at 0x{offset + len(block):x} while measuring TDVF section "
                           f"{section.index} ({section.type_name}): the file shrank while it was read; "
                           "do not modify the firmware during the build")
        for start in range(0, len(block), PAGE_SIZE):
            yield page, block[start:start + PAGE_SIZE]
            page += 1


def _check_unchanged(handle, path, size) -> None:
    try:
        now = os.fstat(handle.fileno()).st_size
    except OSError as error:
        raise TdxError(f"firmware {path}: {error.strerror}: make it readable") from None
    if now != size:
        raise TdxError(f"firmware {path} changed size ({size} -> {now} bytes) while it was measured: "
                       "do not modify the firmware during the build")
