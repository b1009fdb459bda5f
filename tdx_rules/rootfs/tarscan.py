"""The members of an uncompressed tar with the offsets of their data: one sequential pass.

:func:`iter_members` reads USTAR, GNU (long names and link names) and PAX headers (xattrs as
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``) as :mod:`tarfile` reads them, from a tar in
a file (:func:`scan_tar`: bodies are then copied straight from the layer blob) or from one
arriving in chunks (:class:`ChunkStream`: a layer being decompressed). Whatever it does not
handle itself (sparse members, base-256 numbers, unknown types, a damaged header, no
end-of-archive block) raises :class:`Unsupported`: the caller then reads the layer with
:mod:`tarfile`. tests/test_tar_scan.py checks the two against each other.
"""

import base64
import os
import urllib.parse
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ..fsutil import CHUNK
from .member import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Member

_SCAN_KINDS = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCK,
               b"5": DIR, b"6": FIFO}
_ZERO_BLOCK = bytes(512)


class Unsupported(Exception):
    """The archive uses something left to :mod:`tarfile`, is damaged or ends early."""


# Header numbers already read: modes, owners and sizes repeat from member to member.
_OCTAL_MEMO: Dict[bytes, Optional[int]] = {}
_OCTAL_MEMO_SIZE = 1 << 14
_MISSING = object()


def _octal(field: bytes) -> Optional[int]:
    """A header number as tarfile reads it (up to a NUL, blanks around), or None."""
    value = _OCTAL_MEMO.get(field, _MISSING)
    if value is _MISSING:
        value = _read_octal(field)
        if len(_OCTAL_MEMO) < _OCTAL_MEMO_SIZE:
            _OCTAL_MEMO[field] = value
    return value


def _read_octal(field: bytes) -> Optional[int]:
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0 if field[:1] not in (b"\x80", b"\xff") else None
    if not text.isdigit():
        return None  # base-256, a sign, an underscore: left to tarfile
    try:
        return int(text, 8)
    except ValueError:
        return None


def _pax_records(payload: bytes) -> Optional[Dict[str, bytes]]:
    """The records of a pax header; None if damaged or describing a sparse file."""
    records: Dict[str, bytes] = {}
    pos = 0
    while pos < len(payload) and payload[pos:pos + 1] != b"\0":
        space = payload.find(b" ", pos)
        if space < 0 or not payload[pos:space].isdigit():
            return None
        end = pos + int(payload[pos:space])
        equals = payload.find(b"=", space)
        if end > len(payload) or end <= space or payload[end - 1:end] != b"\n" or not space < equals < end:
            return None
        key = payload[space + 1:equals].decode("utf-8", "surrogateescape")
        if key.startswith("GNU.sparse"):
            return None
        records[key] = payload[equals + 1:end - 1]
        pos = end
    return records


class _Source:
    """Front-to-back reads of a tar: ``pos`` is the archive offset of the next byte handed out."""

    def __init__(self):
        self._view = memoryview(b"")
        self.pos = 0

    def _fill(self) -> bool:
        """Load more bytes into ``_view``; False at the end."""
        raise NotImplementedError

    def take(self, count: int) -> Optional[bytes]:
        """The next ``count`` bytes, or None when the tar ends first."""
        if count <= len(self._view):  # the usual case: all buffered
            part = bytes(self._view[:count])
            self._view = self._view[count:]
            self.pos += count
            return part
        parts = []
        while count:
            if not self._view and not self._fill():
                return None
            part = self._view[:count]
            parts.append(bytes(part))
            self._view = self._view[len(part):]
            self.pos += len(part)
            count -= len(part)
        return b"".join(parts)


class Sequential(_Source):
    """``size`` bytes at ``base`` of ``fd``, read in CHUNK-sized reads; what :meth:`skip`
    passes is not read."""

    def __init__(self, fd: int, base: int, size: int):
        super().__init__()
        self._fd, self._base, self._size = fd, base, size
        self._buffer = bytearray(CHUNK)
        self._read = 0  # bytes read from the file so far

    def _fill(self) -> bool:
        want = min(CHUNK, self._size - self._read)
        if want <= 0:
            return False
        n = os.preadv(self._fd, [memoryview(self._buffer)[:want]], self._base + self._read)
        if n <= 0:
            return False
        self._read += n
        self._view = memoryview(self._buffer)[:n]
        return True

    def skip(self, count: int) -> bool:
        """Step over the next ``count`` bytes; False past the end."""
        buffered = min(count, len(self._view))
        self._view = self._view[buffered:]
        self._read += count - buffered
        self.pos += count
        return self._read <= self._size


