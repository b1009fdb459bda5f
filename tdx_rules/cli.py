"""The ``tdx-rules`` command line.

``tdx-rules measure``: the MRTD, RTMR[1] and RTMR[2] a TD launched from the
given files will report, for verifiers and CI. ``tdx-rules pack``: a
deterministic initramfs from a directory. Exit status 0 on success, 1 on bad
input (one ``tdx-rules: error:`` line), 2 on bad usage.
"""

import argparse
import json
import os
import sys

from .errors import ERROR_PREFIX, TdxError

MEASURE_EXAMPLE = """example:
  tdx-rules measure --ovmf OVMF.fd --kernel vmlinuz --initrd initramfs.cpio.gz \\
      --cmdline 'console=ttyS0' --memory 4G --json
registers whose inputs are not given are left out (MRTD needs --ovmf; RTMR[1]
needs --kernel; RTMR[2] needs --cmdline or --initrd)."""


def measure(args) -> dict:
    """The registers and the events, in measurement order, for ``args``."""
    from .measure import mrtd, profiles, rtmr

    profile = profiles.profile_for(args.qemu_version, args.ovmf_version)
    result = {}
    events = []
    if args.ovmf:
        result["mrtd"] = mrtd.compute_mrtd(args.ovmf, profile.mrtd_order).mrtd
    initrd_size = None
    if args.initrd:
        try:
            initrd_size = os.path.getsize(args.initrd)
        except OSError as error:
            raise TdxError(f"--initrd: cannot read {args.initrd}: {error.strerror}") from None
    if args.kernel:
        found = rtmr.rtmr1_events(args.kernel, initrd_size, args.memory, args.cmdline or "", profile)
        result["rtmr1"] = rtmr.replay(found)[1]
        events += found
    if args.cmdline is not None or args.initrd:
        found = rtmr.rtmr2_events(args.cmdline or "", args.initrd, profile)
        result["rtmr2"] = rtmr.replay(found)[2]
        events += found
    result["events"] = [{"register": e.register, "description": e.description, "digest": e.digest} for e in events]
    result["profile"] = {"qemu_version": profile.qemu_version, "ovmf_version": profile.ovmf_version}
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdx-rules", description="Tools of tdx-rules (TDX guest images for SCons).")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("measure", help="precompute MRTD, RTMR[1], RTMR[2]", epilog=MEASURE_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--ovmf", help="firmware image (the combined OVMF.fd)")
    sub.add_argument("--kernel", help="kernel (bzImage) for direct boot")
    sub.add_argument("--initrd", help="initramfs as passed to -initrd")
    sub.add_argument("--cmdline", help="kernel command line as passed to -append")
    sub.add_argument("--memory", default="4G", help="guest memory, as -m (default 4G)")
    sub.add_argument("--qemu-version", default="8.2", help="QEMU of the launch profile (default 8.2)")
    sub.add_argument("--ovmf-version", default="2024.02-3+tdx1.0",
                     help="OVMF of the launch profile (default 2024.02-3+tdx1.0)")
    sub.add_argument("--json", action="store_true", help="print a JSON object with the registers and the events")
    from . import pack

    sub = commands.add_parser("pack", help=pack.PACK_HELP, description=pack.PACK_HELP, epilog=pack.PACK_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    pack.add_arguments(sub)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pack":
            from . import pack

            pack.run(args)
            return 0
        result = measure(args)
    except TdxError as error:
        print(ERROR_PREFIX + str(error), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        for key, label in (("mrtd", "MRTD"), ("rtmr1", "RTMR[1]"), ("rtmr2", "RTMR[2]")):
            if key in result:
                print(f"{label:8} {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
