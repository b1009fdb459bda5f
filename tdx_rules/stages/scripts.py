"""Scripts stage: ``launch-tdx.sh`` and the self-extracting ``run-qemu.sh``.

``python -m tdx_rules.stages.scripts --config C.json --ovmf F --kernel K --initrd I
--ovmf-profile P.json --launch OUT.sh [--runner OUT-run-qemu.sh]``

CONFIG keys: ``name``, ``memory`` ("4G"), ``cpus`` (int), ``cmdline``,
``ssh_forward`` ([host port, guest port] or null), ``bundle_runner`` (bool;
``--runner`` is given exactly when it is true), ``qemu_version`` (the TD syntax:
:func:`tdx_rules.measure.launch.launch_for`). The ovmf stage's profile says whether
the firmware starts only inside a trust domain (then ``TDX=0`` boots without it).

Only the file names of the firmware, kernel and initramfs go into the
scripts: the launch script finds them beside itself, the runner carries them
in a deterministic tar archive after its header.
"""

import argparse
import os
import stat
import tarfile

from ..errors import TdxError
from ..fsutil import atomic_output, read_json_object
from ..measure.launch import QGS_CID, QGS_PORT, launch_for
from ..render import check_text, render
from ..rootfs import verity
from ..settings import BY_NAME
from ._entry import load_config, run

MARKER = "__TDX_RULES_PAYLOAD_BELOW__"

_ROLES = ("ovmf", "kernel", "initrd")


def check_config(config) -> dict:
    """The validated script settings of ``config``."""
    if not isinstance(config, dict):
        raise TdxError(f"scripts config: expected a JSON object, got {config!r}")
    missing = [key for key in ("name", "memory", "cpus", "cmdline") if key not in config]
    if missing:
        raise TdxError(f"scripts config: key(s) {', '.join(missing)} missing: regenerate the config with the TdxImage rule")
    name, cmdline = (check_text(f"option {key}", config[key]) for key in ("name", "cmdline"))
    return {
        "name": name,
        "memory": BY_NAME["memory"].parse("memory", config["memory"]),
        "cpus": BY_NAME["cpus"].parse("cpus", config["cpus"]),
        "cmdline": cmdline,
        "ssh_forward": BY_NAME["ssh_forward"].parse("ssh_forward", config.get("ssh_forward")),
        "bundle_runner": BY_NAME["bundle_runner"].parse("bundle_runner", config.get("bundle_runner", True)),
        "launch": launch_for(BY_NAME["qemu_version"].parse("qemu_version", config.get("qemu_version", BY_NAME["qemu_version"].default))),
    }


def _inputs(ovmf, kernel, initrd, rootfs=None, rootfs_hash=None) -> dict:
    """{role: (path, basename)} after checking the files and their names (the root filesystem and
    its dm-verity hash tree are optional)."""
    inputs = {}
    for role, path in zip(_ROLES + ("rootfs", "rootfs_hash"), (ovmf, kernel, initrd, rootfs, rootfs_hash)):
        if path is None:
            continue
        path = os.fspath(path)
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise TdxError(f"{role} input {path}: {error.strerror}: build it first") from None
        if not stat.S_ISREG(mode):
            raise TdxError(f"{role} input {path} is not a regular file: point it at the built file")
        base = os.path.basename(path)
        if base in ("", ".", "..") or "\n" in base or base.startswith("-"):
            raise TdxError(f"{role} input {path}: the file name {base!r} cannot be used in a script: rename it")
        inputs[role] = (path, base)
    names = [base for _, base in inputs.values()]
    if len(set(names)) != len(names):
        raise TdxError(f"the inputs share a file name ({', '.join(names)}): give them distinct names")
    return inputs


def _context(settings: dict, inputs: dict, tdx_only_firmware: bool = False) -> dict:
    context = {key: settings[key] for key in ("name", "memory", "cpus", "cmdline", "ssh_forward", "launch")}
    context.update(rootfs=None, rootfs_hash=None, qgs_cid=QGS_CID, qgs_port=QGS_PORT,
                   tdx_only_firmware=tdx_only_firmware)
    context.update({role: base for role, (_, base) in inputs.items()})
    return context


