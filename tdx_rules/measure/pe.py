"""PE/COFF Authenticode digest, computed the way edk2 measures an EFI image.

The firmware (edk2 OvmfPkg/Tcg/TdTcg2Dxe/MeasureBootPeCoff.c, MeasurePeImageAndExtend;
the same steps as SecurityPkg's Tcg2Dxe) hashes, following PE/COFF spec appendix A:

1. the headers from offset 0 up to the optional header's CheckSum field;
2. skip CheckSum (4 bytes);
3. if NumberOfRvaAndSizes > 4 (there is a certificate-table directory entry): up to
   that entry, skip it (8 bytes), then on to SizeOfHeaders; otherwise straight on to
   SizeOfHeaders;
4. every section with SizeOfRawData > 0, sorted by PointerToRawData (a stable sort),
   SizeOfRawData bytes from PointerToRawData;
5. with SUM = SizeOfHeaders + the sizes of step 4: if the file is longer than SUM, the
   bytes from SUM up to (file size - certificate table size); the file is rejected when
   it is shorter than SUM + certificate table size.  No padding to 8 bytes is added.

The file is streamed, never read whole.  ``patch`` ({file offset: bytes}) replaces bytes
as they are read, for both parsing and hashing: QEMU's in-memory setup-header patch
(see kernel_patch.py) changes what the firmware measures without changing the file.
"""

import hashlib
import os
import struct

from tdx_rules.errors import TdxError
from tdx_rules.fsutil import CHUNK

IMAGE_DOS_SIGNATURE = b"MZ"
IMAGE_NT_SIGNATURE = b"PE\0\0"
PE32_MAGIC = 0x10B
PE32_PLUS_MAGIC = 0x20B
DIRECTORY_ENTRY_SECURITY = 4
MAX_DIRECTORY_ENTRIES = 16
SECTION_HEADER_SIZE = 40
COFF_HEADER_SIZE = 20

# Offsets inside the optional header (PE/COFF spec 3.4).
_OPT_SIZE_OF_HEADERS = 60
_OPT_CHECKSUM = 64
_OPT_NUMBER_OF_RVA = {PE32_MAGIC: 92, PE32_PLUS_MAGIC: 108}
_OPT_DATA_DIRECTORIES = {PE32_MAGIC: 96, PE32_PLUS_MAGIC: 112}


