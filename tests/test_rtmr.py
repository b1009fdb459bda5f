"""RTMR[1]/RTMR[2] prediction: Authenticode, QEMU's setup-header patch, profiles, replay.

Outside references: Debian's own Authenticode signature embedded in its signed 6.12 vmlinuz
(read with the openssl CLI), a slow whole-file reference of the PE/COFF appendix-A
algorithm written here, hand-computed hashlib chains, and the numbers from QEMU's
x86_load_linux / pc_q35_init (memory split, ACPI reserve, 4 KiB alignment).
"""

import dataclasses
import hashlib
import os
import struct
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.measure import kernel_patch, pe, profiles, rtmr
from tests import debian
from tests.conftest import fuzz_examples

GiB = 1 << 30
MiB = 1 << 20
ACPI = 0x28000  # QEMU PC_FW_DATA: 0x20000 + 0x8000


@pytest.fixture(scope="module")
def vmlinuz():
    tree = debian.kernel_tree()
    return os.path.join(tree, "boot", f"vmlinuz-{debian.kernel_release()}")


# --- an independent, whole-file reference of the PE/COFF appendix-A algorithm -------------

def u16(data, at):
    return struct.unpack_from("<H", data, at)[0]


def u32(data, at):
    return struct.unpack_from("<I", data, at)[0]


def pe_fields(data):
    """Offsets and values the reference needs, read straight from the bytes."""
    lfanew = u32(data, 0x3C) if data[:2] == b"MZ" else 0
    nsec = u16(data, lfanew + 6)
    opt_size = u16(data, lfanew + 20)
    opt = lfanew + 24
    magic = u16(data, opt)
    dirs = opt + (96 if magic == 0x10B else 112)
    return {
        "checksum": opt + 64,
        "nrva": u32(data, dirs - 4),
        "cert_entry": dirs + 8 * 4,
        "size_of_headers": u32(data, opt + 60),
        "sections": [struct.unpack_from("<II", data, opt + opt_size + 40 * i + 16) for i in range(nsec)],
    }


def reference_authenticode(data: bytes, algorithm="sha384") -> str:
    """Headers minus CheckSum and the certificate-table entry, then sections by file offset,
    then what follows them minus the certificate table; no padding."""
    f = pe_fields(data)
    skip = set(range(f["checksum"], f["checksum"] + 4))
    cert_size = 0
    if f["nrva"] > 4:
        skip |= set(range(f["cert_entry"], f["cert_entry"] + 8))
        cert_size = u32(data, f["cert_entry"] + 4)
    message = bytearray(b for i, b in enumerate(data[:f["size_of_headers"]]) if i not in skip)
    total = f["size_of_headers"]
    for size, pointer in sorted(((s, p) for s, p in f["sections"] if s), key=lambda sp: sp[1]):
        message += data[pointer:pointer + size]
        total += size
    message += data[total:len(data) - cert_size]
    return hashlib.new(algorithm, bytes(message)).hexdigest()


