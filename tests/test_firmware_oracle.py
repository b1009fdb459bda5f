"""The firmware as oracle: Debian's OVMF measures a direct kernel boot into a TPM, and our
RTMR[1] and RTMR[2] predictions must equal what it measured.

OVMF's Tcg2 drivers hash the kernel (Authenticode, after QEMU has edited its setup header),
the boot actions and, through the kernel's EFI stub, the command line and the initrd, and
send every digest to the TPM with TPM2_PCR_Extend.  ``tests/tpm_recorder.py`` sits on
QEMU's tpm-emulator socket and records those extends (SHA-384 bank), so the digests below
come from the firmware and the kernel, not from this project.  UEFI maps PCR 2-6 to
RTMR[1] and PCR 8-15 to RTMR[2]; the PCR separators are left out of the RTMR[1] comparison
because where they land differs between TPM and TDX (see profiles.separator_in_rtmr1).

The recorder answers only what OVMF asks, so one case runs against a real TPM as well:
swtpm, with the guest kernel reading back the firmware's event log and swtpm's PCRs, the log
decoded and replayed by tpm2-tools' ``tpm2_eventlog``.
"""

import dataclasses
import hashlib
import os
import re
import shutil
import struct
import subprocess
import time

import pytest

from tdx_rules.measure import pe, profiles, rtmr
from tests import debian
from tests.tpm_recorder import TpmRecorder

QEMU = "qemu-system-x86_64"
SEPARATOR = hashlib.sha384(b"\0\0\0\0").hexdigest()
BOOT_TIMEOUT = 240

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")


@pytest.fixture(scope="module")
def stack():
    """Debian's kernel and OVMF, and the profile for the QEMU on this machine with that OVMF."""
    kernel = os.path.join(debian.kernel_tree(), "boot", f"vmlinuz-{debian.kernel_release()}")
    ovmf = os.path.join(debian.package_tree("ovmf"), "usr", "share", "ovmf", "OVMF.fd")
    banner = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    qemu_version = re.search(r"version ([0-9][^ ]*)", banner).group(1)
    profile = profiles.profile_for(qemu_version, debian.package_version("ovmf"))
    return kernel, ovmf, profile


def firmware_extends(tmp_path, kernel, ovmf, memory, cmdline, initrd):
    """Boot under TCG until ExitBootServices has been measured; the (pcr, digest) extends in order."""
    recorder = TpmRecorder(str(tmp_path / "tpm.sock")).start()
    command = [QEMU, "-accel", "tcg", "-nodefaults", "-nographic", "-machine", "q35", "-m", memory,
               "-bios", ovmf, "-kernel", kernel, "-append", cmdline,
               "-chardev", f"socket,id=tpm,path={recorder.path}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
               "-device", "tpm-crb,tpmdev=tpm0", "-serial", "none", "-monitor", "none"]
    if initrd is not None:
        command += ["-initrd", initrd]
    qemu = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Besides its separator, PCR 5 gets "Exit Boot Services Invocation" and "... Returned with
        # Success": the last firmware measurements of a boot.
        done = recorder.wait_for(
            lambda extends: sum(pcr == 5 and digest != SEPARATOR for pcr, digest in extends) >= 2, BOOT_TIMEOUT)
    finally:
        qemu.kill()
        _, err = qemu.communicate()
        recorder.close()
    assert done, f"firmware did not reach ExitBootServices; QEMU said: {err.decode(errors='replace')[-2000:]}"
    return list(recorder.extends)


def replay(digests) -> str:
    value = bytes(48)
    for digest in digests:
        value = hashlib.sha384(value + bytes.fromhex(digest)).digest()
    return value.hex()


CASES = [
    # memory, command line, initrd size (None: no -initrd)
    ("1G", "console=ttyS0 panic=-1 quiet", 300_000),
    ("2G", "console=ttyS0 label=caf\u00e9-\u00fcber-\u2603", 12_345),
    ("3G", "", 4096),
    ("2G", "", None),
]


@pytest.mark.parametrize("memory, cmdline, initrd_size", CASES,
                         ids=["1G-ascii", "2G-non-ascii", "3G-empty", "2G-empty-no-initrd"])
