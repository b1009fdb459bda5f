"""CCEL event log parsing and RTMR replay, against real logs from public projects' test suites.

The logs, the quote and the ACPI table are read from ../shared/testdata/tdx-attestation/ (its
README names each file's project and commit). The expected RTMRs are the values those projects
assert, written out below with the file and lines where they are asserted; the cos113 log is also
checked against the RTMR fields of its TD's quote, read here by plain slicing. Decoded event data
is compared with the bytes read by hand (``utf-16-le`` / ``ascii``), not with the parser's view.
Logs with several digest algorithms, missing digests and bad headers are built here from the TCG
PC Client Platform Firmware Profile layout, independently of the module.
"""

import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tdx_rules.attest.eventlog import EV_NO_ACTION, Event, EventLog, parse_ccel_table, parse_eventlog
from tdx_rules.errors import TdxError
from tests.conftest import ROOT, fuzz_examples

DATA = os.path.join(ROOT, "..", "shared", "testdata", "tdx-attestation")
EVENTLOGS = os.path.join(DATA, "eventlogs")
COS113 = "go-tdx-guest_cos113_ccel_data.dat"
ZERO = "00" * 48
SHA256, SHA384 = 0x000B, 0x000C
EV_SEPARATOR, EV_EVENT_TAG, EV_IPL, EV_EFI_ACTION = 0x4, 0x6, 0xD, 0x80000007
EV_PLATFORM_CONFIG_FLAGS = 0xA

needs_data = pytest.mark.skipif(not os.path.isdir(EVENTLOGS), reason=f"{EVENTLOGS} is absent (the shared test data)")

# RTMR[0..3] as asserted by confidential-containers/trustee deps/eventlog/src/lib.rs lines 413-442
# (commit 78962cd416dcc8a32f9377e0066a28fe21420f69; RTMR3 is zero in all of them).
TRUSTEE_RTMRS = {
    "trustee_CCEL_data": [
        "2dc712306a963eadb894ad47dbaa17df44814151555aee11cbb843becca88950ffd079664902e6f22c66f7c8213543f4",
        "0fa3be56af61208bbd179dc7b124988eb929319154663c539d6f46445ecac2fec287075047ff7bd1922829fec28cd3cf",
        ZERO, ZERO],
    "trustee_CCEL_data_ovmf": [
        "8566f998798db09443b244c62de9a3041fb02e2e6936c4396d784bba2e90177329ec5aba3bb484404f2ab9cc90abe193",
        "775b9f6bfe99f8a31396f0d0218e67ffa796d3b96ccf961cbb0deba48c79c00f082cda1a5567c1c16305f1fc210c13c6",
        "94eaf7a7bf398ed8d888c91057ae0261802e4f3df084213a76ca7f0b5055ac9d2241de43cd58d9e8b49c503bbf25f34a",
        ZERO],
    "trustee_CCEL_data_grub": [
        "cec0a104f691f60da2387fea3c2de00c4ac035e2bb479ff02edcce69039d9e9907f0b3e55031da3dc7038f423adebd79",
        "6c289e0c62182d41ebe97bdbc9872d10998a08eaa86adcdc684001a363207ee72942c7522cdf00a4bbc3d784bed7b670",
        "08919d017ba0e52cd6d966351c7de16fe76c1d3d3d3da4554239e4c7d16cb8b82a94e7eaea3a0e6e18eb690b999fd31e",
        ZERO],
    "trustee_CCEL_data_gcp": [
        "3300980705adf09d28b707b79699d9874892164280832be2c386a715b6e204e0897fb564a064f810659207ba862b304f",
        "204d49f78d29918fe7b2f694e76653861a0c2a018987d2c3a54266eff737232524cf0af68c4d180e2f8c2c0937f21967",
        ZERO, ZERO],
    "trustee_CCEL_data_grub_gke": [
        "bc9945139042cf2cc75caf920aa57f14884ecfd7e893bccc51250c8ce90eb53ce72741e6adaa18183eb1331a87d4544a",
        "c17cb288a4dee302bb9ed8d27257a168f3264ad68cab53757f37eeaa7039657fa887cad65cf910e0fdc435ff110f8a7b",
        "334aeba2c985f8886cea97d1ecffbd512769d528b9a94009583db667ad7d2faa7d37fa145d75b192ceee2d2f10b2eb6d",
        ZERO],
}
# RTMR[0..2] of the cos113 log as google/go-eventlog asserts them in ccel/extract_test.go lines 36-38
# (commit b9c4e7a126f6ee5f3ab9fa0b8eb140169982c282); go-tdx-guest rtmr/ccel_test.go:24-51 checks the
# same log against its quote. RTMR3 is not extended by any event of the log.
COS113_RTMRS = [
    "3fa2f61f395b7f5feefb4ec2df61297f109ad8abcd6410c1b7df60f21f37b19297fc35e544039c7e1edece752afd17f6",
    "f62dbc072bd5d3f3438b7b35c39a727f5aea2ffc2473f43723953f530daf62504f0a7944aa62c41a86e8a878c2b122c1",
    "4969684dc87381fc3b3134176c8d8806eaf0a901859f5f70cfae8d17714b46c10a8de219048c9fc09f11f381a6fbe7c1",
    ZERO]
