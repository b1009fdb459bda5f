"""Boot a built image with its own launch script in local mode and capture its serial console.

No machine here can start a real TD. ``TDX=0`` makes the image's ``<name>-launch-tdx.sh``
(or the self-extracting ``<name>-run-qemu.sh``) start the same firmware, kernel, initramfs and
disk as an ordinary VM, so the demo and the tests boot exactly what users ship. ``ACCEL=tcg``
by default: ``/dev/kvm`` exists on the test machines but does not run guests reliably.
"""

import os
import shutil
import signal
import subprocess
import threading

from .errors import TdxError


def boot_image(script: str, *, until: str = None, timeout: float = 300, accel: str = "tcg", memory: str = "1G",
               cmdline: str = None, env: dict = None, qemu_args=("-no-reboot", "-snapshot"), then=None) -> str:
    """Run ``script`` with ``TDX=0`` and return everything the guest printed on its console.

    ``qemu_args`` are appended to the QEMU command line (by default: exit instead of rebooting,
    and ``-snapshot``, so the guest never writes to the image's disk file). ``cmdline`` and
    ``memory`` override the image's (``CMDLINE``/``MEMORY``). Stops when QEMU exits, when
    ``until`` appears in the output, or after ``timeout`` seconds (then raises TdxError with the
    output so far). The launch script's own notes on stderr are part of the output.
    """
    qemu = (env or {}).get("QEMU") or os.environ.get("QEMU") or "qemu-system-x86_64"
    if shutil.which(qemu) is None:
        raise TdxError(f"{qemu} not found; install it (Debian: apt-get install qemu-system-x86)")
    environ = dict(os.environ, TDX="0", ACCEL=accel, MEMORY=memory, VSOCK_CID="", SSH_PORT="")
    if cmdline is not None:
        environ["CMDLINE"] = cmdline
    environ.update(env or {})
    proc = subprocess.Popen([script, *qemu_args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    chunks = []
    done = threading.Event()

    def reader():
        # The serial console arrives in pieces of any size (often a few bytes): look for
        # ``until`` in a rolling tail of the bytes, not in the last few pieces.
        needle = until.encode() if until else b""
        tail = b""
        for raw in iter(lambda: proc.stdout.read1(4096), b""):
            chunks.append(raw)
            if needle:
                tail = (tail + raw)[-(len(needle) + 4096):]
                if needle in tail:
                    done.set()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    finished = done.wait(timeout)
    try:
        if finished and then is not None and proc.poll() is None:
            then(b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n"))
    finally:
        _stop(proc)
    thread.join(5)
    output = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    if not finished:
        raise TdxError(f"the guest did not finish within {timeout:.0f} s; its console so far:\n{output[-3000:]}")
    return output


def _stop(proc) -> None:
    if proc.poll() is None:
        # The whole group: the runner's QEMU is a child of its shell, which cleans up on SIGTERM.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
