"""Read an initramfs image as the kernel does: a sequence of segments, each an
uncompressed newc archive or a compressed stream (gzip, zstd, xz, lzma, bzip2, lz4
legacy) holding one or more newc archives, with zero padding between them.

``members(path)`` streams the members; bodies are read in chunks (for hashing) and never
held whole, except symlink targets.  Bad input raises TdxError naming the offset.
"""

import bz2
import dataclasses
import hashlib
import lzma
import stat
import struct
import zlib
from typing import Iterator, Optional

from ..errors import TdxError
from ..fsutil import expansion_exceeded
from .newc import HEADER_LEN, TRAILER, header_fields
from .pack import LZ4_LEGACY_MAGIC

CHUNK = 1 << 20
MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (struct.pack("<I", LZ4_LEGACY_MAGIC), "lz4"),
    (b"\x5d\x00\x00", "lzma"),
)
TYPE_LETTER = {stat.S_IFREG: "-", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
               stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}
TYPE_NAME = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
             stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


@dataclasses.dataclass(frozen=True)
class Member:
    """One archive member as listed by ``inspect``."""

    path: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: tuple
    target: Optional[str]
    sha256: Optional[str]
    segment: int
    compression: str

    @property
    def kind(self) -> str:
        return TYPE_NAME.get(stat.S_IFMT(self.mode), "unknown")

    def mode_string(self) -> str:
        return TYPE_LETTER.get(stat.S_IFMT(self.mode), "?") + stat.filemode(self.mode)[1:]

    def as_dict(self) -> dict:
        out = {"path": self.path, "type": self.kind, "mode": f"{stat.S_IMODE(self.mode):04o}", "uid": self.uid,
               "gid": self.gid, "size": self.size, "nlink": self.nlink, "segment": self.segment,
               "compression": self.compression}
        if self.target is not None:
            out["target"] = self.target
        if stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode):
            out["rdev"] = f"{self.rdev[0]},{self.rdev[1]}"
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


class _Source:
    """The raw image with a cursor; knows where each compressed stream ended."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.handle = open(path, "rb")
        except OSError as error:
            raise TdxError(f"{path}: cannot read: {error.strerror}") from None

    def close(self):
        self.handle.close()


class _Plain:
    """Reads a newc segment straight from the image file."""

    def __init__(self, source: _Source):
        self.handle = source.handle

    def read(self, size: int) -> bytes:
        return self.handle.read(size)


class _Decompressing:
    """Reads the decompressed bytes of one compressed stream starting at the cursor, and
    leaves the image's cursor just after that stream when it ends."""

    def __init__(self, source: _Source, kind: str, start: int):
        self.source = source
        self.kind = kind
        self.start = start
        self.pending = b""
        self.eof = False
        self.compressed = 0
        self.expanded = 0
        if kind == "gzip":
            self.engine = zlib.decompressobj(wbits=31)
        elif kind == "xz":
            self.engine = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        elif kind == "lzma":
            self.engine = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
        elif kind == "bzip2":
            self.engine = bz2.BZ2Decompressor()
        elif kind == "zstd":
            import zstandard

            self.engine = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        elif kind == "lz4":
            import lz4.block

            self.lz4 = lz4.block
            self.engine = None
            source.handle.read(4)
        else:  # pragma: no cover - MAGICS and this list are the same
            raise TdxError(f"{source.path}: unknown compression {kind}")

    def _more(self) -> bool:
        """Decompress another piece into ``pending``; False at the end of the stream."""
        if self.eof:
            return False
        handle = self.source.handle
        if self.kind == "lz4":
            return self._more_lz4(handle)
        data = handle.read(CHUNK)
        if not data:
            if self.kind == "lzma":  # .lzma streams may end without an end marker
                self.eof = True
                return False
            raise TdxError(f"{self.source.path}: {self.kind} stream starting at offset {self.start} is truncated")
        self.compressed += len(data)
        try:
            out = self.engine.decompress(data)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as error:
            raise TdxError(f"{self.source.path}: corrupt {self.kind} stream at offset {self.start}: {error}") from None
        except Exception as error:  # zstandard.ZstdError
            raise TdxError(f"{self.source.path}: corrupt {self.kind} stream at offset {self.start}: {error}") from None
        self._take(out)
        if getattr(self.engine, "eof", False):
            unused = self.engine.unused_data
            handle.seek(-len(unused), 1)
            self.eof = True
        return True

    def _more_lz4(self, handle) -> bool:
        head = handle.read(4)
        if len(head) < 4:
            handle.seek(-len(head), 1)
            self.eof = True
            return False
        (size,) = struct.unpack("<I", head)
        if size == LZ4_LEGACY_MAGIC or size == 0:
            handle.seek(-4, 1)
            self.eof = True
            return False
        data = handle.read(size)
        if len(data) < size:
            raise TdxError(f"{self.source.path}: lz4 stream starting at offset {self.start} is truncated")
        self.compressed += size + 4
        try:
            out = self.lz4.decompress(data, uncompressed_size=8 << 20)
        except Exception as error:  # lz4.block.LZ4BlockError
            raise TdxError(f"{self.source.path}: corrupt lz4 block at offset {self.start}: {error}") from None
        self._take(out)
        return True

    def _take(self, out: bytes) -> None:
        self.expanded += len(out)
        if expansion_exceeded(self.compressed, self.expanded):
            raise TdxError(f"{self.source.path}: the {self.kind} stream at offset {self.start} expands more than "
                           "100:1 past 256 MiB; refusing it as a decompression bomb")
        self.pending += out

    def read(self, size: int) -> bytes:
        while len(self.pending) < size and self._more():
            pass
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    def at_end(self) -> bool:
        """True when nothing but zero padding is left in this stream (consumes the padding)."""
        while True:
            stripped = self.pending.lstrip(b"\0")
            if stripped:
                self.pending = stripped
                return False
            self.pending = b""
            if not self._more():
                return True

    def finish(self) -> None:
        """Read to the end of the compressed stream so the image cursor lands after it."""
        while self._more():
            if self.pending.strip(b"\0"):
                raise TdxError(f"{self.source.path}: data after the last archive in the {self.kind} stream "
                               f"at offset {self.start}")
            self.pending = b""


