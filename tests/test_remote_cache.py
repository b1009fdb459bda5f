"""The remote cache of a CI fleet (docs/ci.md, "A fleet of runners"): stage outputs and
downloads shared over HTTP through a real nginx (Debian's nginx-light, WebDAV PUT), with
checkouts in different directories that have their own CacheDir and download cache."""

import base64
import hashlib
import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from tdx_rules.upstream import fetch
from tdx_rules.upstream.remote import READ_TIMEOUT, Remote, blob_path, parse_entry_header
from tests.conftest import DOWNLOAD_CACHE, ROOT, STAGE_CODE, STAGE_LINE, scons, stages_run, write_project
from tests.httpserver import HttpServer
from tests.nginx import Nginx, nginx  # noqa: F401 - the fixture
from tests.test_ci_recipe import cachedir_line, outputs

REMOTE_LINE = re.compile(r"^\[tdx\] (\w+) (\S+) \(remote\)$", re.M)
WARNING = "tdx-rules: warning: remote cache"
SUMMARY = re.compile(r"^\[tdx\] cache: (\d+) local, (\d+) remote, (\d+) built$", re.M)


def options(small_kernel, ovmf="file:/usr/share/ovmf/OVMF.fd") -> str:
    return (f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
            f"modules_dir={small_kernel['modules_dir']!r}, ovmf={ovmf!r}, ovmf_version='2022.11', "
            "memory='1G', cmdline='console=ttyS0'")


def checkout(tmp_path, name, small_kernel, extra="", **kwargs) -> str:
    """A checkout of the project in its own directory, with the CacheDir line of docs/ci.md."""
    project = write_project(tmp_path / name / "src", options(small_kernel, **kwargs),
                            "import os\n" + cachedir_line())
    if extra:
        with open(os.path.join(project, "SConstruct"), "a") as handle:
            handle.write(extra)
    return project


def build(project, url, push=False, auth=None, check=True, download_cache=None, **env):
    """scons in ``project`` with its own CacheDir (and download cache) beside it."""
    base = os.path.dirname(project)
    environ = {"SCONS_CACHE": os.path.join(base, "scons-cache"),
               "TDX_RULES_CACHE": download_cache or os.path.join(base, "tdx-rules-cache"),
               "SOURCE_DATE_EPOCH": "1700000000", "TDX_RULES_REMOTE_CACHE": url,
               "TDX_RULES_REMOTE_CACHE_PUSH": "1" if push else "0"}
    if auth is not None:
        environ["TDX_RULES_REMOTE_CACHE_AUTH"] = auth
    environ.update(env)
    return scons(project, env=environ, check=check)


def own_download_cache(path) -> str:
    """A download cache of its own holding only the Debian packages the minirootfs is composed
    from (linked from the tests' shared cache), so that a download of the build really happens."""
    apt = os.path.join(DOWNLOAD_CACHE, "apt")
    os.makedirs(os.path.join(path, "apt"))
    for name in os.listdir(apt):
        if name.startswith(("busybox-static_", "musl_")):
            try:
                os.link(os.path.join(apt, name), os.path.join(path, "apt", name))
            except OSError:
                shutil.copy(os.path.join(apt, name), os.path.join(path, "apt", name))
    return str(path)


def remote_stages(result) -> set:
    return {match.group(1) for match in REMOTE_LINE.finditer(result.stdout) if match.group(1) in STAGE_CODE}


def warnings(result) -> list:
    return [line for line in (result.stdout + result.stderr).splitlines() if WARNING in line]


def summary(result):
    found = SUMMARY.findall(result.stdout)
    assert len(found) == 1, result.stdout
    return tuple(int(n) for n in found[0])


def local_cachedir(project) -> dict:
    """{'<KK>/<key>': bytes} of the SCons CacheDir beside ``project`` (written by SCons itself)."""
    top = os.path.join(os.path.dirname(project), "scons-cache")
    found = {}
    for sub in os.listdir(top):
        if len(sub) == 2 and os.path.isdir(os.path.join(top, sub)):
            for name in os.listdir(os.path.join(top, sub)):
                with open(os.path.join(top, sub, name), "rb") as handle:
                    found[f"{sub}/{name}"] = handle.read()
    return found


def stage_entries(server) -> dict:
    """{'<KK>/<key>': (header fields, body)} of the stage entries on the server's disk."""
    found = {}
    for path, data in server.entries().items():
        if not path.startswith("sha256/"):
            header, _, body = data.partition(b"\n")
            found[path] = (header, body)
    return found


