"""Init stage: the image's ``/init``, the udhcpc event script and ``authorized_keys``.

``python -m tdx_rules.stages.init --config CONFIG.json --out init.frag``

CONFIG keys: ``name`` (image name), ``program`` (absolute guest path of the
workload), ``args`` (list of strings, or null to pass the kernel command
line's arguments through as ``"$@"``), ``env_vars`` ({name: value}),
``ssh_keys`` (list of public key lines), ``ssh_daemon`` (``{"server", "keygen", "port"}``: the
SSH server the init starts once the network is up, or absent).

The output is a newc fragment (see :mod:`tdx_rules.initramfs.newc`) holding ``init``,
``usr/share/udhcpc/default.script``, the mount points the init needs,
``dev/console`` and, when keys are given, ``root/.ssh/authorized_keys``.
"""

import argparse
import base64
import binascii
import re
import stat
import struct

from ..errors import TdxError
from ..initramfs import newc
from ..render import check_text, render, static
from ._entry import load_config, run

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)

UDHCPC_SCRIPT = "usr/share/udhcpc/default.script"
_DEVICE = re.compile(r"^/dev/[a-z0-9]+$")
# A dm-verity root filesystem: the hash tree's disk, the helper that opens the device, the kernel
# parameter that carries the root hash and the other parameters.
_VERITY_KEYS = ("hash_device", "helper", "parameter")
AUTHORIZED_KEYS = "root/.ssh/authorized_keys"

