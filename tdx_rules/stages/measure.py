"""Finalize: the attestation measurements the verifier must expect.

Three independent targets, so each reruns only when its inputs change:

- ``mrtd``: the firmware and the launch profile (its transcript also holds the RTMR[0] events
  that depend only on the firmware: :mod:`tdx_rules.measure.rtmr0`);
- ``rtmr1``: the kernel, the initramfs *size*, the memory size, the ``vga=``
  word of the command line (the only part QEMU writes into the setup header
  of a kernel that loads high) and the profile;
- ``rtmr2``: the command line, the initramfs bytes and the profile.

Each writes ``<name>-<register>.hex`` and a JSON transcript with every event. The profile's
QEMU version comes from the config; its OVMF release from the ovmf stage's
``ovmf.profile.json`` (the firmware actually used, or ``ovmf_version`` when set).
"""

import argparse
import dataclasses

from ..fsutil import atomic_output, read_json_object, write_json
from ..measure import mrtd, profiles, rtmr, rtmr0
from ..rootfs import verity
from ._entry import load_config, run


def _profile(config):
    return profiles.profile_for(config["qemu_version"], config["ovmf_profile"]["ovmf_version"])


def _write(value: str, out: str, transcript: str, data: dict) -> None:
    with atomic_output(out, "w") as handle:
        handle.write(value + "\n")
    write_json(transcript, dict(data, value=value))


def _events(events):
    return [{"register": event.register, "description": event.description, "digest": event.digest}
            for event in events]


def measure_mrtd(config, ovmf, out, transcript):
    profile = _profile(config)
    result = mrtd.compute_mrtd(ovmf, profile.mrtd_order)
    _write(result.mrtd, out, transcript, {"register": "mrtd", "profile": dataclasses.asdict(profile),
                                          "sections": result.transcript,
                                          "rtmr0_firmware": rtmr0.firmware_events(ovmf)})


def measure_rtmr1(config, kernel, initrd_size, out, transcript):
    profile = _profile(config)
    events = rtmr.rtmr1_events(kernel, initrd_size, config["memory"], config["vga"], profile)
    _write(rtmr.replay(events)[1], out, transcript, {"register": "rtmr1", "profile": dataclasses.asdict(profile),
                                                     "events": _events(events)})


def measure_rtmr2(config, initrd, out, transcript, verity_hash=None, roothash=None):
    profile = _profile(config)
    cmdline = verity.command_line(config["cmdline"], verity_hash, roothash)
    events = rtmr.rtmr2_events(cmdline, initrd, profile)
    _write(rtmr.replay(events)[2], out, transcript, {"register": "rtmr2", "profile": dataclasses.asdict(profile),
                                                     "events": _events(events), "cmdline": cmdline})


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.measure")
    parser.add_argument("register", choices=("mrtd", "rtmr1", "rtmr2"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--input", required=True, help="firmware (mrtd), kernel (rtmr1) or initramfs (rtmr2)")
    parser.add_argument("--ovmf-profile", required=True, help="the ovmf stage's ovmf.profile.json")
    parser.add_argument("--initrd-size-file", help="rtmr1: file holding the initramfs size in bytes")
    parser.add_argument("--verity-hash", help="rtmr2: the dm-verity hash tree of the root filesystem")
    parser.add_argument("--roothash", help="rtmr2: its root hash file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--transcript", required=True)
    args = parser.parse_args(argv)
    config = dict(load_config(args.config), ovmf_profile=read_json_object(
        args.ovmf_profile, "ovmf profile", "rebuild the image (scons)"))
    if args.register == "mrtd":
        measure_mrtd(config, args.input, args.out, args.transcript)
    elif args.register == "rtmr1":
        with open(args.initrd_size_file, encoding="ascii") as handle:
            size = int(handle.read().strip())
        measure_rtmr1(config, args.input, size, args.out, args.transcript)
    else:
        measure_rtmr2(config, args.input, args.out, args.transcript, args.verity_hash, args.roothash)


if __name__ == "__main__":
    run(main)
