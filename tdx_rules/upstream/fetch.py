"""Every download of tdx-rules: verified, cached, atomic, retried, mirror-aware.

Pinned files land in the content cache ``<cache>/sha256/<hex>/<basename>``;
small unpinned files (checksum files, ``Packages`` indexes) in
``<cache>/url/<sha256 of the URL>/<basename>``; ``apt-get download`` results in
``<cache>/apt/``. A file appears under its final name only once complete and
verified (temp file, fsync, ``os.replace``), and a per-entry lock in
``<cache>/locks/`` makes concurrent threads and processes download it once.

Transient failures (connection errors, timeouts, HTTP 5xx/429, a body shorter
than its Content-Length) are retried with exponential backoff; HTTP 4xx and
checksum mismatches are not. Every failure raises
:class:`~tdx_rules.errors.TdxError` with one line naming the URL and the fix.
Each download logs one line ``[tdx] fetch <url>`` (plus one per retry).
"""

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Callable, Optional
from urllib.parse import unquote, urlsplit

import filelock
import requests
import urllib3
import zstandard

from ..errors import BadChecksumFile, ChecksumMismatch, NotFound, TdxError
from ..fsutil import CHUNK, atomic_output

MAX_REDIRECTS = 10
RETRY_AFTER_CAP = 30.0
# A body that arrives slower than this (bytes per second, averaged over `timeout`
# seconds) counts as a stalled transfer and is retried, as curl's --speed-limit does.
LOW_SPEED = 1024
USER_AGENT = "tdx-rules"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_APT_VERSION = re.compile(r"^[0-9A-Za-z.+~:-]+$")


