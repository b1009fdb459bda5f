"""Layer blobs decompressed in a thread of their own, so that the caller's thread goes on meanwhile.

:class:`Decompressor` reads a blob and decompresses it by its magic bytes: gzip by
zlib-ng's inflate (the ``zlib-ng`` package pinned in pyproject.toml, where the numbers
behind that choice are), zstd by libzstd (``zstandard``); both release the GIL while they
work. gzip streams may hold several members one after another (``cat a.gz b.gz``,
writers that start a member per flush), also with NUL padding between them, read as
Python's ``gzip`` module reads them (GNU gzip stops at such padding); each member's
CRC-32 and length are checked. The output is handed out in bounded chunks, together with
the raw bytes it came from, so that the consumer hashes exactly the bytes that were
decompressed.
"""

import hashlib
import queue
import threading
from typing import Callable, List

import zstandard
from zlib_ng import zlib_ng

from ..errors import TdxError
from ..fsutil import CHUNK, expansion_exceeded

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_WBITS = 16 + zlib_ng.MAX_WBITS  # a gzip header and trailer around the deflate stream
# Chunks a Decompressor may run ahead of its consumer (each at most CHUNK bytes of output).
QUEUE_DEPTH = 4
# zlib's words for damaged gzip input, in the words of GNU gzip and Python's gzip module.
_GZIP_DAMAGE = {"incorrect data check": "CRC check failed: a gzip member's CRC-32 does not match its data",
                "incorrect length check": "Incorrect length of data produced: a gzip member's length field is wrong",
                "incorrect header check": "Not a gzipped file: no gzip member where one should start",
                "header crc mismatch": "CRC check failed: a gzip member's header CRC does not match"}


class CorruptGzip(ValueError):
    """A gzip stream whose bytes are damaged (named as gzip names the damage)."""


# What the codecs raise for damaged input (EOFError: the stream ends early).
CORRUPT_STREAM = (EOFError, CorruptGzip, zlib_ng.error, zstandard.ZstdError)


class Decompressor(threading.Thread):
    """One layer blob decompressed in a thread of its own.

    The thread reads the blob from ``opener()`` (a context manager yielding a binary
    file), decompresses it by its magic bytes (gzip: every member; zstd: every frame;
    anything else is passed on as it is) and queues the output in chunks of at most CHUNK
    bytes, at most QUEUE_DEPTH of them ahead of :meth:`next_chunk`. :meth:`next_chunk`,
    in the consumer's thread, hashes and counts the raw bytes behind each chunk
    (:attr:`blob_sha256`, :attr:`blob_size`: final once it returned b"") and raises what
    stopped the thread: TdxError naming ``where`` for output out of proportion to the
    input (a decompression bomb), what the codec raises for damaged input (EOFError for a
    stream that ends early), OSError for an unreadable blob.
    """

    def __init__(self, opener: Callable, where: str):
        super().__init__(daemon=True)
        self._opener, self._where = opener, where
        self._queue: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self._stopping = False
        self._finished = False
        self._handle = None  # the blob, open while the thread runs
        self._raw: List[bytes] = []  # raw bytes read since the last chunk was queued
        self._raw_size = 0
        self._output_size = 0
        self.blob_sha256 = hashlib.sha256()
        self.blob_size = 0

    # ---- the thread

    def run(self) -> None:
        try:
            with self._opener() as handle:
                self._handle = handle
                self._decompress()
                while not self._stopping and self._read():  # past the stream's end: hashed too
                    pass
            self._queue_item(None)
        except BaseException as exc:  # handed to the consumer by next_chunk()
            self._queue_item(exc)

    def _read(self) -> bytes:
        data = self._handle.read(CHUNK)
        if data:
            self._raw.append(data)
            self._raw_size += len(data)
        return data

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self._output_size += len(data)
        if expansion_exceeded(self._raw_size, self._output_size):
            raise TdxError(f"{self._where}: decompresses to more than {self._output_size} bytes, out of "
                           "proportion to its compressed size (a decompression bomb?); refusing this image")
        self._queue_item(data)

    def _queue_item(self, item) -> None:
        """Queue ``item`` (bytes, None at the end, or an exception) with the raw bytes behind it."""
        raw, self._raw = self._raw, []
        if not self._stopping:
            self._queue.put((item, raw))

    def _decompress(self) -> None:
        first = self._read()
        if first[:2] == GZIP_MAGIC:
            self._gunzip(first)
            return
        if first[:4] == ZSTD_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(_Prepended(first, self._read), read_size=CHUNK,
                                                                 read_across_frames=True)
            read = reader.read
        else:
            read = _Prepended(first, self._read).read
        while not self._stopping:
            data = read(CHUNK)
            if not data:
                return
            self._emit(data)

    def _gunzip(self, data: bytes) -> None:
        """Every gzip member of the stream, ``data`` being its first bytes."""
        decoder = zlib_ng.decompressobj(GZIP_WBITS)
        while not self._stopping:
            if decoder.eof:  # the member's CRC-32 and length matched; more members may follow
                data = decoder.unused_data.lstrip(b"\0")
                while not data:
                    data = self._read()
                    if not data:
                        return
                    data = data.lstrip(b"\0")
                decoder = zlib_ng.decompressobj(GZIP_WBITS)
            elif not data:
                data = self._read()
                if not data:
                    raise EOFError("the gzip stream ends inside a member")
            out = _inflate(decoder, data)
            self._emit(out)
            data = decoder.unconsumed_tail
            while len(out) == CHUNK and not data and not decoder.eof and not self._stopping:  # held back
                out = _inflate(decoder, b"")
                self._emit(out)

    # ---- the consumer

    def next_chunk(self) -> bytes:
        """The next chunk of output; b"" at the end. Raises what stopped the thread."""
        if self._finished:
            return b""
        item, raw = self._queue.get()
        for data in raw:
            self.blob_sha256.update(data)
            self.blob_size += len(data)
        if isinstance(item, bytes):
            return item
        self._finished = True
        if item is not None:
            raise item
        return b""

    def stop(self) -> None:
        """Make the thread stop (unblocking it) and wait for it."""
        self._stopping = True
        while self.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.join()


def _inflate(decoder, data: bytes) -> bytes:
    """At most CHUNK bytes of output from ``decoder`` fed ``data``; CorruptGzip for damage."""
    try:
        return decoder.decompress(data, CHUNK)
    except zlib_ng.error as exc:
        words = str(exc).rpartition(": ")[2]
        raise CorruptGzip(_GZIP_DAMAGE.get(words, words)) from None


class _Prepended:
    """``first`` and then what ``read(size)`` returns, read through ``read(size)``."""

    def __init__(self, first: bytes, read: Callable[[], bytes]):
        self._first, self._read = first, read

    def read(self, size: int = CHUNK) -> bytes:
        if self._first:
            data, self._first = self._first[:size], self._first[size:]
            return data
        return self._read()