def _detect(source: _Source):
    """Skip zero padding; return (offset, kind) of the next segment, or None at the end."""
    handle = source.handle
    while True:
        start = handle.tell()
        head = handle.read(8)
        if not head:
            return None
        stripped = head.lstrip(b"\0")
        if not stripped:
            continue
        handle.seek(start + len(head) - len(stripped))
        break
    offset = handle.tell()
    head = handle.read(6)
    handle.seek(offset)
    if head.startswith(b"0707"):
        return offset, "none"
    for magic, kind in MAGICS:
        if head.startswith(magic):
            return offset, kind
    raise TdxError(f"{source.path}: offset {offset}: neither a newc archive nor a compression the kernel reads "
                   f"(starts with {head.hex()})")


def _read_exact(stream, size: int, path: str, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TdxError(f"{path}: truncated archive ({what})")
    return data


def _archive(stream, path: str, segment: int, kind: str, with_hash: bool) -> Iterator[Member]:
    """Members of one newc archive from ``stream`` up to and including its trailer."""
    while True:
        head = _read_exact(stream, HEADER_LEN, path, f"header in segment {segment}")
        if head[:6] not in (b"070701", b"070702"):
            raise TdxError(f"{path}: segment {segment}: not a newc header ({head[:6]!r})")
        fields = header_fields(head)
        if fields is None:
            raise TdxError(f"{path}: segment {segment}: corrupt newc header")
        mode, uid, gid, nlink, size = fields[1], fields[2], fields[3], fields[4], fields[6]
        rdev, namesize = (fields[9], fields[10]), fields[11]
        raw = _read_exact(stream, namesize, path, "member name")
        if not namesize or raw[-1:] != b"\0":
            raise TdxError(f"{path}: segment {segment}: corrupt member name")
        name = raw[:-1].decode("utf-8", "surrogateescape")
        _read_exact(stream, -(HEADER_LEN + namesize) % 4, path, "name padding")
        if name == TRAILER:
            return
        target = digest = None
        if stat.S_ISLNK(mode):
            target = _read_exact(stream, size, path, f"link target of {name}").decode("utf-8", "surrogateescape")
        else:
            hasher = hashlib.sha256() if with_hash and stat.S_ISREG(mode) else None
            left = size
            while left:
                piece = _read_exact(stream, min(left, CHUNK), path, f"body of {name}")
                left -= len(piece)
                if hasher:
                    hasher.update(piece)
            digest = hasher.hexdigest() if hasher else None
        _read_exact(stream, -size % 4, path, "body padding")
        yield Member(name, mode, uid, gid, size, nlink, rdev, target, digest, segment, kind)


def members(path, with_hash: bool = False) -> Iterator[Member]:
    """Every member of every archive in the initramfs image at ``path``, in order."""
    source = _Source(path)
    try:
        segment = 0
        while True:
            found = _detect(source)
            if found is None:
                return
            offset, kind = found
            if kind == "none":
                yield from _archive(_Plain(source), source.path, segment, kind, with_hash)
            else:
                stream = _Decompressing(source, kind, offset)
                while not stream.at_end():
                    yield from _archive(stream, source.path, segment, kind, with_hash)
                stream.finish()
            segment += 1
    finally:
        source.close()