class _Transient(Exception):
    """A failure worth retrying; the message says what happened."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


def mirror_url(url: str, mirror: Optional[str]) -> str:
    """``url`` as served by ``mirror``: mirror prefix + host + path (+ query).

    ``mirror_url("https://dl-cdn.alpinelinux.org/alpine/x", "http://127.0.0.1:8000/base")``
    is ``"http://127.0.0.1:8000/base/dl-cdn.alpinelinux.org/alpine/x"``. No mirror: ``url``.
    """
    if not mirror:
        return url
    try:
        _split(mirror)
    except TdxError:
        raise TdxError(f"mirror {mirror!r} is not an http:// or https:// URL; fix TDX_RULES_MIRROR") from None
    parts = _split(url)
    rest = parts.path or "/"
    if parts.query:
        rest += "?" + parts.query
    return mirror.rstrip("/") + "/" + parts.netloc.rpartition("@")[2] + rest


def _split(url: str):
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except (ValueError, TypeError, AttributeError):
        raise TdxError(f"{url!r} is not a valid URL; fix it") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TdxError(f"{url!r} is not an http:// or https:// URL; fix it")
    return parts


def _basename(url: str, name: Optional[str]) -> str:
    base = name if name else _split(url).path.rsplit("/", 1)[-1]
    if not base or base in (".", "..") or "/" in base or "\0" in base or len(base) > 200:
        if name:
            raise TdxError(f"{url}: name {name!r} is not a plain file name; pass a name without '/'")
        base = "download"
    return base


def _short(exc: BaseException) -> str:
    """One short line for a requests/urllib3 exception (their messages nest reprs)."""
    text = " ".join(str(exc).split())
    for marker in ("Connection refused", "Connection reset", "timed out", "Name or service not known",
                   "IncompleteRead", "Connection broken", "Remote end closed"):
        if marker in text:
            return marker.lower()
    return (text[:160] + "…") if len(text) > 160 else text or type(exc).__name__


@contextlib.contextmanager
def _locked(cache: str, key: str):
    """Hold ``<cache>/locks/<key>.lock`` (threads and processes); TdxError if the cache is unwritable."""
    locks = os.path.join(cache, "locks")
    try:
        os.makedirs(locks, exist_ok=True)
        lock = filelock.FileLock(os.path.join(locks, key + ".lock"))
        lock.acquire()
    except OSError as exc:
        raise TdxError(f"cannot write the download cache {cache} ({exc.strerror or exc}); "
                       "make it writable or set TDX_RULES_CACHE to another directory") from None
    try:
        yield
    finally:
        lock.release()


class _Progress:
    """A one-line progress bar on a terminal (stdout); nothing when stdout is not one, where
    the ``[tdx] fetch`` line per file is the whole report."""

    INTERVAL = 0.2

    def __init__(self, name: str, total: Optional[int]):
        self.name, self.total = name, total
        self.enabled = sys.stdout.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self.last < self.INTERVAL:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        if self.total:
            filled = min(30, 30 * done // self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // self.total:3d}% " \
                  f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            bar = f"{done / 1e6:.1f} MB"
        sys.stdout.write(f"\r[tdx] {self.name} {bar} {rate:.1f} MB/s")
        if final:
            sys.stdout.write("\n")
        sys.stdout.flush()

    def finish(self, done: int) -> None:
        self.update(done, final=True)


def _attempt(url: str, dest: str, sha256: Optional[str], timeout: float, shown: str) -> None:
    """One GET of ``url`` into ``dest`` (atomically); raise _Transient or TdxError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    with requests.Session() as session:
        session.max_redirects = MAX_REDIRECTS
        try:
            response = session.get(url, stream=True, timeout=timeout, headers=headers)
        except requests.TooManyRedirects:
            raise TdxError(f"{shown}: more than {MAX_REDIRECTS} redirects (a redirect loop); "
                           "fix the URL or the mirror") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(_short(exc)) from None
        except (requests.RequestException, ValueError) as exc:
            raise TdxError(f"{shown}: cannot request this URL ({_short(exc)}); fix the URL") from None
        with response:
            status = response.status_code
            if status == 429 or status >= 500:
                after = response.headers.get("Retry-After", "")
                raise _Transient(f"HTTP {status}", float(after) if after.isdigit() else None)
            if status in (404, 410):
                raise NotFound(f"{shown}: HTTP {status} {response.reason or ''}".rstrip()
                               + "; check the URL and version (the file may have been removed upstream)")
            if status != 200:
                raise TdxError(f"{shown}: HTTP {status} {response.reason or ''}".rstrip()
                               + "; check the URL and version (the file may have been removed upstream)")
            length = response.headers.get("Content-Length", "")
            expected = int(length) if length.isdigit() else None
            digest = hashlib.sha256()
            got = 0
            window_start, window_bytes = time.monotonic(), 0
            progress = _Progress(_basename(url, None), expected)
            with atomic_output(dest) as out:
                while True:
                    try:
                        # read1: at most one read of the socket, so a trickling body is noticed.
                        chunk = response.raw.read1(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                        raise _Transient(f"{_short(exc)} after {got} bytes") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    progress.update(got)
                    window_bytes += len(chunk)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= timeout:
                        if window_bytes < LOW_SPEED * elapsed:
                            raise _Transient(f"transfer slower than {LOW_SPEED} bytes/s after {got} bytes")
                        window_start, window_bytes = time.monotonic(), 0
                progress.finish(got)
                if expected is not None and got < expected:
                    raise _Transient(f"body ended after {got} of {expected} bytes")
                actual = digest.hexdigest()
                if sha256 is not None and actual != sha256:
                    raise ChecksumMismatch(f"{shown}: checksum mismatch: expected sha256 {sha256}, got {actual}; "
                                   "the upstream file changed or the pin is wrong, so check the source and fix the pin")


def _download(url: str, dest: str, sha256: Optional[str], *, mirror: Optional[str], retries: int,
              timeout: float, backoff: float, log: Callable[[str], None]) -> None:
    """Download ``url`` (through ``mirror``) to ``dest`` with retries; ``dest`` appears only when complete."""
    source = mirror_url(url, mirror)
    shown = source if source == url else f"{source} (mirror of {url})"
    log(f"[tdx] fetch {source}")
    last = ""
    attempts = max(0, int(retries)) + 1
    for attempt in range(attempts):
        try:
            _attempt(source, dest, sha256, timeout, shown)
            return
        except _Transient as exc:
            last = str(exc)
            if attempt + 1 == attempts:
                break
            delay = backoff * (2 ** attempt)
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, RETRY_AFTER_CAP))
            log(f"[tdx] retry {source} in {delay:g}s ({last})")
            time.sleep(delay)
        except OSError as exc:
            raise TdxError(f"cannot write {dest} ({exc.strerror or exc}); check free space and permissions "
                           "of the download cache") from None
    hint = ("check the mirror (TDX_RULES_MIRROR) or the network" if mirror
            else "check the network, or set TDX_RULES_MIRROR to a mirror that serves it")
    raise TdxError(f"cannot download {shown} after {attempts} attempts ({last}); {hint}")


