"""Stage 2: the minirootfs tarball that supplies busybox and the musl loader.

Default: the Alpine minirootfs of the configured release, verified against
the ``.sha256`` file Alpine publishes beside it. Any ``file:``/``https:``
spec replaces it. ``debian`` composes the same layout from Debian's
busybox-static and musl packages (for Debian hosts and offline use).
"""

import gzip
import io
import tarfile

from ..errors import TdxError
from ..fsutil import CHUNK, atomic_output, copy_file, write_json
from ..upstream.debpkg import DebPackage
from ..upstream.sources import Spec, materialize, parse
from ._entry import load_config, run
from .common import context, fetching_stage_arguments, input_record

MUSL_LOADER = "lib/ld-musl-x86_64.so.1"
MUSL_LIBC_LINK = "lib/libc.musl-x86_64.so.1"


def _member_from_deb(deb: str, name: str, sink) -> int:
    """Stream the data member ``name`` of ``deb`` into ``sink``; return its size."""
    for info, stream in DebPackage(deb).iter_data():
        if info.name == name and stream is not None:
            size = 0
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                sink.write(chunk)
                size += len(chunk)
            return size
    raise TdxError(f"{deb}: package has no {name}")


def compose_debian(busybox_deb: str, musl_deb: str, out: str) -> None:
    """Write an Alpine-layout minirootfs.tar.gz from Debian's busybox-static and musl."""
    files = {}
    for key, deb, member in (("bin/busybox", busybox_deb, "bin/busybox"),
                             (MUSL_LOADER, musl_deb, "lib/x86_64-linux-musl/libc.so")):
        buffer = io.BytesIO()  # busybox (2 MB) and libc.so (0.7 MB) are small
        _member_from_deb(deb, member, buffer)
        files[key] = buffer.getvalue()
    with atomic_output(out) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            def add(name, kind, mode, data=b"", linkname=""):
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.size, info.linkname = kind, mode, len(data), linkname
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                tar.addfile(info, io.BytesIO(data) if data else None)
            for directory in ("bin", "etc", "lib"):
                add(directory + "/", tarfile.DIRTYPE, 0o755)
            add("bin/busybox", tarfile.REGTYPE, 0o755, files["bin/busybox"])
            add(MUSL_LOADER, tarfile.REGTYPE, 0o755, files[MUSL_LOADER])
            add(MUSL_LIBC_LINK, tarfile.SYMTYPE, 0o777, linkname="ld-musl-x86_64.so.1")


def build_minirootfs(spec: Spec, ctx, out: str) -> list:
    """Produce ``out`` from ``spec``; return the manifest records of the inputs."""
    if spec.kind == "debian":
        busybox = materialize(parse("apt:busybox-static"), ctx, "minirootfs")[0]
        musl = materialize(parse("apt:musl"), ctx, "minirootfs")[0]
        compose_debian(busybox.path, musl.path, out)
        return [input_record(busybox), input_record(musl)]
    resolved = materialize(spec, ctx, "minirootfs")
    copy_file(resolved[0].path, out)
    return [input_record(r) for r in resolved]


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.minirootfs", argv)
    config = load_config(args.config)
    records = build_minirootfs(parse(config["spec"], "minirootfs"), context(args, config), args.out)
    write_json(args.info, {"inputs": records})


if __name__ == "__main__":
    run(main)
