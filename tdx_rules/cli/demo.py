"""``./run demo``: build examples/hello into a TDX image from Debian parts and boot it.

Builds with scons, boots the kernel and initramfs under QEMU software
emulation (no TDX hardware needed) and prints the guest's output and the
paths of the artifacts.
"""

import os
import subprocess
import sys

from ..boot import boot_image
from ..errors import TdxError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    example = os.path.join(ROOT, "examples", "hello")
    print("[demo] building examples/hello (first run downloads Debian packages: kernel 6.12, busybox, musl, OVMF)")
    result = subprocess.run([sys.executable, "-m", "SCons", "-Q", "-C", example])
    if result.returncode:
        return result.returncode
    out = os.path.join(example, "build", "tdx", "hello")
    print("[demo] booting with TDX=0 ACCEL=tcg build/tdx/hello/hello-launch-tdx.sh (an ordinary VM under software "
          "emulation, about 10 s)")
    try:
        console = boot_image(os.path.join(out, "hello-launch-tdx.sh"), until="HELLO-DONE")
    except TdxError as error:
        print(f"[demo] {error}", file=sys.stderr)
        return 1
    print("[demo] guest output:")
    for line in console.splitlines():
        if line.startswith(("[tdx-init]", "HELLO", "configfs-tsm", "module loaded", "arg[")) or "TDX=0:" in line:
            print("    " + line)
    print("[demo] artifacts:")
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            print(f"    {os.path.relpath(path, os.getcwd())}  ({os.path.getsize(path)} bytes)")
    return 0 if "HELLO-DONE" in console else 1


if __name__ == "__main__":
    sys.exit(main())