# Mount points and writable places the init uses; sys/kernel/config appears
# once sysfs is mounted, so it is not shipped.
_DIRECTORIES = (("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                ("run", 0o755), ("sys", 0o555), ("tmp", 0o1777))


def check_program(program) -> str:
    text = check_text("program", program)
    if not text.startswith("/"):
        raise TdxError(f"program {text!r} is not an absolute guest path: write it like /usr/bin/{text or 'app'}")
    return text


def check_args(args):
    """``None`` (pass the kernel's arguments through) or a list of strings."""
    if args is None:
        return None
    if not isinstance(args, (list, tuple)):
        raise TdxError(f"args: expected a list of strings or None, got {args!r}")
    return [check_text(f"args[{index}]", arg) for index, arg in enumerate(args)]


def check_env_vars(env_vars):
    """Sorted (name, value) pairs; names must be shell variable names."""
    if env_vars is None:
        return []
    if not isinstance(env_vars, dict):
        raise TdxError(f"env_vars: expected a dict of name -> value, got {env_vars!r}")
    pairs = []
    for key, value in env_vars.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise TdxError(f"env_vars: {key!r} is not a valid variable name: use letters, digits and _ "
                           f"and do not start with a digit")
        pairs.append((key, check_text(f"env_vars[{key!r}]", value)))
    return sorted(pairs)


def check_ssh_key(index: int, key) -> str:
    """Return the key line normalised (outer whitespace removed) or raise TdxError."""
    what = f"ssh_keys[{index}]"
    if not isinstance(key, str):
        raise TdxError(f"{what}: expected a public key line (string), got {key!r}")
    if "PRIVATE KEY" in key or key.lstrip().startswith("-----BEGIN"):
        raise TdxError(f"{what} is a PRIVATE key: never put it in an image; give the public key (the .pub file)")
    line = key.strip()
    if "\n" in line or "\r" in line:
        raise TdxError(f"{what} spans several lines: give one public key per list entry, each on one line")
    if "\0" in line:
        raise TdxError(f"{what} contains a NUL byte: give the public key line from the .pub file")
    parts = line.split(None, 2)
    if not parts:
        raise TdxError(f"{what} is empty: remove it or give a public key line from a .pub file")
    key_type = parts[0]
    if key_type not in SSH_KEY_TYPES:
        raise TdxError(f"{what}: key type {key_type[:40]!r} is not one of {', '.join(SSH_KEY_TYPES)} "
                       f"(key options before the type are not supported): give '<type> <base64> [comment]'")
    if len(parts) < 2:
        raise TdxError(f"{what}: the base64 key data after {key_type!r} is missing: copy the whole .pub line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise TdxError(f"{what}: the key data after {key_type!r} is not valid base64: copy the whole .pub line") from None
    embedded = None
    if len(blob) >= 4:
        (length,) = struct.unpack(">I", blob[:4])
        if 0 < length <= len(blob) - 4:
            embedded = blob[4:4 + length].decode("ascii", "replace")
    if embedded is None:
        raise TdxError(f"{what}: the key data is too short to be a {key_type} key: copy the whole .pub line")
    if embedded != key_type:
        raise TdxError(f"{what}: the line says {key_type!r} but the key data is a {embedded[:40]!r} key: "
                       f"fix the type or the key")
    return line


def check_ssh_keys(keys):
    if keys is None:
        return []
    if not isinstance(keys, (list, tuple)):
        raise TdxError(f"ssh_keys: expected a list of public key lines, got {keys!r}")
    return [check_ssh_key(index, key) for index, key in enumerate(keys)]


def build_entries(config: dict):
    """The fragment's entries for ``config``, sorted by name."""
    if not isinstance(config, dict):
        raise TdxError(f"init config: expected a JSON object, got {config!r}")
    for key in ("name", "program"):
        if key not in config:
            raise TdxError(f"init config: the key {key!r} is missing: regenerate the config with the TdxImage rule")
    name = check_text("name", config["name"])
    program = check_program(config["program"])
    args = check_args(config.get("args"))
    env_vars = check_env_vars(config.get("env_vars"))
    ssh_keys = check_ssh_keys(config.get("ssh_keys"))

    rootfs_device = config.get("rootfs_device")
    verity = config.get("verity")
    if rootfs_device is not None and not (isinstance(rootfs_device, str) and _DEVICE.match(rootfs_device)):
        raise TdxError(f"init config: rootfs_device {rootfs_device!r} is not a device path like /dev/vda")
    if verity is not None and not (rootfs_device and isinstance(verity, dict) and set(verity) == set(_VERITY_KEYS)
                                   and _DEVICE.match(str(verity["hash_device"]))
                                   and re.match(r"^/[a-z/-]+$", str(verity["helper"]))
                                   and re.match(r"^[a-z.]+$", str(verity["parameter"]))):
        raise TdxError(f"init config: verity {verity!r} is not what the TdxImage rule writes; regenerate the config")
    ssh_daemon = config.get("ssh_daemon")
    if ssh_daemon is not None and not (ssh_keys and isinstance(ssh_daemon, dict)
                                       and set(ssh_daemon) == {"server", "keygen", "port"}
                                       and all(str(ssh_daemon[k]).startswith("/") for k in ("server", "keygen"))
                                       and isinstance(ssh_daemon["port"], int) and 0 < ssh_daemon["port"] < 65536):
        raise TdxError(f"init config: ssh_daemon {ssh_daemon!r} is not what the TdxImage rule writes; "
                       "regenerate the config")
    script = render("init.sh.j2", name=name, program=program, args=args, env_vars=env_vars,
                    ssh_keys=bool(ssh_keys), ssh_daemon=ssh_daemon, rootfs_device=rootfs_device, verity=verity)
    entries = [newc.directory(path, mode) for path, mode in _DIRECTORIES]
    entries.append(newc.Entry("dev/console", stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1))
    entries.append(newc.blob("init", script.encode("utf-8"), 0o755))
    entries.append(newc.blob(UDHCPC_SCRIPT, static("udhcpc.sh"), 0o755))
    if ssh_keys:
        entries.append(newc.directory("root/.ssh", 0o700))
        entries.append(newc.blob(AUTHORIZED_KEYS, "".join(k + "\n" for k in ssh_keys).encode("utf-8"), 0o600))
    return sorted(entries, key=lambda entry: entry.name.encode("utf-8"))


def build_init(config: dict, out_fragment) -> None:
    """Validate ``config`` and write the init fragment to ``out_fragment``."""
    newc.write_fragment(out_fragment, build_entries(config))


def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.init",
                                     description="Write the /init fragment of a TDX guest image.")
    parser.add_argument("--config", required=True, help="stage config (JSON)")
    parser.add_argument("--out", required=True, help="output fragment (newc)")
    options = parser.parse_args(argv)
    build_init(load_config(options.config), options.out)


if __name__ == "__main__":
    run(main)