def build_pe(*, magic=0x20B, nrva=16, sections=(), trailing=b"", cert=b"", checksum=0xDEADBEEF,
             size_of_headers=0x400, mz=True):
    """A small PE image: ``sections`` is a list of (name, file offset, data) in table order."""
    dirs_at = 96 if magic == 0x10B else 112
    opt_size = dirs_at + 8 * nrva
    lfanew = 0x40 if mz else 0
    image = bytearray(size_of_headers)
    if mz:
        image[0:2] = b"MZ"
        struct.pack_into("<I", image, 0x3C, lfanew)
    image[lfanew:lfanew + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", image, lfanew + 4, 0x8664, len(sections), 0x5EED, 0, 0, opt_size, 0x22)
    opt = lfanew + 24
    image[opt:opt + opt_size] = bytes((i * 7 + 3) & 0xFF for i in range(opt_size))  # non-zero filler
    struct.pack_into("<H", image, opt, magic)
    struct.pack_into("<I", image, opt + 60, size_of_headers)
    struct.pack_into("<I", image, opt + 64, checksum)
    struct.pack_into("<I", image, opt + dirs_at - 4, nrva)
    table = opt + opt_size
    end = size_of_headers
    for i, (name, pointer, data) in enumerate(sections):
        struct.pack_into("<8sIIII", image, table + 40 * i, name, len(data), 0x1000 * (i + 1), len(data), pointer)
        end = max(end, pointer + len(data))
    image += bytes(end - len(image))
    for _, pointer, data in sections:
        image[pointer:pointer + len(data)] = data
    image += trailing
    if nrva > 4:
        struct.pack_into("<II", image, opt + dirs_at + 32, len(image) if cert else 0, len(cert))
    return bytes(image + cert)


def read_bytes(path, size=-1):
    with open(path, "rb") as handle:
        return handle.read(size)


def digest_of_bytes(tmp_path, data, name="img", **kwargs):
    path = tmp_path / name
    path.write_bytes(data)
    return pe.authenticode(str(path), **kwargs)


# --- Authenticode against Debian's own signature -----------------------------------------

def certificate_blob(data):
    """The PKCS#7 bytes of the first WIN_CERTIFICATE in the attribute certificate table."""
    f = pe_fields(data)
    offset, size = struct.unpack_from("<II", data, f["cert_entry"])
    assert offset and size and offset + size == len(data), "Debian's kernel should be signed"
    length, revision, kind = struct.unpack_from("<IHH", data, offset)
    assert (revision, kind) == (0x0200, 0x0002)  # WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA
    return data[offset + 8:offset + length]


def spc_indirect_data_digest(der: bytes, tmp_path):
    """(algorithm, hex digest) of the image digest inside SpcIndirectDataContent, via openssl."""
    (tmp_path / "sig.der").write_bytes(der)
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "sig.der")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    start = next(i for i, line in enumerate(out) if ":1.3.6.1.4.1.311.2.1.4" in line)  # SPC_INDIRECT_DATA
    algorithm = None
    for line in out[start:]:
        if "prim: OBJECT" in line and line.rstrip().endswith((":sha256", ":sha384", ":sha1", ":sha512")):
            algorithm = line.rsplit(":", 1)[1].strip()
        if "OCTET STRING" in line and "[HEX DUMP]:" in line:
            return algorithm, line.split("[HEX DUMP]:", 1)[1].strip().lower()
    raise AssertionError("no digest in SpcIndirectDataContent")


def test_sha256_authenticode_of_signed_debian_kernel_equals_its_embedded_signature(vmlinuz, tmp_path):
    data = read_bytes(vmlinuz)
    algorithm, signed_digest = spc_indirect_data_digest(certificate_blob(data), tmp_path)
    assert algorithm == "sha256"
    assert pe.authenticode(vmlinuz, "sha256") == signed_digest
    assert reference_authenticode(data, "sha256") == signed_digest


def test_hashed_ranges_leave_out_exactly_checksum_cert_entry_and_certificate_table(vmlinuz):
    data = read_bytes(vmlinuz)
    f = pe_fields(data)
    cert_offset, cert_size = struct.unpack_from("<II", data, f["cert_entry"])
    covered = set()
    for start, end in pe.hashed_ranges(vmlinuz):
        covered.add((start, end))
    flat = sorted(covered)
    holes, pos = [], 0
    for start, end in flat:
        if start > pos:
            holes.append((pos, start))
        pos = max(pos, end)
    if pos < len(data):
        holes.append((pos, len(data)))
    assert holes == [(f["checksum"], f["checksum"] + 4), (f["cert_entry"], f["cert_entry"] + 8),
                     (cert_offset, cert_offset + cert_size)]


