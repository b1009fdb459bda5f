"""TDVF metadata parsing and MRTD prediction, against Debian's real OVMF.fd and synthetic images.

The section table is checked against facts read independently from the
firmware bytes (the "TDVF" descriptor found by a byte search, the UEFI
firmware-volume headers the sections point at), not against the parser.
No published MRTD exists for Debian's ovmf 2022.11 build, so the MRTD values
are checked for stability, for the record format (a hand-built image with a
hand-computed digest) and against a naive whole-file replay.
"""

import hashlib
import os
import random
import shutil
import struct
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.measure.mrtd import (
    MrtdResult,
    compute_mrtd,
    extend_record,
    page_add_record,
)
from tdx_rules.measure.tdvf import TdvfMetadata, parse_tdvf
from tests.conftest import fuzz_examples

OVMF = "/usr/share/ovmf/OVMF.fd"
needs_ovmf = pytest.mark.skipif(not os.path.isfile(OVMF),
                                reason=f"{OVMF} is absent (install Debian's ovmf package to run these tests)")

# Facts written out here from the specifications, independently of the module under test.
FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
TDX_METADATA_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae").bytes_le
TYPES = {0: "BFV", 1: "CFV", 2: "TD_HOB", 3: "TempMem"}
PAGE = 4096


def read(path=OVMF) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def descriptor_by_search(data: bytes) -> int:
    """The file offset of the one "TDVF" descriptor that follows the TDVF metadata GUID."""
    needle = TDX_METADATA_GUID + b"TDVF"
    first = data.find(needle)
    assert first >= 0 and data.find(needle, first + 1) == -1
    return first + 16


def sections_by_hand(data: bytes, offset: int):
    signature, length, version, count = struct.unpack_from("<4sIII", data, offset)
    assert (signature, version, length) == (b"TDVF", 1, 16 + 32 * count)
    return [struct.unpack_from("<IIQQII", data, offset + 16 + 32 * i) for i in range(count)]


def firmware_volume(data: bytes, offset: int):
    """(FvLength, HeaderLength) of the EFI_FIRMWARE_VOLUME_HEADER at ``offset``, its checksum verified."""
    assert data[offset + 40:offset + 44] == b"_FVH", hex(offset)
    (fv_length,) = struct.unpack_from("<Q", data, offset + 32)
    (header_length,) = struct.unpack_from("<H", data, offset + 48)
    words = struct.unpack_from(f"<{header_length // 2}H", data, offset)
    assert sum(words) & 0xFFFF == 0, "firmware volume header checksum"
    return fv_length, header_length


def section_tuple(s):
    return (s.data_offset, s.raw_data_size, s.memory_address, s.memory_data_size, s.type, s.attributes)


@pytest.fixture(scope="module")
def ovmf_bytes():
    if not os.path.isfile(OVMF):
        pytest.skip(f"{OVMF} is absent (install Debian's ovmf package to run these tests)")
    return read()


@pytest.fixture(scope="module")
def meta(ovmf_bytes) -> TdvfMetadata:
    return parse_tdvf(OVMF)


# --- the real firmware: the parsed table agrees with the bytes -------------------------------------------


@needs_ovmf
def test_descriptor_is_the_one_found_by_byte_search(ovmf_bytes, meta):
    offset = descriptor_by_search(ovmf_bytes)
    assert meta.locator == "guid-table"
    assert meta.descriptor_offset == offset
    assert meta.file_size == len(ovmf_bytes)
    assert [section_tuple(s) for s in meta.sections] == sections_by_hand(ovmf_bytes, offset)
    assert [s.index for s in meta.sections] == list(range(len(meta.sections)))
    assert all(s.type_name == TYPES[s.type] for s in meta.sections)


