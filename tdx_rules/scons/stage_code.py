"""The code each stage runs, by file: a changed file reruns the stage (tests/test_tool.py checks
the table against the modules' real imports)."""

import os

# The package root: STAGE_CODE names files relative to it.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The code each stage runs, besides COMMON: a changed file reruns the stage.
# tests/test_tool.py checks this against the modules' real imports. Package __init__.py files are
# left out: they hold only a docstring (tests/test_layout.py).
COMMON = ("errors.py", "fsutil.py", "stages/_entry.py")
_FETCHING = ("stages/common.py", "upstream/sources.py", "upstream/fetch.py", "upstream/debpkg.py",
             "upstream/signatures.py", "upstream/release.py", "upstream/lock.py", "upstream/remote.py")
_MEASURING = ("stages/measure.py", "measure/profiles.py", "measure/rtmr.py", "measure/rtmr0.py",
              "measure/mrtd.py", "measure/tdvf.py", "measure/pe.py", "measure/kernel_patch.py", "rootfs/verity.py")
STAGE_CODE = {
    "program": ("stages/program.py", "elf.py"),
    "closure": ("stages/closure.py", "initramfs/closure.py", "initramfs/newc.py", "elf.py") + _FETCHING,
    "ssh": ("stages/ssh.py", "stages/closure.py", "initramfs/closure.py", "initramfs/newc.py", "elf.py") + _FETCHING,
    "minirootfs": ("stages/minirootfs.py",) + _FETCHING,
    "busybox": ("stages/busybox.py", "initramfs/newc.py"),
    "kernel": ("stages/kernel.py",) + _FETCHING,
    "modules": ("stages/modules.py", "initramfs/newc.py"),
    "init": ("stages/init.py", "initramfs/newc.py", "render.py", "templates/init.sh.j2", "templates/udhcpc.sh"),
    "cpio": ("stages/cpio.py", "initramfs/newc.py", "elf.py"),
    "compress": ("stages/compress.py", "initramfs/pgzip.py"),
    "ovmf": ("stages/ovmf.py", "measure/profiles.py") + _FETCHING,
    "scripts": ("stages/scripts.py", "render.py", "settings.py", "measure/launch.py", "measure/profiles.py",
                "rootfs/verity.py",
                "templates/launch-tdx.sh.j2", "templates/run-qemu.sh.j2"),
    "manifest": ("stages/manifest.py", "measure/launch.py", "measure/profiles.py", "rootfs/verity.py"),
    "rootfs": ("stages/rootfs.py", "rootfs/verity.py", "rootfs/formats.py", "rootfs/layers.py", "rootfs/tarscan.py",
               "rootfs/member.py", "rootfs/tree.py", "rootfs/ext4.py", "rootfs/ext4_writer.py", "rootfs/ext4_xattr.py",
               "rootfs/htree.py", "rootfs/decompress.py"),
    "pack": ("initramfs/pack.py", "initramfs/pgzip.py", "initramfs/newc.py"),
    "mrtd": _MEASURING,
    "rtmr1": _MEASURING,
    "rtmr2": _MEASURING,
}
# The stages "finalize" stands for in the docs: compression, measurements, scripts, manifest.
FINALIZE = ("compress", "mrtd", "rtmr1", "rtmr2", "scripts", "manifest")
