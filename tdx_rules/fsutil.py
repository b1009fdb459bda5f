"""Small file helpers shared by every stage: atomic writes and streaming hashes."""

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading

from .errors import TdxError

CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_output(path, mode="wb"):
    """Open a temp file beside ``path``; rename it over ``path`` only on success.

    An exception (or a killed process) never leaves a partial ``path`` behind.  Build
    outputs are not fsynced: SCons does not sync its own record of them (.sconsign) either,
    and a sync per output cost 15 % of a 200 MB pack.  Downloads, shared between projects,
    are synced (upstream/fetch.py).
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes, mode=0o644):
    """Atomically write ``data`` to ``path`` and set its permission bits."""
    with atomic_output(path) as out:
        out.write(data)
    os.chmod(path, mode)


def copy_file(src, dst, mode=None):
    """Stream ``src`` to ``dst`` atomically; return the SHA-256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(src, "rb") as inp, atomic_output(dst) as out:
        for chunk in iter(lambda: inp.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
    if mode is not None:
        os.chmod(dst, mode)
    return digest.hexdigest()


def sha256_file(path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path, what: str, hint: str) -> dict:
    """The JSON object in ``path``; a TdxError naming ``what`` and ending with ``hint`` if the
    file cannot be read, is not JSON or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise TdxError(f"cannot read {what} {path}: {error.strerror}") from None
    except ValueError as error:
        raise TdxError(f"{what} {path} is not valid JSON ({error}); {hint}") from None
    if not isinstance(data, dict):
        raise TdxError(f"{what} {path} must hold a JSON object; {hint}")
    return data


def write_json(path, data) -> None:
    """Canonical JSON (sorted keys), written atomically."""
    with atomic_output(path, "w") as out:
        json.dump(data, out, indent=1, sort_keys=True)
        out.write("\n")


class FileSlice(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``offset`` of an open file (an ar or tar member)."""

    def __init__(self, handle, offset: int, size: int):
        super().__init__()
        self._handle = handle
        self._left = size
        handle.seek(offset)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._left)
        if want <= 0:
            return 0
        data = self._handle.read(want)
        buffer[:len(data)] = data
        self._left -= len(data)
        return len(data)


# Decompression-bomb bound for archives read from downloads and images: past
# BOMB_FLOOR bytes of output, more than BOMB_RATIO bytes out per byte in is refused.
# Real kernel packages expand about 4x and container layers rarely past 20x.
BOMB_FLOOR = 256 << 20
BOMB_RATIO = 100


def expansion_exceeded(compressed: int, expanded: int) -> bool:
    """Whether ``expanded`` output bytes from ``compressed`` input bytes look like a decompression bomb."""
    return expanded > BOMB_FLOOR and expanded > BOMB_RATIO * max(compressed, 1)


CACHE_PREFIX = "cache:"


def cache_relative(path, cache: str):
    """``path`` as the kernel info records it: ``cache:<relative>`` inside the download cache
    (so the info stays valid on a machine whose cache lives elsewhere, as when it comes from
    a shared CacheDir), else absolute; None stays None."""
    if path is None:
        return None
    path, cache = os.path.abspath(path), os.path.abspath(cache)
    if os.path.commonpath([path, cache]) == cache:
        return CACHE_PREFIX + os.path.relpath(path, cache).replace(os.sep, "/")
    return path


def resolve_recorded(path, cache: str):
    """The directory a recorded ``modules_root`` names on this machine."""
    if path is None or not path.startswith(CACHE_PREFIX):
        return path
    relative = path[len(CACHE_PREFIX):]
    if relative.startswith("/") or ".." in relative.split("/"):
        raise TdxError(f"kernel info names {path!r}, which is not inside the download cache; rebuild the kernel stage")
    return os.path.join(cache, relative)


class RangeHasher(threading.Thread):
    """Digests of byte ranges of files, computed in a thread while the caller goes on.
    ``ranges`` are ``(path, offset, size)`` (size None: to the end of the file), an
    iterable the thread consumes as it goes (it must not change meanwhile);
    ``digest`` makes a hashlib-style object (SHA-256 unless told), ``finish`` turns
    one into its result (its hex digest unless told). :meth:`result` waits and
    returns the results in order, or raises what reading raised."""

    def __init__(self, ranges, digest=hashlib.sha256, finish=lambda digest: digest.hexdigest()):
        super().__init__(daemon=True)
        self._ranges = ranges
        self._digest = digest
        self._finish = finish
        self._digests: list = []
        self._error = None

    def run(self) -> None:
        handles: dict = {}
        try:
            for path, offset, size in self._ranges:
                handle = handles.get(path)
                if handle is None:
                    handle = handles[path] = open(path, "rb", buffering=0)
                digest = self._digest()
                handle.seek(offset)
                while size is None or size:
                    data = handle.read(CHUNK if size is None else min(size, CHUNK))
                    if not data:
                        if size is None:
                            break
                        raise EOFError(f"{path} ends {size} bytes before the end of the range")
                    digest.update(data)
                    if size is not None:
                        size -= len(data)
                self._digests.append(self._finish(digest))
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            for handle in handles.values():
                handle.close()

    def result(self) -> list:
        self.join()
        if self._error is not None:
            raise self._error
        return self._digests