# TD report body fields of a version 4 quote: the body starts at 48, RTMR0..3 at 328/376/424/472 in it.
QUOTE_RTMR_OFFSETS = [48 + 328, 48 + 376, 48 + 424, 48 + 472]


def read(name: str, folder: str = EVENTLOGS) -> bytes:
    with open(os.path.join(folder, name), "rb") as handle:
        return handle.read()


def spec_id_size(raw: bytes) -> int:
    """The size of the legacy first record: its 32-byte header (eventSize at 28) and the Spec ID event."""
    return 32 + struct.unpack_from("<I", raw, 28)[0]


def record_size(e: Event) -> int:
    return 12 + sum(2 + len(d) for d in e.digests.values()) + 4 + len(e.data)


def used_part(raw: bytes) -> bytes:
    """The log without the padding of the CCEL area."""
    return raw[:spec_id_size(raw) + sum(record_size(e) for e in parse_eventlog(raw).events)]


# --- hand-built logs (TCG PC Client PFP: TCG_PCR_EVENT + TCG_EfiSpecIdEvent, then TCG_PCR_EVENT2) ----------

def header(algorithms, signature=b"Spec ID Event03\0", vendor=b""):
    body = (signature + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
            + b"".join(struct.pack("<HH", alg, size) for alg, size in algorithms) + bytes([len(vendor)]) + vendor)
    return struct.pack("<II", 1, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(body)) + body


def record(mr_index, event_type, digests, data=b"", size=None):
    return (struct.pack("<III", mr_index, event_type, len(digests))
            + b"".join(struct.pack("<H", alg) + digest for alg, digest in digests)
            + struct.pack("<I", len(data) if size is None else size) + data)


def sha384_record(mr_index, event_type, data):
    return record(mr_index, event_type, [(SHA384, hashlib.sha384(data).digest())], data)


