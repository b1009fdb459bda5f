"""Parallel gzip whose bytes do not depend on the number of threads.

The input is cut into blocks of a fixed size (``block_size``, default
128 KiB) at fixed offsets. Each block is compressed on its own by a raw
deflate stream (``zlib.compressobj(level, DEFLATED, -15, 8)``) primed with
the 32 KiB of input that precede the block as a preset dictionary, so
matches may still reach back into the previous block, as in one long
deflate stream. Every block but the last ends with ``Z_SYNC_FLUSH`` (an
empty stored block, which leaves the stream byte-aligned and not final);
the last ends with ``Z_FINISH``. Concatenated, the blocks form one ordinary
deflate stream, wrapped in one RFC 1952 gzip member: `gzip -d`, Python's
``gzip`` module and the kernel's initramfs unpacker read it like any other.

A block's compressed bytes are a function of the block and the 32 KiB
before it only, never of which thread compressed it or when, so the output
is identical for 1..N threads (it does depend on the zlib library: the same
zlib version gives the same bytes). The threads run ``deflate`` with the
GIL released; at most ``2 * threads`` blocks are in flight and results are
written in input order, so memory stays bounded whatever the input size.
The CRC-32 is computed sequentially over the input (cheap next to deflate).

The gzip header is fixed: no file name, mtime 0, XFL 2 at level 9, 4 at
level 1, 0 otherwise (RFC 1952), and OS 3 (Unix), which is what
`gzip -9n` writes on Linux, so the first 10 bytes match GNU gzip's.

The price of independent blocks is a 4-5 byte sync marker per block and
restarted Huffman statistics. Measured against `gzip -9n` on initramfs-like
data (binaries, shared objects, text, random), the output came out between
0.6 % smaller and 0.01 % larger (tests/test_pack.py, bench/pack.py).
memLevel 8 (zlib's default, the same 32 KiB literal buffer as GNU gzip) beat
memLevel 9 by up to 0.8 % on text-heavy input; 64 KiB..1 MiB blocks were
within about 0.1 % of each other, and 128 KiB keeps every CPU busy on small
archives.
"""

import collections
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Deque, Optional

from ..errors import TdxError

WINDOW = 32 * 1024
DEFAULT_BLOCK_SIZE = 128 * 1024
MEM_LEVEL = 8
OS_UNIX = 3
READ_SIZE = 1 << 20


def available_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads) -> int:
    """``None``/``"all"``/``0`` → every available CPU; otherwise a positive count."""
    if threads is None or threads == "all" or threads == 0:
        return available_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise TdxError(f"threads={threads!r} is not a thread count: give a positive number or 'all'")
    return threads


class OrderedPool:
    """Run ``func`` over submitted items in threads; hand results to ``sink`` in submission order.

    At most ``depth`` items are pending; with one thread, items run inline
    (no executor), which produces the same results in the same order.
    """

    def __init__(self, func: Callable, sink: Callable, threads: int, depth: Optional[int] = None):
        self._func = func
        self._sink = sink
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tdx-compress") if threads > 1 else None
        self._depth = depth or 2 * threads
        self._pending: Deque = collections.deque()

    def submit(self, *args) -> None:
        if self._executor is None:
            self._sink(self._func(*args))
            return
        self._pending.append(self._executor.submit(self._func, *args))
        while len(self._pending) >= self._depth:
            self._sink(self._pending.popleft().result())

    def finish(self) -> None:
        """Wait for every pending item and pass its result on."""
        while self._pending:
            self._sink(self._pending.popleft().result())
        self.close()

    def close(self) -> None:
        """Drop pending work (after an error) and stop the threads."""
        if self._executor is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            self._executor.shutdown(wait=True)
            self._executor = None


def gzip_header(level: int) -> bytes:
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    # ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS
    return struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, xfl, OS_UNIX)


def _deflate_block(level: int, data: bytes, dictionary: bytes, last: bool) -> bytes:
    if dictionary:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        comp = zlib.compressobj(level, zlib.DEFLATED, -15, MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class CountingWriter:
    """Base of the compressing writers (gzip here, the others in pack): ``write`` counts the
    input bytes for ``tell`` (newc pads with it), ``close`` finishes the stream and
    ``abort`` abandons it. Subclasses provide ``_write`` and ``_finish``."""

    def __init__(self):
        self._size = 0
        self._closed = False

    def write(self, data) -> int:
        if self._closed:
            raise ValueError("write to a closed compressor")
        self._size += len(data)
        self._write(data)
        return len(data)

    def tell(self) -> int:
        return self._size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """No-op: an early flush would change the compressed bytes."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finish()

    def abort(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def _write(self, data) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class GzipWriter(CountingWriter):
    """A write-only file object producing thread-count-independent gzip on ``dst``.

    ``write`` buffers; ``close`` compresses the last block and writes the
    trailer (it does not close ``dst``). ``tell`` is the number of
    uncompressed bytes written so far. Used as a context manager, an
    exception abandons the stream (no trailer) and stops the threads.
    """

    def __init__(self, dst: BinaryIO, level: int = 9, threads=None, block_size: int = DEFAULT_BLOCK_SIZE):
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
            raise TdxError(f"gzip level {level!r} is out of range: pick 1..9")
        if not isinstance(block_size, int) or block_size < 1024:
            raise TdxError(f"gzip block size {block_size!r} is too small: use at least 1024 bytes")
        super().__init__()
        self._dst = dst
        self._level = level
        self._block_size = block_size
        self._buffer = bytearray()
        self._history = b""
        self._crc = 0
        self._pool = OrderedPool(self._compress, dst.write, resolve_threads(threads))
        dst.write(gzip_header(level))

    def _compress(self, data, dictionary, last):
        return _deflate_block(self._level, data, dictionary, last)

    def _submit(self, block: bytes, last: bool) -> None:
        self._crc = zlib.crc32(block, self._crc)
        self._pool.submit(block, self._history, last)
        self._history = (self._history + block)[-WINDOW:] if len(block) < WINDOW else block[-WINDOW:]

    def _write(self, data) -> None:
        self._buffer += data
        # Keep at least one byte back: the last block must be the one that ends with Z_FINISH.
        while len(self._buffer) > self._block_size:
            with memoryview(self._buffer) as view:
                block = bytes(view[:self._block_size])
            del self._buffer[:self._block_size]
            self._submit(block, last=False)

    def _finish(self) -> None:
        try:
            self._submit(bytes(self._buffer), last=True)
            self._buffer = bytearray()
            self._pool.finish()
        except BaseException:
            self._pool.close()
            raise
        self._dst.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))

    def abort(self) -> None:
        """Stop without finishing the stream (the output is unusable)."""
        super().abort()
        self._buffer = bytearray()
        self._pool.close()


def compress_gzip(src_fileobj: BinaryIO, dst_fileobj: BinaryIO, level: int = 9, threads=None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Gzip everything ``src_fileobj`` yields onto ``dst_fileobj``; return the input size.

    The bytes are the same for every ``threads`` (``None`` = all CPUs).
    """
    with GzipWriter(dst_fileobj, level, threads, block_size) as out:
        for chunk in iter(lambda: src_fileobj.read(READ_SIZE), b""):
            out.write(chunk)
    return out.tell()