@needs_ovmf
def test_bfv_is_a_run_of_firmware_volumes_ending_at_the_reset_vector(ovmf_bytes, meta):
    (bfv,) = meta.by_type("BFV")
    assert bfv.mr_extend and not bfv.page_aug
    # The BFV covers whole firmware volumes (in OVMF: FVMAIN_COMPACT then SECFV), back to back.
    offset, end, volumes = bfv.data_offset, bfv.data_offset + bfv.raw_data_size, 0
    while offset < end:
        length, _ = firmware_volume(ovmf_bytes, offset)
        assert length > 0
        offset += length
        volumes += 1
    assert offset == end and volumes >= 1
    # The boot volume is the end of the image, mapped to end just below 4 GiB (reset vector at 0xfffffff0).
    assert end == len(ovmf_bytes)
    assert bfv.memory_address + bfv.memory_data_size == 1 << 32
    assert bfv.raw_data_size == bfv.memory_data_size


@needs_ovmf
def test_cfv_is_the_variable_store_volume(ovmf_bytes, meta):
    (cfv,) = meta.by_type("CFV")
    assert not cfv.mr_extend
    length, _ = firmware_volume(ovmf_bytes, cfv.data_offset)
    assert length == cfv.raw_data_size


@needs_ovmf
def test_file_ranges_lie_inside_the_file_and_do_not_overlap(ovmf_bytes, meta):
    ranges = sorted(s.file_range for s in meta.sections if s.raw_data_size)
    assert ranges
    assert all(0 <= start < end <= len(ovmf_bytes) for start, end in ranges)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))


@needs_ovmf
def test_memory_only_sections_have_no_file_bytes(meta):
    assert len(meta.by_type("TD_HOB")) == 1
    assert meta.by_type("TempMem")
    for s in meta.by_type("TD_HOB") + meta.by_type("TempMem"):
        assert s.raw_data_size == 0 and not s.mr_extend
    ranges = sorted(s.memory_range for s in meta.sections)
    assert all(start % PAGE == 0 and end % PAGE == 0 and end > start for start, end in ranges)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))


# --- MRTD of the real firmware ---------------------------------------------------------------------------


