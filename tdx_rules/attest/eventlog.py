"""The CCEL event log of a TD: a TCG2 crypto-agile event log, parsed and replayed into RTMR[0..3].

Inside a TD, ``/sys/firmware/acpi/tables/data/CCEL`` holds the log area that the ACPI
CCEL table (``/sys/firmware/acpi/tables/CCEL``) points at. Its bytes, all little-endian:

* one legacy SHA-1-format record, TCG_PCR_EVENT (pcrIndex u32, eventType u32, a 20-byte
  digest, eventSize u32, event data), whose data is TCG_EfiSpecIdEvent: the signature
  "Spec ID Event03\\0" (16), platformClass u32, specVersionMinor u8, specVersionMajor u8,
  specErrata u8, uintnSize u8, numberOfAlgorithms u32, then {algorithmId u16, digestSize u16}
  per algorithm, vendorInfoSize u8 and vendorInfo;
* then TCG_PCR_EVENT2 records: pcrIndex u32, eventType u32, TPML_DIGEST_VALUES (count u32,
  then {algorithmId u16, a digest of the size the Spec ID event gives}), eventSize u32, event
  data. For a TD the pcrIndex is the CC measurement register index: 1..4 are RTMR[0..3];
  index 0 (MRTD) appears on EV_NO_ACTION records;
* the area is padded (0xFF from OVMF, zeros from td-shim): a record whose fixed header is all
  0xFF or all zero bytes ends the log, as does the end of the data.

The structures, the event types and the event data formats (UEFI_VARIABLE_DATA,
UEFI_IMAGE_LOAD_EVENT, UEFI_PLATFORM_FIRMWARE_BLOB2, TCG_PCClientTaggedEvent) are those of the
TCG PC Client Platform Firmware Profile Specification (version 1.05, section 10 "Event
Logging": 10.2 the TCG_PCR_EVENT and TCG_PCR_EVENT2 structures, 10.4.1 the event types,
10.4.5 the TCG_EfiSpecIdEvent); GUIDs, UCS-2 strings and device paths are the UEFI
specification's. Replay is the TDX module's TDG.MR.RTMR.EXTEND (Intel TDX Module ABI and the
Guest-Hypervisor Communication Interface): every RTMR starts as 48 zero bytes and each record
that is not EV_NO_ACTION extends one, RTMR = SHA-384(RTMR || the record's SHA-384 digest).

The ACPI CCEL table ("Confidential Computing Event Log Table" of ACPI 6.5, first defined in
the Intel TDX Guest-Hypervisor Communication Interface): the 36-byte ACPI header (signature
"CCEL"), CC type u8 (2: TDX), CC subtype u8, reserved u16, LAML u64 (log area minimum length),
LASA u64 (log area start address, guest-physical; nothing here reads it).

:func:`parse_eventlog` and :func:`parse_ccel_table` bound every size field by the bytes that
remain before using it and refuse absurd counts: any input gives a result or a one-line
TdxError naming the input, the record and its byte offset, never another exception.
"""

import hashlib
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..errors import TdxError

EV_NO_ACTION = 0x3
SHA384 = 0x000C
RTMR_COUNT = 4
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
LEGACY_HEADER = 32  # pcrIndex, eventType, SHA-1 digest (20), eventSize
FIXED_HEADER = 12  # pcrIndex, eventType, digest count of a TCG_PCR_EVENT2
MAX_DIGEST = 512  # bytes, for algorithms not in DIGEST_SIZES; SHA-512 is 64, so more is a corrupt header
DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64, 0x0012: 32}  # SHA-1, SHA-256/384/512, SM3-256
HEX_PREFIX = 64
FIX = "pass the whole CCEL data file (/sys/firmware/acpi/tables/data/CCEL), as read from the TD"

EVENT_TYPES = {
    0x00000000: "EV_PREBOOT_CERT", 0x00000001: "EV_POST_CODE", 0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION", 0x00000004: "EV_SEPARATOR", 0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG", 0x00000007: "EV_S_CRTM_CONTENTS", 0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE", 0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES", 0x0000000C: "EV_COMPACT_HASH", 0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA", 0x0000000F: "EV_NONHOST_CODE", 0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO", 0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS", 0x00000013: "EV_POST_CODE2",
    0x80000000: "EV_EFI_EVENT_BASE", 0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT", 0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER", 0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT", 0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2", 0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY", 0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG", 0x800000E3: "EV_EFI_SPDM_DEVICE_POLICY",
    0x800000E4: "EV_EFI_SPDM_DEVICE_AUTHORITY",
}
TEXT_TYPES = {0x1, 0x4, 0x5, 0x7, 0x8, 0xD, 0x80000007}  # POST_CODE, SEPARATOR, ACTION, S_CRTM_*, IPL, EFI_ACTION
VARIABLE_TYPES = {0x80000001, 0x80000002, 0x8000000C, 0x800000E0}
DESCRIBED_TYPES = {0x8000000A, 0x8000000B}  # description size u8 + description, then base/length or tables
IMAGE_TYPES = {0x80000003, 0x80000004, 0x80000005}


