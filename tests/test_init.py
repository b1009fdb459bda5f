"""The init stage: fragment contents, validation, and the rendered /init run under real busybox."""

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.initramfs import newc
from tdx_rules.stages import init as init_stage
from tests.conftest import fuzz_examples

BUSYBOX = "/bin/busybox"
needs_busybox = pytest.mark.skipif(not os.access(BUSYBOX, os.X_OK), reason="needs /bin/busybox (busybox-static)")

# Values that a shell would mangle if they were ever interpolated unquoted.
TRICKY = [
    "it's",
    'say "hi"',
    "'",
    '"',
    "$(touch pwned-by-dollar-paren)",
    "`touch pwned-by-backtick`",
    "$HOME",
    "${HOME}",
    "$@",
    "$1",
    "*",
    "?",
    "[a]",
    "~",
    "a  b   c",
    " leading and trailing ",
    "line one\nline two",
    "trailing newline\n\n",
    "tab\there",
    "back\\slash\\n",
    "ünïcødé ✓ 漢字 🚀",
    "",
    "-n",
    "--",
    "; echo injected && false || true | cat > x < y & wait",
    "%s%d%%",
    "\r\x1b[31m\x07",
    "#not a comment",
]


def ssh_key(key_type: str, embedded: str = None, comment: str = "user@host") -> str:
    """A syntactically valid public key line (random key material)."""
    embedded = key_type if embedded is None else embedded
    data = struct.pack(">I", len(embedded)) + embedded.encode() + struct.pack(">I", 32) + os.urandom(32)
    line = f"{key_type} {base64.b64encode(data).decode()}"
    return f"{line} {comment}" if comment else line


def config(**overrides) -> dict:
    base = {"name": "test image", "program": "/usr/bin/hello", "args": None, "env_vars": {}, "ssh_keys": []}
    base.update(overrides)
    return base


def unpack(fragment, root) -> dict:
    """Write the fragment's entries below ``root``; return {name: entry}."""
    entries = {}
    for entry in newc.read_entries(fragment):
        entries[entry.name] = entry
        target = os.path.join(root, entry.name)
        if entry.is_dir:
            os.makedirs(target, exist_ok=True)
            os.chmod(target, stat.S_IMODE(entry.mode))
        elif stat.S_ISREG(entry.mode):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as out:
                out.write(newc.read_body(entry))
            os.chmod(target, stat.S_IMODE(entry.mode))
    return entries


def build(tmp_path, cfg, label="image"):
    out = tmp_path / label
    out.mkdir()
    fragment = out / "init.frag"
    init_stage.build_init(cfg, fragment)
    root = out / "root"
    root.mkdir()
    entries = unpack(fragment, root)
    return fragment, root, entries


RECORDER = """#!{python}
import json, os, sys
with open({record!r}, "w") as out:
    json.dump({{"argv": [os.fsencode(a).hex() for a in sys.argv[1:]],
               "env": {{k.hex(): v.hex() for k, v in os.environb.items()}}}}, out)
"""


def recorder(tmp_path):
    """A program that records its arguments and environment as exact bytes."""
    record = tmp_path / "record.json"
    program = tmp_path / "bin dir" / "record-argv"
    program.parent.mkdir()
    program.write_text(RECORDER.format(python=sys.executable, record=str(record)))
    program.chmod(0o755)
    return str(program), record


def read_record(record):
    data = json.loads(record.read_text())
    argv = [bytes.fromhex(a).decode("utf-8") for a in data["argv"]]
    env = {bytes.fromhex(k).decode(): bytes.fromhex(v).decode("utf-8") for k, v in data["env"].items()}
    return argv, env


def run_init(root, extra_args=(), env=None, cwd=None):
    environ = {"PATH": "/usr/bin:/bin", "HOME": "/home/tester"}
    environ.update(env or {})
    return subprocess.run([BUSYBOX, "sh", str(root / "init"), *extra_args], env=environ, cwd=cwd,
                          capture_output=True, timeout=60)