def test_signing_does_not_change_the_digest_and_trailing_bytes_are_not_padded(vmlinuz, tmp_path):
    signed = read_bytes(vmlinuz)
    f = pe_fields(signed)
    cert_offset, _ = struct.unpack_from("<II", signed, f["cert_entry"])
    unsigned = bytearray(signed[:cert_offset])
    unsigned[f["cert_entry"]:f["cert_entry"] + 8] = bytes(8)
    unsigned[f["checksum"]:f["checksum"] + 4] = b"\x12\x34\x56\x78"
    assert digest_of_bytes(tmp_path, bytes(unsigned)) == pe.authenticode(vmlinuz)

    odd = bytes(unsigned) + b"abc"  # not a multiple of 8: 3 bytes of trailing data
    assert len(odd) % 8 == 3
    ours = digest_of_bytes(tmp_path, odd, "odd")
    assert ours == reference_authenticode(odd)
    # A padding implementation would hash these 5 zero bytes too, so both would agree.
    assert ours != digest_of_bytes(tmp_path, odd + bytes(5), "padded")
    assert ours != digest_of_bytes(tmp_path, bytes(unsigned), "even")


def test_small_pe32_plus_sections_hashed_in_file_order_and_certificate_left_out(tmp_path):
    first, second = os.urandom(0x200), os.urandom(0x180)
    image = build_pe(sections=[(b".late", 0x600, second), (b".early", 0x400, first), (b".bss", 0, b"")],
                     trailing=b"TRAILER", cert=b"C" * 16)
    ours = digest_of_bytes(tmp_path, image)
    assert ours == reference_authenticode(image)
    f = pe_fields(image)
    headers = image[:f["checksum"]] + image[f["checksum"] + 4:f["cert_entry"]] + image[f["cert_entry"] + 8:0x400]
    assert ours == hashlib.sha384(headers + first + second + b"TRAILER").hexdigest()
    assert hashlib.sha384(headers + second + first + b"TRAILER").hexdigest() != ours


def test_trailing_data_starts_at_the_sum_of_hashed_sizes_as_in_edk2(tmp_path):
    # A gap between sections shifts the "extra data" window (PE/COFF appendix A step 16:
    # it begins at SUM_OF_BYTES_HASHED, not at the end of the last section).
    first, second = os.urandom(0x200), os.urandom(0x180)
    image = build_pe(sections=[(b".early", 0x400, first), (b".late", 0x800, second)], trailing=b"TRAILER",
                     cert=b"C" * 16)
    f = pe_fields(image)
    headers = image[:f["checksum"]] + image[f["checksum"] + 4:f["cert_entry"]] + image[f["cert_entry"] + 8:0x400]
    summed = 0x400 + 0x200 + 0x180
    expected = hashlib.sha384(headers + first + second + image[summed:len(image) - 16]).hexdigest()
    assert digest_of_bytes(tmp_path, image) == expected == reference_authenticode(image)


@pytest.mark.parametrize("magic", [0x10B, 0x20B])
@pytest.mark.parametrize("nrva", [0, 4, 5, 16])
def test_pe32_and_pe32_plus_with_and_without_a_certificate_directory(tmp_path, magic, nrva):
    image = build_pe(magic=magic, nrva=nrva, sections=[(b".text", 0x400, os.urandom(0x123))],
                     trailing=os.urandom(13), cert=b"sig" * 5 if nrva > 4 else b"")
    assert digest_of_bytes(tmp_path, image) == reference_authenticode(image)
    assert digest_of_bytes(tmp_path, image, algorithm="sha256") == reference_authenticode(image, "sha256")


def test_image_without_mz_header_is_read_from_offset_zero(tmp_path):
    image = build_pe(mz=False, sections=[(b".text", 0x400, b"x" * 64)])
    assert digest_of_bytes(tmp_path, image) == reference_authenticode(image)