def runner_header(context: dict) -> bytes:
    """The runner's shell header, ending with the marker line."""
    first = render("run-qemu.sh.j2", payload_line=0, marker=MARKER, **context)
    start = first.count("\n") + 1
    header = render("run-qemu.sh.j2", payload_line=start, marker=MARKER, **context)
    if header.count("\n") + 1 != start or not header.endswith("\n" + MARKER + "\n"):
        raise AssertionError("run-qemu.sh.j2 must end with the marker line")
    return header.encode("utf-8")


def write_payload(out, inputs: dict) -> None:
    """Append a deterministic tar archive of the inputs to ``out``, streaming each file."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, base in sorted(inputs.values(), key=lambda item: item[1].encode("utf-8", "surrogateescape")):
            info = tarfile.TarInfo(base)
            info.size = os.stat(path).st_size
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            with open(path, "rb") as body:
                try:
                    tar.addfile(info, body)
                except OSError as error:
                    raise TdxError(f"{path}: {error}: the file changed while it was bundled; rebuild") from None


def build_scripts(config: dict, ovmf, kernel, initrd, out_launch, out_runner=None, rootfs=None,
                  tdx_only_firmware: bool = False, verity_hash=None, roothash=None) -> None:
    """Write the launch script and, when ``bundle_runner`` is on, the self-extracting runner.

    ``rootfs``: an ext4 image attached as a virtio disk (the image's init mounts it); the launch
    script names it relative to itself, the runner carries it.
    ``tdx_only_firmware``: the firmware starts only inside a trust domain.
    ``verity_hash``, ``roothash``: the rootfs's dm-verity hash tree, attached as a second disk, and
    its root hash, whose parameters join the default command line.
    """
    settings = check_config(config)
    if settings["bundle_runner"] and out_runner is None:
        raise TdxError("bundle_runner is on but no runner output was given: pass --runner OUT-run-qemu.sh")
    if not settings["bundle_runner"] and out_runner is not None:
        raise TdxError("bundle_runner is off but a runner output was given: drop --runner or turn bundle_runner on")
    if verity_hash is not None and rootfs is None:
        raise TdxError("a dm-verity hash tree without its root filesystem: pass --rootfs too")
    settings["cmdline"] = verity.command_line(settings["cmdline"], verity_hash, roothash)
    inputs = _inputs(ovmf, kernel, initrd, rootfs, verity_hash)
    context = _context(settings, inputs, tdx_only_firmware)

    launch_context = dict(context)
    for role in ("rootfs", "rootfs_hash"):  # the disks stay where TdxExt4Rootfs wrote them
        if role in inputs:
            launch_context[role] = os.path.relpath(os.path.abspath(inputs[role][0]),
                                                   os.path.dirname(os.path.abspath(out_launch)))
    launch = render("launch-tdx.sh.j2", **launch_context).encode("utf-8")
    with atomic_output(out_launch) as out:
        out.write(launch)
    os.chmod(out_launch, 0o755)

    if out_runner is not None:
        header = runner_header(context)
        with atomic_output(out_runner) as out:
            out.write(header)
            write_payload(out, inputs)
        os.chmod(out_runner, 0o755)


def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.scripts",
                                     description="Write the launch scripts of a TDX guest image.")
    parser.add_argument("--config", required=True, help="stage config (JSON)")
    parser.add_argument("--ovmf", required=True, help="TDX firmware file")
    parser.add_argument("--kernel", required=True, help="kernel file")
    parser.add_argument("--initrd", required=True, help="initramfs file")
    parser.add_argument("--ovmf-profile", required=True, help="the ovmf stage's ovmf.profile.json")
    parser.add_argument("--rootfs", help="ext4 root filesystem attached as a virtio disk")
    parser.add_argument("--verity-hash", help="its dm-verity hash tree, attached as a second disk")
    parser.add_argument("--roothash", help="the tree's root hash file")
    parser.add_argument("--launch", required=True, help="output: launch-tdx.sh")
    parser.add_argument("--runner", help="output: self-extracting run-qemu.sh (only with bundle_runner)")
    options = parser.parse_args(argv)
    profile = read_json_object(options.ovmf_profile, "ovmf profile", "rebuild the image (scons)")
    build_scripts(load_config(options.config), options.ovmf, options.kernel, options.initrd,
                  options.launch, options.runner, options.rootfs, bool(profile.get("tdx_only")),
                  options.verity_hash, options.roothash)


if __name__ == "__main__":
    run(main)