def _hex(data: bytes) -> str:
    more = f"... ({len(data)} bytes)" if len(data) > HEX_PREFIX else ""
    return data[:HEX_PREFIX].hex() + more if data else "(empty)"


def _text(data: bytes) -> Optional[str]:
    """``data`` as text if it is printable ASCII or 16-bit-per-character (UCS-2) text, else None."""
    if len(data) >= 2 and len(data) % 2 == 0 and all(b == 0 for b in data[1::2]):
        raw = data[::2]  # widened ASCII: every high byte zero
    else:
        raw = data
    raw = raw.rstrip(b"\0")
    if not raw:
        return None
    if all(32 <= b < 127 or b in (9, 10, 13) for b in raw):
        return raw.decode("ascii")
    if len(data) % 2 == 0:  # UCS-2 beyond ASCII (a UEFI string): decode what is well formed
        try:
            text = data.decode("utf-16-le").rstrip("\0")
        except UnicodeDecodeError:
            return None
        if text and text.isprintable():
            return text
    return None


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record of the log."""

    index: int  # position in the log, counting every record after the Spec ID header from 0
    mr_index: int  # the record's pcrIndex field as is
    rtmr: Optional[int]  # 0..3 for mr_index 1..4, None for records at index 0
    event_type: int
    digests: Dict[int, bytes]  # algorithm id -> digest
    data: bytes

    @property
    def sha384(self) -> Optional[bytes]:
        return self.digests.get(SHA384)

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.event_type, f"0x{self.event_type:08x}")

    def decoded(self) -> str:
        """A short human-readable rendering of the event data; falls back to a hex prefix."""
        try:
            return self._decoded()
        except (struct.error, ValueError, IndexError):
            return _hex(self.data)

    def _decoded(self) -> str:
        data, kind = self.data, self.event_type
        if kind == 0x4 and len(data) == 4 and _text(data) is None:  # a separator's value: 0, or 0xFFFFFFFF on error
            return f"separator 0x{struct.unpack('<I', data)[0]:08x}"
        if kind == 0x6 and len(data) >= 8:  # TCG_PCClientTaggedEvent: tag id, size, bytes
            tag, size = struct.unpack_from("<II", data)
            body = data[8:8 + size]
            return f"tag 0x{tag:08x}: {_text(body) or _hex(body)}"
        if kind in VARIABLE_TYPES and len(data) >= 32:  # UEFI_VARIABLE_DATA: GUID, name length, data length
            name_chars, value_size = struct.unpack_from("<QQ", data, 16)
            name = data[32:32 + 2 * min(name_chars, len(data))]
            return f"{_text(name) or _hex(name)} ({_guid(data)}), {min(value_size, len(data))} bytes"
        if kind in DESCRIBED_TYPES:  # description size u8 + description, then (blob) base u64, length u64
            text = _text(data[1:1 + data[0]]) or _hex(data[1:1 + data[0]])
            rest = data[1 + data[0]:]
            if kind == 0x8000000A and len(rest) >= 16:
                base, length = struct.unpack_from("<QQ", rest)
                return f"{text} at 0x{base:x}, {length} bytes"
            return text
        if kind == 0xA and len(data) >= 20:  # td-shim: a 16-byte descriptor, info length u32, info
            name, size = _text(data[:16]), struct.unpack_from("<I", data, 16)[0]
            if name and data[15] == 0 and size == len(data) - 20:
                return f"{name}: {_text(data[20:]) or _hex(data[20:])}"
        if kind in IMAGE_TYPES and len(data) >= 32:  # UEFI_IMAGE_LOAD_EVENT: address, length, link address, path
            address, length, _, path_size = struct.unpack_from("<QQQQ", data)
            return f"image of {length} bytes at 0x{address:x}: {_device_path(data[32:32 + path_size])}"
        if kind == 0x80000006 and data[:8] == b"EFI PART" and len(data) >= 100:  # UEFI_GPT_DATA
            return f"GPT with {struct.unpack_from('<Q', data, 92)[0]} partitions"
        if kind == EV_NO_ACTION and len(data) >= 16 and _text(data[:16]):  # "StartupLocality\0", "SP800-155 Event3"
            return f"{_text(data[:16])}: {_hex(data[16:])}"
        return _text(data) or _hex(data)


def _device_path(path: bytes) -> str:
    """The file names of a UEFI device path (media file path nodes), else its bytes in hex."""
    names, offset = [], 0
    while offset + 4 <= len(path) and path[offset] != 0x7F:  # 0x7F: end of the device path
        kind, subtype, size = struct.unpack_from("<BBH", path, offset)
        if size < 4:
            break
        if (kind, subtype) == (4, 4):  # MEDIA_FILEPATH_DP: a UCS-2 path
            names.append(_text(path[offset + 4:offset + size]) or "?")
        offset += size
    return " ".join(names) or _hex(path) or "no device path"


@dataclass(frozen=True)
class EventLog:
    """The Spec ID header's algorithm list and every record after it."""

    algorithms: Dict[int, int]  # from the Spec ID event: id -> digest size
    events: List[Event]  # every record after the header, EV_NO_ACTION included

    def replay(self) -> List[bytes]:
        """RTMR[0..3] (48 bytes each) as the TDX module computes them from these events."""
        rtmrs = [bytes(48)] * RTMR_COUNT
        for event in self.events:
            if event.event_type == EV_NO_ACTION or event.rtmr is None:
                continue
            if event.sha384 is None or len(event.sha384) != 48:
                raise TdxError(f"event {event.index}: no SHA-384 digest to extend RTMR[{event.rtmr}] with; "
                               f"build the log with parse_eventlog, which refuses such events")
            rtmrs[event.rtmr] = hashlib.sha384(rtmrs[event.rtmr] + event.sha384).digest()
        return rtmrs


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _spec_id(data: bytes, what: str) -> Dict[int, int]:
    """The algorithms of the TCG_EfiSpecIdEvent in the first (SHA-1 format) record; checks its bounds."""
    if len(data) < LEGACY_HEADER:
        raise TdxError(f"{what}: offset 0x0: {len(data)} bytes, too short for the first record (32-byte "
                       f"header and the Spec ID event); {FIX}")
    size = _u32(data, 28)
    if size > len(data) - LEGACY_HEADER:
        raise TdxError(f"{what}: offset 0x1c: the Spec ID event claims {size} bytes, past the end of the data "
                       f"({len(data) - LEGACY_HEADER} left); {FIX}")
    body = data[LEGACY_HEADER:LEGACY_HEADER + size]
    if body[:16] != SPEC_ID_SIGNATURE or size < 29:
        raise TdxError(f"{what}: offset 0x20: the first record is not a TCG2 \"Spec ID Event03\" header "
                       f"(found {body[:16]!r}): this is not a crypto-agile (TCG2) event log; {FIX}")
    count = _u32(body, 24)
    if count == 0 or count > (size - 29) // 4:
        raise TdxError(f"{what}: offset 0x38: the Spec ID event lists {count} digest algorithms, which its "
                       f"{size} bytes cannot hold; {FIX}")
    algorithms: Dict[int, int] = {}
    for n in range(count):
        offset = 28 + 4 * n
        algorithm, digest_size = struct.unpack_from("<HH", body, offset)
        expected = DIGEST_SIZES.get(algorithm, digest_size)
        if algorithm in algorithms:
            problem = "is listed twice"
        elif digest_size != expected:
            problem = f"has a digest size of {digest_size} bytes, not {expected}"
        elif not 0 < digest_size <= MAX_DIGEST:
            problem = f"has a digest size of {digest_size} bytes"
        else:
            algorithms[algorithm] = digest_size
            continue
        raise TdxError(f"{what}: offset 0x{LEGACY_HEADER + offset:x}: algorithm 0x{algorithm:04x} {problem} in the "
                       f"Spec ID event; the header is corrupt, {FIX}")
    vendor = 28 + 4 * count
    if body[vendor] > size - vendor - 1:
        raise TdxError(f"{what}: offset 0x{LEGACY_HEADER + vendor:x}: the Spec ID event's vendor data "
                       f"({body[vendor]} bytes) runs past its {size} bytes; {FIX}")
    return algorithms