def test_checksum_and_cert_entry_do_not_count_but_every_other_byte_does(tmp_path):
    image = bytearray(build_pe(sections=[(b".text", 0x400, os.urandom(0x100))], trailing=b"tail",
                               cert=b"certificate!"))
    base = digest_of_bytes(tmp_path, bytes(image))
    f = pe_fields(bytes(image))
    for offset in (f["checksum"], f["checksum"] + 3):
        changed = bytearray(image)
        changed[offset] ^= 0xFF
        assert digest_of_bytes(tmp_path, bytes(changed), "c") == base
    for offset in (0x10, f["checksum"] - 5, f["checksum"] + 4, f["cert_entry"] + 8, 0x3FF, 0x400, 0x4FF,
                   len(image) - len(b"certificate!") - 1):
        changed = bytearray(image)
        changed[offset] ^= 0xFF
        assert digest_of_bytes(tmp_path, bytes(changed), "c") != base, hex(offset)
    changed = bytearray(image)
    changed[-1] ^= 0xFF  # inside the certificate blob
    assert digest_of_bytes(tmp_path, bytes(changed), "c") == base


def test_patch_is_applied_as_if_written_to_the_file_even_across_read_chunks(tmp_path, monkeypatch):
    image = build_pe(sections=[(b".text", 0x400, os.urandom(0x300))], trailing=os.urandom(50))
    patch = {0x3F0: b"\x01" * 0x20, 0x20: b"zz", len(image) - 3: b"end"}
    edited = bytearray(image)
    for offset, data in patch.items():
        edited[offset:offset + len(data)] = data
    expected = reference_authenticode(bytes(edited))
    monkeypatch.setattr(pe, "CHUNK", 7)
    assert digest_of_bytes(tmp_path, image, patch=patch) == expected
    with pytest.raises(TdxError, match="runs past the end"):
        digest_of_bytes(tmp_path, image, patch={len(image) - 1: b"xy"})


@pytest.mark.parametrize("cut", [0, 1, 0x3C, 0x44, 0x60, 0x200, 0x3FF, 0x500])
def test_truncated_images_raise_tdx_error(tmp_path, cut):
    image = build_pe(sections=[(b".text", 0x400, os.urandom(0x200))])
    with pytest.raises(TdxError) as error:
        digest_of_bytes(tmp_path, image[:cut])
    assert "\n" not in str(error.value) and "img" in str(error.value)


def test_unknown_algorithm_and_missing_file_are_tdx_errors(tmp_path):
    with pytest.raises(TdxError, match="unknown hash algorithm"):
        pe.authenticode(str(tmp_path / "x"), "md17")
    with pytest.raises(TdxError, match="cannot read"):
        pe.authenticode(str(tmp_path / "missing"))


# --- replay -------------------------------------------------------------------------------

def test_replay_matches_hand_computed_chains():
    d1, d2, d3 = (hashlib.sha384(x).digest() for x in (b"one", b"two", b"three"))
    events = [rtmr.Event(1, "a", d1.hex()), rtmr.Event(2, "b", d2.hex()), rtmr.Event(1, "c", d3.hex())]
    r1 = hashlib.sha384(hashlib.sha384(bytes(48) + d1).digest() + d3).hexdigest()
    r2 = hashlib.sha384(bytes(48) + d2).hexdigest()
    assert rtmr.replay(events) == {0: "0" * 96, 1: r1, 2: r2, 3: "0" * 96}
    assert rtmr.replay(list(reversed(events)))[1] != r1  # order matters
    assert rtmr.replay([]) == {i: "0" * 96 for i in range(4)}


@pytest.mark.parametrize("event", [rtmr.Event(4, "x", "00" * 48), rtmr.Event(-1, "x", "00" * 48),
                                   rtmr.Event(1, "x", "00" * 32), rtmr.Event(1, "x", "zz" * 48)])
def test_replay_rejects_bad_events(event):
    with pytest.raises(TdxError):
        rtmr.replay([event])


