"""THE settings table of the image rule.

One row per option of ``env.TdxImage(...)``: its name, the ``TDX_IMAGE_*``
environment variable that overrides it, the default, the stages that read
it, and the help text. The rule, the stage configs, ``scons -h`` and the
README's option table are all derived from this table.

Precedence (highest first): the environment variable, the keyword given to
``TdxImage``, the default. The environment wins so that CI can change an
image without editing the SConstruct, as with the reference builder.
"""

import dataclasses
import os
import re
import shlex
import sys
import textwrap
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from .errors import TdxError


def _text(name, value):
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TdxError(f"option {name}: expected a string, got {value!r}")
    return str(value)


def _optional_text(name, value):
    return None if value in (None, "") else _text(name, value)


def _count(name, value):
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TdxError(f"option {name}: expected a whole number, got {value!r}") from None
    if number < 1:
        raise TdxError(f"option {name}: must be at least 1, got {value!r}")
    return number


_SIZE = re.compile(r"^([1-9][0-9]*)([MGT])$")


def _memory(name, value):
    text = str(value).strip().upper()
    if text.endswith("B"):
        text = text[:-1]
    if not _SIZE.match(text):
        raise TdxError(f"option {name}: {value!r} is not a memory size; write e.g. '4G' or '512M'")
    return text


