"""The firmware as oracle: Debian's OVMF measures a direct kernel boot into a TPM, and our
RTMR[1] and RTMR[2] predictions must equal what it measured.

OVMF's Tcg2 drivers hash the kernel (Authenticode, after QEMU has edited its setup header),
the boot actions and, through the kernel's EFI stub, the command line and the initrd, and
send every digest to the TPM with TPM2_PCR_Extend.  ``tests/tpm_recorder.py`` sits on
QEMU's tpm-emulator socket and records those extends (SHA-384 bank), so the digests below
come from the firmware and the kernel, not from this project.  UEFI maps PCR 2-6 to
RTMR[1] and PCR 8-15 to RTMR[2]; the PCR separators are left out of the RTMR[1] comparison
because where they land differs between TPM and TDX (see profiles.separator_in_rtmr1).
"""

import dataclasses
import hashlib
import os
import re
import shutil
import struct
import subprocess

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