@pytest.fixture
def glob_dir(tmp_path):
    """A working directory where `*`, `?` and `[a]` would match files if they were globbed."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    for name in ("a", "b", "c"):
        (directory / name).write_text("")
    return directory


# --- the fragment -----------------------------------------------------------------------------------------------


def test_fragment_entries_and_modes(tmp_path):
    keys = [ssh_key("ssh-ed25519"), ssh_key("ssh-rsa", comment="")]
    fragment, root, entries = build(tmp_path, config(ssh_keys=keys))
    modes = {name: entry.mode for name, entry in entries.items()}
    assert modes == {
        "dev": stat.S_IFDIR | 0o755,
        "dev/console": stat.S_IFCHR | 0o600,
        "etc": stat.S_IFDIR | 0o755,
        "init": stat.S_IFREG | 0o755,
        "proc": stat.S_IFDIR | 0o555,
        "root": stat.S_IFDIR | 0o700,
        "root/.ssh": stat.S_IFDIR | 0o700,
        "root/.ssh/authorized_keys": stat.S_IFREG | 0o600,
        "run": stat.S_IFDIR | 0o755,
        "sys": stat.S_IFDIR | 0o555,
        "tmp": stat.S_IFDIR | 0o1777,
        "usr/share/udhcpc/default.script": stat.S_IFREG | 0o755,
    }
    assert list(entries) == sorted(entries)
    console = entries["dev/console"]
    assert (console.rdevmajor, console.rdevminor) == (5, 1)
    assert (root / "root/.ssh/authorized_keys").read_text() == "".join(k + "\n" for k in keys)
    assert stat.S_IMODE(os.stat(root / "root/.ssh/authorized_keys").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "root/.ssh").st_mode) == 0o700
    assert (root / "init").read_bytes().startswith(b"#!/bin/sh\n")
    assert (root / "usr/share/udhcpc/default.script").read_bytes().startswith(b"#!/bin/sh\n")


def test_no_keys_no_ssh_dir_and_no_configfs_dir(tmp_path):
    _, root, entries = build(tmp_path, config())
    assert not any(name.startswith("root/.ssh") for name in entries)
    assert "sys/kernel/config" not in entries and "sys/kernel" not in entries
    assert b"chmod 0600 /root/.ssh/authorized_keys" not in (root / "init").read_bytes()


def test_keys_are_stripped_of_outer_whitespace(tmp_path):
    key = ssh_key("ecdsa-sha2-nistp256")
    _, root, _ = build(tmp_path, config(ssh_keys=["  " + key + "\n"]))
    assert (root / "root/.ssh/authorized_keys").read_text() == key + "\n"
    assert b"chmod 0600 /root/.ssh/authorized_keys" in (root / "init").read_bytes()


@pytest.mark.parametrize("key_type", init_stage.SSH_KEY_TYPES)
def test_every_supported_key_type(tmp_path, key_type):
    key = ssh_key(key_type, comment="a comment with spaces")
    _, root, _ = build(tmp_path, config(ssh_keys=[key]))
    assert (root / "root/.ssh/authorized_keys").read_text() == key + "\n"


def test_fragment_is_deterministic(tmp_path):
    cfg = config(args=TRICKY, env_vars={"A": "1", "B": "x y"}, ssh_keys=[ssh_key("ssh-ed25519")])
    first, _, _ = build(tmp_path, cfg, "one")
    second, _, _ = build(tmp_path, dict(reversed(list(cfg.items()))), "two")
    assert first.read_bytes() == second.read_bytes()


def test_env_order_does_not_matter(tmp_path):
    one, _, _ = build(tmp_path, config(env_vars={"A": "1", "B": "2"}), "one")
    two, _, _ = build(tmp_path, config(env_vars={"B": "2", "A": "1"}), "two")
    assert one.read_bytes() == two.read_bytes()


def test_cli_writes_the_fragment_and_reports_errors(tmp_path):
    cfg = tmp_path / "init.json"
    cfg.write_text(json.dumps(config(args=["x"])))
    out = tmp_path / "out" / "init.frag"
    done = subprocess.run([sys.executable, "-m", "tdx_rules.stages.init", "--config", str(cfg), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "init" in {entry.name for entry in newc.read_entries(out)}

    cfg.write_text(json.dumps(config(env_vars={"BAD-NAME": "x"})))
    done = subprocess.run([sys.executable, "-m", "tdx_rules.stages.init", "--config", str(cfg), "--out",
                           str(tmp_path / "bad.frag")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("tdx-rules: error: ") and done.stderr.count("\n") == 1
    assert "BAD-NAME" in done.stderr
    assert not (tmp_path / "bad.frag").exists()


# --- validation ---------------------------------------------------------------------------------------------------


def refused(cfg, *needles):
    with pytest.raises(TdxError) as info:
        init_stage.build_entries(cfg)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "", "Ä", "A=B", "A\nB", "$X", "a.b"])
def test_invalid_env_names_are_refused(name):
    refused(config(env_vars={name: "value"}), repr(name))


def test_nul_in_values_is_refused():
    refused(config(env_vars={"X": "a\0b"}), "X", "NUL")
    refused(config(args=["ok", "a\0b"]), "args[1]", "NUL")


def test_relative_program_is_refused():
    refused(config(program="hello"), "absolute")


def test_multi_line_key_is_refused():
    two = ssh_key("ssh-ed25519") + "\n" + ssh_key("ssh-rsa")
    refused(config(ssh_keys=[ssh_key("ssh-ed25519"), two]), "ssh_keys[1]", "line")


def test_private_key_is_refused():
    private = ("-----BEGIN OPENSSH PRIVATE KEY-----\n"
               + base64.b64encode(os.urandom(120)).decode() + "\n-----END OPENSSH PRIVATE KEY-----\n")
    refused(config(ssh_keys=[private]), "ssh_keys[0]", "PRIVATE", ".pub")


def test_mismatched_key_type_is_refused():
    refused(config(ssh_keys=[ssh_key("ssh-rsa", embedded="ssh-ed25519")]), "ssh_keys[0]", "ssh-rsa", "ssh-ed25519")


def test_invalid_base64_is_refused():
    refused(config(ssh_keys=["ssh-ed25519 AAAA$$$notbase64 user@host"]), "ssh_keys[0]", "base64")
    refused(config(ssh_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"]), "ssh_keys[0]", "base64")


def test_other_bad_keys_are_refused():
    refused(config(ssh_keys=["ssh-dss " + base64.b64encode(b"x").decode()]), "ssh_keys[0]", "ssh-dss")
    refused(config(ssh_keys=["ssh-ed25519"]), "ssh_keys[0]", "missing")
    refused(config(ssh_keys=["   "]), "ssh_keys[0]", "empty")
    refused(config(ssh_keys=["ssh-ed25519 " + base64.b64encode(b"\0\0").decode()]), "ssh_keys[0]", "short")
    refused(config(ssh_keys=[ssh_key("ssh-ed25519"), 42]), "ssh_keys[1]")


# --- running the rendered /init under busybox ---------------------------------------------------------------------


@needs_busybox
def test_syntax_of_rendered_scripts(tmp_path):
    _, root, _ = build(tmp_path, config(args=TRICKY, env_vars={f"V{i}": v for i, v in enumerate(TRICKY)},
                                        ssh_keys=[ssh_key("ssh-ed25519")]))
    for script in (root / "init", root / "usr/share/udhcpc/default.script"):
        for checker in ([BUSYBOX, "sh", "-n"], ["bash", "-n"]):
            done = subprocess.run([*checker, str(script)], capture_output=True, text=True)
            assert done.returncode == 0, (checker, script, done.stderr)


@needs_busybox
def test_tricky_values_arrive_verbatim(tmp_path, glob_dir):
    program, record = recorder(tmp_path)
    env_vars = {f"VAR_{i}": value for i, value in enumerate(TRICKY)}
    env_vars["lower_case"] = "mixed $CASE"
    _, root, _ = build(tmp_path, config(program=program, args=TRICKY, env_vars=env_vars))
    done = run_init(root, extra_args=["ignored", "because args are set"], cwd=glob_dir)
    assert done.returncode == 0, done.stderr
    argv, env = read_record(record)
    assert argv == TRICKY
    for key, value in env_vars.items():
        assert env[key] == value, key
    assert env["HOME"] == "/home/tester"
    assert done.stdout.decode().splitlines()[-1] == f"[tdx-init] starting {program}"
    assert not list(glob_dir.glob("pwned*")) and not list(tmp_path.rglob("pwned*"))
    # Not PID 1: no system setup, no messages other than the start line.
    assert "configfs-tsm" not in done.stdout.decode()


@needs_busybox
def test_empty_args_list_means_no_arguments(tmp_path):
    program, record = recorder(tmp_path)
    _, root, _ = build(tmp_path, config(program=program, args=[]))
    done = run_init(root, extra_args=["not", "passed"])
    assert done.returncode == 0, done.stderr
    assert read_record(record)[0] == []


@needs_busybox
def test_null_args_pass_the_command_line_through(tmp_path, glob_dir):
    program, record = recorder(tmp_path)
    _, root, _ = build(tmp_path, config(program=program, args=None, env_vars={"ONLY": "x"}))
    done = run_init(root, extra_args=TRICKY, cwd=glob_dir)
    assert done.returncode == 0, done.stderr
    argv, env = read_record(record)
    assert argv == TRICKY
    assert env["ONLY"] == "x"

    done = run_init(root, extra_args=[])
    assert done.returncode == 0, done.stderr
    assert read_record(record)[0] == []


@needs_busybox
def test_program_path_with_spaces_and_quotes(tmp_path):
    program, record = recorder(tmp_path)
    odd = tmp_path / "it's a \"dir\" $(x)" / "my prog"
    odd.parent.mkdir()
    shutil.copy(program, odd)
    _, root, _ = build(tmp_path, config(program=str(odd), args=["one"]))
    done = run_init(root)
    assert done.returncode == 0, done.stderr
    assert read_record(record)[0] == ["one"]
    assert f"[tdx-init] starting {odd}" in done.stdout.decode()


@needs_busybox
def test_missing_program_fails(tmp_path):
    _, root, _ = build(tmp_path, config(program=str(tmp_path / "does-not-exist")))
    done = run_init(root)
    assert done.returncode != 0


_value_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@needs_busybox
@settings(max_examples=fuzz_examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(_value_text, max_size=5),
       env=st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), _value_text, max_size=4))
def test_any_text_arrives_verbatim(tmp_path_factory, args, env):
    tmp_path = tmp_path_factory.mktemp("prop")
    program, record = recorder(tmp_path)
    _, root, _ = build(tmp_path, config(program=program, args=args, env_vars=env))
    done = run_init(root)
    assert done.returncode == 0, done.stderr
    argv, seen = read_record(record)
    assert argv == args
    for key, value in env.items():
        assert seen[key] == value


# --- the udhcpc event script ----------------------------------------------------------------------------------------


FAKE_IP = """#!/bin/sh
printf '%s\\n' "ip $*" >> "$LOG"
case "$*" in
    *"route del"*) exit 1 ;;
    *"addr show"*) exit 0 ;;
