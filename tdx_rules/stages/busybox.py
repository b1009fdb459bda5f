"""Stage 3: busybox, the musl loader and the applet links, as the base fragment.

Reads the minirootfs with :mod:`tarfile` in streaming mode and keeps only the
members the image needs. Unsafe member names anywhere in the archive stop
the build. The applet list is read from the busybox binary itself (its
packed, sorted table of applet names), so no downloaded binary is executed.
"""

import argparse
import os
import re
import shutil
import stat
import tarfile
import tempfile

from ..errors import TdxError
from ..fsutil import CHUNK
from ..initramfs import newc
from ._entry import run

# Bounds on the work a hostile archive can cause: a member we keep may hold at most
# MAX_MEMBER bytes, and reading stops (refused) before the decompressed stream passes
# MAX_STREAM bytes (an Alpine minirootfs is under 16 MiB uncompressed).
MAX_MEMBER = 64 << 20
MAX_STREAM = 256 << 20
WANTED = ("bin/busybox", "lib/ld-musl-x86_64.so.1", "lib/libc.musl-x86_64.so.1", "etc/alpine-release")
_APPLET = re.compile(rb"^[a-z0-9\[][a-z0-9_.\[-]*$")


def applet_names(busybox_path: str) -> list:
    """The applet names compiled into a busybox binary.

    Busybox stores them as one NUL-separated, sorted string that starts with
    the ``[`` and ``[[`` applets.
    """
    with open(busybox_path, "rb") as handle:
        data = handle.read()  # a busybox binary is about 1-2 MB
    start = data.find(b"[\0[[\0")
    if start < 0:
        raise TdxError(f"{busybox_path}: cannot find the busybox applet table; is this a busybox binary?")
    end = data.find(b"\0\0", start)
    names = data[start:end].split(b"\0")
    if len(names) < 10 or names != sorted(names) or not all(_APPLET.match(n) for n in names):
        raise TdxError(f"{busybox_path}: the busybox applet table is unreadable")
    return [n.decode() for n in names]


def extract_base(minirootfs: str, out: str) -> None:
    """Write the base fragment (busybox, musl loader, applet links) from ``minirootfs``."""
    entries = []
    with tempfile.TemporaryDirectory(prefix=".busybox.", dir=os.path.dirname(os.path.abspath(out))) as tmp:
        found = {}
        try:
            with tarfile.open(minirootfs, mode="r|*") as tar:
                for info in tar:
                    name = info.name[2:] if info.name.startswith("./") else info.name
                    name = name.rstrip("/")
                    if not name or name == ".":
                        continue
                    if name.startswith("/") or ".." in name.split("/"):
                        raise TdxError(f"{minirootfs}: unsafe member name {info.name!r}; refusing this archive")
                    if info.offset_data + info.size > MAX_STREAM:
                        raise TdxError(f"{minirootfs}: member {name!r} ends past {MAX_STREAM >> 20} MiB of "
                                       "uncompressed data; refusing this archive (not a minirootfs)")
                    if name not in WANTED:
                        if info.isreg():  # read the body through: tarfile's own skip is slow on a stream
                            with tar.extractfile(info) as src:
                                while src.read(CHUNK):
                                    pass
                        continue
                    if name in found:
                        raise TdxError(f"{minirootfs}: member {name!r} appears twice; refusing this archive")
                    if info.issym():
                        found[name] = newc.symlink(name, info.linkname)
                    elif info.isfile():
                        if info.size > MAX_MEMBER:
                            raise TdxError(f"{minirootfs}: {name} declares {info.size} bytes; refusing this archive")
                        local = os.path.join(tmp, name.replace("/", "_"))
                        with tar.extractfile(info) as src, open(local, "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
                        mode = 0o755 if info.mode & 0o111 else 0o644
                        found[name] = newc.disk_file(name, local, mode)
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise TdxError(f"{minirootfs}: cannot read: {error.strerror}") from None
            raise TdxError(f"{minirootfs}: corrupt or truncated minirootfs archive ({error})") from None
        if "bin/busybox" not in found or not stat.S_ISREG(found["bin/busybox"].mode):
            raise TdxError(f"{minirootfs}: no bin/busybox in the minirootfs; use an Alpine minirootfs or minirootfs='debian'")
        entries.extend(found.values())
        for applet in applet_names(found["bin/busybox"].path):
            if applet != "busybox":
                entries.append(newc.symlink(f"bin/{applet}", "busybox"))
        newc.write_fragment(out, newc.merge([entries]))


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.busybox")
    parser.add_argument("--minirootfs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    extract_base(args.minirootfs, args.out)


if __name__ == "__main__":
    run(main)