def _check_sha256(sha256, url: str) -> str:
    text = str(sha256 or "").strip().lower()
    if not _HEX64.match(text):
        raise TdxError(f"{url}: {sha256!r} is not a SHA-256 (64 hex digits); fix the pin")
    return text


def _reuse_sibling(directory: str, dest: str) -> bool:
    """Give ``dest`` the bytes of a verified file already in ``directory`` (same hash, other name)."""
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(directory)):
            path = os.path.join(directory, entry)
            if not entry.startswith(".") and os.path.isfile(path):
                temp = os.path.join(directory, f".{os.path.basename(dest)}.{os.getpid()}.link")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                try:
                    os.link(path, temp)
                except OSError:
                    shutil.copyfile(path, temp)
                os.replace(temp, dest)
                return True
    return False


def fetch(url: str, sha256: str, *, cache: str, mirror: Optional[str] = None, name: Optional[str] = None,
          retries: int = 4, timeout: float = 30, backoff: float = 0.5, log: Callable[[str], None] = print,
          verify: Optional[Callable[[str], None]] = None, remote=None) -> str:
    """Path of the file at ``url`` whose SHA-256 is ``sha256``, in the content cache.

    Returns ``<cache>/sha256/<hex>/<name or URL basename>`` at once if present (no
    network); otherwise downloads it (through ``mirror`` if set), verifies it and
    moves it into place. Retries transient failures ``retries`` times, waiting
    ``backoff``, 2×, 4×… seconds. TdxError on a 4xx, a checksum mismatch (the
    bad bytes are deleted), a redirect loop, or when retries run out.
    ``verify(path)`` (a signature check) runs on the downloaded file before it enters the
    cache and on a cached one; a file it refuses (TdxError) is removed.
    ``remote`` (an :class:`~tdx_rules.upstream.remote.Remote`): a local miss asks it first, by
    SHA-256, with the same checks; a file downloaded from ``url`` is uploaded to it when it pushes.
    A fault of the remote is reported (one line on stderr) and the download goes on as without it.
    """
    sha = _check_sha256(sha256, url)
    directory = os.path.join(os.fspath(cache), "sha256", sha)
    dest = os.path.join(directory, _basename(url, name))
    if os.path.isfile(dest):
        return _verified(dest, verify)
    with _locked(os.fspath(cache), sha):
        if os.path.isfile(dest):
            return _verified(dest, verify)
        if _reuse_sibling(directory, dest):
            return _verified(dest, verify)
        temp = os.path.join(directory, f".{os.path.basename(dest)}.{os.getpid()}.unverified")
        try:
            from_remote = _from_remote(remote, sha, temp, log)
            if not from_remote:
                _download(url, temp, sha, mirror=mirror, retries=retries, timeout=timeout, backoff=backoff, log=log)
            if verify is not None:
                verify(temp)
            os.replace(temp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: nothing partial or wrong stays behind
            raise
        if not from_remote:
            _to_remote(remote, sha, dest)
    return dest


def _from_remote(remote, sha: str, temp: str, log: Callable[[str], None]) -> bool:
    """Whether the remote cache gave ``temp`` the bytes with ``sha`` (checked)."""
    if remote is None or remote.failed:
        return False
    from .remote import DamagedEntry, RemoteFault, blob_path, report_fault

    try:
        found = remote.get_blob(sha, temp)
    except RemoteFault as fault:
        report_fault(fault)
        return False
    except DamagedEntry as damage:
        log(f"[tdx] remote cache: {remote.url}{blob_path(sha)} is damaged ({damage}); downloading instead")
        return False
    except OSError as exc:
        raise TdxError(f"cannot write {temp} ({exc.strerror or exc}); check free space and permissions "
                       "of the download cache") from None
    if found:
        log(f"[tdx] fetch {remote.url}{blob_path(sha)} (remote cache)")
    return found


def _to_remote(remote, sha: str, path: str) -> None:
    """Upload a verified download when ``remote`` pushes; a fault is reported, never raised."""
    if remote is None or not remote.push or remote.failed:
        return
    from .remote import RemoteFault, report_fault

    try:
        remote.put_blob(sha, path)
    except RemoteFault as fault:
        report_fault(fault)


def _verified(path: str, verify: Optional[Callable[[str], None]]) -> str:
    """``path`` after ``verify`` accepted it; a refused file leaves the cache."""
    if verify is not None:
        try:
            verify(path)
        except TdxError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    return path


def _text_path(url: str, cache: str, name: Optional[str] = None) -> str:
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return os.path.join(os.fspath(cache), "url", key, _basename(url, name))


def forget_text(url: str, *, cache: str, name: Optional[str] = None) -> None:
    """Drop the cached copy of ``url`` that :func:`fetch_text` keeps (one that failed a check)."""
    path = _text_path(url, cache, name)
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def is_text_cached(url: str, *, cache: str, name: Optional[str] = None) -> bool:
    """Whether :func:`fetch_text` would answer ``url`` from the cache."""
    return os.path.isfile(_text_path(url, cache, name))


def fetch_text(url: str, *, cache: str, mirror: Optional[str] = None, name: Optional[str] = None,
               retries: int = 4, timeout: float = 30, backoff: float = 0.5,
               log: Callable[[str], None] = print, refresh: bool = False) -> bytes:
    """Bytes of a small unpinned file (checksum file, Packages index), cached by URL.

    Kept at ``<cache>/url/<sha256 of url>/<basename>`` and reused when present
    (offline builds work from a filled cache); ``refresh=True`` downloads it again
    and replaces the cached copy, for callers that found the cached copy stale.
    Same atomic/lock/retry rules as :func:`fetch`; nothing is decompressed.
    """
    dest = _text_path(url, cache, name)
    directory, key = os.path.dirname(dest), os.path.basename(os.path.dirname(dest))
    if refresh or not os.path.isfile(dest):
        with _locked(os.fspath(cache), "url-" + key):
            if refresh or not os.path.isfile(dest):
                try:
                    _download(url, dest, None, mirror=mirror, retries=retries, timeout=timeout, backoff=backoff,
                              log=log)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)
                    raise
    with open(dest, "rb") as handle:
        return handle.read()


