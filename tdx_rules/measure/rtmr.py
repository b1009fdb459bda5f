"""RTMR[1] and RTMR[2] of a TD booted by QEMU + OVMF with a direct kernel (-kernel/-initrd/-append).

An RTMR starts as 48 zero bytes; each event extends it: RTMR = SHA-384(RTMR || digest).

RTMR[1] (UEFI PCRs 2-6), in order:
1. the kernel's PE Authenticode SHA-384, measured when OVMF's QemuLoadKernelImage calls
   LoadImage (EV_EFI_BOOT_SERVICES_APPLICATION, PCR 4);
2. EV_EFI_ACTION "Calling EFI Application from Boot Option" at ReadyToBoot
   (TdTcg2Dxe OnReadyToBoot; TdMeasureAction hashes AsciiStrLen bytes, no NUL);
3. from edk2-stable202411 on, EV_SEPARATOR: SHA-384 of four zero bytes (MeasureSeparatorEvent);
4. EV_EFI_ACTION "Exit Boot Services Invocation" and
5. EV_EFI_ACTION "Exit Boot Services Returned with Success" (OnExitBootServices, PCR 5).

RTMR[2] (PCR 9) holds what the Linux EFI stub measures (drivers/firmware/efi/libstub,
efi_measure_tagged_event; kernels with the CC-measurement support):
1. efi_convert_cmdline: the LoadOptions buffer, LoadOptionsSize bytes, if that is not 0.
   OVMF (X86QemuLoadImageLib QemuLoadKernelImage) fills it with UnicodeSPrintAsciiFormat,
   so each byte of QEMU's -append string becomes one 16-bit unit (not UTF-16 of the text),
   plus " initrd=initrd" after it (edk2 before stable202508) or "initrd=initrd " before it
   (stable202508 and later) when an initrd is loaded, plus a 16-bit NUL.  With an empty
   command line and no initrd LoadOptionsSize is 0: no event.
2. the initrd's SHA-384, when the stub loads it through OVMF's LoadFile2 (only when the
   initrd is not empty: fw_cfg gives OVMF no initrd blob for a 0-byte file).
"""

import hashlib
import os
import re
from dataclasses import dataclass

from tdx_rules.errors import TdxError
from tdx_rules.fsutil import CHUNK
from tdx_rules.measure import kernel_patch, pe
from tdx_rules.measure.profiles import DEFAULT, Profile

RTMR_COUNT = 4
DIGEST_SIZE = 48
ZERO = bytes(DIGEST_SIZE)

CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
EXIT_BOOT_SERVICES_INVOCATION = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_SUCCEEDED = b"Exit Boot Services Returned with Success"
SEPARATOR_DATA = b"\0\0\0\0"

_HEX = re.compile(r"^[0-9a-f]{96}$")


@dataclass(frozen=True)
class Event:
    """One extend of RTMR ``register`` (0-3) by a SHA-384 ``digest`` (lowercase hex)."""

    register: int
    description: str
    digest: str