def _is_padding(header: bytes) -> bool:
    return header == b"\xff" * len(header) or header == bytes(len(header))


def parse_eventlog(data: bytes, what: str = "event log") -> EventLog:
    """Parse CCEL data: the Spec ID header, then every TCG_PCR_EVENT2 record up to the padding.

    Refuses (TdxError) a record cut off by the end of the data, a digest of an algorithm the
    header did not list, and a record that cannot be replayed: an extended (not EV_NO_ACTION)
    event with an MR index outside 1..4 or without a SHA-384 digest.
    """
    data = bytes(data)
    algorithms = _spec_id(data, what)
    offset = LEGACY_HEADER + _u32(data, 28)
    events: List[Event] = []
    while offset < len(data):
        n, start, left = len(events), offset, len(data) - offset
        where = f"{what}: record {n} at offset 0x{start:x}"
        if _is_padding(data[offset:offset + FIXED_HEADER]):
            break
        if left < FIXED_HEADER:
            raise TdxError(f"{where}: the record header is cut off by the end of the data ({left} bytes left); {FIX}")
        mr_index, event_type, count = struct.unpack_from("<III", data, offset)
        if count > len(algorithms):
            raise TdxError(f"{where}: {count} digests, but the Spec ID header lists {len(algorithms)} "
                           f"algorithms; the log is corrupt, {FIX}")
        offset += FIXED_HEADER
        digests: Dict[int, bytes] = {}
        for _ in range(count):
            if len(data) - offset < 2:
                raise TdxError(f"{where}: a digest's algorithm id is cut off by the end of the data; {FIX}")
            algorithm = struct.unpack_from("<H", data, offset)[0]
            size = algorithms.get(algorithm)
            if size is None or algorithm in digests:
                raise TdxError(f"{where}: digest of algorithm 0x{algorithm:04x} at offset 0x{offset:x} "
                               f"{'appears twice' if size else 'is not listed in the Spec ID header'}; "
                               f"the log is corrupt, {FIX}")
            if len(data) - offset - 2 < size:
                raise TdxError(f"{where}: digest of algorithm 0x{algorithm:04x} is cut off by the end of the "
                               f"data; {FIX}")
            digests[algorithm] = data[offset + 2:offset + 2 + size]
            offset += 2 + size
        if len(data) - offset < 4:
            raise TdxError(f"{where}: the event size is cut off by the end of the data; {FIX}")
        size = _u32(data, offset)
        if size > len(data) - offset - 4:
            raise TdxError(f"{where}: the event claims {size} bytes of data but only {len(data) - offset - 4} "
                           f"remain; {FIX}")
        body = data[offset + 4:offset + 4 + size]
        offset += 4 + size
        # MR index 0 is MRTD, which the TDX module builds before the TD runs: no event can extend it,
        # so an extended event there is refused (EV_NO_ACTION records there are listed, rtmr None).
        extended = event_type != EV_NO_ACTION
        if extended and not 1 <= mr_index <= RTMR_COUNT:
            raise TdxError(f"{where}: {EVENT_TYPES.get(event_type, f'event type 0x{event_type:08x}')} extends MR "
                           f"index {mr_index}, but a TD's log extends only 1..4 (RTMR[0..3]); the log is corrupt, "
                           f"{FIX}")
        if extended and mr_index and SHA384 not in digests:
            raise TdxError(f"{where}: the event has no SHA-384 digest (algorithms "
                           f"{', '.join(f'0x{a:04x}' for a in digests) or 'none'}), so RTMR[{mr_index - 1}] cannot "
                           f"be replayed; pass a TDX CCEL log, whose digests are SHA-384")
        events.append(Event(n, mr_index, mr_index - 1 if 1 <= mr_index <= RTMR_COUNT else None,
                            event_type, digests, body))
    return EventLog(algorithms, events)


