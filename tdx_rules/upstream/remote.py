"""The client of a shared remote cache: whole files over plain HTTP ``GET`` and ``PUT``.

Any server with these semantics serves: ``GET <path>`` answers 200 with the bytes last
``PUT`` there or 404, and ``PUT <path>`` stores a body whole (nginx's WebDAV module with
``dav_methods PUT; create_full_put_path on;``, which writes a body to a temporary file and
renames it into place, or bazel-remote's HTTP interface). Two areas share one base URL:

* ``<base>/<KK>/<key>``: a build output under SCons's cache key (``KK``: its first two
  characters in upper case, SCons's own CacheDir layout). The body is one header line
  ``tdx-rules-cache-entry 1 <key> <sha256> <size> <mode>`` and then the file's bytes, so each
  entry carries its SHA-256, checked on every retrieval: a truncated or corrupted entry, or one
  filed under another key, raises :class:`DamagedEntry` and nothing is written.
* ``<base>/sha256/<hh>/<hex>``: a download of the download cache, as its plain bytes; it is
  addressed by its SHA-256, which the caller checks as it checks any download.

Faults of the server (unreachable, a timeout, HTTP 5xx, 401/403, any answer but 200/404 to a
``GET`` and 2xx to a ``PUT``) raise :class:`RemoteFault`: callers build locally instead and warn
once. Timeouts are short and bounded (``CONNECT_TIMEOUT``, ``READ_TIMEOUT``, and a body slower
than ``LOW_SPEED`` bytes/s is a fault), so a hung server costs seconds.

Credentials come from ``TDX_RULES_REMOTE_CACHE_AUTH`` only (``user:password`` for basic
authentication, else a bearer token; ``Bearer <token>`` is accepted too). They travel in the
``Authorization`` header and appear in no message, log line, repr or file; a URL carrying
``user:password@`` is refused so that the address, which messages name, holds no secret.
"""

import base64
import hashlib
import os
import re
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

import requests
import urllib3

from ..errors import TdxError
from ..fsutil import CHUNK, atomic_output

URL_VARIABLE = "TDX_RULES_REMOTE_CACHE"
PUSH_VARIABLE = "TDX_RULES_REMOTE_CACHE_PUSH"
AUTH_VARIABLE = "TDX_RULES_REMOTE_CACHE_AUTH"
# A stage reports a fault of the remote cache on stderr behind this prefix; the SCons glue
# turns it into the build's one warning line and stops asking the server.
FAULT_PREFIX = "tdx-rules: remote cache fault: "

CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
LOW_SPEED = 1024  # bytes per second, averaged over READ_TIMEOUT seconds
MAGIC = b"tdx-rules-cache-entry"
VERSION = b"1"
_MAX_HEADER = 512
_KEY = re.compile(r"^[0-9a-fA-F]{16,128}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[\s\"'`$\\;&|<>]")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class RemoteFault(Exception):
    """The server cannot be used now; the message names what happened, never a credential."""


class DamagedEntry(Exception):
    """An entry whose bytes are not what its header (or its address) says."""


def parse_url(url: str, where: str = URL_VARIABLE) -> str:
    """``url`` as a base ending in ``/``; TdxError for anything but a plain http(s) URL."""
    text = str(url or "").strip()
    if "@" in text:
        # Not echoed: the part before '@' would be a credential.
        raise TdxError(f"{where}: the URL carries credentials (user@ or user:password@); remove them "
                       f"from the URL and put them in {AUTH_VARIABLE}")
    if _UNSAFE.search(text):
        raise TdxError(f"{where}: {text!r} has spaces, quotes or shell characters; give a plain base URL")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except (ValueError, TypeError):
        raise TdxError(f"{where}: {text!r} is not a valid URL; give the cache's base URL, "
                       "e.g. https://cache.example/tdx/") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TdxError(f"{where}: {text!r} is not an http:// or https:// URL; give the cache's base URL, "
                       "e.g. https://cache.example/tdx/")
    if parts.query or parts.fragment:
        raise TdxError(f"{where}: {text!r} has a query or fragment; give a plain base URL")
    return text if text.endswith("/") else text + "/"


