"""Boot an image under QEMU software emulation and capture its serial console.

No QEMU here can start a real TD; this boots the same kernel and initramfs
as an ordinary guest (``-accel tcg``), by direct kernel boot or through OVMF,
to prove that the image starts and the workload runs.
"""

import shutil
import subprocess
import threading

from .errors import TdxError


def boot_tcg(kernel: str, initrd: str, *, ovmf: str = None, cmdline: str = "console=ttyS0 panic=-1",
             memory: str = "1G", timeout: float = 180, until: str = None, qemu: str = "qemu-system-x86_64",
             rootfs: str = None) -> str:
    """Boot and return everything the guest printed on its serial console.

    ``rootfs``: an ext4 image attached read-only-safe as a virtio disk (``snapshot=on``:
    the guest's writes never reach the file). Stops when the guest powers off, when ``until`` appears in the output, or
    after ``timeout`` seconds (then raises TdxError with the output so far).
    """
    if shutil.which(qemu) is None:
        raise TdxError(f"{qemu} not found; install it (Debian: apt-get install qemu-system-x86)")
    command = [qemu, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-m", memory, "-smp", "1",
               "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
               "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
               "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    if ovmf:
        command += ["-bios", ovmf]
    if rootfs:
        command += ["-drive", f"file={rootfs.replace(',', ',,')},if=none,id=rootfs,format=raw,snapshot=on",
                    "-device", "virtio-blk-pci,drive=rootfs"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    done = threading.Event()

    def reader():
        for raw in iter(lambda: proc.stdout.read1(4096), b""):
            chunks.append(raw)
            if until and until.encode() in b"".join(chunks[-4:]):
                done.set()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    finished = done.wait(timeout)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    thread.join(5)
    output = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    if not finished:
        raise TdxError(f"the guest did not finish within {timeout:.0f} s; its console so far:\n{output[-3000:]}")
    return output