def test_rtmr1_and_rtmr2_equal_what_ovmf_measured(tmp_path, stack, memory, cmdline, initrd_size):
    kernel, ovmf, profile = stack
    initrd = None
    if initrd_size is not None:
        initrd = str(tmp_path / "initrd.img")
        with open(initrd, "wb") as handle:
            handle.write(os.urandom(initrd_size))
    extends = firmware_extends(tmp_path, kernel, ovmf, memory, cmdline, initrd)

    # RTMR[1]: the PCR 2-6 events in the order the firmware extended them, separators aside.
    measured = [digest for pcr, digest in extends if 2 <= pcr <= 6 and digest != SEPARATOR]
    predicted = rtmr.rtmr1_events(kernel, initrd_size, memory, cmdline, profile)
    assert [event.digest for event in predicted if event.digest != SEPARATOR] == measured
    assert [pcr for pcr, digest in extends if digest == measured[0]] == [4]

    # RTMR[2]: replaying PCR 8-15 gives our RTMR[2], event for event.
    measured2 = [digest for pcr, digest in extends if 8 <= pcr <= 15]
    predicted2 = rtmr.rtmr2_events(cmdline, initrd, profile)
    assert [event.digest for event in predicted2] == measured2
    assert rtmr.replay(predicted2)[2] == replay(measured2)
    if initrd is not None:
        # The other placement of "initrd=initrd" (edk2-stable202508 and later) would not match.
        other = dataclasses.replace(profile, initrd_arg_prefix=not profile.initrd_arg_prefix)
        assert rtmr.rtmr2_events(cmdline, initrd, other)[0].digest not in measured2


def test_the_measured_kernel_depends_on_memory_and_is_not_the_plain_file(tmp_path, stack):
    """The oracle can tell the models apart: QEMU's header edit changes the digest with memory size."""
    kernel, ovmf, profile = stack
    assert profile.patch_kernel, "this QEMU edits the setup header; the profile must say so"
    initrd = str(tmp_path / "initrd.img")
    with open(initrd, "wb") as handle:
        handle.write(os.urandom(1000))
    kernels = {}
    for memory in ("1G", "3G"):
        extends = firmware_extends(tmp_path, kernel, ovmf, memory, "console=ttyS0", initrd)
        kernels[memory] = [digest for pcr, digest in extends if pcr == 4 and digest != SEPARATOR][0]
    assert kernels["1G"] != kernels["3G"]
    assert pe.authenticode(kernel, "sha384") not in kernels.values()
    for memory, digest in kernels.items():
        assert rtmr.kernel_digest(kernel, 1000, memory, "console=ttyS0", profile) == digest


def test_an_unsigned_kernel_of_odd_size_is_measured_as_we_hash_it(tmp_path, stack):
    """edk2's own Authenticode code as the independent implementation: the signed kernel with its
    certificate table removed and 5 bytes of trailing data (a size that is not a multiple of 8)."""
    kernel, ovmf, profile = stack
    with open(kernel, "rb") as handle:
        image = bytearray(handle.read())
    pe_offset = struct.unpack_from("<I", image, 0x3C)[0]
    optional = pe_offset + 24
    assert struct.unpack_from("<H", image, optional)[0] == 0x20B  # PE32+
    security = optional + 112 + 4 * 8
    cert_offset, cert_size = struct.unpack_from("<II", image, security)
    assert cert_size > 0, "Debian's kernel is signed"
    struct.pack_into("<II", image, security, 0, 0)
    unsigned = bytes(image[:cert_offset]) + b"\x01\x02\x03\x04\x05"
    assert len(unsigned) % 8 != 0
    path = str(tmp_path / "vmlinuz-unsigned")
    with open(path, "wb") as handle:
        handle.write(unsigned)

    extends = firmware_extends(tmp_path, path, ovmf, "2G", "console=ttyS0", None)
    measured = [digest for pcr, digest in extends if pcr == 4 and digest != SEPARATOR][0]
    assert rtmr.kernel_digest(path, None, "2G", "console=ttyS0", profile) == measured
    assert rtmr.kernel_digest(kernel, None, "2G", "console=ttyS0", profile) != measured


# --------------------------------------------------------------------------- a real TPM: swtpm

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security
echo EVENTLOG-BEGIN
od -An -v -tx1 /sys/kernel/security/tpm0/binary_bios_measurements
echo EVENTLOG-END
for pcr in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
  echo "PCR $pcr $(cat /sys/class/tpm/tpm0/pcr-sha384/$pcr)"