def _same_version(wanted: str, found: str) -> bool:
    """Debian versions equal, treating a missing epoch as ``0:`` or as any epoch."""
    def strip_zero(v):
        return v[2:] if v.startswith("0:") else v

    wanted, found = strip_zero(wanted.strip()), strip_zero(found.strip())
    return wanted == found or (":" not in wanted and found.split(":", 1)[-1] == wanted)


def _decompressing(data: bytes, name: str):
    raw = io.BytesIO(data)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.LZMAFile(raw)
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def packages_index_sha256(index_bytes: bytes, index_name: str, package: str, version: str) -> Optional[str]:
    """SHA256 field of the stanza for ``package`` at ``version`` in a Debian ``Packages``
    index (raw, or compressed as ``index_name``'s suffix .gz/.xz/.bz2/.zst says); None if absent."""
    def match(stanza):
        sha = stanza.get("SHA256", "").lower()
        return (stanza.get("Package") == package and _same_version(version, stanza.get("Version", ""))
                and _HEX64.match(sha) is not None)

    stanza = {}
    try:
        with _decompressing(index_bytes, index_name) as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.strip():
                    if match(stanza):
                        return stanza["SHA256"].lower()
                    stanza = {}
                elif line[0] not in " \t":
                    key, _, value = line.partition(":")
                    if key in ("Package", "Version", "SHA256"):
                        stanza[key] = value.strip()
    except (EOFError, OSError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as exc:
        raise TdxError(f"{index_name}: corrupt or truncated Packages index ({_short(exc)}); "
                       "delete it from the download cache and build again") from None
    return stanza["SHA256"].lower() if match(stanza) else None


def alpine_sha256(text: str, filename: str) -> str:
    """The hash for ``filename`` in an Alpine ``.sha256`` file (``<hex>  <filename>`` lines)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise BadChecksumFile(f"{filename}.sha256 is empty; the release may be incomplete upstream, pick another version")
    listed = []
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not _HEX64.match(parts[0].lower()):
            raise BadChecksumFile(f"{filename}.sha256: malformed line {line[:80]!r}; expected '<sha256>  {filename}' "
                           "(is a proxy or mirror returning an error page?)")
        listed.append(parts[1].lstrip("*").rsplit("/", 1)[-1])
        if listed[-1] == filename:
            return parts[0].lower()
    raise BadChecksumFile(f"{filename}.sha256 lists {', '.join(listed)} instead of {filename}; "
                   "check the version in the alpine: spec")


def _cached_deb(directory: str, package: str, version: str) -> Optional[str]:
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.listdir(directory)):
            parts = entry[:-len(".deb")].split("_") if entry.endswith(".deb") else []
            if len(parts) == 3 and parts[0] == package and _same_version(version, unquote(parts[1])):
                return os.path.join(directory, entry)
    return None


def _apt_error(result: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [f"exit status {result.returncode}"])[-1]


def apt_download(package: str, version: Optional[str] = None, *, cache: str,
                 log: Callable[[str], None] = print) -> str:
    """Path of ``package`` (at ``version``, else apt's candidate) fetched by the host's
    ``apt-get download`` into ``<cache>/apt/``.

    With ``version``, a cached file for exactly that version is returned without
    running apt. TdxError with apt's last error line if apt fails.
    """
    spec = f"{package}={version}" if version else package
    if not isinstance(package, str) or not _APT_NAME.match(package) or (
            version is not None and not _APT_VERSION.match(str(version))):
        raise TdxError(f"apt:{spec}: not a Debian package name and version; write apt:PACKAGE[=VERSION]")
    directory = os.path.join(os.fspath(cache), "apt")
    if version and (found := _cached_deb(directory, package, version)):
        return found
    with _locked(os.fspath(cache), "apt-" + package):
        if version and (found := _cached_deb(directory, package, version)):
            return found
        log(f"[tdx] fetch apt:{spec}")
        try:
            os.makedirs(directory, exist_ok=True)
            work = tempfile.mkdtemp(prefix=".apt-", dir=directory)
        except OSError as exc:
            raise TdxError(f"cannot write the download cache {cache} ({exc.strerror or exc}); "
                           "make it writable or set TDX_RULES_CACHE to another directory") from None
        try:
            try:
                result = subprocess.run(["apt-get", "download", "-q", spec], cwd=work, capture_output=True, text=True)
            except FileNotFoundError:
                raise TdxError(f"apt:{spec}: apt-get is not installed; apt: sources need a Debian or Ubuntu "
                               "build host") from None
            if result.returncode:
                raise TdxError(f"apt:{spec}: apt-get download failed ({_apt_error(result)}); "
                               "run apt-get update, or check the package name")
            debs = [entry for entry in os.listdir(work) if entry.endswith(".deb")]
            if len(debs) != 1:
                raise TdxError(f"apt:{spec}: apt-get download left {len(debs)} .deb files instead of one; "
                               "run apt-get update, or check the package name")
            source = os.path.join(work, debs[0])
            with open(source, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(source, 0o644)
            dest = os.path.join(directory, debs[0])
            os.replace(source, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest
