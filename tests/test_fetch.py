"""tdx_rules.upstream.fetch against a real HTTP server on 127.0.0.1, the host's apt, and real Debian metadata."""

import functools
import glob
import gzip
import hashlib
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import unquote

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.fsutil import sha256_file
from tdx_rules.upstream import fetch as F
from tests import debian
from tests.httpserver import http_server  # noqa: F401  (fixture)

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()
QUICK = dict(backoff=0.01, timeout=5)


class Log(list):
    def __call__(self, line):
        self.append(line)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _cached(root):
    """Files in the cache, leaving out lock files."""
    return [f for f in _files(root) if not f.startswith("locks" + os.sep)]


def test_success_then_cache_hit_without_network(http_server, tmp_path):
    url = http_server.add("/dist/pkg-1.0.tar.gz", BODY)
    log = Log()
    path = F.fetch(url, SHA, cache=str(tmp_path), log=log, **QUICK)
    assert path == str(tmp_path / "sha256" / SHA / "pkg-1.0.tar.gz")
    assert open(path, "rb").read() == BODY
    assert log == [f"[tdx] fetch {url}"]
    assert F.fetch(url, SHA.upper(), cache=str(tmp_path), log=log, **QUICK) == path
    assert http_server.count("/dist/pkg-1.0.tar.gz") == 1 and len(log) == 1
    # Same bytes under another name: served from the cache too.
    other = F.fetch(url, SHA, cache=str(tmp_path), name="renamed.tgz", log=log, **QUICK)
    assert open(other, "rb").read() == BODY and http_server.count("/dist/pkg-1.0.tar.gz") == 1


def test_checksum_mismatch_leaves_nothing(http_server, tmp_path):
    url = http_server.add("/f", BODY)
    wrong = "0" * 64
    with pytest.raises(TdxError) as info:
        F.fetch(url, wrong, cache=str(tmp_path), log=Log(), **QUICK)
    message = str(info.value)
    assert url in message and wrong in message and SHA in message and "pin is wrong" in message
    assert "\n" not in message
    assert _cached(tmp_path) == []
    assert http_server.count("/f") == 1  # not retried


@pytest.mark.parametrize("faults", [[500, 503], [429], ["truncate"], ["reset"], [502, "truncate", "reset"]])
def test_transient_failures_are_retried(http_server, tmp_path, faults):
    url = http_server.add("/f", BODY, faults=list(faults))
    log = Log()
    path = F.fetch(url, SHA, cache=str(tmp_path), log=log, **QUICK)
    assert sha256_file(path) == SHA
    assert http_server.count("/f") == len(faults) + 1
    assert sum(line.startswith("[tdx] retry") for line in log) == len(faults)
    assert _cached(tmp_path) == [os.path.join("sha256", SHA, "f")]


def test_timeout_is_retried(http_server, tmp_path):
    url = http_server.add("/slow", BODY, faults=["hang"], hang=1.5)
    assert sha256_file(F.fetch(url, SHA, cache=str(tmp_path), log=Log(), backoff=0.01, timeout=0.3)) == SHA
    assert http_server.count("/slow") == 2


@pytest.mark.parametrize("status", [404, 403, 410])
def test_client_errors_are_not_retried(http_server, tmp_path, status):
    url = http_server.add("/missing", status=status)
    with pytest.raises(TdxError, match=rf"{re.escape(url)}: HTTP {status}"):
        F.fetch(url, SHA, cache=str(tmp_path), log=Log(), **QUICK)
    assert http_server.count("/missing") == 1
    assert _cached(tmp_path) == []


def test_gives_up_after_retries_and_suggests_mirror(http_server, tmp_path):
    url = http_server.add("/down", BODY, faults=[500] * 10)
    message = rf"cannot download {re.escape(url)} after 3 attempts \(HTTP 500\).*TDX_RULES_MIRROR"
    with pytest.raises(TdxError, match=message):
        F.fetch(url, SHA, cache=str(tmp_path), retries=2, log=Log(), **QUICK)
    assert http_server.count("/down") == 3


def test_connection_refused(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    with pytest.raises(TdxError, match=rf"{re.escape(url)} after 2 attempts \(connection refused\).*TDX_RULES_MIRROR"):
        F.fetch(url, SHA, cache=str(tmp_path), retries=1, log=Log(), **QUICK)


def test_redirects(http_server, tmp_path):
    http_server.add("/new", BODY)
    url = http_server.add("/old", redirect="/new")
    assert sha256_file(F.fetch(url, SHA, cache=str(tmp_path), log=Log(), **QUICK)) == SHA
    loop = http_server.add("/loop", redirect="/loop")
    with pytest.raises(TdxError, match="redirect loop"):
        F.fetch(loop, "1" * 64, cache=str(tmp_path), log=Log(), **QUICK)
    assert http_server.count("/loop") == F.MAX_REDIRECTS + 1  # one walk through the loop, no retries


def test_trickle_and_partial_file_invisible(http_server, tmp_path):
    gate = threading.Event()
    url = http_server.add("/gated", BODY, gate=gate, trickle=0.01)
    result = {}
    worker = threading.Thread(target=lambda: result.update(path=F.fetch(url, SHA, cache=str(tmp_path), log=Log())))
    worker.start()
    directory = tmp_path / "sha256" / SHA
    deadline = time.time() + 10
    while not (directory.is_dir() and os.listdir(directory)) and time.time() < deadline:
        time.sleep(0.01)
    names = os.listdir(directory)
    assert len(names) == 1 and names[0].startswith(".") and names[0].endswith(".tmp")  # temp file in the cache dir
    assert not (directory / "gated").exists()
    gate.set()
    worker.join(10)
    assert result["path"] == str(directory / "gated") and sha256_file(result["path"]) == SHA
    assert os.listdir(directory) == ["gated"]


def test_mirror_url():
    mirror = "http://127.0.0.1:8000/base"
    assert (F.mirror_url("https://dl-cdn.alpinelinux.org/alpine/x", mirror)
            == "http://127.0.0.1:8000/base/dl-cdn.alpinelinux.org/alpine/x")
    assert (F.mirror_url("https://h.example:8443/a/b?c=1", mirror + "/")
            == "http://127.0.0.1:8000/base/h.example:8443/a/b?c=1")
    assert F.mirror_url("https://h/a", None) == "https://h/a"
    with pytest.raises(TdxError, match="TDX_RULES_MIRROR"):
        F.mirror_url("https://h/a", "ftp://mirror")


def test_mirror_end_to_end(http_server, tmp_path):
    upstream = "https://dl-cdn.alpinelinux.org/alpine/v3.21/releases/x86_64/alpine-minirootfs-3.21.0-x86_64.tar.gz"
    served = "/base/dl-cdn.alpinelinux.org/alpine/v3.21/releases/x86_64/alpine-minirootfs-3.21.0-x86_64.tar.gz"
    http_server.add(served, BODY)
    line = f"{SHA}  alpine-minirootfs-3.21.0-x86_64.tar.gz\n".encode()
    http_server.add(served + ".sha256", line)
    mirror = http_server.url("/base")
    log = Log()
    text = F.fetch_text(upstream + ".sha256", cache=str(tmp_path), mirror=mirror, log=log, **QUICK)
    sha = F.alpine_sha256(text.decode(), "alpine-minirootfs-3.21.0-x86_64.tar.gz")
    path = F.fetch(upstream, sha, cache=str(tmp_path), mirror=mirror, log=log, **QUICK)
    assert os.path.basename(path) == "alpine-minirootfs-3.21.0-x86_64.tar.gz" and sha256_file(path) == SHA
    assert log == [f"[tdx] fetch {http_server.url(served)}.sha256", f"[tdx] fetch {http_server.url(served)}"]
    assert http_server.count(served) == 1 and http_server.count(served + ".sha256") == 1
    missing = upstream.replace("3.21.0", "3.99.0")
    with pytest.raises(TdxError, match=r"\(mirror of https://dl-cdn.*\): HTTP 404"):
        F.fetch(missing, "2" * 64, cache=str(tmp_path), mirror=mirror, log=log, **QUICK)


def test_fetch_text_cached_by_url(http_server, tmp_path):
    url = http_server.add("/dists/x/Packages.xz", b"index bytes")
    assert F.fetch_text(url, cache=str(tmp_path), log=Log(), **QUICK) == b"index bytes"
    assert F.fetch_text(url, cache=str(tmp_path), log=Log(), **QUICK) == b"index bytes"
    assert http_server.count("/dists/x/Packages.xz") == 1
    key = hashlib.sha256(url.encode()).hexdigest()
    assert _cached(tmp_path) == [os.path.join("url", key, "Packages.xz")]
    gone = http_server.add("/dists/x/Packages.gz", status=404)
    with pytest.raises(TdxError, match="HTTP 404"):
        F.fetch_text(gone, cache=str(tmp_path), log=Log(), **QUICK)
    assert http_server.count("/dists/x/Packages.gz") == 1 and len(_cached(tmp_path)) == 1


def test_concurrent_threads_download_once(http_server, tmp_path):
    gate = threading.Event()
    url = http_server.add("/big", BODY, gate=gate)
    results = []
    threads = [threading.Thread(target=lambda: results.append(F.fetch(url, SHA, cache=str(tmp_path), log=Log())))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 10
    while http_server.count("/big") < 1 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the others are now waiting on the lock
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and len(set(results)) == 1 and sha256_file(results[0]) == SHA
    assert http_server.count("/big") == 1


_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from tdx_rules.upstream.fetch import fetch
print("ready", flush=True)
print(fetch(sys.argv[2], sys.argv[3], cache=sys.argv[4], log=lambda line: None), flush=True)
"""


def test_concurrent_processes_download_once(http_server, tmp_path):
    gate = threading.Event()
    url = http_server.add("/big", BODY, gate=gate)
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, debian.ROOT, url, SHA, str(tmp_path)],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        deadline = time.time() + 10
        while http_server.count("/big") < 1 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the other process is now waiting on the lock
        assert not os.path.exists(tmp_path / "sha256" / SHA / "big")
        gate.set()
        paths = [child.communicate(timeout=20)[0].strip() for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0, 0]
    assert paths[0] == paths[1] == str(tmp_path / "sha256" / SHA / "big")
    assert http_server.count("/big") == 1


@pytest.mark.parametrize("url", ["http://[bad/x", "http://127.0.0.1:99999/x", "ftp://host/x", "host/x", "http:///x"])
def test_bad_urls(tmp_path, url):
    with pytest.raises(TdxError, match="URL"):
        F.fetch(url, SHA, cache=str(tmp_path), retries=0, log=Log())


def test_bad_pin_and_unwritable_cache(tmp_path):
    with pytest.raises(TdxError, match="not a SHA-256"):
        F.fetch("http://127.0.0.1:1/x", "abc", cache=str(tmp_path), log=Log())
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TdxError, match="TDX_RULES_CACHE"):
        F.fetch("http://127.0.0.1:1/x", SHA, cache=str(blocker), log=Log())


# --- Debian and Alpine metadata ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _apt_show(*packages):
    return subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, text=True,
                          check=True).stdout


def _field(stanza_text, name):
    return re.search(rf"^{name}: (.*)$", stanza_text, re.M).group(1).strip()


@functools.lru_cache(maxsize=None)
def _busybox_deb():
    """The real busybox-static .deb of apt's candidate version, from tests/debian.py's cache."""
    version = _field(_apt_show("busybox-static"), "Version")
    for path in glob.glob(os.path.join(debian.CACHE, "debs", "busybox-static_*.deb")):
        if unquote(os.path.basename(path).split("_")[1]) == version:
            return path  # debian.package() does not recognise the %3a-quoted epoch in this name
    return debian.package("busybox-static")


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """Real Packages stanzas (from apt-cache show), raw and compressed with the real gzip and xz."""
    text = _apt_show("musl", "busybox-static", "cpio")
    base = tmp_path_factory.mktemp("index")
    raw = base / "Packages"
    raw.write_text(text)
    subprocess.run(["gzip", "-k", str(raw)], check=True)
    subprocess.run(["xz", "-k", str(raw)], check=True)
    return text, {name: (base / name).read_bytes() for name in ("Packages", "Packages.gz", "Packages.xz")}


@pytest.mark.parametrize("index_name", ["Packages", "Packages.gz", "Packages.xz"])
def test_packages_index_sha256(real_index, index_name):
    text, blobs = real_index
    data = blobs[index_name]
    busybox = _apt_show("busybox-static")
    version = _field(busybox, "Version")
    found = F.packages_index_sha256(data, index_name, "busybox-static", version)
    # The outside reference: the SHA-256 of the real .deb apt downloaded.
    assert found == sha256_file(_busybox_deb())
    assert F.packages_index_sha256(data, index_name, "busybox-static", version.split(":", 1)[1]) == found
    musl = _apt_show("musl")
    assert F.packages_index_sha256(data, index_name, "musl", _field(musl, "Version")) == _field(musl, "SHA256")
    assert F.packages_index_sha256(data, index_name, "musl", "0.0-0") is None
    assert F.packages_index_sha256(data, index_name, "no-such-package", version) is None


def test_packages_index_corrupt(real_index):
    _, blobs = real_index
    with pytest.raises(TdxError, match=r"Packages\.xz: corrupt or truncated"):
        F.packages_index_sha256(blobs["Packages.xz"][:-40], "Packages.xz", "musl", "1")
    with pytest.raises(TdxError, match=r"Packages\.gz: corrupt or truncated"):
        F.packages_index_sha256(b"not gzip at all", "Packages.gz", "musl", "1")
    assert gzip.decompress(blobs["Packages.gz"]) == lzma.decompress(blobs["Packages.xz"])


def test_alpine_sha256(tmp_path):
    name = "alpine-minirootfs-3.21.0-x86_64.tar.gz"
    (tmp_path / name).write_bytes(BODY)
    line = subprocess.run(["sha256sum", name], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert F.alpine_sha256(line, name) == SHA
    with pytest.raises(TdxError, match="instead of alpine-minirootfs-3.20.0"):
        F.alpine_sha256(line, "alpine-minirootfs-3.20.0-x86_64.tar.gz")
    with pytest.raises(TdxError, match="malformed"):
        F.alpine_sha256("<html>Not Found</html>\n", name)
    with pytest.raises(TdxError, match="empty"):
        F.alpine_sha256("\n", name)


# --- apt -----------------------------------------------------------------------------------


@pytest.fixture
def local_apt(tmp_path, monkeypatch):
    """The host's apt pointed (via APT_CONFIG) at a file: repository holding the real
    busybox-static .deb under its real Packages stanza, so apt-get needs no network."""
    base = tmp_path / "apt-root"
    stanza = _apt_show("busybox-static")
    deb = _busybox_deb()
    pool = base / "repo" / os.path.dirname(_field(stanza, "Filename"))
    pool.mkdir(parents=True)
    shutil.copyfile(deb, pool / os.path.basename(_field(stanza, "Filename")))
    (base / "repo" / "Packages").write_text(stanza)
    for sub in ("lists/partial", "cache/archives/partial", "parts"):
        (base / sub).mkdir(parents=True)
    (base / "sources.list").write_text(f"deb [trusted=yes] file:{base / 'repo'} ./\n")
    (base / "apt.conf").write_text(
        f'Dir::Etc::SourceList "{base / "sources.list"}";\nDir::Etc::SourceParts "{base / "parts"}";\n'
        f'Dir::State::Lists "{base / "lists"}";\nDir::Cache "{base / "cache"}";\n'
        'APT::Sandbox::User "root";\nAcquire::Languages "none";\n')
    monkeypatch.setenv("APT_CONFIG", str(base / "apt.conf"))
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
    return stanza


def test_apt_download_real_package(local_apt, tmp_path, monkeypatch):
    version = _field(local_apt, "Version")
    cache = tmp_path / "cache"
    log = Log()
    path = F.apt_download("busybox-static", version, cache=str(cache), log=log)
    assert os.path.dirname(path) == str(cache / "apt")
    assert os.path.basename(path).startswith("busybox-static_1%3a")  # apt's own spelling of the epoch
    assert sha256_file(path) == _field(local_apt, "SHA256")
    assert log == [f"[tdx] fetch apt:busybox-static={version}"]
    assert os.listdir(cache / "apt") == [os.path.basename(path)]  # no temp dir left behind
    # Without a version apt runs again (the candidate may move) and gives the same file.
    assert F.apt_download("busybox-static", cache=str(cache), log=log) == path and len(log) == 2
    # Cached for exactly this version (with or without its epoch): apt is not run (not even on PATH now).
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert F.apt_download("busybox-static", version, cache=str(cache), log=log) == path
    assert F.apt_download("busybox-static", version.split(":", 1)[1], cache=str(cache), log=log) == path
    assert len(log) == 2
    with pytest.raises(TdxError, match="apt-get is not installed"):
        F.apt_download("busybox-static", "0.0-0", cache=str(cache), log=log)


def test_apt_download_failures(local_apt, tmp_path):
    with pytest.raises(TdxError, match=r"apt:no-such-package-tdx: apt-get download failed \(E: .*no-such-package-tdx.*"
                                       r"run apt-get update, or check the package name"):
        F.apt_download("no-such-package-tdx", cache=str(tmp_path), log=Log())
    with pytest.raises(TdxError, match=r"apt:busybox-static=0.0-0: apt-get download failed \(E: Version '0.0-0'"):
        F.apt_download("busybox-static", "0.0-0", cache=str(tmp_path), log=Log())
    with pytest.raises(TdxError, match="not a Debian package name"):
        F.apt_download("-o=foo", cache=str(tmp_path), log=Log())
    assert os.listdir(tmp_path / "apt") == []


def test_body_trickling_slower_than_the_speed_limit_is_retried_then_refused(http_server, tmp_path):
    """Each piece arrives within the read timeout, but the whole transfer would take forever."""
    body = b"x" * 1600  # served in 16 pieces of 100 bytes, 0.2 s apart: 500 bytes/s
    url = http_server.add("/trickle", body, trickle=0.2)
    sha = hashlib.sha256(body).hexdigest()
    started = time.monotonic()
    with pytest.raises(TdxError, match="slower than"):
        F.fetch(url, sha, cache=str(tmp_path), log=Log(), backoff=0.01, timeout=0.5, retries=1)
    assert time.monotonic() - started < 3.0
    assert http_server.count("/trickle") == 2
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "sha256" in p.parts] == []  # nothing cached