# --- profiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("qemu, ovmf, order, separator, patched, prefix", [
    ("8.2", "2024.02-3+tdx1.0", "two-pass", False, True, False),
    ("1:8.2.2+ds-0ubuntu1+tdx1.0", "2024.02-3+tdx1.0", "two-pass", False, True, False),
    ("7.2", "2022.11-6+deb12u2", "two-pass", False, True, False),
    ("8.2", "edk2-stable202411", "two-pass", True, True, False),
    ("9.0", "2024.08", "interleaved", False, True, False),
    ("9.2.0", "2024.11", "interleaved", True, True, False),
    ("9.2", "2025.05", "interleaved", True, True, False),       # QEMU 9.2 has no etc/boot/kernel
    ("10.0", "2024.11-1", "interleaved", True, True, False),    # OVMF too old to read it
    ("10.0", "2025.02-8", "interleaved", True, False, False),   # both: unedited kernel measured
    ("10.1.2", "2025.05", "interleaved", True, False, False),
    ("10.1", "2025.08", "interleaved", True, False, True),
    ("10.2", "2024.02-3+tdx1.0", "interleaved", False, False, False),  # QEMU stops editing for TDX
    ("v10.2.0", "2025.11", "interleaved", True, False, True),
])
def test_profile_table(qemu, ovmf, order, separator, patched, prefix):
    profile = profiles.profile_for(qemu, ovmf)
    assert (profile.mrtd_order, profile.separator_in_rtmr1, profile.patch_kernel, profile.initrd_arg_prefix) == \
        (order, separator, patched, prefix)


def test_default_profile_is_the_reference_stack():
    assert profiles.DEFAULT == profiles.profile_for("8.2", "2024.02-3+tdx1.0")
    assert profiles.DEFAULT.patch_kernel and not profiles.DEFAULT.separator_in_rtmr1
    with pytest.raises(dataclasses.FrozenInstanceError):
        profiles.DEFAULT.patch_kernel = False  # frozen


@pytest.mark.parametrize("qemu, ovmf", [("", "2024.02"), ("eight", "2024.02"), ("8", "2024.02"),
                                        ("8.2", "latest"), ("8.2", "2024.13"), ("8.2", "0~20191122.bd85bf54-2"),
                                        ("8.2", "20241122")])
def test_unparseable_versions_are_named_in_the_error(qemu, ovmf):
    with pytest.raises(TdxError) as error:
        profiles.profile_for(qemu, ovmf)
    assert repr(qemu if "QEMU" in str(error.value) else ovmf) in str(error.value)


# --- QEMU's setup-header patch --------------------------------------------------------------

@pytest.mark.parametrize("memory, below_4g", [("1G", 1 * GiB), ("2G", 2 * GiB), ("2560M", 2560 * MiB),
                                              ("2815M", 2815 * MiB), ("2816M", 2 * GiB), ("3G", 2 * GiB),
                                              ("4G", 2 * GiB), ("64G", 2 * GiB)])
def test_patch_fields_read_back(vmlinuz, memory, below_4g):
    initrd_size = 7_654_321
    patch = kernel_patch.qemu_setup_header_patch(vmlinuz, initrd_size, kernel_patch.parse_memory(memory),
                                                 "console=ttyS0")
    header = bytearray(read_bytes(vmlinuz, 0x300))
    original_loadflags = header[0x211]
    for offset, data in patch.items():
        header[offset:offset + len(data)] = data
    assert header[0x210] == 0xB0
    assert header[0x211] & 0x80 and header[0x211] & ~0x80 == original_loadflags & ~0x80
    assert u32(header, 0x228) == 0x20000 and u16(header, 0x224) == 0xFE00
    address, size = u32(header, 0x218), u32(header, 0x21C)
    assert size == initrd_size
    assert address % 4096 == 0
    # XLF_CAN_BE_LOADED_ABOVE_4G is set in this kernel, so only memory limits the address.
    assert u16(header, 0x236) & 2
    assert address + size <= below_4g - ACPI - 1 < address + size + 4096
    assert kernel_patch.below_4g_mem_size(memory) == below_4g
    assert set(patch) == {0x210, 0x211, 0x218, 0x21C, 0x224, 0x228}