@dataclass(frozen=True)
class CcelTable:
    """The fields of the ACPI CCEL table that describe the log area."""

    cc_type: int  # 1: AMD SEV, 2: Intel TDX
    cc_subtype: int
    laml: int  # log area minimum length, bytes
    lasa: int  # log area start address (guest-physical)
    oem_id: str
    revision: int


CCEL_SIZE = 56  # 36-byte ACPI header, cc type, subtype, reserved u16, LAML u64, LASA u64


def parse_ccel_table(data: bytes, what: str = "CCEL table") -> CcelTable:
    """Parse the ACPI CCEL table (/sys/firmware/acpi/tables/CCEL): which log area the CCEL data is."""
    data = bytes(data)
    if data[:4] != b"CCEL":
        raise TdxError(f"{what}: offset 0x0: the signature is {data[:4]!r}, not b'CCEL'; pass the ACPI table "
                       f"/sys/firmware/acpi/tables/CCEL (the log itself is tables/data/CCEL)")
    if len(data) < CCEL_SIZE:
        raise TdxError(f"{what}: offset 0x{len(data):x}: the table ends after {len(data)} bytes, before the "
                       f"log area fields that end at 0x{CCEL_SIZE:x}; pass the whole table")
    length, revision = struct.unpack_from("<IB", data, 4)
    if not CCEL_SIZE <= length <= len(data):
        raise TdxError(f"{what}: offset 0x4: the header's length {length} is not between {CCEL_SIZE} and the "
                       f"{len(data)} bytes read; pass the whole table")
    if sum(data[:length]) % 256:
        raise TdxError(f"{what}: offset 0x9: the ACPI checksum does not add up to zero over {length} bytes: "
                       f"the table is damaged; read it again from /sys/firmware/acpi/tables/CCEL")
    cc_type, cc_subtype, _, laml, lasa = struct.unpack_from("<BBHQQ", data, 36)
    oem_id = data[10:16].decode("ascii", "replace").rstrip(" \0")
    return CcelTable(cc_type, cc_subtype, laml, lasa, oem_id, revision)