def sha384_hex(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def replay(events) -> dict:
    """{register: hex value} for RTMR 0-3 after extending them with ``events`` in order."""
    values = {index: ZERO for index in range(RTMR_COUNT)}
    for event in events:
        register = event.register
        if isinstance(register, bool) or not isinstance(register, int) or register not in values:
            raise TdxError(f"event {event.description!r}: RTMR index {register!r} is not 0-3")
        digest = str(event.digest).lower()
        if not _HEX.match(digest):
            raise TdxError(f"event {event.description!r}: digest {event.digest!r} is not 96 hex digits (SHA-384)")
        values[register] = hashlib.sha384(values[register] + bytes.fromhex(digest)).digest()
    return {index: value.hex() for index, value in values.items()}


def _check_profile(profile):
    if not isinstance(profile, Profile):
        raise TdxError(f"measurement profile {profile!r} is not a Profile; use profiles.profile_for(...)")
    return profile


def kernel_digest(kernel_path, initrd_size, memory_bytes, cmdline, profile: Profile = DEFAULT) -> str:
    """The kernel's Authenticode SHA-384 as OVMF measures it (with QEMU's header edit if the profile says so)."""
    patch = None
    if _check_profile(profile).patch_kernel:
        patch = kernel_patch.qemu_setup_header_patch(kernel_path, initrd_size, memory_bytes, cmdline)
    return pe.authenticode(kernel_path, "sha384", patch=patch)


def rtmr1_events(kernel_path, initrd_size, memory_bytes, cmdline, profile: Profile = DEFAULT) -> list:
    """RTMR[1] events of a direct kernel boot.

    ``initrd_size`` is None without -initrd; ``memory_bytes`` is the -m value (bytes or "4G").
    """
    profile = _check_profile(profile)
    if profile.patch_kernel:
        memory = kernel_patch.guest_ram_size(memory_bytes)
        initrd = "no initrd" if initrd_size is None else f"initrd of {initrd_size} bytes"
        what = f"kernel Authenticode, setup header as QEMU edits it ({memory} bytes of memory, {initrd})"
    else:
        what = "kernel Authenticode, unedited file"
    events = [
        Event(1, what, kernel_digest(kernel_path, initrd_size, memory_bytes, cmdline, profile)),
        Event(1, "EV_EFI_ACTION " + CALLING_EFI_APPLICATION.decode(), sha384_hex(CALLING_EFI_APPLICATION)),
    ]
    if profile.separator_in_rtmr1:
        events.append(Event(1, "EV_SEPARATOR", sha384_hex(SEPARATOR_DATA)))
    events += [
        Event(1, "EV_EFI_ACTION " + EXIT_BOOT_SERVICES_INVOCATION.decode(), sha384_hex(EXIT_BOOT_SERVICES_INVOCATION)),
        Event(1, "EV_EFI_ACTION " + EXIT_BOOT_SERVICES_SUCCEEDED.decode(), sha384_hex(EXIT_BOOT_SERVICES_SUCCEEDED)),
    ]
    return events


def load_options(cmdline, has_initrd: bool, profile: Profile = DEFAULT) -> bytes:
    """The LoadOptions bytes OVMF gives the kernel (b"" when it passes none)."""
    if cmdline is None:
        cmdline = ""
    if not isinstance(cmdline, str) or "\0" in cmdline:
        raise TdxError("kernel command line must be text without NUL characters")
    raw = cmdline.encode("utf-8")
    if has_initrd:
        raw = b"initrd=initrd " + raw if _check_profile(profile).initrd_arg_prefix else raw + b" initrd=initrd"
    if not raw:
        return b""
    # UnicodeSPrintAsciiFormat("%a"): every byte becomes one CHAR16; then a CHAR16 NUL.
    return b"".join(bytes((byte, 0)) for byte in raw) + b"\0\0"


def sha384_file(path) -> str:
    digest = hashlib.sha384()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
    except OSError as error:
        raise TdxError(f"initrd: cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()


def rtmr2_events(cmdline, initrd_path=None, profile: Profile = DEFAULT) -> list:
    """RTMR[2] events written by the kernel's EFI stub for this command line and initrd file."""
    initrd_size = 0
    if initrd_path is not None:
        try:
            initrd_size = os.stat(initrd_path).st_size
        except OSError as error:
            raise TdxError(f"initrd: cannot read {initrd_path}: {error.strerror}") from None
    events = []
    options = load_options(cmdline, initrd_size > 0, profile)
    if options:
        events.append(Event(2, f"LOADED_IMAGE::LoadOptions ({len(options)} bytes)", sha384_hex(options)))
    if initrd_size > 0:
        events.append(Event(2, f"Linux initrd ({initrd_size} bytes)", sha384_file(initrd_path)))
    return events