def naive_mrtd(data: bytes, sections, order: str) -> str:
    """Replay the TDX module's MRTD extensions over the whole file in memory (the test's own reading)."""
    h = hashlib.sha384()

    def add(gpa):
        h.update(b"MEM.PAGE.ADD" + bytes(4) + gpa.to_bytes(8, "little") + bytes(104))

    def extend(gpa, offset):
        for chunk in range(0, PAGE, 256):
            h.update(b"MR.EXTEND" + bytes(7) + (gpa + chunk).to_bytes(8, "little") + bytes(104))
            h.update(data[offset + chunk:offset + chunk + 256])

    for data_offset, _raw, gpa, size, _type, attributes in sections:
        pages = range(size // PAGE)
        adds = not attributes & 2
        if order == "two-pass":
            for page in pages:
                if adds:
                    add(gpa + page * PAGE)
            for page in pages:
                if attributes & 1:
                    extend(gpa + page * PAGE, data_offset + page * PAGE)
        else:
            for page in pages:
                if adds:
                    add(gpa + page * PAGE)
                if attributes & 1:
                    extend(gpa + page * PAGE, data_offset + page * PAGE)
    return h.hexdigest()


@needs_ovmf
def test_the_two_orders_differ_and_each_is_stable(tmp_path):
    two_pass = compute_mrtd(OVMF, "two-pass")
    interleaved = compute_mrtd(OVMF, "interleaved")
    assert isinstance(two_pass, MrtdResult)
    for result, order in ((two_pass, "two-pass"), (interleaved, "interleaved")):
        assert result.order == order
        assert len(result.mrtd) == 96 and result.mrtd == result.mrtd.lower()
        int(result.mrtd, 16)
    assert two_pass.mrtd != interleaved.mrtd
    assert compute_mrtd(OVMF, "two-pass").mrtd == two_pass.mrtd
    assert compute_mrtd(OVMF, "interleaved").mrtd == interleaved.mrtd
    other = tmp_path / "elsewhere" / "deeper"
    other.mkdir(parents=True)
    copy = other / "firmware-copy.fd"
    shutil.copyfile(OVMF, copy)
    assert compute_mrtd(copy, "two-pass").mrtd == two_pass.mrtd
    assert compute_mrtd(str(copy), "interleaved").mrtd == interleaved.mrtd


@needs_ovmf
@pytest.mark.parametrize("order", ["two-pass", "interleaved"])
def test_streamed_mrtd_equals_a_naive_whole_file_replay(ovmf_bytes, order):
    sections = sections_by_hand(ovmf_bytes, descriptor_by_search(ovmf_bytes))
    assert compute_mrtd(OVMF, order).mrtd == naive_mrtd(ovmf_bytes, sections, order)


@needs_ovmf
def test_transcript_breaks_the_measurement_down_per_section(meta):
    result = compute_mrtd(OVMF, "interleaved")
    assert [entry["index"] for entry in result.transcript] == [s.index for s in meta.sections]
    for entry, section in zip(result.transcript, meta.sections):
        assert entry["type"] == section.type_name
        assert entry["gpa"] == section.memory_address
        assert entry["pages"] == section.memory_data_size // PAGE
        assert entry["added"] is True
        assert entry["extended"] is (section.type_name == "BFV")
        assert entry["bytes_measured"] == (section.raw_data_size if section.type_name == "BFV" else 0)
    text = result.describe()
    assert result.mrtd in text and "BFV" in text and "TD_HOB" in text


# --- record format and locators, on hand-built images ----------------------------------------------------


def test_records_follow_the_tdx_module_layout():
    record = page_add_record(0xFFE2_1000)
    assert len(record) == 128
    assert record[:12] == b"MEM.PAGE.ADD" and record[12:16] == bytes(4)
    assert record[16:24] == (0xFFE2_1000).to_bytes(8, "little") and record[24:] == bytes(104)
    record = extend_record(0x80_0100)
    assert len(record) == 128
    assert record[:9] == b"MR.EXTEND" and record[9:16] == bytes(7)
    assert record[16:24] == (0x80_0100).to_bytes(8, "little") and record[24:] == bytes(104)


def guid_table(entries) -> bytes:
    """OVMF's GUIDed table: entries (data + u16 length + GUID), total u16 length, footer GUID."""
    body = b"".join(data + struct.pack("<H", len(data) + 18) + guid for guid, data in entries)
    return body + struct.pack("<H", len(body) + 18) + FOOTER_GUID


def build_image(sections, size=0x4000, locator="guid-table", seed=1):
    """A firmware of ``size`` bytes with random content, the descriptor at size-0x1000 and the locator at the end.

    ``sections``: (data_offset, raw, gpa, memory_size, type, attributes) tuples.
    """
    rng = random.Random(seed)
    image = bytearray(rng.getrandbits(8) for _ in range(size))
    descriptor = struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    descriptor += b"".join(struct.pack("<IIQQII", *s) for s in sections)
    desc_at = size - 0x1000
    image[desc_at - 16:desc_at + len(descriptor)] = TDX_METADATA_GUID + descriptor
    if locator == "guid-table":
        table = guid_table([(uuid.uuid4().bytes_le, b"\x01\x02"),
                            (TDX_OFFSET_GUID, struct.pack("<I", size - desc_at)),
                            (uuid.uuid4().bytes_le, b"")])
        image[size - 0x20 - len(table):size - 0x20] = table
        image[size - 0x20:size - 0x1C] = struct.pack("<I", 0xDEADBEEF)  # no valid legacy pointer
    else:
        image[size - 0x30:size - 0x20] = bytes(16)  # no footer GUID
        image[size - 0x20:size - 0x1C] = struct.pack("<I", desc_at)
    return bytes(image)


SMALL = [
    (0x1000, 0x3000, 0xFFFF_D000, 0x3000, 0, 1),  # BFV, measured, holds the metadata
    (0x0000, 0x1000, 0xFFFF_C000, 0x1000, 1, 0),  # CFV
    (0, 0, 0x80_0000, 0x2000, 3, 0),  # TempMem
    (0, 0, 0x80_2000, 0x1000, 2, 0),  # TD_HOB
]


def test_hand_built_image_gives_the_hand_computed_mrtd(tmp_path):
    path = tmp_path / "tiny.fd"
    data = build_image(SMALL)
    path.write_bytes(data)
    meta = parse_tdvf(path)
    assert meta.locator == "guid-table" and meta.descriptor_offset == 0x3000
    assert [section_tuple(s) for s in meta.sections] == SMALL
    add = page_add_record
    pages = [(0xFFFF_D000 + i * PAGE, data[0x1000 + i * PAGE:0x2000 + i * PAGE]) for i in range(3)]

    def extends(gpa, page):
        return b"".join(extend_record(gpa + c) + page[c:c + 256] for c in range(0, PAGE, 256))

    rest = add(0xFFFF_C000) + add(0x80_0000) + add(0x80_1000) + add(0x80_2000)
    interleaved = b"".join(add(gpa) + extends(gpa, page) for gpa, page in pages) + rest
    two_pass = (b"".join(add(gpa) for gpa, _ in pages) + b"".join(extends(gpa, page) for gpa, page in pages)
                + rest)
    assert compute_mrtd(path, "interleaved").mrtd == hashlib.sha384(interleaved).hexdigest()
    assert compute_mrtd(path, "two-pass").mrtd == hashlib.sha384(two_pass).hexdigest()


def test_legacy_offset_at_end_minus_0x20_is_used_without_a_guid_table(tmp_path):
    path = tmp_path / "legacy.fd"
    path.write_bytes(build_image(SMALL, locator="legacy"))
    meta = parse_tdvf(path)
    assert meta.locator == "legacy" and meta.descriptor_offset == 0x3000
    assert [section_tuple(s) for s in meta.sections] == SMALL


def test_page_aug_sections_leave_no_trace_in_mrtd(tmp_path):
    perm = (0, 0, 0x100_0000, 0x4000, 4, 2)  # td-shim PermMem, accepted at run time
    with_aug, without = tmp_path / "aug.fd", tmp_path / "plain.fd"
    # The descriptor lies inside the measured BFV, so compare images without a BFV: only the records count.
    no_bfv = [s for s in SMALL if s[4] != 0]
    with_aug.write_bytes(build_image(no_bfv + [perm]))
    without.write_bytes(build_image(no_bfv))
    result = compute_mrtd(with_aug, "interleaved")
    assert result.transcript[-1]["type"] == "PermMem" and result.transcript[-1]["added"] is False
    assert result.mrtd == compute_mrtd(without, "interleaved").mrtd


# --- errors ----------------------------------------------------------------------------------------------


def assert_tdx_error(call, *words):
    with pytest.raises(TdxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, message
    return message


@needs_ovmf
def test_code_only_half_of_a_split_firmware_is_refused(tmp_path, ovmf_bytes, meta):
    (bfv,) = meta.by_type("BFV")
    code = tmp_path / "OVMF_CODE.fd"
    code.write_bytes(ovmf_bytes[-bfv.raw_data_size:])  # what a split build ships as the CODE image
    assert_tdx_error(lambda: parse_tdvf(code), "OVMF_CODE", "OVMF.fd", str(code))
    assert_tdx_error(lambda: compute_mrtd(code, "interleaved"), "OVMF_CODE")
    cut = tmp_path / "cut.fd"
    cut.write_bytes(ovmf_bytes[-(len(ovmf_bytes) - 0x1000):])
    assert_tdx_error(lambda: parse_tdvf(cut), "OVMF_CODE")


@needs_ovmf
@pytest.mark.parametrize("make", [
    pytest.param(lambda d: b"", id="empty"),
    pytest.param(lambda d: d[:10], id="ten-bytes"),
    pytest.param(lambda d: d[:len(d) // 2], id="first-half"),
    pytest.param(lambda d: d[:-1], id="last-byte-cut"),
    pytest.param(lambda d: d[-0x40:], id="last-64-bytes"),
    pytest.param(lambda d: d[-0x1000:], id="last-page"),
    pytest.param(lambda d: random.Random(7).randbytes(len(d)), id="random-2MiB"),
    pytest.param(lambda d: bytes(len(d)), id="zeros"),
    pytest.param(lambda d: d[:-0x30] + bytes(0x30), id="tail-zeroed"),
    pytest.param(lambda d: d[:-0x800] + bytes(0x800), id="descriptor-gone"),
])
def test_truncated_or_garbage_files_raise_tdx_error(tmp_path, ovmf_bytes, make):
    path = tmp_path / "bad.fd"
    path.write_bytes(make(ovmf_bytes))
    assert_tdx_error(lambda: parse_tdvf(path), str(path))
    assert_tdx_error(lambda: compute_mrtd(path, "two-pass"), str(path))


def test_missing_file_directory_and_unknown_order(tmp_path):
    assert_tdx_error(lambda: parse_tdvf(tmp_path / "nope.fd"), "nope.fd", "does not exist")
    assert_tdx_error(lambda: parse_tdvf(tmp_path), "directory")
    assert_tdx_error(lambda: compute_mrtd(tmp_path / "nope.fd", "sideways"), "sideways", "two-pass", "interleaved")


def patched(data: bytes, desc: int, changes) -> bytes:
    """Apply (offset relative to the descriptor, struct format, value) changes."""
    image = bytearray(data)
    for rel, fmt, value in changes:
        struct.pack_into(fmt, image, desc + rel, value)
    return bytes(image)


def field(section, name):
    """Offset of a section field relative to the descriptor."""
    return 16 + 32 * section + {"offset": 0, "raw": 4, "gpa": 8, "size": 16, "type": 24, "attr": 28}[name]


@needs_ovmf
@pytest.mark.parametrize("changes, words", [
    ([(0, "<4s", b"TDVX")], ["signature"]),
    ([(8, "<I", 2)], ["version 2"]),
    ([(12, "<I", 0)], ["no sections"]),
    ([(4, "<I", 16 + 32 * 5)], ["length"]),
    ([(12, "<I", 0x7FFFFFFF)], ["sections"]),
    ([(field(2, "size"), "<Q", 0x10800)], ["MemoryDataSize", "4 KiB"]),
    ([(field(2, "gpa"), "<Q", 0x810800)], ["MemoryAddress", "aligned"]),
    ([(field(3, "gpa"), "<Q", 0x810000)], ["overlapping guest memory"]),
    ([(field(2, "gpa"), "<Q", 0xFFFF_FFFF_FFFF_F000)], ["2**52"]),
    ([(field(1, "raw"), "<I", 0x21000)], ["exceeds MemoryDataSize"]),
    ([(field(1, "offset"), "<I", 0x1000)], ["overlapping bytes"]),
    ([(field(0, "offset"), "<I", 0xFFFF_F000)], ["OVMF_CODE"]),
    ([(field(4, "type"), "<I", 42)], ["unknown type 42"]),
    ([(field(1, "attr"), "<I", 0x10)], ["attribute"]),
    ([(field(0, "attr"), "<I", 3)], ["MR_EXTEND and PAGE_AUG"]),
    ([(field(4, "raw"), "<I", 0x1000)], ["TD_HOB", "must not carry file bytes"]),
    ([(field(1, "raw"), "<I", 0)], ["CFV", "RawDataSize is 0"]),
    # 2**28 pages to add (a hang in the MRTD loop before this was refused); real firmware adds 2 MiB.
    ([(field(5, "gpa"), "<Q", 1 << 32), (field(5, "size"), "<Q", 1 << 40)], ["page by page", "0x10000214000"]),
])
def test_corrupt_section_tables_are_refused(tmp_path, ovmf_bytes, meta, changes, words):
    path = tmp_path / "corrupt.fd"
    path.write_bytes(patched(ovmf_bytes, meta.descriptor_offset, changes))
    assert_tdx_error(lambda: parse_tdvf(path), str(path), *words)


@needs_ovmf
@pytest.mark.parametrize("at, value, words", [
    pytest.param(-0x32, 3, ["GUIDed table"], id="table-shorter-than-its-trailer"),
    pytest.param(-0x32, 17, ["GUIDed table"], id="table-length-17"),
    pytest.param(-0x44, 0, ["entry"], id="entry-length-0"),
    pytest.param(-0x44, 0x1000, ["entry"], id="entry-longer-than-table"),
])
def test_corrupt_guid_tables_are_refused(tmp_path, ovmf_bytes, at, value, words):
    # Layout from the end: 0x20 reset-vector bytes, footer GUID at -0x30, table length at -0x32,
    # then the last entry's GUID at -0x42 and its length at -0x44.
    assert ovmf_bytes[-0x30:-0x20] == FOOTER_GUID
    image = bytearray(ovmf_bytes)
    struct.pack_into("<H", image, len(image) + at, value)
    path = tmp_path / "table.fd"
    path.write_bytes(bytes(image))
    assert_tdx_error(lambda: parse_tdvf(path), str(path), *words)


# --- fuzz ------------------------------------------------------------------------------------------------

TAIL = 0x1000
# In Debian's OVMF.fd the descriptor (16 + 6 * 32 bytes) starts 0x840 bytes before the end; the GUIDed
# table's length, its last entry's length and the legacy pointer sit at -0x32, -0x44 and -0x20.
FUZZ_WORDS = [TAIL - 0x840 + 4 * i for i in range(52)] + [TAIL - 0x34, TAIL - 0x44, TAIL - 0x20, TAIL - 0x78]
FUZZ_VALUES = [0, 1, 0x12, 0x840, 0x1000, 0xFFFF, 0x1FF000, 0x200000, 0x7FFFFFFF, 0xFFFFFFFF]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@needs_ovmf
@settings(max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, TAIL - 1), st.integers(0, 255)), max_size=12),
    words=st.lists(st.tuples(st.sampled_from(FUZZ_WORDS), st.sampled_from(FUZZ_VALUES)), max_size=3),
    cut_end=st.integers(0, 0x40) | st.just(0),
    # Mostly the real size (so that deeper checks are reached), sometimes CODE-sized, tiny or odd sizes.
    prefix=st.one_of(st.just(0x1FF000), st.just(0x1FF000), st.just(0x1FF000),
                     st.sampled_from([0x1DF000, 0x1000, 0]), st.integers(0, 0x300000)),
)
def test_fuzzed_tails_only_ever_raise_tdx_error(fuzz_dir, edits, words, cut_end, prefix):
    """The real image's last page, mutated, after a sparse prefix: parse_tdvf returns or raises TdxError."""
    tail = bytearray(_real_tail())
    for pos, value in edits:
        tail[pos] = value
    for pos, value in words:
        struct.pack_into("<I", tail, pos, value)
    if cut_end:
        del tail[-cut_end:]
    path = fuzz_dir / "fuzzed.fd"
    with open(path, "wb") as handle:
        handle.truncate(prefix)  # sparse zeros: parse_tdvf must not need them
        handle.seek(prefix)
        handle.write(tail)
    try:
        meta = parse_tdvf(path)
    except TdxError as error:
        assert "\n" not in str(error)
        event("refused")
        return
    event("parsed")
    size = prefix + len(tail)
    for s in meta.sections:
        # (QEMU ignores DataOffset when RawDataSize is 0, and so does the parser.)
        assert not s.raw_data_size or s.data_offset + s.raw_data_size <= size
        assert s.memory_address % PAGE == 0 and s.memory_data_size % PAGE == 0
    try:  # whatever parses must also measure (or fail cleanly); the prefix is sparse, so this is cheap
        result = compute_mrtd(path, "interleaved")
    except TdxError as error:
        assert "\n" not in str(error)
    else:
        assert len(result.mrtd) == 96


_TAIL_CACHE = []


def _real_tail() -> bytes:
    if not _TAIL_CACHE:
        with open(OVMF, "rb") as handle:
            handle.seek(-TAIL, os.SEEK_END)
            _TAIL_CACHE.append(handle.read())
    return _TAIL_CACHE[0]
