"""An SSH login into the image: Debian's dropbear, its libraries from verified packages, the
host key made at first boot, and OpenSSH's client on the launch script's port forward."""

import hashlib
import json
import os
import socket
import subprocess

import pytest

from tdx_rules.boot import boot_image
from tdx_rules.errors import TdxError
from tdx_rules.initramfs import newc
from tdx_rules.stages import cpio

from .conftest import FAST_SETUP, fast_options, scons, stages_run, write_project

# A workload that stays up, so that the guest runs while the test logs in.
WAITER_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    puts("WAITER-UP");
    fflush(stdout);
    for (;;) pause();
}
"""


def ssh_keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@host", "-f", str(path)], check=True)
    return open(f"{path}.pub").read().strip()


def cpio_members(path):
    with open(path, "rb") as handle:
        data = handle.read()
    out, offset = {}, 0
    while True:
        fields = newc.header_fields(data[offset:offset + newc.HEADER_LEN])
        name_size, size = fields[11], fields[6]
        name_start = offset + newc.HEADER_LEN
        name = data[name_start:name_start + name_size - 1].decode()
        body = name_start + name_size + (-(newc.HEADER_LEN + name_size) % 4)
        if name == newc.TRAILER:
            return out
        out[name] = (fields[1], data[body:body + size])
        offset = body + size + (-size % 4)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    where = tmp_path_factory.mktemp("keys")
    return {name: (where / name, ssh_keygen(where / name)) for name in ("good", "wrong")}


@pytest.fixture(scope="module")
def ssh_project(tmp_path_factory, small_kernel, keys):
    project = write_project(tmp_path_factory.mktemp("ssh") / "proj", fast_options(small_kernel), FAST_SETUP)
    with open(os.path.join(project, "hello.c"), "w") as handle:
        handle.write(WAITER_C)
    with open(os.path.join(project, "opts.json"), "w") as handle:
        json.dump({"ssh_keys": [keys["good"][1]]}, handle)
    result = scons(project)
    assert "ssh" in stages_run(result)
    return project


def out_file(project, name):
    return os.path.join(project, "build", "tdx", "hello", name)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ssh(port, key, known_hosts, command):
    return subprocess.run(
        ["ssh", "-p", str(port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "ConnectTimeout=60",
         "-o", "PasswordAuthentication=no", "-F", "/dev/null", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=180)


def test_openssh_logs_in_with_the_image_key_and_a_wrong_key_is_refused(ssh_project, keys, tmp_path, small_kernel):
    port = free_port()
    seen = {}

    def log_in(console):
        # The host key was made at this boot; its public half is on the console: pin it.
        line = next(x for x in console.splitlines() if "ssh host key: " in x)
        host_key = line.split("ssh host key: ", 1)[1].split()
        assert host_key[0] == "ssh-ed25519" and len(host_key) >= 2, line
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        seen["good"] = ssh(port, keys["good"][0], known_hosts, "echo ssh-ok; uname -r; id -u")
        seen["wrong"] = ssh(port, keys["wrong"][0], known_hosts, "echo should-not-run")
        other = tmp_path / "other_known_hosts"  # a host key other than the console's is not accepted
        other.write_text(f"[127.0.0.1]:{port} {keys['good'][1]}\n")
        seen["spoofed"] = ssh(port, keys["good"][0], other, "echo should-not-run")

    console = boot_image(out_file(ssh_project, "hello-launch-tdx.sh"), until="ssh server listening on port 22",
                         timeout=400, env={"SSH_PORT": str(port)}, then=log_in)
    assert "cannot start the SSH server" not in console and "cannot make the SSH host key" not in console
    good = seen["good"]
    assert good.returncode == 0, good.stderr
    assert good.stdout.split() == ["ssh-ok", small_kernel["release"], "0"], good.stdout
    wrong = seen["wrong"]
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr, wrong.stderr
    assert "should-not-run" not in wrong.stdout
    spoofed = seen["spoofed"]
    assert spoofed.returncode == 255 and "Host key verification failed" in spoofed.stderr, spoofed.stderr


def test_host_key_is_made_in_the_guest_not_shipped(ssh_project):
    members = cpio_members(os.path.join(out_file(ssh_project, "work"), "hello-initramfs.cpio"))
    assert members["etc/dropbear"][0] == 0o040700
    assert not [name for name in members if name.startswith("etc/dropbear/")]
    assert not [name for name, (_, body) in members.items() if b"PRIVATE KEY" in body]
    init = members["init"][1].decode()
    assert "dropbearkey -t ed25519" in init and "/usr/sbin/dropbear -r" in init


def test_server_files_are_the_bytes_dpkg_deb_unpacks(ssh_project, tmp_path):
    manifest = json.load(open(out_file(ssh_project, "hello-manifest.json")))
    members = cpio_members(os.path.join(out_file(ssh_project, "work"), "hello-initramfs.cpio"))
    packages = {record["package"]: record for record in manifest["inputs"]["ssh"]}
    assert {"dropbear-bin", "libc6", "libtomcrypt1", "libtommath1"} <= set(packages)
    unpacked = {}
    for package, record in packages.items():
        subprocess.run(["apt-get", "download", "-q", f"{package}={record['version']}"], cwd=tmp_path, check=True,
                       capture_output=True)
        deb = next(tmp_path / name for name in os.listdir(tmp_path) if name.startswith(package + "_"))
        assert hashlib.sha256(deb.read_bytes()).hexdigest() == record["sha256"]
        unpacked[package] = tmp_path / ("x-" + package)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked[package])], check=True)
    files = manifest["ssh"]["files"]
    assert {"/usr/sbin/dropbear", "/usr/bin/dropbearkey", "/lib64/ld-linux-x86-64.so.2"} <= {f["path"] for f in files}
    for item in files:
        mode, body = members[item["path"].lstrip("/")]
        if "link" in item:
            assert body.decode() == item["link"] and mode & 0o170000 == 0o120000
            continue
        source = unpacked[item["from"]["package"]] / item["from"]["member"]
        assert hashlib.sha256(source.read_bytes()).hexdigest() == item["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["ssh"]["interpreter"] == "/lib64/ld-linux-x86-64.so.2"


def test_image_without_keys_has_no_server_and_no_network_driver(fast_project):
    result = scons(fast_project)
    assert "ssh" not in stages_run(result)
    members = cpio_members(os.path.join(out_file(fast_project, "work"), "hello-initramfs.cpio"))
    assert not [name for name in members if "dropbear" in name or name.startswith("lib64")]
    assert b"dropbear" not in members["init"][1]
    assert not [name for name in members if name.endswith("/virtio_net.ko")]
    assert "ssh" not in json.load(open(out_file(fast_project, "hello-manifest.json")))


def test_network_driver_is_bundled_with_the_server(ssh_project):
    members = cpio_members(os.path.join(out_file(ssh_project, "work"), "hello-initramfs.cpio"))
    load = next(body for name, (_, body) in members.items() if name.endswith("/tdx-rules.load")).decode().split()
    assert "virtio_net" in load and load.index("failover") < load.index("net_failover") < load.index("virtio_net")


def test_changed_key_does_not_rerun_the_ssh_stage_and_changed_libs_do(ssh_project, keys):
    opts = os.path.join(ssh_project, "opts.json")
    with open(opts, "w") as handle:
        json.dump({"ssh_keys": [keys["wrong"][1]]}, handle)
    try:
        ran = stages_run(scons(ssh_project))
        assert "init" in ran and "cpio" in ran and "ssh" not in ran
    finally:
        with open(opts, "w") as handle:
            json.dump({"ssh_keys": [keys["good"][1]]}, handle)
        scons(ssh_project)
    assert stages_run(scons(ssh_project)) == set()


def failed_build(small_kernel, tmp_path, keys, options):
    """(the project, scons's result, its ``scons: ***`` lines) of an image with keys and ``options``."""
    project = write_project(tmp_path / "p", fast_options(small_kernel) + options, FAST_SETUP)
    with open(os.path.join(project, "opts.json"), "w") as handle:
        json.dump({"ssh_keys": [keys["good"][1]]}, handle)
    result = scons(project, check=False)
    return project, result, [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]


def test_missing_server_library_is_one_line_naming_ssh_libs(small_kernel, tmp_path, keys):
    project, result, errors = failed_build(small_kernel, tmp_path, keys, ", ssh_libs=['apt:libc6']")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "libtomcrypt.so.1 (needed by dropbear)" in errors[0], result.stderr
    assert "ssh_libs" in errors[0]
    assert not os.path.exists(os.path.join(project, "build", "tdx", "hello", "work", "ssh.frag"))


def test_a_package_without_dropbear_is_refused_in_one_line(small_kernel, tmp_path, keys):
    _, result, errors = failed_build(small_kernel, tmp_path, keys, ", ssh_server='apt:libtommath1'")
    assert len(errors) == 1 and "holds no /usr/sbin/dropbear" in errors[0] and "ssh_server" in errors[0], result.stderr


def test_lock_pins_each_server_package_under_its_own_spec(ssh_project):
    fragment = os.path.join(out_file(ssh_project, "work"), "ssh.frag")
    before = open(fragment, "rb").read()
    scons(ssh_project, "--tdx-lock")
    lock = json.load(open(os.path.join(ssh_project, "tdx.lock")))
    manifest = json.load(open(out_file(ssh_project, "hello-manifest.json")))
    for record in manifest["inputs"]["ssh"]:
        pinned = lock["specs"][record["spec"]]
        assert [(p["package"], p["version"], p["sha256"]) for p in pinned] == [
            (record["package"], record["version"], record["sha256"])]
    # Built from the lock (the stage's config now carries it): the same fragment, then no rerun.
    assert "ssh" in stages_run(scons(ssh_project))
    assert open(fragment, "rb").read() == before
    assert stages_run(scons(ssh_project)) == set()
    os.remove(os.path.join(ssh_project, "tdx.lock"))
    scons(ssh_project)


def library_fragment(path, entries):
    newc.write_fragment(str(path), entries)
    return str(path)


def test_library_fragments_share_only_identical_files(tmp_path):
    base = library_fragment(tmp_path / "base.frag", [newc.blob("bin/sh", b"busybox", 0o755)])
    libc = tmp_path / "libc"
    libc.write_bytes(b"libc bytes")
    same = library_fragment(tmp_path / "a.frag", [newc.disk_file("lib/libc.so.6", str(libc), 0o755)])
    also = library_fragment(tmp_path / "b.frag", [newc.blob("lib/libc.so.6", b"libc bytes", 0o755)])
    other = library_fragment(tmp_path / "c.frag", [newc.blob("lib/libc.so.6", b"other libc", 0o755)])
    mode = library_fragment(tmp_path / "e.frag", [newc.blob("lib/libc.so.6", b"libc bytes", 0o644)])
    clash = library_fragment(tmp_path / "d.frag", [newc.blob("bin/sh", b"another shell", 0o755)])
    layers = cpio._library_layers([("the libraries of x", same), ("the SSH server", also)], [])
    assert [[e.name for e in layer] for layer in layers] == [["lib/libc.so.6"], ["lib/libc.so.6"]]
    for different in (other, mode):
        with pytest.raises(TdxError, match=r"/lib/libc.so.6 comes from the libraries of x and from the SSH server, "
                                           "as two different files"):
            cpio._library_layers([("the libraries of x", same), ("the SSH server", different)], [])
    config = {"program_path": "/usr/bin/x", "extra_files": {}}
    with pytest.raises(TdxError, match=r"/bin/sh comes both from the base of the image and from the SSH server"):
        cpio.build_cpio([base], None, config, str(tmp_path / "three.cpio"), ssh=clash)
    assert not (tmp_path / "three.cpio").exists()


GLIBC_C = "#include <stdio.h>\nint main(void) { puts(\"GLIBC-SSH\"); return 0; }\n"


def test_glibc_workload_and_server_share_the_loader_and_libc(small_kernel, tmp_path, keys):
    project = tmp_path / "glibc"
    project.mkdir()
    (project / "app.c").write_text(GLIBC_C)
    subprocess.run(["gcc", "-O2", "-o", str(project / "app.bin"), str(project / "app.c")], check=True)
    (project / "SConstruct").write_text(
        "import tdx_rules\n"
        "DefaultEnvironment(tools=[])\n"
        "env = Environment(tools=['tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
        "app = env.TdxProgram('app', 'app.bin')\n"
        f"env.TdxImage('app', binary=app, {fast_options(small_kernel)}, ssh_keys=[{keys['good'][1]!r}])\n"
        .replace("OPTS.get('memory', '2G')", "'1G'").replace(", ssh_keys=OPTS.get('ssh_keys', [])", "")
        .replace(", env_vars=OPTS.get('env_vars', {})", "").replace(", extra_files=OPTS.get('extra_files', {})", ""))
    assert {"closure", "ssh", "cpio"} <= stages_run(scons(str(project)))
    manifest = json.load(open(os.path.join(project, "build", "tdx", "app", "app-manifest.json")))
    workload = {f["path"]: f for f in manifest["libraries"]["files"]}
    server = {f["path"]: f for f in manifest["ssh"]["files"]}
    shared = sorted(set(workload) & set(server))
    assert "/lib/x86_64-linux-gnu/libc.so.6" in shared and "/lib64/ld-linux-x86-64.so.2" in shared
    for path in shared:  # the host's glibc and the libc6 package: the same bytes
        assert workload[path].get("sha256") == server[path].get("sha256")
    members = cpio_members(os.path.join(project, "build", "tdx", "app", "work", "app-initramfs.cpio"))
    assert {"usr/bin/app", "usr/sbin/dropbear", "lib/x86_64-linux-gnu/libc.so.6"} <= set(members)