def test_patch_without_initrd_leaves_ramdisk_fields_and_vga_is_handled(vmlinuz):
    patch = kernel_patch.qemu_setup_header_patch(vmlinuz, None, 4 * GiB, "quiet")
    assert 0x218 not in patch and 0x21C not in patch
    patch = kernel_patch.qemu_setup_header_patch(vmlinuz, None, 4 * GiB, "quiet vga=0x317 x")
    assert patch[0x1FA] == struct.pack("<H", 0x317)
    assert kernel_patch.qemu_setup_header_patch(vmlinuz, None, 4 * GiB, "vga=ask")[0x1FA] == b"\xfd\xff"
    with pytest.raises(TdxError, match="vga"):
        kernel_patch.qemu_setup_header_patch(vmlinuz, None, 4 * GiB, "vga=big")


def fake_bzimage(tmp_path, protocol=0x20F, loadflags=0x01, xloadflags=0, initrd_addr_max=0x7FFFFFFF,
                 setup_sects=4, size=0x3000):
    image = bytearray(size)
    image[0x1F1] = setup_sects
    struct.pack_into("<IH", image, 0x202, 0x53726448, protocol)
    image[0x211] = loadflags
    struct.pack_into("<I", image, 0x22C, initrd_addr_max)
    struct.pack_into("<H", image, 0x236, xloadflags)
    path = tmp_path / f"bz{protocol:x}-{xloadflags:x}-{loadflags:x}"
    path.write_bytes(bytes(image))
    return str(path)


@pytest.mark.parametrize("protocol, xloadflags, initrd_addr_max, memory, cap", [
    (0x20F, 0x02, 0x7FFFFFFF, "2560M", 2560 * MiB - ACPI - 1),  # XLF_CAN_BE_LOADED_ABOVE_4G: memory decides
    (0x20F, 0x40, 0x7FFFFFFF, "2560M", 0x7FFFFFFF),             # bit 6 is XLF_5LEVEL_ENABLED, not the 4G flag
    (0x20F, 0x00, 0x37FFFFFF, "4G", 0x37FFFFFF),
    (0x20B, 0x02, 0x37FFFFFF, "4G", 0x37FFFFFF),                # xloadflags only counts from protocol 2.12
    (0x202, 0x02, 0x12345678, "4G", 0x37FFFFFF),                # initrd_addr_max only from protocol 2.03
    (0x203, 0x00, 0x12345678, "4G", 0x12345678),
    (0x20F, 0x02, 0x7FFFFFFF, "1G", 1 * GiB - ACPI - 1),
])
def test_initrd_cap_follows_the_header_and_memory(tmp_path, protocol, xloadflags, initrd_addr_max, memory, cap):
    path = fake_bzimage(tmp_path, protocol=protocol, xloadflags=xloadflags, initrd_addr_max=initrd_addr_max)
    patch = kernel_patch.qemu_setup_header_patch(path, 5000, memory, "")
    assert u32(patch[0x218], 0) == (cap - 5000) & ~4095
    with pytest.raises(TdxError, match=f"does not fit below {cap:#x}"):
        kernel_patch.qemu_setup_header_patch(path, cap, memory, "")


