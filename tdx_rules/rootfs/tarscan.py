"""The members of an uncompressed tar, read in place: one sequential pass over the headers.

:func:`scan_tar` reads USTAR, GNU (long names and link names) and PAX headers (xattrs as
``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*``) as :mod:`tarfile` reads them, and returns
every member with the offset of its data, so that bodies can be copied straight from the
layer blob. Whatever it does not handle itself (sparse members, base-256 numbers, unknown
types, a damaged header, no end-of-archive block) makes it return None: the caller then
reads the layer with :mod:`tarfile`. tests/test_tar_scan.py checks the two against each
other.
"""

import base64
import os
import urllib.parse
from typing import Dict, List, Optional, Tuple

from ..fsutil import CHUNK
from .member import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Member

_SCAN_KINDS = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCK,
               b"5": DIR, b"6": FIFO}
_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> Optional[int]:
    """A header number as tarfile reads it (up to a NUL, blanks around), or None."""
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
        records[payload[space + 1:equals].decode("utf-8", "surrogateescape")] = payload[equals + 1:end - 1]
        pos = end
    return records


class _Sequential:
    """Reads ``size`` bytes at ``base`` of ``fd`` front to back in CHUNK-sized reads,
    stepping over what :meth:`skip` passes."""

    def __init__(self, fd: int, base: int, size: int):
        self._fd, self._base, self._size = fd, base, size
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)[:0]
        self._read = 0  # bytes read from the file so far
        self.pos = 0  # archive offset of the next byte handed out

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

    def take(self, count: int) -> Optional[bytes]:
        """The next ``count`` bytes, or None when the file ends first."""
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

    def skip(self, count: int) -> bool:
        """Step over the next ``count`` bytes (what is not buffered is not read); False past the end."""
        buffered = min(count, len(self._view))
        self._view = self._view[buffered:]
        self._read += count - buffered
        self.pos += count
        return self._read <= self._size


def scan_tar(fd: int, base: int, size: int) -> Optional[List[Tuple[Member, int]]]:
    """Every member of the uncompressed tar at ``base`` of ``fd`` with its data offset (from
    ``base``), in one sequential read; None when the archive uses something left to
    :mod:`tarfile` (sparse files, base-256 numbers, unknown types, a damaged header, no
    end-of-archive block)."""
    members: List[Tuple[Member, int]] = []
    global_pax: Dict[str, bytes] = {}
    pending: Dict[str, bytes] = {}
    stream = _Sequential(fd, base, size)
    while True:
        block = stream.take(512)
        if block is None:
            return None
        if block == _ZERO_BLOCK:
            return members
        if _octal(block[148:156]) != sum(block) - sum(block[148:156]) + 256:
            return None
        length = _octal(block[124:136])
        if length is None:
            return None
        data = stream.pos
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            payload = stream.take(length)
            if payload is None or not stream.skip(-length % 512):
                return None
            if kind in (b"x", b"g"):
                records = _pax_records(payload)
                if records is None or any(key.startswith("GNU.sparse") for key in records):
                    return None
                (pending if kind == b"x" else global_pax).update(records)
            else:
                pending["path" if kind == b"L" else "linkpath"] = payload.split(b"\0", 1)[0]
            continue
        member_kind = _SCAN_KINDS.get(kind)
        if member_kind is None:
            return None
        mode, uid, gid = _octal(block[100:108]), _octal(block[108:116]), _octal(block[116:124])
        major = minor = 0
        if member_kind in (CHAR, BLOCK):
            major, minor = _octal(block[329:337]), _octal(block[337:345])
        if mode is None or uid is None or gid is None or major is None or minor is None:
            return None
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
            return None
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
            return None
        members.append((Member(text, member_kind, mode & 0o7777, uid, gid, (major, minor),
                               linkname.decode("utf-8", "surrogateescape"), length if member_kind == FILE else 0,
                               xattrs), data))
