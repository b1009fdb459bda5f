"""Stage: the TDX firmware (OVMF), copied beside the image as ``<name>-ovmf.fd``.

A ``.deb`` (``canonical-ovmf:``, ``apt:ovmf``, or any package spec) is read in
Python and its OVMF.fd streamed out; any other spec is the firmware file.
"""


from ..errors import TdxError
from ..fsutil import CHUNK, atomic_output, copy_file, write_json
from ..upstream.debpkg import DebPackage
from ..upstream.sources import materialize, parse
from ._entry import load_config, run
from .common import context, fetching_stage_arguments, input_record

FIRMWARE_MEMBERS = ("usr/share/ovmf/OVMF.tdx.fd", "usr/share/ovmf/OVMF.fd", "usr/share/qemu/OVMF.fd")


def firmware_from_deb(deb: str, out: str) -> str:
    """Stream the TDX-capable OVMF image out of ``deb``; return its member name."""
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
    raise TdxError(f"ovmf: {deb} contains none of {', '.join(FIRMWARE_MEMBERS)}; pass the firmware file with ovmf='file:…'")


def build_ovmf(spec_text: str, ctx, out: str, info: str) -> None:
    resolved = materialize(parse(spec_text, "ovmf"), ctx, "ovmf")[0]
    record = input_record(resolved)
    if resolved.path.endswith(".deb"):
        record["member"] = firmware_from_deb(resolved.path, out)
    else:
        copy_file(resolved.path, out)
    write_json(info, {"inputs": [record]})


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.ovmf", argv)
    build_ovmf(load_config(args.config)["spec"], context(args), args.out, args.info)


if __name__ == "__main__":
    run(main)