def test_old_boot_protocols_get_the_low_command_line_layout(tmp_path):
    cmdline = "root=/dev/vda"
    cmdline_addr = 0x9A000 - ((len(cmdline) + 16) & ~15)
    old = kernel_patch.qemu_setup_header_patch(fake_bzimage(tmp_path, protocol=0x201), None, "1G", cmdline)
    assert old == {0x20: struct.pack("<H", 0xA33F), 0x22: struct.pack("<H", cmdline_addr - 0x90000),
                   0x210: b"\xb0", 0x211: b"\x81", 0x224: struct.pack("<H", cmdline_addr - 0x90000 - 0x200)}
    not_high = kernel_patch.qemu_setup_header_patch(fake_bzimage(tmp_path, loadflags=0), None, "1G", cmdline)
    assert not_high[0x228] == struct.pack("<I", cmdline_addr) and not_high[0x211] == b"\x80"
    with pytest.raises(TdxError, match="too old to load an initrd"):
        kernel_patch.qemu_setup_header_patch(fake_bzimage(tmp_path, protocol=0x1FF), 10, "1G", "")
    with pytest.raises(TdxError, match="invalid kernel header"):
        kernel_patch.qemu_setup_header_patch(fake_bzimage(tmp_path, setup_sects=200), None, "1G", "")


def test_rtmr1_memory_dependence_follows_the_q35_split(vmlinuz):
    def rtmr1(memory, profile=profiles.DEFAULT):
        return rtmr.replay(rtmr.rtmr1_events(vmlinuz, 3_000_000, memory, "console=ttyS0", profile))[1]

    values = {memory: rtmr1(memory) for memory in ("1G", "2G", "2560M", "3G", "4G")}
    assert values["3G"] == values["4G"] == values["2G"]  # 2 GiB below 4 GiB in each case
    assert len({values["1G"], values["2560M"], values["4G"]}) == 3
    unpatched = profiles.profile_for("10.2", "2024.11")
    assert rtmr1("1G", unpatched) == rtmr1("4G", unpatched)


def test_rtmr1_events_in_order(vmlinuz):
    events = rtmr.rtmr1_events(vmlinuz, None, 4 * GiB, "", profiles.profile_for("9.2", "2024.11"))
    digests = [e.digest for e in events]
    assert all(e.register == 1 for e in events)
    assert digests[1:] == [hashlib.sha384(x).hexdigest() for x in (
        b"Calling EFI Application from Boot Option", b"\0\0\0\0",
        b"Exit Boot Services Invocation", b"Exit Boot Services Returned with Success")]
    old = rtmr.rtmr1_events(vmlinuz, None, 4 * GiB, "", profiles.DEFAULT)
    assert [e.digest for e in old] == [digests[0]] + digests[1:2] + digests[3:]
    unpatched = rtmr.rtmr1_events(vmlinuz, None, 4 * GiB, "", profiles.profile_for("10.2", "2024.11"))
    assert unpatched[0].digest == pe.authenticode(vmlinuz) != digests[0]


def test_patched_digest_equals_authenticode_of_an_edited_copy(vmlinuz, tmp_path):
    patch = kernel_patch.qemu_setup_header_patch(vmlinuz, 1000, 4 * GiB, "x")
    edited = bytearray(read_bytes(vmlinuz))
    for offset, data in patch.items():
        edited[offset:offset + len(data)] = data
    copy = tmp_path / "edited"
    copy.write_bytes(bytes(edited))
    assert rtmr.kernel_digest(vmlinuz, 1000, "4G", "x") == pe.authenticode(str(copy))


def test_initrd_too_large_for_memory(vmlinuz):
    with pytest.raises(TdxError, match=r"initrd of 2147483648 bytes does not fit below 0x7ffd7fff.*raise memory"):
        kernel_patch.qemu_setup_header_patch(vmlinuz, 2 * GiB, 4 * GiB, "")
    with pytest.raises(TdxError, match="does not fit"):
        rtmr.rtmr1_events(vmlinuz, 1 * GiB - ACPI - 1, "1G", "", profiles.DEFAULT)
    kernel_patch.qemu_setup_header_patch(vmlinuz, 1 * GiB - ACPI - 2, "1G", "")  # one byte less fits


def test_non_kernel_files_are_rejected(tmp_path):
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(0x1000))
    with pytest.raises(TdxError, match="HdrS"):
        kernel_patch.qemu_setup_header_patch(str(tmp_path / "elf"), None, "4G", "")