def _flag(name, value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise TdxError(f"option {name}: expected on/off, got {value!r}")


def _string_list(name, value, separator=":"):
    if value is None:
        return []
    if isinstance(value, str):
        return [part for part in value.split(separator) if part]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TdxError(f"option {name}: expected a list of strings, got {value!r}")
    return list(value)


def _paths(name, value):
    return _string_list(name, value, ":")


def _args(name, value):
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return _string_list(name, value)


def _ssh_keys(name, value):
    if isinstance(value, str):
        value = [line for line in value.splitlines() if line.strip()]
    return _string_list(name, value)


def _mapping(name, value):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TdxError(f"option {name}: expected a dict of strings, got {value!r}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, (str, int)) or isinstance(item, bool):
            raise TdxError(f"option {name}: entry {key!r}: {item!r} must map a string to a string")
        out[key] = str(item)
    return out


def _extra_files(name, value):
    """guest path -> host path. The variable form is ``host:guest`` pairs separated by commas."""
    if isinstance(value, str):
        pairs = {}
        for item in (part.strip() for part in value.replace("\n", ",").split(",")):
            if not item:
                continue
            host, sep, guest = item.rpartition(":")
            if not sep or not host or not guest.startswith("/"):
                raise TdxError(f"TDX_IMAGE_EXTRA_FILES: {item!r} is not HOST:GUEST with an absolute guest path")
            pairs[guest] = host
        return pairs
    return _mapping(name, value)


def _port_pair(name, value):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(":")
    try:
        host, guest = (int(v) for v in value)
    except (TypeError, ValueError):
        raise TdxError(f"option {name}: expected (host_port, guest_port), got {value!r}") from None
    for port in (host, guest):
        if not 0 < port < 65536:
            raise TdxError(f"option {name}: port {port} is out of range 1-65535")
    return [host, guest]


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    env: Optional[str]
    default: Any
    stages: Tuple[str, ...]
    parse: Callable[[str, Any], Any]
    help: str


SETTINGS = (
    Setting("alpine_version", "TDX_IMAGE_ALPINE_VERSION", "3.21", ("minirootfs",), _text,
            "Alpine release whose minirootfs supplies busybox and musl."),
    Setting("alpine_minor", "TDX_IMAGE_ALPINE_MINOR", "0", ("minirootfs",), _text,
            "Alpine point release (3.21.**0**)."),
    Setting("minirootfs", None, None, ("minirootfs",), _optional_text,
            "Source spec that replaces the Alpine download; `debian` composes it from Debian's busybox-static and musl."),
    Setting("kernel", "TDX_IMAGE_KERNEL", None, ("kernel",), _optional_text,
            "Kernel source spec (`ubuntu-kernel:`, `apt:`, `file:` vmlinuz, or a path); default: the Ubuntu kernel below."),
    Setting("kernel_version", "TDX_IMAGE_KERNEL_VERSION", "6.8.0-55", ("kernel",), _text,
            "Ubuntu kernel version used when `kernel` is not set."),
    Setting("kernel_abi", "TDX_IMAGE_KERNEL_ABI", "57", ("kernel",), _text,
            "Ubuntu kernel ABI number (6.8.0-55.**57**)."),
    Setting("modules_dir", "TDX_IMAGE_KERNEL_MODULES_DIR", None, ("kernel",), _optional_text,
            "Directory holding `lib/modules/<release>` or the `<release>` tree, for a `file:` kernel."),
    Setting("kernel_modules", "TDX_IMAGE_KERNEL_MODULES", [], ("modules",), _paths,
            "Extra modules: names looked up in the kernel's tree or `.ko` files; colon-separated in the variable."),
    Setting("ovmf", "TDX_IMAGE_OVMF", None, ("ovmf",), _optional_text,
            "Firmware source spec (`canonical-ovmf:`, `apt:ovmf`, `file:`, or a path); default: Canonical's TDX OVMF."),
    Setting("ovmf_version", "TDX_IMAGE_OVMF_VERSION", None, ("ovmf",), _optional_text,
            "OVMF release of the launch profile; unset, the version of the firmware package actually used "
            "(Canonical's TDX OVMF `2024.02-3+tdx1.0` when `ovmf` is not set either). Required for a firmware "
            "file that is not a package. The measurements and scripts follow the ovmf stage's choice."),
    Setting("qemu_version", "TDX_IMAGE_QEMU_VERSION", "8.2", ("mrtd", "rtmr1", "rtmr2", "scripts"), _text,
            "QEMU version the image is launched with: the measurement profile (MRTD page order, kernel header "
            "edit) and the launch scripts' syntax (Canonical's TDX 8.2 build before 10.1, upstream from 10.1)."),
    Setting("extra_files", "TDX_IMAGE_EXTRA_FILES", {}, ("cpio",), _extra_files,
            "Files to add: {guest path: host path}; the variable takes comma-separated `HOST:GUEST` pairs."),
    Setting("args", None, None, ("init",), _args,
            "Arguments of the workload; when unset, the kernel command line's arguments pass through as \"$@\"."),
    Setting("env_vars", None, {}, ("init",), _mapping,
            "Environment variables exported before the workload starts."),
    Setting("ssh_keys", None, [], ("init",), _ssh_keys,
            "Public keys written to /root/.ssh/authorized_keys (one line each). With keys, an initramfs "
            "image carries the SSH server of `ssh_server` and starts it once the network is up."),
    Setting("ssh_forward", None, [2222, 22], ("scripts", "init"), _port_pair,
            "(host port, guest port) forwarded by the launch scripts; the SSH server listens on the guest port."),
    Setting("ssh_server", "TDX_IMAGE_SSH_SERVER", "apt:dropbear-bin", ("ssh",), _text,
            "Package spec of the SSH server of images with `ssh_keys`: a Debian package holding "
            "`/usr/sbin/dropbear` and `/usr/bin/dropbearkey`."),
    Setting("ssh_libs", None, ["apt:libc6", "apt:libcrypt1", "apt:libgmp10", "apt:libtomcrypt1", "apt:libtommath1",
                                   "apt:zlib1g"],
            ("ssh",), _string_list,
            "Packages that hold the SSH server's loader and libraries, resolved from its ELF files as "
            "`TdxProgram`'s but never from the host."),
    Setting("cpus", None, 4, ("scripts",), _count, "Virtual CPUs in the launch scripts."),
    Setting("memory", None, "4G", ("scripts", "rtmr1"), _memory,
            "Guest memory in the launch scripts (`4G`, `512M`); RTMR[1] depends on it."),
    Setting("cmdline", None, "console=ttyS0 ip=dhcp", ("scripts", "rtmr2"), _text,
            "Kernel command line; RTMR[2] measures it."),
    Setting("bundle_runner", None, True, ("scripts",), _flag,
            "Also write the self-extracting `<name>-run-qemu.sh` carrying firmware, kernel and initramfs."),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
SKIP_VARIABLE = "TDX_IMAGE_SKIP"


@dataclasses.dataclass(frozen=True)
class Variable:
    """A construction variable the tool sets (``env.SetDefault``) and the builders read."""

    name: str
    default: Callable[[], Any]   # evaluated when the tool is loaded
    shown: str                   # the default as the docs show it
    used_by: Tuple[str, ...]
    help: str


def _python():
    return sys.executable


def default_cache_dir() -> str:
    """``$TDX_RULES_CACHE``, else ``~/.cache/tdx-rules``: the download cache of every project."""
    return os.environ.get("TDX_RULES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tdx-rules")


def _mirror():
    return os.environ.get("TDX_RULES_MIRROR", "")


def _keyring():
    return os.environ.get("TDX_RULES_KEYRING", "")


def _snapshot():
    return os.environ.get("TDX_RULES_SNAPSHOT", "")


def _remote_cache():
    return os.environ.get("TDX_RULES_REMOTE_CACHE", "")


def _remote_cache_push():
    return os.environ.get("TDX_RULES_REMOTE_CACHE_PUSH", "")


_ALL_BUILDERS = ("TdxImage", "TdxStaticProgram", "TdxProgram", "TdxExt4Rootfs", "TdxPack")


VARIABLES = (
    Variable("TDX_CC", lambda: "musl-gcc", "`musl-gcc`", ("TdxStaticProgram",),
             "C compiler for C sources; it must link statically."),
    Variable("TDX_CFLAGS", lambda: "-Os", "`-Os`", ("TdxStaticProgram",), "Flags for TDX_CC."),
    Variable("TDX_CACHE", default_cache_dir, "`$TDX_RULES_CACHE`, else `~/.cache/tdx-rules`",
             ("TdxImage", "TdxProgram", "TdxExt4Rootfs"),
             "Download and artifact cache shared by every project on the machine."),
    Variable("TDX_MIRROR", _mirror, "`$TDX_RULES_MIRROR`, else none", ("TdxImage", "TdxProgram"),
             "Base URL of a mirror tried before the upstream download addresses."),
    Variable("TDX_KEYRING", _keyring, "`$TDX_RULES_KEYRING`, else none", ("TdxImage",),
             "Extra trusted public key files (armored or binary, colon-separated) for the signatures of the "
             "named upstreams, in addition to the keys tdx-rules pins; never instead of them."),
    Variable("TDX_SNAPSHOT", _snapshot, "`$TDX_RULES_SNAPSHOT`, else none", ("TdxImage",),
             "Snapshot archives a locked file that is no longer offered is fetched from, `NAME=URL,...` "
             "(defaults: debian, debian-security at snapshot.debian.org, ubuntu at snapshot.ubuntu.com)."),
    Variable("TDX_REMOTE_CACHE", _remote_cache, "`$TDX_RULES_REMOTE_CACHE`, else none",
             _ALL_BUILDERS + ("TdxRemoteCache",),
             "Base URL of a remote cache shared over HTTP GET/PUT (nginx WebDAV, bazel-remote): a miss of the "
             "local CacheDir asks it for the stage's entry, and fetching stages share downloads through it; "
             "credentials come from `$TDX_RULES_REMOTE_CACHE_AUTH` only (`user:password` or a bearer token)."),
    Variable("TDX_REMOTE_CACHE_PUSH", _remote_cache_push, "`$TDX_RULES_REMOTE_CACHE_PUSH`, else off",
             _ALL_BUILDERS + ("TdxRemoteCache",),
             "Upload built outputs and downloads to TDX_REMOTE_CACHE (`1` or `0`); off, builds only read it."),
    Variable("TDX_PYTHON", _python, "the Python running SCons", _ALL_BUILDERS,
             "Interpreter the stage commands run with (left out of the signatures, so a CacheDir is shared "
             "between machines)."),
    Variable("TDX_VERBOSE", lambda: "", "off (also `VERBOSE=1` on the command line or in the environment)",
             _ALL_BUILDERS,
             "Print each stage's full command instead of its `[tdx] <stage> <name>` line."),
)


def construction_defaults() -> Dict[str, Any]:
    """``{name: default}`` of every construction variable, for ``env.SetDefault``."""
    return {variable.name: variable.default() for variable in VARIABLES}


def help_text(images: Mapping[str, Tuple[str, ...]]) -> str:
    """What ``scons -h`` shows for the images declared so far: ``{name: its stage aliases}``."""
    lines = ["", "tdx-rules images (scons <alias>; outputs under build/tdx/<name>/ unless output_dir= is given):"]
    for name, stages in images.items():
        lines.append(f"  {name:<24} the whole image")
        wrapped = textwrap.wrap("one stage: " + ", ".join(stages), 70)
        lines.append(f"  {name + '-<stage>':<24} {wrapped[0]}")
        lines += [f"  {'':<24} {more}" for more in wrapped[1:]]
    lines.append("")
    lines.append("tdx-rules options (TdxImage keyword; the environment variable wins over the keyword):")
    for setting in SETTINGS:
        default = "" if setting.default in (None, [], {}) else f" [default {setting.default!r}]"
        variable = f" / {setting.env}" if setting.env else ""
        lines.append(f"  {setting.name}{variable}{default}")
        lines.append(f"      {setting.help.replace('`', '').replace('**', '')}")
    lines.append(f"  {SKIP_VARIABLE}=1 skips every image; VERBOSE=1 prints the full commands.")
    return "\n".join(lines) + "\n"


def resolve(options: Mapping[str, Any], environ: Mapping[str, str]) -> Dict[str, Any]:
    """Apply precedence (variable > keyword > default) and parse every setting.

    Unknown keywords are an error naming the closest setting names.
    """
    unknown = sorted(set(options) - set(BY_NAME))
    if unknown:
        raise TdxError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(BY_NAME)}")
    values = {}
    for setting in SETTINGS:
        if setting.env and environ.get(setting.env, "") != "":
            name, raw = setting.env, environ[setting.env]
        elif options.get(setting.name) is not None:
            name, raw = setting.name, options[setting.name]
        else:
            name, raw = setting.name, setting.default
        values[setting.name] = setting.parse(name, raw)
    return values


def for_stage(values: Mapping[str, Any], stage: str) -> Dict[str, Any]:
    """The subset of resolved ``values`` that ``stage`` reads."""
    return {s.name: values[s.name] for s in SETTINGS if stage in s.stages}


def markdown_table() -> str:
    """The README's option table."""
    rows = ["| option | environment variable | default | read by | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = "—" if s.default in (None, [], {}) else f"`{s.default!r}`".replace("'", '"')
        env = f"`{s.env}`" if s.env else "—"
        rows.append(f"| `{s.name}` | {env} | {default} | {', '.join(s.stages)} | {s.help} |")
    return "\n".join(rows)


README_BEGIN = "<!-- settings table: generated by `python -m tdx_rules.settings README.md`; do not edit -->"
README_END = "<!-- end of settings table -->"


def update_readme(path: str) -> bool:
    """Rewrite the settings table between the markers of ``path``; True when it changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    new = text[:start] + "\n" + markdown_table() + "\n" + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(new)
    return new != text


if __name__ == "__main__":
    for readme in sys.argv[1:] or ["README.md"]:
        print(f"{readme}: {'updated' if update_readme(readme) else 'up to date'}")
