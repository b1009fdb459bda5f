"""Parallel gzip whose bytes do not depend on the number of threads or the CPU.

The input is cut into blocks of a fixed size (``block_size``, default
128 KiB) at fixed offsets. Each block is compressed on its own by a raw
deflate stream (``compressobj(level, DEFLATED, -15, 8)``) primed with the
32 KiB of input that precede the block as a preset dictionary, so matches
may still reach back into the previous block, as in one long deflate
stream. Every block but the last ends with ``Z_SYNC_FLUSH`` (an empty stored
block, which leaves the stream byte-aligned and not final); the last ends
with ``Z_FINISH``. Concatenated, the blocks form one ordinary deflate
stream, wrapped in one RFC 1952 gzip member: `gzip -d`, Python's ``gzip``
module and the kernel's initramfs unpacker read it like any other.

The deflate library is zlib-ng, through the Python package ``zlib-ng``
pinned in pyproject.toml (its wheel bundles the C library), not the
host's system zlib behind the standard library's ``zlib``: the initramfs
bytes, and so RTMR[2], must not depend on how the host built its zlib.
zlib-ng has one hash function for every CPU (zlib-ng PR #1681) and gives the
same output after ``deflateReset`` (2.3.3, PR #2102), so the bytes depend on
the zlib-ng version only, never on the CPU's features (SSE2 .. AVX-512) or
the thread count. :func:`compressor_identity` names that version; the build
records it in the manifest and reruns compression when it changes.

A block's compressed bytes are a function of the block and the 32 KiB
before it only, never of which thread compressed it or when. The threads
run ``deflate`` with the GIL released; at most ``2 * threads`` blocks are in
flight and results are written in input order, so memory stays bounded
whatever the input size. The CRC-32 is computed sequentially over the input
(cheap next to deflate).

The gzip header is fixed: no file name, mtime 0, XFL 2 at level 9, 4 at
level 1, 0 otherwise (RFC 1952), and OS 3 (Unix), which is what
`gzip -9n` writes on Linux, so the first 10 bytes match GNU gzip's.

Level 9 is the default (README "Packing your own tree" has the numbers): on
160 MB of binaries, shared objects, kernel modules and Python sources it
came out 0.15 % smaller than `gzip -9n` and about 4x faster than the
standard library's zlib at 9 (which was 0.06 % larger), while zlib-ng's
levels 2..8 were 11 % .. 2.2 % larger there (they win only on synthetic
data). memLevel 8 (the same 32 KiB literal buffer as GNU gzip) beat memLevel
9 by 0.3-0.6 % at level 9. Smaller blocks compress slightly better (the Huffman
tables adapt more often; 64 KiB..1 MiB within 0.1 %); 128 KiB keeps every
CPU busy on small archives and costs a 4-5 byte sync marker per block.
"""

import collections
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Deque, Optional

from ..errors import TdxError

try:
    import zlib_ng
    from zlib_ng import zlib_ng as deflate_library
except ImportError:  # reported by _library(), when gzip is asked for
    zlib_ng = deflate_library = None

# The Python package whose bundled zlib-ng does the deflate (pinned in pyproject.toml).
DEFLATE_PACKAGE = "zlib-ng"
WINDOW = 32 * 1024
DEFAULT_BLOCK_SIZE = 128 * 1024
DEFAULT_LEVEL = 9
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


def _library():
    if deflate_library is None:
        raise TdxError(f"gzip compression needs the Python package {DEFLATE_PACKAGE} (pinned in tdx-rules' "
                       f"pyproject.toml): pip install the version tdx-rules names, or ./run setup")
    return deflate_library


def compressor_identity() -> str:
    """What makes the gzip bytes, e.g. ``zlib-ng 2.3.3 (python zlib-ng 1.1.0)``: the zlib-ng
    library version and the version of the Python package that bundles it (the one imported)."""
    library = _library()
    package = getattr(zlib_ng, "__version__", "unknown")  # the imported package's own (1.0.0 and 1.1.0 have it)
    return f"zlib-ng {library.ZLIBNG_VERSION} (python {DEFLATE_PACKAGE} {package})"


def check_compressor(expected: str) -> None:
    """Refuse to compress unless :func:`compressor_identity` is ``expected`` (what the build
    declared, so that its signature names the library that really runs)."""
    actual = compressor_identity()
    if actual != expected:
        raise TdxError(f"the gzip compressor here is {actual}, but the build declared {expected}: the SCons "
                       "process and the stage import different zlib-ng packages; give both the same Python "
                       "environment (PYTHONPATH)")


def gzip_header(level: int) -> bytes:
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    # ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS
    return struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, xfl, OS_UNIX)


def _deflate_block(level: int, data: bytes, dictionary: bytes, last: bool) -> bytes:
    lib = deflate_library
    if dictionary:
        comp = lib.compressobj(level, lib.DEFLATED, -15, MEM_LEVEL, lib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        comp = lib.compressobj(level, lib.DEFLATED, -15, MEM_LEVEL, lib.Z_DEFAULT_STRATEGY)
    return comp.compress(data) + comp.flush(lib.Z_FINISH if last else lib.Z_SYNC_FLUSH)


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

    def __init__(self, dst: BinaryIO, level: int = DEFAULT_LEVEL, threads=None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        _library()
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
        self._crc = deflate_library.crc32(block, self._crc)
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


def compress_gzip(src_fileobj: BinaryIO, dst_fileobj: BinaryIO, level: int = DEFAULT_LEVEL, threads=None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Gzip everything ``src_fileobj`` yields onto ``dst_fileobj``; return the input size.

    The bytes are the same for every ``threads`` (``None`` = all CPUs).
    """
    with GzipWriter(dst_fileobj, level, threads, block_size) as out:
        for chunk in iter(lambda: src_fileobj.read(READ_SIZE), b""):
            out.write(chunk)
    return out.tell()