def assert_tdx_error(call, *words):
    with pytest.raises(TdxError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# --- replay against the values other projects assert --------------------------------------------------------

@needs_data
@pytest.mark.parametrize("name", sorted(TRUSTEE_RTMRS))
def test_trustee_logs_replay_to_the_rtmrs_trustee_asserts(name):
    log = parse_eventlog(read(name), name)
    assert log.algorithms == {SHA384: 48}
    assert [rtmr.hex() for rtmr in log.replay()] == TRUSTEE_RTMRS[name]


@needs_data
def test_cos113_log_replays_to_the_rtmrs_go_eventlog_asserts():
    log = parse_eventlog(read(COS113), COS113)
    assert [rtmr.hex() for rtmr in log.replay()] == COS113_RTMRS
    # The README counts 44 events: the Spec ID header and 43 records after it.
    assert len(log.events) == 43 and [e.index for e in log.events] == list(range(43))


@needs_data
def test_cos113_log_replays_to_the_rtmrs_of_its_quote():
    quote = read("go-tdx-guest_cos-113-tdx-quote.dat", os.path.join(DATA, "quotes"))
    assert struct.unpack_from("<HHI", quote) == (4, 2, 0x81)  # version 4, ECDSA P-256, TDX
    in_quote = [quote[offset:offset + 48] for offset in QUOTE_RTMR_OFFSETS]
    assert parse_eventlog(read(COS113)).replay() == in_quote


@needs_data
def test_mr_index_0_no_action_events_are_listed_with_no_rtmr_and_not_replayed():
    raw = read("trustee_CCEL_data_grub_gke")
    log = parse_eventlog(raw)
    first = spec_id_size(raw)
    assert struct.unpack_from("<II", raw, first) == (0, EV_NO_ACTION)  # the first record, read by hand
    at_zero = [e for e in log.events if e.mr_index == 0]
    assert [e.index for e in at_zero] == [0, 1]
    assert all(e.event_type == EV_NO_ACTION and e.rtmr is None and e.type_name == "EV_NO_ACTION" for e in at_zero)
    assert at_zero[0].data[:16] == b"SP800-155 Event3" and at_zero[0].decoded().startswith("SP800-155 Event3")
    # Every other event extends the RTMR one below its MR index; replaying them by hand gives the same RTMRs.
    rtmrs = [bytes(48)] * 4
    for e in log.events[2:]:
        assert e.rtmr == e.mr_index - 1 and e.event_type != EV_NO_ACTION
        rtmrs[e.rtmr] = hashlib.sha384(rtmrs[e.rtmr] + e.digests[SHA384]).digest()
    assert log.replay() == rtmrs


@needs_data
def test_the_log_ends_at_the_padding_of_the_area_whether_0xff_or_zeros():
    # OVMF pads its log area with 0xFF, td-shim (trustee_CCEL_data) with zeros.
    for name, fill in [(COS113, 0xFF), ("trustee_CCEL_data", 0)]:
        raw = read(name)
        used = used_part(raw)
        assert set(raw[len(used):]) == {fill}
        assert parse_eventlog(used).events == parse_eventlog(raw).events


def test_a_log_with_two_digest_algorithms_replays_its_sha384_digests():
    data = [b"first", b"second", b"third"]
    raw = header([(SHA256, 32), (SHA384, 48)], vendor=b"test")
    for mr_index, payload in zip([1, 4, 1], data):
        raw += record(mr_index, EV_EFI_ACTION, [(SHA256, hashlib.sha256(payload).digest()),
                                                (SHA384, hashlib.sha384(payload).digest())], payload)
    raw += record(0, EV_NO_ACTION, [(SHA256, bytes(32)), (SHA384, bytes(48))], b"StartupLocality\0\3")
    log = parse_eventlog(raw + b"\xff" * 100)
    assert log.algorithms == {SHA256: 32, SHA384: 48}
    assert [e.rtmr for e in log.events] == [0, 3, 0, None]
    rtmr0 = hashlib.sha384(bytes(48) + hashlib.sha384(b"first").digest()).digest()
    rtmr0 = hashlib.sha384(rtmr0 + hashlib.sha384(b"third").digest()).digest()
    rtmr3 = hashlib.sha384(bytes(48) + hashlib.sha384(b"second").digest()).digest()
    assert log.replay() == [rtmr0, bytes(48), bytes(48), rtmr3]
    assert log.events[0].digests[SHA256] == hashlib.sha256(b"first").digest()
    assert log.events[3].decoded().startswith("StartupLocality")


# --- the ACPI CCEL table ----------------------------------------------------------------------------------

@needs_data
def test_the_cos113_ccel_table_describes_a_log_area_that_holds_the_data_file():
    raw = read("go-tdx-guest_cos113_ccel_table.dat")
    table = parse_ccel_table(raw)
    assert raw[:4] == b"CCEL" and struct.unpack_from("<I", raw, 4)[0] == len(raw) == 56
    # Fields read by hand at their ACPI 6.5 offsets: CC type 36, subtype 37, LAML 40, LASA 48.
    assert (table.cc_type, table.cc_subtype) == (raw[36], raw[37]) == (2, 0)  # 2: Intel TDX
    assert (table.laml, table.lasa) == struct.unpack_from("<QQ", raw, 40)
    assert table.laml == len(read(COS113)) == 262144  # the data file is the whole log area
    assert table.lasa and table.lasa % 4096 == 0  # a page-aligned guest-physical address
    assert (table.oem_id, table.revision) == ("INTEL", raw[8]) == ("INTEL", 1)


@needs_data
@pytest.mark.parametrize("make, words", [
    pytest.param(lambda t: b"", ["signature"], id="empty"),
    pytest.param(lambda t: b"XSDT" + t[4:], ["signature", "XSDT"], id="not-ccel"),
    pytest.param(lambda t: t[:40], ["ends after 40 bytes"], id="cut-before-laml"),
    pytest.param(lambda t: t[:4] + struct.pack("<I", 100) + t[8:], ["length 100"], id="length-past-end"),
    pytest.param(lambda t: t[:48] + b"\1" + t[49:], ["checksum"], id="lasa-changed"),
    pytest.param(lambda t: read(COS113), ["signature"], id="the-data-file-instead"),
])
def test_a_damaged_ccel_table_is_refused(make, words):
    assert_tdx_error(lambda: parse_ccel_table(make(read("go-tdx-guest_cos113_ccel_table.dat")), "tables/CCEL"),
                     "tables/CCEL", *words)


# --- decoding ---------------------------------------------------------------------------------------------

@needs_data
def test_grub_kernel_command_line_decodes_to_the_text_in_the_record():
    log = parse_eventlog(read(COS113))
    cmdline = [e for e in log.events if e.rtmr == 2 and e.event_type == EV_IPL and e.data.startswith(b"kernel_cmdline")]
    assert len(cmdline) == 1
    by_hand = cmdline[0].data.decode("ascii").rstrip("\0")
    assert "console=ttyS0,115200" in by_hand and cmdline[0].decoded() == by_hand


@needs_data
def test_systemd_stub_section_names_in_ucs2_decode_to_text():
    log = parse_eventlog(read("trustee_CCEL_data_grub_gke"))
    sections = [e for e in log.events if e.rtmr == 2 and e.event_type == EV_IPL]
    by_hand = [e.data.decode("utf-16-le") for e in sections]
    assert all(text.endswith("\0") for text in by_hand)  # UCS-2 ending in a 16-bit NUL
    assert [e.decoded() for e in sections] == [text.rstrip("\0") for text in by_hand]
    assert ".cmdline" in [e.decoded() for e in sections]


@needs_data
@pytest.mark.parametrize("name", ["trustee_CCEL_data_ovmf", "trustee_CCEL_data_grub"])
def test_the_efi_stub_command_line_event_decodes_to_its_tag_and_description(name):
    # The Linux EFI stub's tagged events: the event data holds the description; the command line and
    # the initrd are only in the digest (measured into RTMR[2]).
    tagged = [e for e in parse_eventlog(read(name)).events if e.event_type == EV_EVENT_TAG]
    assert [e.rtmr for e in tagged] == [2, 2]
    for e in tagged:
        tag, size = struct.unpack_from("<II", e.data)
        description = e.data[8:8 + size].decode("ascii").rstrip("\0")
        assert e.decoded() == f"tag 0x{tag:08x}: {description}"
    assert "LOADED_IMAGE::LoadOptions" in tagged[0].decoded() and "Linux initrd" in tagged[1].decoded()


@needs_data
def test_td_shim_payload_info_decodes_to_the_kernel_command_line():
    raw = read("trustee_CCEL_data")
    info = [e for e in parse_eventlog(raw).events if e.data.startswith(b"td_payload_info\0")]
    assert len(info) == 1 and info[0].event_type == EV_PLATFORM_CONFIG_FLAGS
    start = raw.find(b"root=")
    by_hand = raw[start:raw.index(b"\0", start)].decode("ascii")
    assert by_hand == "root=/dev/vda1 console=hvc0 rw"
    assert info[0].decoded() == f"td_payload_info: {by_hand}"


@needs_data
def test_separators_and_efi_actions_decode_to_text_and_variables_to_their_names():
    log = parse_eventlog(read(COS113))
    actions = [e for e in log.events if e.event_type == EV_EFI_ACTION]
    assert [e.decoded() for e in actions] == [e.data.decode("ascii") for e in actions]
    assert "Exit Boot Services Invocation" in [e.decoded() for e in actions]
    separators = [e for e in log.events if e.event_type == EV_SEPARATOR]
    assert separators and all(e.data == bytes(4) and e.decoded() == "separator 0x00000000" for e in separators)
    variables = log.events[2:7]
    names = [e.data[32:32 + 2 * struct.unpack_from("<Q", e.data, 16)[0]].decode("utf-16-le") for e in variables]
    assert names == ["SecureBoot", "PK", "KEK", "db", "dbx"]
    assert [e.decoded().split(" ")[0] for e in variables] == names
    assert [e.type_name for e in log.events[:3]] == [
        "EV_EFI_HANDOFF_TABLES2", "EV_EFI_PLATFORM_FIRMWARE_BLOB2", "EV_EFI_VARIABLE_DRIVER_CONFIG"]


def test_type_names_follow_the_tcg_table_and_unknown_types_print_in_hex():
    def name(kind):
        return Event(0, 1, 0, kind, {}, b"").type_name
    assert name(0x80000003) == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert name(0x800000E0) == "EV_EFI_VARIABLE_AUTHORITY"
    assert name(0x80000009 + 2) == "EV_EFI_HANDOFF_TABLES2"
    assert name(0xD) == "EV_IPL" and name(0x6) == "EV_EVENT_TAG" and name(0xA) == "EV_PLATFORM_CONFIG_FLAGS"
    assert name(0x12345678) == "0x12345678"
    long_binary = Event(0, 1, 0, 0x12345678, {}, bytes(range(200))).decoded()
    assert long_binary.startswith(bytes(range(64)).hex()) and "200 bytes" in long_binary


# --- refusals ---------------------------------------------------------------------------------------------

@needs_data
def test_a_log_cut_anywhere_is_refused_or_is_a_shorter_valid_log():
    raw = used_part(read(COS113))
    full = parse_eventlog(raw).events
    last = len(raw) - record_size(full[-1])
    boundaries = [spec_id_size(raw) + sum(record_size(e) for e in full[:n]) for n in range(len(full))]
    cuts = list(range(0, 2048, 7)) + boundaries + list(range(last + 1, len(raw)))
    outcomes = {"refused": 0, "shorter": 0}
    for cut in cuts:
        try:
            events = parse_eventlog(raw[:cut], "cut log").events
        except TdxError as error:
            assert str(error).startswith("cut log: ") and "offset 0x" in str(error) and "\n" not in str(error)
            outcomes["refused"] += 1
        else:
            assert events == full[:len(events)] and cut in boundaries
            outcomes["shorter"] += 1
    assert outcomes["refused"] > 0 and outcomes["shorter"] > 0
    # Inside the last record the message says what was cut off and where the record starts.
    assert_tdx_error(lambda: parse_eventlog(raw[:last + 40]), f"record 42 at offset 0x{last:x}", "digest of algorithm "
                     "0x000c is cut off by the end of the data", "pass the whole CCEL data file")
    assert_tdx_error(lambda: parse_eventlog(raw[:-1]), f"offset 0x{last:x}", "claims 40 bytes of data but only 39")
    assert_tdx_error(lambda: parse_eventlog(raw[:20]), "too short for the first record")


@needs_data
def test_a_first_record_that_is_not_spec_id_event03_is_refused():
    raw = bytearray(read(COS113))
    raw[32:48] = b"Spec ID Event02\0"  # a TPM 1.2 (SHA-1 only) log has no Event03 header
    assert_tdx_error(lambda: parse_eventlog(bytes(raw), "CCEL"), "CCEL: offset 0x20", "Spec ID Event03", "Event02")
    assert_tdx_error(lambda: parse_eventlog(bytes(300)), "not a TCG2")
    assert_tdx_error(lambda: parse_eventlog(header([])), "lists 0 digest algorithms")
    assert_tdx_error(lambda: parse_eventlog(header([(SHA384, 48), (SHA384, 48)])), "0x000c is listed twice")
    assert_tdx_error(lambda: parse_eventlog(header([(SHA384, 0)])), "digest size of 0 bytes, not 48")
    assert_tdx_error(lambda: parse_eventlog(header([(SHA384, 47)])), "digest size of 47 bytes, not 48")
    assert_tdx_error(lambda: parse_eventlog(header([(0x1234, 0)])), "0x1234 has a digest size of 0 bytes")
    vendor_too_long = bytearray(header([(SHA384, 48)], vendor=b"abc"))
    vendor_too_long[-4] = 10  # vendorInfoSize: 10 bytes, where 3 follow
    assert_tdx_error(lambda: parse_eventlog(bytes(vendor_too_long)), "vendor data (10 bytes)")


@needs_data
def test_an_event_claiming_2_gib_of_data_is_refused():
    raw = bytearray(read(COS113))
    first = spec_id_size(raw)
    struct.pack_into("<I", raw, first + 12 + 2 + 48, 2 ** 31)  # eventSize of record 0
    assert_tdx_error(lambda: parse_eventlog(bytes(raw)), f"record 0 at offset 0x{first:x}",
                     "claims 2147483648 bytes of data")


def test_an_extended_event_at_mr_index_9_is_refused():
    raw = header([(SHA384, 48)]) + sha384_record(1, EV_EFI_ACTION, b"ok") + sha384_record(9, EV_EFI_ACTION, b"no")
    assert_tdx_error(lambda: parse_eventlog(raw), "record 1 at offset", "EV_EFI_ACTION extends MR index 9")
    # An EV_NO_ACTION event is not extended, so its index does not matter.
    log = parse_eventlog(header([(SHA384, 48)]) + sha384_record(9, EV_NO_ACTION, b"x"))
    assert log.events[0].rtmr is None and log.replay() == [bytes(48)] * 4


def test_an_extended_event_without_a_sha384_digest_is_refused():
    raw = header([(SHA256, 32), (SHA384, 48)]) + record(2, EV_EFI_ACTION, [(SHA256, bytes(32))], b"x")
    assert_tdx_error(lambda: parse_eventlog(raw), "record 0", "no SHA-384 digest", "0x000b", "RTMR[1]")
    assert_tdx_error(lambda: parse_eventlog(header([(SHA256, 32)]) + record(1, 5, [(SHA256, bytes(32))])),
                     "no SHA-384 digest")


def test_digest_lists_that_do_not_match_the_header_are_refused():
    head = header([(SHA384, 48)])
    digest = (SHA384, bytes(48))
    assert_tdx_error(lambda: parse_eventlog(head + record(1, 5, [digest, digest])), "2 digests",
                     "lists 1 algorithms")
    assert_tdx_error(lambda: parse_eventlog(head + record(1, 5, [(0x0004, bytes(20))])),
                     "algorithm 0x0004", "not listed in the Spec ID header")
    assert_tdx_error(lambda: parse_eventlog(head + struct.pack("<III", 1, 5, 0xFFFFFFFF)), "4294967295 digests")


# --- fuzzing ----------------------------------------------------------------------------------------------

def parse_all_the_way(data: bytes) -> None:
    """parse_eventlog, then everything a caller does with a result: none of it may raise but TdxError."""
    try:
        log = parse_eventlog(data, "fuzzed")
    except TdxError as error:
        assert str(error).startswith("fuzzed: ") and "\n" not in str(error)
        event("refused")
        return
    event("parsed")
    assert all(len(rtmr) == 48 for rtmr in log.replay())
    for e in log.events:
        assert isinstance(e.decoded(), str) and isinstance(e.type_name, str)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_parsed_or_refused_with_tdx_error(data):
    parse_all_the_way(data)
    try:
        parse_ccel_table(data)
    except TdxError:
        pass


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.binary(max_size=400), st.sampled_from([[(SHA384, 48)], [(SHA256, 32), (SHA384, 48)], [(0x1234, 1)]]))
def test_random_records_after_a_valid_header_are_parsed_or_refused_with_tdx_error(body, algorithms):
    parse_all_the_way(header(algorithms) + body)