class ChunkStream(_Source):
    """A tar that arrives in chunks: ``next_chunk()`` returns the next bytes, b"" at the end.
    A chunk is let go as soon as it is passed."""

    def __init__(self, next_chunk: Callable[[], bytes]):
        super().__init__()
        self._next_chunk = next_chunk

    def _fill(self) -> bool:
        chunk = self._next_chunk()
        self._view = memoryview(chunk)
        return bool(chunk)

    def skip(self, count: int) -> bool:
        """Step over the next ``count`` bytes; False when the stream ends first."""
        self.pos += count
        while count:
            if not self._view and not self._fill():
                return False
            step = min(count, len(self._view))
            self._view = self._view[step:]
            count -= step
        return True


def scan_tar(fd: int, base: int, size: int) -> Optional[List[Tuple[Member, int]]]:
    """Every member of the uncompressed tar at ``base`` of ``fd`` with its data offset (from
    ``base``), in one sequential read; None when the archive uses something left to
    :mod:`tarfile` (sparse files, base-256 numbers, unknown types, a damaged header, no
    end-of-archive block)."""
    try:
        return list(iter_members(Sequential(fd, base, size)))
    except Unsupported:
        return None


def iter_members(stream: _Source) -> Iterator[Tuple[Member, int]]:
    """Every member of the tar read from ``stream`` (a :class:`ChunkStream`, say) with the
    archive offset of its data, each yielded once its body has been passed; stops at the
    end-of-archive block. Raises :class:`Unsupported` where :func:`scan_tar` returns None."""
    global_pax: Dict[str, bytes] = {}
    pending: Dict[str, bytes] = {}
    while True:
        block = stream.take(512)
        if block is None:
            raise Unsupported("no end-of-archive block")
        if block == _ZERO_BLOCK:
            return
        if _octal(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
            raise Unsupported("header checksum")
        length = _octal(block[124:136])
        if length is None:
            raise Unsupported("size field")
        data = stream.pos
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            payload = stream.take(length)
            if payload is None or not stream.skip(-length % 512):
                raise Unsupported("extended header")
            if kind in (b"x", b"g"):
                records = _pax_records(payload)
                if records is None:
                    raise Unsupported("pax records")
                (pending if kind == b"x" else global_pax).update(records)
            else:
                pending["path" if kind == b"L" else "linkpath"] = payload.split(b"\0", 1)[0]
            continue
        member_kind = _SCAN_KINDS.get(kind)
        if member_kind is None:
            raise Unsupported("member type")
        mode, uid, gid = _octal(block[100:108]), _octal(block[108:116]), _octal(block[116:124])
        major = minor = 0
        if member_kind in (CHAR, BLOCK):
            major, minor = _octal(block[329:337]), _octal(block[337:345])
        if mode is None or uid is None or gid is None or major is None or minor is None:
            raise Unsupported("number field")
        # As tarfile reads a header: a V7 directory is a file named with a slash; a
        # directory's slashes go; a ustar prefix is joined; pax "path" loses its slashes.
        name = block[0:100].split(b"\0", 1)[0]
        if kind == b"\0" and name.endswith(b"/"):
            member_kind = DIR
        if member_kind == DIR:
            name = name.rstrip(b"/")
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        linkname = block[157:257].split(b"\0", 1)[0]
        pax = dict(global_pax, **pending) if global_pax else pending
        pending = {}
        try:
            name = pax["path"].rstrip(b"/") if "path" in pax else name
            linkname = pax.get("linkpath", linkname)
            uid = int(pax.get("uid", uid))
            gid = int(pax.get("gid", gid))
            length = int(pax.get("size", length))
        except ValueError:
            raise Unsupported("pax number") from None
        xattrs = {}
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                xattrs[key[len("SCHILY.xattr."):]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                xattrs[urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])] = base64.b64decode(
                    value + b"=" * (-len(value) % 4))
        text = name.decode("utf-8", "surrogateescape")
        if member_kind == DIR:
            text = text.rstrip("/")
        if member_kind == FILE and not stream.skip(length + (-length % 512)):
            raise Unsupported("body")
        yield (Member(text, member_kind, mode & 0o7777, uid, gid, (major, minor),
                      linkname.decode("utf-8", "surrogateescape"), length if member_kind == FILE else 0, xattrs), data)