done
poweroff -f
"""


def busybox_initrd(tmp_path, size):
    """A newc archive (made by GNU cpio) of Debian's static busybox and an /init that prints the
    firmware's TCG2 event log and the TPM's SHA-384 PCRs; zero-padded to ``size`` bytes."""
    root = tmp_path / "initrd-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(debian.package_tree("busybox-static"), "bin", "busybox"), root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
    archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root, input=names,
                             capture_output=True, check=True).stdout
    assert len(archive) <= size, f"busybox archive is {len(archive)} bytes, more than the case's {size}"
    path = tmp_path / "initrd.cpio"
    path.write_bytes(archive + bytes(size - len(archive)))  # the kernel skips zeros between archives
    return str(path)


def swtpm_boot(tmp_path, kernel, ovmf, memory, cmdline, initrd):
    """Boot under TCG with a real swtpm (SHA-384 bank only) to the initrd's /init; return the
    event log (bytes) the guest kernel read from the firmware and the PCR values the TPM reported."""
    state = tmp_path / "tpm-state"
    state.mkdir()
    subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--pcr-banks", "sha384"],
                   check=True, capture_output=True)
    socket_path = str(tmp_path / "swtpm.sock")
    tpm = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                            "--ctrl", f"type=unixio,path={socket_path}", "--terminate"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if os.path.exists(socket_path):
                break
            time.sleep(0.05)
        command = [QEMU, "-accel", "tcg", "-nodefaults", "-nographic", "-machine", "q35", "-m", memory,
                   "-bios", ovmf, "-kernel", kernel, "-append", cmdline, "-initrd", initrd, "-no-reboot",
                   "-chardev", f"socket,id=tpm,path={socket_path}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
                   "-device", "tpm-crb,tpmdev=tpm0", "-serial", "stdio", "-monitor", "none"]
        qemu = subprocess.run(command, capture_output=True, timeout=BOOT_TIMEOUT)
    finally:
        tpm.kill()
        tpm.wait()
    console = qemu.stdout.decode("utf-8", "replace").replace("\r", "")
    match = re.search(r"EVENTLOG-BEGIN\n(.*?)EVENTLOG-END", console, re.S)
    assert match, f"the guest printed no event log; console ends: {console[-3000:]}"
    log = bytes.fromhex("".join(match.group(1).split()))
    pcrs = {int(number): bytes.fromhex(value) for number, value in re.findall(r"^PCR (\d+) ([0-9A-Fa-f]{96})$",
                                                                               console, re.M)}
    assert sorted(pcrs) == list(range(16)), f"the guest printed PCRs {sorted(pcrs)}; console: {console[-3000:]}"
    return log, pcrs


def tpm2_eventlog(tmp_path, log):
    """The log as tpm2-tools' ``tpm2_eventlog`` reads it: its extends in order, (pcr, SHA-384
    hex), leaving out EV_NO_ACTION records, and the SHA-384 PCR values it replays them to."""
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(log)
    text = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True).stdout
    extends = []
    for record in re.split(r"^- EventNum:", text, flags=re.M)[1:]:
        if re.search(r"^\s*EventType: EV_NO_ACTION$", record, re.M):
            continue
        pcr = int(re.search(r"^\s*PCRIndex: (\d+)$", record, re.M).group(1))
        digests = re.findall(r"AlgorithmId: (\w+)\s+Digest: \"([0-9a-f]+)\"", record)
        assert [algorithm for algorithm, _ in digests] == ["sha384"], f"one SHA-384 bank expected: {record}"
        extends.append((pcr, digests[0][1]))
    bank = re.search(r"^pcrs:\s+sha384:\n((?:\s+\d+\s*: 0x[0-9A-Fa-f]+\n?)+)", text, re.M)
    assert bank, f"tpm2_eventlog replayed no SHA-384 bank: {text[-1000:]}"
    replayed = {int(pcr): bytes.fromhex(value) for pcr, value in re.findall(r"(\d+)\s*: 0x([0-9A-Fa-f]+)",
                                                                             bank.group(1))}
    return extends, replayed


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("swtpm", "swtpm_setup", "tpm2_eventlog")),
                    reason="swtpm or tpm2-tools is not installed (./run installs them)")
def test_a_real_tpm_holds_what_its_event_log_says_and_that_equals_our_rtmrs(tmp_path, stack):
    """swtpm instead of the recorder: the event log OVMF kept (read back by the guest kernel)
    replays to the PCR values swtpm itself reports, and its PCR 2-6 and 8-15 events equal our
    RTMR[1] and RTMR[2] predictions, as in the recorder's cases."""
    kernel, ovmf, profile = stack
    memory, cmdline, size = "2G", "console=ttyS0 panic=-1 quiet", 4_000_000
    initrd = busybox_initrd(tmp_path, size)
    log, pcrs = swtpm_boot(tmp_path, kernel, ovmf, memory, cmdline, initrd)

    extends, replayed = tpm2_eventlog(tmp_path, log)
    # PCR 10 is the guest kernel's (IMA's boot aggregate, kept in IMA's own log): the firmware's
    # log must account for every other one.
    assert pcrs[10] != bytes(48) and 10 not in {pcr for pcr, _ in extends}
    assert {pcr: replayed.get(pcr, bytes(48)) for pcr in range(16) if pcr != 10} == \
        {pcr: value for pcr, value in pcrs.items() if pcr != 10}, "the event log does not replay to the TPM's PCRs"
    assert any(value != bytes(48) for pcr, value in pcrs.items() if 8 <= pcr <= 15), "nothing reached PCR 8-15"

    measured = [digest for pcr, digest in extends if 2 <= pcr <= 6 and digest != SEPARATOR]
    predicted = rtmr.rtmr1_events(kernel, size, memory, cmdline, profile)
    assert [event.digest for event in predicted if event.digest != SEPARATOR] == measured
    measured2 = [digest for pcr, digest in extends if 8 <= pcr <= 15]
    assert [event.digest for event in rtmr.rtmr2_events(cmdline, initrd, profile)] == measured2