class _PatchedFile:
    """Random-access reads of a file with some byte ranges replaced."""

    def __init__(self, handle, path, patch):
        self.handle = handle
        self.path = path
        self.size = os.fstat(handle.fileno()).st_size
        self.patches = []
        for offset, data in sorted((patch or {}).items()):
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise TdxError(f"PE image {path}: patch offset {offset!r} is not a file offset")
            data = bytes(data)
            if offset + len(data) > self.size:
                raise TdxError(f"PE image {path}: patch at {offset:#x} ({len(data)} bytes) runs past the end "
                               f"of the {self.size}-byte file; is this the right kernel?")
            if self.patches and self.patches[-1][0] + len(self.patches[-1][1]) > offset:
                raise TdxError(f"PE image {path}: patch ranges overlap at {offset:#x}")
            self.patches.append((offset, data))

    def read(self, offset, length, what):
        """Exactly ``length`` bytes at ``offset`` (patched), or TdxError naming ``what``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TdxError(f"PE image {self.path} is truncated or corrupt: {what} at {offset:#x}+{length:#x} "
                           f"lies outside the {self.size}-byte file")
        self.handle.seek(offset)
        data = self.handle.read(length)
        if len(data) != length:
            raise TdxError(f"PE image {self.path}: short read at {offset:#x}; the file changed while being read")
        return self._apply(offset, data)

    def _apply(self, offset, data):
        end = offset + len(data)
        touched = [(o, p) for o, p in self.patches if o < end and o + len(p) > offset]
        if not touched:
            return data
        buf = bytearray(data)
        for o, p in touched:
            lo, hi = max(o, offset), min(o + len(p), end)
            buf[lo - offset:hi - offset] = p[lo - o:hi - o]
        return bytes(buf)

    def hash_range(self, digest, start, end, what):
        """Feed [start, end) to ``digest`` in chunks."""
        if start > end or end > self.size:
            raise TdxError(f"PE image {self.path} is truncated or corrupt: {what} ({start:#x}..{end:#x}) "
                           f"lies outside the {self.size}-byte file")
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            digest.update(self.read(pos, n, what))
            pos += n


def _u16(data, offset):
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data, offset):
    return struct.unpack_from("<I", data, offset)[0]


def _layout(image):
    """Parse the headers; return the (start, end) ranges edk2 hashes, in order."""
    path = image.path
    if image.size < 2:
        raise TdxError(f"PE image {path} is empty or truncated; give an EFI/PE kernel (bzImage)")
    pe_offset = 0
    if image.read(0, 2, "DOS header") == IMAGE_DOS_SIGNATURE:
        pe_offset = _u32(image.read(0x3C, 4, "DOS e_lfanew"), 0)
    if image.read(pe_offset, 4, "PE signature") != IMAGE_NT_SIGNATURE:
        raise TdxError(f"PE image {path} has no PE signature at {pe_offset:#x}; it is not an EFI image "
                       "(a kernel needs CONFIG_EFI_STUB)")
    coff_offset = pe_offset + 4
    coff = image.read(coff_offset, COFF_HEADER_SIZE, "COFF header")
    number_of_sections = _u16(coff, 2)
    size_of_optional_header = _u16(coff, 16)
    opt = coff_offset + COFF_HEADER_SIZE
    magic = _u16(image.read(opt, 2, "optional header magic"), 0)
    if magic not in _OPT_NUMBER_OF_RVA:
        raise TdxError(f"PE image {path} has optional header magic {magic:#x}, neither PE32 (0x10b) nor "
                       "PE32+ (0x20b); the file is corrupt")
    directories = _OPT_DATA_DIRECTORIES[magic]
    if size_of_optional_header < directories:
        raise TdxError(f"PE image {path}: SizeOfOptionalHeader {size_of_optional_header} is too small for a "
                       f"{'PE32+' if magic == PE32_PLUS_MAGIC else 'PE32'} header; the file is corrupt")
    fixed = image.read(opt, directories, "optional header")
    size_of_headers = _u32(fixed, _OPT_SIZE_OF_HEADERS)
    number_of_rva = _u32(fixed, _OPT_NUMBER_OF_RVA[magic])
    if number_of_rva > MAX_DIRECTORY_ENTRIES or directories + 8 * number_of_rva > size_of_optional_header:
        raise TdxError(f"PE image {path}: {number_of_rva} data directories do not fit its optional header; "
                       "the file is corrupt")
    checksum = opt + _OPT_CHECKSUM
    section_table = opt + size_of_optional_header
    section_table_end = section_table + SECTION_HEADER_SIZE * number_of_sections
    if size_of_headers > image.size or section_table_end > image.size:
        raise TdxError(f"PE image {path} is truncated: its headers ({max(size_of_headers, section_table_end)} "
                       f"bytes) are longer than the {image.size}-byte file")

    ranges = [(0, checksum)]
    cert_size = 0
    if number_of_rva > DIRECTORY_ENTRY_SECURITY:
        cert_entry = opt + directories + 8 * DIRECTORY_ENTRY_SECURITY
        if cert_entry + 8 > size_of_headers:
            raise TdxError(f"PE image {path}: SizeOfHeaders {size_of_headers:#x} ends inside the optional "
                           "header; the file is corrupt")
        ranges += [(checksum + 4, cert_entry), (cert_entry + 8, size_of_headers)]
        cert_size = _u32(image.read(cert_entry + 4, 4, "certificate table entry"), 0)
    else:
        if checksum + 4 > size_of_headers:
            raise TdxError(f"PE image {path}: SizeOfHeaders {size_of_headers:#x} ends inside the optional "
                           "header; the file is corrupt")
        ranges.append((checksum + 4, size_of_headers))

    table = image.read(section_table, SECTION_HEADER_SIZE * number_of_sections, "section table")
    sections = []
    for index in range(number_of_sections):
        raw_size, raw_pointer = struct.unpack_from("<II", table, index * SECTION_HEADER_SIZE + 16)
        if raw_size == 0:
            continue
        if raw_pointer + raw_size > image.size:
            name = table[index * SECTION_HEADER_SIZE:index * SECTION_HEADER_SIZE + 8].rstrip(b"\0")
            raise TdxError(f"PE image {path} is truncated: section {name.decode('ascii', 'replace')!r} "
                           f"({raw_pointer:#x}+{raw_size:#x}) runs past the end of the {image.size}-byte file")
        sections.append((raw_pointer, raw_size))
    sections.sort(key=lambda section: section[0])  # stable, like edk2's insertion sort
    summed = size_of_headers
    for pointer, size in sections:
        ranges.append((pointer, pointer + size))
        summed += size

    if image.size > summed:
        if image.size > summed + cert_size:
            ranges.append((summed, image.size - cert_size))
        elif image.size < summed + cert_size:
            raise TdxError(f"PE image {path}: its certificate table ({cert_size} bytes) is larger than the data "
                           "after its last section; the file is corrupt")
    return ranges


def hashed_ranges(path, patch=None):
    """The [start, end) file ranges that Authenticode hashes, in hashing order."""
    try:
        with open(path, "rb") as handle:
            return _layout(_PatchedFile(handle, path, patch))
    except OSError as error:
        raise TdxError(f"PE image: cannot read {path}: {error.strerror}") from None


def authenticode(path, algorithm: str = "sha384", patch=None) -> str:
    """Authenticode digest (lowercase hex) of the PE image at ``path``, as edk2 measures it."""
    try:
        digest = hashlib.new(algorithm)
    except (ValueError, TypeError):
        raise TdxError(f"Authenticode: unknown hash algorithm {algorithm!r}; use sha384 or sha256") from None
    try:
        with open(path, "rb") as handle:
            image = _PatchedFile(handle, path, patch)
            for start, end in _layout(image):
                image.hash_range(digest, start, end, "hashed range")
    except OSError as error:
        raise TdxError(f"PE image: cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()
