"""Which QEMU/OVMF behaviours a measurement must follow, chosen from their versions.

Each rule below names the public change it comes from:

- mrtd_order: QEMU 8.x adds every page of a TDVF section before extending them
  ("two-pass"); QEMU 9.0 and later add and extend page by page ("interleaved").
- separator_in_rtmr1: edk2 commit efaf8931bb "OvmfPkg/TdTcg2Dxe: Fix the SeparatorEvent
  issue in RTMRs" (first release edk2-stable202411) measures the EV_SEPARATOR of
  PCRs 2-6 into RTMR[1]; before it, that separator went to RTMR[0].
- patch_kernel: QEMU up to 10.1 edits the kernel setup header for TDX guests
  (x86_load_linux skipped it only when sev_enabled()); 10.2 skips it for every
  confidential guest ("check machine->cgs", applied for 10.2).  QEMU 10.0 also publishes
  the unedited kernel as fw_cfg file etc/boot/kernel, and OVMF from edk2-stable202502
  (QemuKernelLoaderFsDxe "add support for named blobs", edk2 PR 10628) prefers that file
  over the edited setup+kernel blobs.  So the measured kernel is edited unless
  QEMU >= 10.2, or QEMU >= 10.0 together with OVMF >= 2025.02.
- initrd_arg_prefix: edk2 commit a2ac0fea49 "[QemuLoadImageLib] Prefix initrd=initrd in
  cmdline" (first release edk2-stable202508) passes the kernel "initrd=initrd <cmdline>"
  instead of "<cmdline> initrd=initrd".  That string is what the EFI stub measures.

Versions are given as the packages spell them: QEMU "8.2", "8.2.2", "1:8.2.2+ds-0ubuntu1";
OVMF by its edk2 release "2024.02-3+tdx1.0", "2022.11-6+deb12u2", "2024.11",
"edk2-stable202411".
"""

import re
from dataclasses import dataclass

from tdx_rules.errors import TdxError

TWO_PASS = "two-pass"
INTERLEAVED = "interleaved"

DEFAULT_QEMU_VERSION = "8.2"
DEFAULT_OVMF_VERSION = "2024.02-3+tdx1.0"

_QEMU = re.compile(r"^(?:[0-9]+:)?v?([0-9]{1,3})\.([0-9]{1,3})(?:[.+~-].*)?$")
_OVMF = re.compile(r"^(?:[0-9]+:)?(?:edk2-)?(?:stable)?(20[0-9]{2})\.?([0-9]{2})(?:[.+~-].*)?$")


@dataclass(frozen=True)
class Profile:
    """The measurement-relevant behaviour of one QEMU + OVMF pair."""

    qemu_version: str
    ovmf_version: str
    mrtd_order: str            # TWO_PASS (QEMU < 9) or INTERLEAVED
    separator_in_rtmr1: bool   # edk2 >= stable202411
    patch_kernel: bool         # the firmware measures QEMU's edited setup header
    initrd_arg_prefix: bool    # edk2 >= stable202508: "initrd=initrd " goes before the command line


def parse_qemu_version(text) -> tuple:
    """(major, minor) of a QEMU version string."""
    match = _QEMU.match(str(text).strip())
    if not match:
        raise TdxError(f"QEMU version {text!r} is not understood; write it like '8.2', '9.2.0' or "
                       "'1:8.2.2+ds-0ubuntu1'")
    return int(match.group(1)), int(match.group(2))


def parse_ovmf_version(text) -> tuple:
    """(year, month) of the edk2 release an OVMF package version is built from."""
    match = _OVMF.match(str(text).strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise TdxError(f"OVMF version {text!r} is not understood; give the edk2 release it is built from, "
                       "like '2024.02-3+tdx1.0', '2022.11-6+deb12u2' or 'edk2-stable202411'")
    return int(match.group(1)), int(match.group(2))


def profile_for(qemu_version: str = DEFAULT_QEMU_VERSION, ovmf_version: str = DEFAULT_OVMF_VERSION) -> Profile:
    """The Profile for a QEMU version and an OVMF version (both as their packages name them)."""
    qemu = parse_qemu_version(qemu_version)
    ovmf = parse_ovmf_version(ovmf_version)
    unpatched = qemu >= (10, 2) or (qemu >= (10, 0) and ovmf >= (2025, 2))
    return Profile(
        qemu_version=str(qemu_version).strip(),
        ovmf_version=str(ovmf_version).strip(),
        mrtd_order=TWO_PASS if qemu < (9, 0) else INTERLEAVED,
        separator_in_rtmr1=ovmf >= (2024, 11),
        patch_kernel=not unpatched,
        initrd_arg_prefix=ovmf >= (2025, 8),
    )


# The reference stack: Canonical's TDX QEMU 8.2 with OVMF 2024.02-3+tdx1.0.
DEFAULT = profile_for()