@pytest.mark.parametrize("text, expected", [
    ("4G", 4 * GiB), ("512M", 512 * MiB), ("2048", 2048 * MiB), ("1.5G", 1536 * MiB), ("4GB", 4 * GiB),
    ("4GiB", 4 * GiB), ("1T", 1 << 40), ("64k", 64 << 10), (" 2g ", 2 * GiB), (3 * GiB, 3 * GiB)])
def test_parse_memory(text, expected):
    assert kernel_patch.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "4X", "-1G", "0", "0G", "1.3K", "4 G B", "G", True, "1e3M"])
def test_parse_memory_rejects_junk(text):
    with pytest.raises(TdxError) as error:
        kernel_patch.parse_memory(text)
    assert repr(text) in str(error.value)


# --- RTMR[2] --------------------------------------------------------------------------------

def widened(text: bytes) -> bytes:
    return b"".join(bytes([b, 0]) for b in text) + b"\0\0"


def test_rtmr2_command_line_and_initrd(tmp_path):
    initrd = tmp_path / "initrd.cpio.gz"
    initrd.write_bytes(os.urandom(100_000))
    events = rtmr.rtmr2_events("console=ttyS0 quiet", str(initrd))
    assert [e.register for e in events] == [2, 2]
    assert events[0].digest == hashlib.sha384(widened(b"console=ttyS0 quiet initrd=initrd")).hexdigest()
    assert events[1].digest == hashlib.sha384(initrd.read_bytes()).hexdigest()
    new = rtmr.rtmr2_events("console=ttyS0 quiet", str(initrd), profiles.profile_for("10.1", "2025.08"))
    assert new[0].digest == hashlib.sha384(widened(b"initrd=initrd console=ttyS0 quiet")).hexdigest()


def test_rtmr2_widens_bytes_not_unicode_characters():
    options = rtmr.load_options("caf\u00e9", False)
    assert options == b"c\0a\0f\0\xc3\0\xa9\0\0\0"
    assert options != "caf\u00e9\0".encode("utf-16-le")


def test_rtmr2_without_command_line_or_initrd(tmp_path):
    assert rtmr.rtmr2_events("", None) == []
    assert rtmr.rtmr2_events(None, None) == []
    initrd = tmp_path / "i"
    initrd.write_bytes(b"x")
    only = rtmr.rtmr2_events("", str(initrd))
    assert only[0].digest == hashlib.sha384(widened(b" initrd=initrd")).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # fw_cfg gives OVMF no initrd for a 0-byte file: no "initrd=initrd", no initrd event.
    assert rtmr.rtmr2_events("a", str(empty)) == rtmr.rtmr2_events("a", None)
    with pytest.raises(TdxError, match="cannot read"):
        rtmr.rtmr2_events("a", str(tmp_path / "missing"))


# --- fuzzing: corrupt images give TdxError and nothing else --------------------------------

@settings(max_examples=fuzz_examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 0x3FF), st.binary(min_size=1, max_size=8)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 0x6000)))
def test_fuzz_mutated_kernel_headers(vmlinuz, edits, cut):
    patch = {}
    for offset, data in edits:
        if all(offset + len(data) <= o or o + len(d) <= offset for o, d in patch.items()):
            patch[offset] = data
    try:
        if cut is None:
            result = pe.authenticode(vmlinuz, patch=patch)
        else:
            with open(vmlinuz, "rb") as handle:
                head = bytearray(handle.read(cut))
            for offset, data in patch.items():
                head[offset:offset + len(data)] = data[:max(0, len(head) - offset)]
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "k")
                with open(path, "wb") as out:
                    out.write(head)
                result = pe.authenticode(path)
                try:
                    kernel_patch.qemu_setup_header_patch(path, 1000, "2G", "vga=1")
                except TdxError:
                    pass
    except TdxError as error:
        assert "\n" not in str(error)
        return
    assert len(result) == 96 and int(result, 16) >= 0