def assert_entries_valid(server):
    for path, (header, body) in stage_entries(server).items():
        sha, size, _ = parse_entry_header(header + b"\n", path.split("/")[1])
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (sha, size), path


def test_second_checkout_takes_every_stage_from_the_server_and_runs_none(tmp_path, small_kernel, nginx):
    first = checkout(tmp_path, "a", small_kernel)
    built = build(first, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    ran = stages_run(built)
    assert {"program", "kernel", "cpio", "compress", "manifest"} <= ran
    assert summary(built) == (0, 0, len(STAGE_LINE.findall(built.stdout)))
    assert not warnings(built), built.stderr

    # Entries are SCons's own cache entries: the key and the two-character directory of the
    # local CacheDir SCons wrote, the same bytes after one header line carrying their SHA-256.
    local = local_cachedir(first)
    entries = stage_entries(nginx)
    assert len(entries) >= 10 and set(entries) <= set(local)
    for path, (header, body) in entries.items():
        assert path.split("/")[0] == path.split("/")[1][:2].upper()
        assert body == local[path]
        assert header.split()[3].decode() == hashlib.sha256(body).hexdigest()
    stored = nginx.entries()

    second = checkout(tmp_path / "elsewhere", "b", small_kernel)
    again = build(second, nginx.url)
    assert stages_run(again) == set(), again.stdout
    assert remote_stages(again) == ran
    assert outputs(second) == outputs(first) and len(outputs(first)) >= 8
    assert summary(again) == (0, len(remote_stages(again)), 0)
    assert not warnings(again), again.stderr

    # A rebuild of the second checkout takes nothing from the server again: its outputs are up to date.
    up_to_date = build(second, nginx.url)
    assert stages_run(up_to_date) == set() and not remote_stages(up_to_date)

    # Without push, a build that changes an option builds locally and uploads nothing.
    changed = build(second, nginx.url, TDX_IMAGE_KERNEL_MODULES="virtio_blk")
    assert "modules" in stages_run(changed)
    assert nginx.entries() == stored


def test_a_stage_entry_keeps_the_files_mode(tmp_path, small_kernel, nginx):
    first = checkout(tmp_path, "a", small_kernel)
    build(first, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    second = checkout(tmp_path, "b", small_kernel)
    build(second, nginx.url)
    for name in ("hello-launch-tdx.sh", "hello-run-qemu.sh"):
        path = os.path.join(second, "build", "tdx", "hello", name)
        assert os.access(path, os.X_OK), name
    assert os.access(os.path.join(second, "hello"), os.X_OK)


def test_server_stopped_before_the_build_builds_locally_with_one_warning(tmp_path, small_kernel, nginx):
    nginx.stop()
    project = checkout(tmp_path, "a", small_kernel)
    started = time.monotonic()
    result = build(project, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    assert len(warnings(result)) == 1 and "connection refused" in warnings(result)[0], result.stderr
    assert time.monotonic() - started < 120


STOPPER = """
import signal, socket, time
def stop_server(target, source, env):
    # Stops the server in the middle of the build when STOP_SERVER names its pid file.
    pid_file = os.environ.get('STOP_SERVER')
    if pid_file:
        os.kill(int(open(pid_file).read()), signal.SIGTERM)
        for _ in range(200):
            try:
                socket.create_connection(('127.0.0.1', int(os.environ['STOP_PORT'])), timeout=0.2).close()
                time.sleep(0.05)
            except OSError:
                break
    with open(str(target[0]), 'w') as handle:
        handle.write('constant\\n')
    return 0
stopper = env.Command('stopper.txt', app, Action(stop_server, None))
env.NoCache(stopper)
env.AlwaysBuild(stopper)
env.Depends('build/tdx/hello/work/hello-initramfs.cpio', stopper)
"""


def test_server_stopped_during_the_build_builds_the_rest_locally_with_one_warning(tmp_path, small_kernel, nginx):
    first = checkout(tmp_path, "a", small_kernel, extra=STOPPER)
    build(first, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    second = checkout(tmp_path, "b", small_kernel, extra=STOPPER)
    result = build(second, nginx.url, download_cache=DOWNLOAD_CACHE,
                   STOP_SERVER=os.path.join(nginx.dir, "nginx.pid"), STOP_PORT=str(nginx.port))
    assert {"busybox", "program"} <= remote_stages(result), result.stdout  # before the server went away
    assert {"cpio", "compress", "manifest"} <= stages_run(result)            # after
    assert len(warnings(result)) == 1, result.stderr
    assert outputs(second) == outputs(first)


def test_truncated_entry_on_the_servers_disk_is_detected_rebuilt_and_replaced(tmp_path, small_kernel, nginx):
    first = checkout(tmp_path, "a", small_kernel)
    build(first, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    path, (header, body) = max(stage_entries(nginx).items(), key=lambda item: len(item[1][1]))
    on_disk = os.path.join(nginx.store, "cache", path)
    with open(on_disk, "r+b") as handle:
        handle.truncate(len(header) + 1 + len(body) // 2)

    second = checkout(tmp_path, "b", small_kernel)
    rebuilt = build(second, nginx.url, push=True, download_cache=DOWNLOAD_CACHE)
    assert len(stages_run(rebuilt)) == 1, rebuilt.stdout
    damaged = [line for line in warnings(rebuilt) if "damaged" in line]
    assert len(damaged) == 1 and path.split("/")[1] in damaged[0] and "truncated" in damaged[0]
    assert outputs(second) == outputs(first)
    with open(on_disk, "rb") as handle:
        assert handle.read() == header + b"\n" + body  # replaced by the pushing build
    assert_entries_valid(nginx)

    third = checkout(tmp_path, "c", small_kernel)
    pulled = build(third, nginx.url)
    assert stages_run(pulled) == set() and outputs(third) == outputs(first)


class _Answers500(http.server.BaseHTTPRequestHandler):
    def _fail(self):
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            length -= len(self.rfile.read(min(length, 1 << 16)))
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_HEAD = _fail

    def log_message(self, *args):
        pass


def test_a_server_answering_500_to_everything_costs_one_warning(tmp_path, small_kernel):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers500)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        project = checkout(tmp_path, "a", small_kernel)
        result = build(project, f"http://127.0.0.1:{server.server_address[1]}/cache/", push=True,
                       download_cache=DOWNLOAD_CACHE)
    finally:
        server.shutdown()
        server.server_close()
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    assert len(warnings(result)) == 1 and "HTTP 500" in warnings(result)[0], result.stderr


def test_a_hung_server_costs_seconds_not_minutes(tmp_path, small_kernel):
    # Connections are accepted by the kernel (listen backlog) but never answered.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        project = checkout(tmp_path, "a", small_kernel)
        started = time.monotonic()
        result = build(project, f"http://127.0.0.1:{hung.getsockname()[1]}/cache/", push=True,
                       download_cache=DOWNLOAD_CACHE)
        elapsed = time.monotonic() - started
    assert {"program", "cpio", "manifest"} <= stages_run(result)
    assert len(warnings(result)) == 1 and "timed out" in warnings(result)[0], result.stderr
    # One bounded timeout for the whole build, not one per target (that would be minutes).
    assert elapsed < 3 * READ_TIMEOUT + 60


def _everything_written(*directories) -> bytes:
    data = []
    for directory in directories:
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        data.append(handle.read())
    return b"\n".join(data)


@pytest.mark.parametrize("kind", ["basic", "bearer"])
def test_credentials_open_the_server_and_a_wrong_one_costs_one_warning_and_leaks_nowhere(tmp_path, small_kernel,
                                                                                         kind):
    secret = "pw-" + secrets.token_hex(8)
    wrong = "pw-" + secrets.token_hex(8)
    if kind == "basic":
        server, good, bad = Nginx(tmp_path / "nginx", users={"ci": secret}), f"ci:{secret}", f"ci:{wrong}"
    else:
        server, good, bad = Nginx(tmp_path / "nginx", bearer=secret), secret, wrong
    with server:
        # Without credentials the server refuses (it really checks them).
        anonymous = build(checkout(tmp_path, "anonymous", small_kernel), server.url, push=True,
                          download_cache=DOWNLOAD_CACHE)
        assert len(warnings(anonymous)) == 1 and "HTTP 401" in warnings(anonymous)[0]
        assert stage_entries(server) == {}
        first = checkout(tmp_path, "a", small_kernel)
        pushed = build(first, server.url, push=True, auth=good, download_cache=DOWNLOAD_CACHE, VERBOSE="1")
        assert not warnings(pushed) and len(stage_entries(server)) >= 10
        second = checkout(tmp_path, "b", small_kernel)
        pulled = build(second, server.url, auth=good)
        assert stages_run(pulled) == set() and remote_stages(pulled)
        third = checkout(tmp_path, "c", small_kernel)
        refused = build(third, server.url, auth=bad, download_cache=DOWNLOAD_CACHE, VERBOSE="1")
        assert "musl-gcc" in refused.stdout  # the full commands were printed
        assert len(warnings(refused)) == 1 and "HTTP 401" in warnings(refused)[0], refused.stderr
        assert outputs(third) == outputs(second)
    log = "".join(result.stdout + result.stderr for result in (anonymous, pushed, pulled, refused))
    for credential in (good, bad):
        for form in (credential, base64.b64encode(credential.encode()).decode()):
            assert form not in log
    for password in (secret, wrong):
        assert password not in log


def test_the_credential_is_in_no_sconsign_manifest_or_stage_config(tmp_path, small_kernel):
    secret = "pw-" + secrets.token_hex(8)
    origin_data = open("/usr/share/ovmf/OVMF.fd", "rb").read()
    sha = hashlib.sha256(origin_data).hexdigest()
    with Nginx(tmp_path / "nginx", users={"ci": secret}) as server, HttpServer() as origin:
        # The ovmf stage downloads through a URL, so a stage process holds the credential too.
        url = origin.add("/fw/OVMF.fd", origin_data)
        project = checkout(tmp_path, "a", small_kernel, ovmf=f"{url}#sha256={sha}")
        result = build(project, server.url, push=True, auth=f"ci:{secret}",
                       download_cache=own_download_cache(tmp_path / "a" / "dl"))
        assert "ovmf" in stages_run(result) and not warnings(result)
        assert blob_path(sha) in server.entries()  # the download went up, with the credential
    work = os.path.join(project, "build", "tdx", "hello", "work")
    named = [os.path.join(project, ".sconsign.dblite"), os.path.join(project, "build", "tdx", "hello",
                                                                      "hello-manifest.json")]
    named += [os.path.join(work, name) for name in os.listdir(work) if name.endswith(".config.json")]
    assert len(named) >= 10 and all(os.path.isfile(path) for path in named)
    forms = [secret.encode(), base64.b64encode(f"ci:{secret}".encode())]
    for path in named:
        with open(path, "rb") as handle:
            data = handle.read()
        assert not any(form in data for form in forms), path
    everything = _everything_written(os.path.dirname(project))
    assert not any(form in everything for form in forms)


def test_two_builds_pushing_the_same_keys_at_the_same_time(tmp_path, small_kernel, nginx):
    projects = [checkout(tmp_path, name, small_kernel) for name in ("a", "b")]
    environ = dict(os.environ, PYTHONPATH=ROOT, TDX_RULES_CACHE=DOWNLOAD_CACHE, SOURCE_DATE_EPOCH="1700000000",
                   TDX_RULES_REMOTE_CACHE=nginx.url, TDX_RULES_REMOTE_CACHE_PUSH="1")
    environ.pop("TDX_IMAGE_SKIP", None)
    runs = [subprocess.Popen([sys.executable, "-m", "SCons", "-Q"], cwd=project, text=True,
                             env=dict(environ, SCONS_CACHE=os.path.join(os.path.dirname(project), "scons-cache")),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for project in projects]
    results = [run.communicate() + (run.returncode,) for run in runs]
    for stdout, stderr, code in results:
        assert code == 0, stdout + stderr
        assert WARNING not in stdout + stderr, stderr
    assert outputs(projects[0]) == outputs(projects[1])
    assert len(stage_entries(nginx)) >= 10
    assert_entries_valid(nginx)
    third = checkout(tmp_path, "c", small_kernel)
    pulled = build(third, nginx.url)
    assert stages_run(pulled) == set() and outputs(third) == outputs(projects[0])


def test_a_stage_takes_its_download_from_the_server(tmp_path, small_kernel, nginx):
    data = open("/usr/share/ovmf/OVMF.fd", "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    with HttpServer() as origin:
        first_url = origin.add("/a/OVMF.fd", data)
        second_url = origin.url("/b/OVMF.fd")  # not served: the origin has it no more
        first = checkout(tmp_path, "a", small_kernel, ovmf=f"{first_url}#sha256={sha}")
        build(first, nginx.url, push=True, download_cache=own_download_cache(tmp_path / "a" / "dl"))
        assert origin.count("/a/OVMF.fd") == 1
        assert nginx.entries()[blob_path(sha)] == data
        # Another spec for the same bytes: the ovmf stage runs, its download comes from the server.
        second = checkout(tmp_path, "b", small_kernel, ovmf=f"{second_url}#sha256={sha}")
        result = build(second, nginx.url, download_cache=own_download_cache(tmp_path / "b" / "dl"))
        assert origin.count("/b/OVMF.fd") == 0
    assert "ovmf" in stages_run(result)
    assert f"{nginx.url}{blob_path(sha)} (remote cache)" in result.stdout
    fd = os.path.join("build", "tdx", "hello", "hello-ovmf.fd")
    assert open(os.path.join(second, fd), "rb").read() == data


def test_downloads_are_verified_from_the_server_and_a_damaged_one_is_replaced(tmp_path, nginx):
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    lines = []
    with HttpServer() as origin:
        url = origin.add("/f.bin", data)
        pusher = Remote(nginx.url, push=True)
        fetch.fetch(url, sha, cache=str(tmp_path / "a"), remote=pusher, log=lines.append)
        assert origin.count("/f.bin") == 1 and nginx.entries()[blob_path(sha)] == data
        path = fetch.fetch(url, sha, cache=str(tmp_path / "b"), remote=Remote(nginx.url), log=lines.append)
        assert origin.count("/f.bin") == 1 and open(path, "rb").read() == data
        # Damaged on the server's disk: refused by its SHA-256, downloaded, replaced by a pusher.
        on_disk = os.path.join(nginx.store, "cache", blob_path(sha))
        with open(on_disk, "r+b") as handle:
            handle.seek(1000)
            handle.write(b"\0" * 16)
        path = fetch.fetch(url, sha, cache=str(tmp_path / "c"), remote=Remote(nginx.url, push=True),
                           log=lines.append)
        assert origin.count("/f.bin") == 2 and open(path, "rb").read() == data
        assert any("damaged" in line for line in lines)
        assert nginx.entries()[blob_path(sha)] == data


@pytest.mark.parametrize("url, message", [
    ("ftp://cache.example/tdx/", "not an http:// or https:// URL"),
    ("https://ci:hunter2@cache.example/tdx/", "carries credentials"),
    ("https://cache.example/tdx/ x", "spaces, quotes or shell characters"),
])
def test_a_bad_remote_cache_url_stops_the_build_with_one_line(tmp_path, small_kernel, url, message):
    project = checkout(tmp_path, "a", small_kernel)
    result = build(project, url, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    # One line, and SCons's pointer to the SConstruct's line that loaded the tool.
    assert len(errors) == 2 and errors[1].strip().startswith('File "') and "SConstruct" in errors[1], result.stderr
    assert "TDX_RULES_REMOTE_CACHE" in errors[0] and message in errors[0]
    assert "hunter2" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_tdx_remote_cache_in_the_sconstruct_and_the_environment_winning_over_push(tmp_path, small_kernel, nginx):
    extra = f"\nenv.TdxRemoteCache({nginx.url!r})\n"
    # The method comes before the images' targets exist: put it right after the Environment.
    first = write_project(tmp_path / "a" / "src", options(small_kernel),
                          "import os\n" + cachedir_line() + extra)
    environ = {"SCONS_CACHE": str(tmp_path / "a" / "scons-cache"), "SOURCE_DATE_EPOCH": "1700000000"}
    pulled_only = scons(first, env=environ)
    assert stage_entries(nginx) == {}  # push defaults to off
    assert summary(pulled_only)[2] >= 5
    scons(first, "-c", env=environ)
    pushed = scons(first, env=dict(environ, TDX_RULES_REMOTE_CACHE_PUSH="1", SCONS_CACHE=str(tmp_path / "empty")))
    assert len(stage_entries(nginx)) >= 10 and not warnings(pushed)
    second = write_project(tmp_path / "b" / "src", options(small_kernel), "import os\n" + cachedir_line() + extra)
    again = scons(second, env={"SCONS_CACHE": str(tmp_path / "b" / "scons-cache"),
                               "TDX_RULES_CACHE": str(tmp_path / "b" / "dl"), "SOURCE_DATE_EPOCH": "1700000000"})
    assert stages_run(again) == set() and remote_stages(again)