_REAL = {}


def real_log(name: str) -> bytes:
    """The used part of a real log and 64 bytes of its padding (cached: hypothesis calls this often)."""
    if name not in _REAL:
        raw = read(name)
        _REAL[name] = raw[:len(used_part(raw)) + 64]
    return _REAL[name]


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    st.tuples(st.just("word"), st.integers(0, 1 << 20), st.sampled_from([0, 1, 5, 48, 0x7FFFFFFF, 0xFFFFFFFF])),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
)


@needs_data
@settings(max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["trustee_CCEL_data_ovmf", "trustee_CCEL_data_grub_gke", "trustee_CCEL_data"]),
       st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_real_logs_are_parsed_or_refused_with_tdx_error(name, mutations):
    data = bytearray(real_log(name))
    for kind, position, value in mutations:
        at = position % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= value
        elif kind == "insert":
            data[at:at] = value
        elif kind == "delete":
            del data[at:at + value]
        elif kind == "word":
            data[at:at + 4] = struct.pack("<I", value)
        elif kind == "truncate":
            del data[at:]
    parse_all_the_way(bytes(data))


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.sampled_from([0x1, 0x3, 0x4, 0x5, 0x6, 0xA, 0xD, 0x80000001, 0x80000002, 0x80000003, 0x80000006,
                        0x80000007, 0x8000000A, 0x8000000B, 0x800000E0]) | st.integers(0, 2 ** 32 - 1),
       st.binary(max_size=300))
def test_decoded_never_raises_whatever_the_data(event_type, data):
    rendering = Event(0, 1, 0, event_type, {SHA384: bytes(48)}, data).decoded()
    assert isinstance(rendering, str) and rendering


def test_replay_of_a_hand_made_event_without_sha384_is_refused():
    log = EventLog({SHA384: 48}, [Event(0, 1, 0, EV_EFI_ACTION, {}, b"x")])
    assert_tdx_error(log.replay, "event 0", "no SHA-384 digest")


def test_an_extended_event_at_mr_index_0_is_refused_since_nothing_extends_mrtd():
    raw = header([(SHA384, 48)]) + sha384_record(0, EV_EFI_ACTION, b"into MRTD?")
    assert_tdx_error(lambda: parse_eventlog(raw), "record 0 at offset", "EV_EFI_ACTION extends MR index 0")
