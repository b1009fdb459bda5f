"""Stage: the TDX firmware (OVMF), copied beside the image as ``<name>-ovmf.fd``.

A ``.deb`` (``canonical-ovmf:``, ``apt:ovmf``, a ``file:`` package, any package spec) is read in
Python and its firmware streamed out: the package's dedicated TDX build when it ships one
(``OVMF.tdx.fd``; edk2's IntelTdx build ``OVMF.inteltdx.fd`` / ``OVMF.inteltdx.ms.fd``, which
Debian ships from 2026 on), else its ``OVMF.fd``. A package without any firmware that depends on
an ``*-inteltdx`` package (Debian's ``ovmf`` became such a metapackage) is followed to it, for
``apt:`` specs. Any other spec is the firmware file itself.

Besides the firmware and the info record, the stage writes ``ovmf.profile.json``: the OVMF
release the launch profile uses (``ovmf_version`` when set, else the package's version), the
firmware file taken, and whether that firmware starts only inside a trust domain (the IntelTdx
builds: the launch scripts' ``TDX=0`` mode then boots the kernel with QEMU's own firmware).
"""

import os
import re

from ..errors import TdxError
from ..fsutil import CHUNK, atomic_output, copy_file, write_json
from ..measure.profiles import parse_ovmf_version
from ..upstream.debpkg import DebPackage
from ..upstream.sources import materialize, parse
from ._entry import load_config, run
from .common import context, fetching_stage_arguments, input_record

FIRMWARE_MEMBERS = ("usr/share/ovmf/OVMF.tdx.fd", "usr/share/ovmf/OVMF.inteltdx.fd", "usr/share/ovmf/OVMF.inteltdx.ms.fd",
                    "usr/share/ovmf/OVMF.fd", "usr/share/qemu/OVMF.fd")
# edk2 OvmfPkg/IntelTdx builds: they start only inside a trust domain.
TDX_ONLY = re.compile(r"(^|[./_-])inteltdx([./_-]|$)", re.IGNORECASE)


def firmware_from_deb(deb: str, out: str):
    """Stream the TDX-capable OVMF image out of ``deb``; return its member name, or None when
    the package holds none of :data:`FIRMWARE_MEMBERS`."""
    members = {}
    for info, _ in DebPackage(deb).iter_data():
        if info.name in FIRMWARE_MEMBERS and (info.isfile() or info.issym()):
            members[info.name] = info
    for name in FIRMWARE_MEMBERS:
        if name in members and members[name].isfile():
            for info, stream in DebPackage(deb).iter_data():
                if info.name == name:
                    with atomic_output(out) as sink:
                        for chunk in iter(lambda: stream.read(CHUNK), b""):
                            sink.write(chunk)
                    return name
    return None


def _inteltdx_dependency(deb: str):
    """The ``*-inteltdx`` package a firmware metapackage depends on, or None."""
    depends = DebPackage(deb).control.get("Depends", "")
    for item in depends.split(","):
        name = item.strip().split(" ")[0].split(":")[0]
        if name.endswith("-inteltdx"):
            return name
    return None


def build_ovmf(spec_text: str, ctx, out: str, info: str, profile: str, ovmf_version=None) -> None:
    spec = parse(spec_text, "ovmf")
    resolved = materialize(spec, ctx, "ovmf")[0]
    records = [input_record(resolved)]
    version = None
    if resolved.path.endswith(".deb"):
        member = firmware_from_deb(resolved.path, out)
        package = resolved.path
        if member is None:
            dependency = _inteltdx_dependency(resolved.path)
            if dependency is None or spec.kind != "apt":
                raise TdxError(f"ovmf: {os.path.basename(resolved.path)} contains none of "
                               f"{', '.join(FIRMWARE_MEMBERS)}; pass the firmware file with ovmf='file:…'")
            resolved = materialize(parse(f"apt:{dependency}" + (f"={spec.version}" if spec.version else ""),
                                         "ovmf"), ctx, "ovmf")[0]
            records.append(input_record(resolved))
            package = resolved.path
            member = firmware_from_deb(package, out)
            if member is None:
                raise TdxError(f"ovmf: {os.path.basename(package)} contains none of {', '.join(FIRMWARE_MEMBERS)}; "
                               "pass the firmware file with ovmf='file:…'")
        records[-1]["member"] = member
        version = DebPackage(package).control.get("Version")
        firmware = os.path.basename(member)
    else:
        copy_file(resolved.path, out)
        firmware = os.path.basename(resolved.path)
    if version is not None and ovmf_version is None:
        try:
            parse_ovmf_version(version)
        except TdxError:
            raise TdxError(f"ovmf: the package version {version!r} names no edk2 release; set the option "
                           "ovmf_version to the release the firmware is built from, e.g. '2024.02'") from None
    if ovmf_version is None and version is None:
        raise TdxError(f"ovmf: {firmware} is not a package, so its OVMF release is unknown; set the option "
                       "ovmf_version (or TDX_IMAGE_OVMF_VERSION) to the edk2 release it is built from, e.g. '2024.02'")
    write_json(info, {"inputs": records})
    write_json(profile, {"ovmf_version": ovmf_version or version, "firmware": firmware,
                         "tdx_only": bool(TDX_ONLY.search(firmware))})


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.ovmf", argv, extra_outputs=("--profile",))
    config = load_config(args.config)
    build_ovmf(config["spec"], context(args, config), args.out, args.info, args.profile, config.get("ovmf_version"))


if __name__ == "__main__":
    run(main)