def parse_flag(value, where: str = PUSH_VARIABLE) -> bool:
    """on/off as ``TDX_RULES_REMOTE_CACHE_PUSH`` and ``push=`` take it."""
    if isinstance(value, bool):
        return value
    text = str(value if value is not None else "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TdxError(f"{where}: expected on/off (1 or 0), got {value!r}")


def authorization(credential: Optional[str]) -> Optional[str]:
    """The ``Authorization`` header value for a ``TDX_RULES_REMOTE_CACHE_AUTH`` value."""
    if not credential:
        return None
    if credential[:7].lower() == "bearer ":
        return "Bearer " + credential[7:].strip()
    if ":" in credential:
        return "Basic " + base64.b64encode(credential.encode("utf-8")).decode("ascii")
    return "Bearer " + credential.strip()


def credential_from_environment() -> Optional[str]:
    """``TDX_RULES_REMOTE_CACHE_AUTH``: the one value a stage reads from its environment, so
    that the secret stays out of command lines (which ``VERBOSE=1`` prints) and config files."""
    return os.environ.get(AUTH_VARIABLE) or None


def entry_path(key: str) -> str:
    """Where a build output with SCons cache key ``key`` lives below the base URL."""
    if not _KEY.match(key or ""):
        raise ValueError(f"not a cache key: {key!r}")
    return f"{key[:2].upper()}/{key}"


def blob_path(sha256: str) -> str:
    """Where a download with SHA-256 ``sha256`` lives below the base URL."""
    if not _HEX64.match(sha256 or ""):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    return f"sha256/{sha256[:2]}/{sha256}"


def entry_header(key: str, sha256: str, size: int, mode: int) -> bytes:
    return b" ".join([MAGIC, VERSION, key.encode(), sha256.encode(), str(size).encode(), b"%o" % mode]) + b"\n"


def parse_entry_header(line: bytes, key: str):
    """(sha256, size, mode) of a header line; DamagedEntry if it is not one for ``key``."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        magic, version, found_key, sha, size, mode = (field.decode("ascii") for field in fields)
        size_value, mode_value = int(size), int(mode, 8)
    except (ValueError, UnicodeDecodeError):
        raise DamagedEntry("no valid entry header") from None
    if magic.encode() != MAGIC or version.encode() != VERSION:
        raise DamagedEntry(f"unknown entry format {magic} {version}")
    if found_key != key:
        raise DamagedEntry(f"entry of key {found_key[:16]}… filed under {key[:16]}…")
    if not _HEX64.match(sha) or size_value < 0 or not 0 <= mode_value <= 0o7777:
        raise DamagedEntry("no valid entry header")
    return sha, size_value, mode_value


class _Body:
    """A PUT body with a known length (so it is sent with Content-Length, not chunked): a
    prefix, then the bytes of a file, read piece by piece."""

    def __init__(self, prefix: bytes, handle, size: int):
        self.prefix, self.handle, self.size = prefix, handle, size

    def __len__(self) -> int:
        return len(self.prefix) + self.size

    def read(self, amount: int = -1) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            return data
        return self.handle.read(CHUNK if amount is None or amount < 0 else amount)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    for marker in ("Connection refused", "Connection reset", "timed out", "Name or service not known",
                   "Remote end closed", "Connection aborted", "IncompleteRead", "Connection broken"):
        if marker in text:
            return marker.lower()
    return (text[:120] + "…") if len(text) > 120 else text or type(exc).__name__


class Remote:
    """One remote cache: its base URL, whether to upload, and its credential (kept out of repr).

    After the first :class:`RemoteFault` the object is ``failed`` and every later call is a
    miss without a request, so one broken server costs one timeout per process.
    """

    def __init__(self, url: str, push: bool = False, credential: Optional[str] = None,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
        self.url = parse_url(url)
        self.push = bool(push)
        self._authorization = authorization(credential)
        self.timeout = (connect_timeout, read_timeout)
        self.failed: Optional[str] = None
        self._session = None

    def __repr__(self) -> str:
        return f"Remote({self.url!r}, push={self.push})"

    def _headers(self) -> dict:
        headers = {"User-Agent": "tdx-rules", "Accept-Encoding": "identity"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        return headers

    def _http(self):
        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False  # no netrc credentials, no proxy from the environment
        return self._session

    def fault(self, message: str) -> RemoteFault:
        self.failed = message
        return RemoteFault(message)

    def _status_fault(self, method: str, path: str, status: int) -> RemoteFault:
        hint = {401: f"; check {AUTH_VARIABLE}", 403: f"; check {AUTH_VARIABLE} and the server's permissions",
                405: "; the server does not accept this method (for nginx: dav_methods PUT)",
                413: "; the server refuses bodies this large (for nginx: client_max_body_size 0)"}
        return self.fault(f"{method} {self.url}{path}: HTTP {status}{hint.get(status, '')}")

    def get(self, path: str, write: Callable[[bytes], None]) -> bool:
        """Stream the body at ``path`` into ``write``; False on 404/410; RemoteFault otherwise."""
        if self.failed:
            return False
        url = self.url + path
        try:
            response = self._http().get(url, stream=True, timeout=self.timeout, headers=self._headers(),
                                        allow_redirects=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self.fault(f"GET {url}: {_short(exc)}") from None
        with response:
            if response.status_code in (404, 410):
                return False
            if response.status_code != 200:
                raise self._status_fault("GET", path, response.status_code)
            window_start, window_bytes = time.monotonic(), 0
            while True:
                try:
                    chunk = response.raw.read1(CHUNK, decode_content=False)
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                    raise self.fault(f"GET {url}: {_short(exc)}") from None
                if not chunk:
                    return True
                write(chunk)
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= self.timeout[1]:
                    if window_bytes < LOW_SPEED * elapsed:
                        raise self.fault(f"GET {url}: slower than {LOW_SPEED} bytes/s")
                    window_start, window_bytes = time.monotonic(), 0

    def put(self, path: str, body) -> None:
        """Store ``body`` (bytes, or an object with ``read`` and ``__len__``) at ``path``."""
        if self.failed:
            return
        url = self.url + path
        try:
            response = self._http().put(url, data=body, timeout=self.timeout,
                                        headers=dict(self._headers(), **{"Content-Type": "application/octet-stream"}),
                                        allow_redirects=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self.fault(f"PUT {url}: {_short(exc)}") from None
        with response:
            if not 200 <= response.status_code < 300:
                raise self._status_fault("PUT", path, response.status_code)

    # --- build outputs --------------------------------------------------------------

    def get_entry(self, key: str, dest: str) -> Optional[int]:
        """Write the build output of ``key`` to ``dest``; its mode, or None on a miss.

        ``dest`` appears only complete and verified; DamagedEntry (nothing written) when the
        bytes do not match the entry's header; RemoteFault when the server fails.
        """
        reader = _EntryReader(key)
        try:
            with atomic_output(dest) as out:
                if not self.get(entry_path(key), lambda chunk: out.write(reader.feed(chunk))):
                    raise _Miss()
                reader.finish()
        except _Miss:
            return None
        return reader.mode

    def put_entry(self, key: str, path: str, mode: int) -> None:
        """Upload the file at ``path`` as the build output of ``key``."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
            size = handle.tell()
            handle.seek(0)
            self.put(entry_path(key), _Body(entry_header(key, digest.hexdigest(), size, mode), handle, size))

    # --- downloads --------------------------------------------------------------

    def get_blob(self, sha256: str, dest: str) -> bool:
        """Write the download with ``sha256`` to ``dest`` (verified, atomically); False on a miss."""
        digest = hashlib.sha256()

        def write(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        try:
            with atomic_output(dest) as out:
                if not self.get(blob_path(sha256), write):
                    raise _Miss()
                if digest.hexdigest() != sha256:
                    raise DamagedEntry("SHA-256 mismatch (truncated or corrupted)")
        except _Miss:
            return False
        return True

    def put_blob(self, sha256: str, path: str) -> None:
        """Upload the verified download at ``path`` under its SHA-256."""
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            self.put(blob_path(sha256), _Body(b"", handle, size))


class _Miss(Exception):
    """Internal: the server has no such entry (leaves atomic_output without a file)."""


class _EntryReader:
    """Checks the body of an entry as it streams: the header line, then bytes against it."""

    def __init__(self, key: str):
        self.key, self.header, self.parsed = key, b"", None
        self.digest, self.size = hashlib.sha256(), 0

    @property
    def mode(self) -> int:
        return self.parsed[2]

    def feed(self, chunk: bytes) -> bytes:
        """The file bytes in ``chunk`` (after the header); DamagedEntry past the announced size."""
        if self.parsed is None:
            self.header += chunk
            newline = self.header.find(b"\n")
            if newline < 0:
                if len(self.header) > _MAX_HEADER:
                    raise DamagedEntry("no valid entry header")
                return b""
            chunk = self.header[newline + 1:]
            self.parsed = parse_entry_header(self.header[:newline + 1], self.key)
        self.digest.update(chunk)
        self.size += len(chunk)
        if self.size > self.parsed[1]:
            raise DamagedEntry(f"longer than the {self.parsed[1]} bytes its header gives")
        return chunk

    def finish(self) -> None:
        if self.parsed is None:
            raise DamagedEntry("no valid entry header (truncated)")
        sha, size, _ = self.parsed
        if self.size != size:
            raise DamagedEntry(f"{self.size} of {size} bytes (truncated)")
        if self.digest.hexdigest() != sha:
            raise DamagedEntry("SHA-256 mismatch (corrupted)")


def report_fault(fault: RemoteFault) -> None:
    """Tell the SCons glue (reading a stage's stderr) that the server failed; it warns once."""
    import sys

    print(FAULT_PREFIX + str(fault), file=sys.stderr, flush=True)