esac
exit 0
"""


def _can_unshare():
    if not shutil.which("unshare") or not os.access(BUSYBOX, os.X_OK):
        return False
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--net", "true"], capture_output=True)
    return done.returncode == 0


CAN_UNSHARE = _can_unshare()


@needs_busybox
@pytest.mark.skipif(not CAN_UNSHARE or not os.access("/bin/dash", os.X_OK),
                    reason="needs dash and a network namespace (the script must never touch the host's network)")
def test_udhcpc_script_applies_a_lease(tmp_path):
    # busybox sh runs its own applets before anything on PATH, so the script runs under dash here, with a
    # fake `ip` first on PATH, and in a fresh network namespace in case anything still reached a real `ip`.
    _, root, _ = build(tmp_path, config())
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    (bindir / "ip").write_text(FAKE_IP)
    (bindir / "ip").chmod(0o755)
    for applet in ("grep", "mv"):
        os.symlink(BUSYBOX, bindir / applet)
    log, resolv = tmp_path / "ip.log", tmp_path / "resolv.conf"
    env = {"PATH": str(bindir), "LOG": str(log), "RESOLV_CONF": str(resolv), "interface": "eth0",
           "ip": "10.0.2.15", "mask": "24", "broadcast": "10.0.2.255", "router": "10.0.2.2 10.0.2.1",
           "dns": "10.0.2.3 1.1.1.1", "domain": "example.test"}
    script = str(root / "usr/share/udhcpc/default.script")

    def event(name):
        return subprocess.run([shutil.which("unshare"), "--net", "/bin/dash", script, name], env=env,
                              capture_output=True, text=True, timeout=30)

    done = event("bound")
    assert done.returncode == 0, done.stderr
    assert resolv.read_text() == "search example.test\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n"
    calls = log.read_text().splitlines()
    assert calls == [
        "ip -4 addr show dev eth0",
        "ip -4 addr flush dev eth0",
        "ip -4 addr add 10.0.2.15/24 broadcast 10.0.2.255 dev eth0",
        "ip -4 route del default dev eth0",
        "ip -4 route add default via 10.0.2.2 dev eth0 metric 0",
        "ip -4 route add default via 10.0.2.1 dev eth0 metric 1",
    ]
    assert "[udhcpc] eth0: 10.0.2.15/24" in done.stdout

    log.write_text("")
    done = event("deconfig")
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["ip link set dev eth0 up", "ip -4 addr flush dev eth0"]


# --- as PID 1 (pid, mount and network namespaces, chroot into the unpacked fragment) -----------------------------------


PID1_PROGRAM = """#!/bin/sh
printf '%s\\n' "$$" > /result.pid
for arg in "$@"; do printf '%s\\0' "$arg"; done > /result.argv
printf '%s' "$GREETING" > /result.env
"""

@pytest.mark.skipif(not CAN_UNSHARE, reason="needs busybox and permission to create namespaces")
def test_init_as_pid1(tmp_path):
    args = ["x y", "$(nope)", "it's"]
    _, root, _ = build(tmp_path, config(program="/bin/workload", args=args, env_vars={"GREETING": "hello\nworld"},
                                        ssh_keys=[ssh_key("ssh-ed25519")]))
    for directory in ("bin", f"lib/modules/{os.uname().release}"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", root / "bin" / applet)
    (root / "bin/workload").write_text(PID1_PROGRAM)
    (root / "bin/workload").chmod(0o755)
    (root / f"lib/modules/{os.uname().release}/tdx-rules.load").write_text(
        "tdx_rules_test_no_module_a\n\n# comment\ntdx_rules_test_no_module_b")
    (root / "etc/alpine-release").write_text("3.21.0\n")

    command = [shutil.which("unshare"), "--pid", "--fork", "--mount", "--net",
               shutil.which("chroot"), str(root), "/bin/sh", "/init"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"HOME": "/", "TERM": "linux"})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "[tdx-init] image test image" in lines
    # The chroot has no modules (and busybox sh always runs its own modprobe), so every load fails and is reported.
    failures = [line for line in lines if line.startswith("[tdx-init] modprobe ")]
    assert failures == ["[tdx-init] modprobe tdx_rules_test_no_module_a failed (continuing)",
                        "[tdx-init] modprobe tdx_rules_test_no_module_b failed (continuing)"]
    assert any(line in ("[tdx-init] configfs-tsm: present", "[tdx-init] configfs-tsm: absent") for line in lines)
    assert f"[tdx-init] kernel: {os.uname().release}" in lines
    assert "[tdx-init] alpine: 3.21.0" in lines
    assert any(line.startswith("[tdx-init] memory: ") for line in lines)
    assert any(line.startswith("[tdx-init] cpus: ") for line in lines)
    assert lines[-1] == "[tdx-init] starting /bin/workload"
    assert (root / "result.pid").read_text() == "1\n"
    assert (root / "result.argv").read_text().split("\0")[:-1] == args
    assert (root / "result.env").read_text() == "hello\nworld"
    assert stat.S_IMODE(os.stat(root / "root/.ssh/authorized_keys").st_mode) == 0o600


def test_sh_filter():
    from tdx_rules.render import render, sh_quote
    assert sh_quote("plain") == "plain"
    assert sh_quote(22) == "22"
    assert sh_quote("it's $x") == "'it'\"'\"'s $x'"
    assert sh_quote("") == "''"
    with pytest.raises(TdxError, match="NUL"):
        sh_quote("a\0b")
    with pytest.raises(TypeError):
        sh_quote(None)
    with pytest.raises(Exception, match="undefined"):
        render("init.sh.j2", name="x", program="/p", args=None, env_vars=[])  # ssh_keys missing: StrictUndefined


def test_template_states_the_quoting_rule(tmp_path):
    _, root, _ = build(tmp_path, config())
    assert "QUOTING RULE" in (root / "init").read_text()
