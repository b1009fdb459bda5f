"""``tdx-rules pack``: a deterministic, compressed initramfs from a directory.

The tree is walked without following symlinks and written as one newc
archive by :mod:`tdx_rules.newc` (members sorted by name, every parent
present, inode numbers in archive order, uid/gid 0, one mtime for all),
streamed straight into the compressor and renamed into place only when
complete. Two packs of the same tree give the same bytes whatever the
umask, the file mtimes, the owner, the directory the tree lives in or the
number of threads.

What is kept of the host's metadata:

* regular files: 0755 if any execute bit is set, else 0644; the setuid and
  setgid bits are kept on executables (they are set on purpose, and the
  umask never touches them), dropped elsewhere;
* directories: 0755, or 01777 when the sticky bit is set (``/tmp``);
* symlinks: the target as it is (absolute targets point inside the guest);
* hard links become independent copies;
* device nodes, FIFOs and sockets are refused, naming the path: the guest's
  ``/dev`` comes from devtmpfs, and recording nodes would need the host
  tree to hold them (which needs root); add them through a fragment if an
  image really needs one.

Compressions, each in the form the kernel's unpacker (``init/initramfs.c``
through ``lib/decompress_*.c``) reads:

* ``gzip`` (default, level 9): :mod:`tdx_rules.pgzip`, zlib-ng's deflate
  (the pinned ``zlib-ng`` package), parallel, the same bytes for any thread
  count and any CPU. Needs ``CONFIG_RD_GZIP``.
* ``zstd`` (level 19, the kernel's own choice for initramfs): the
  ``zstandard`` module, always in multi-threaded mode (>= 1 worker), whose
  output zstd guarantees to be the same for any number of workers (the
  single-threaded mode gives other bytes, so it is never used); checksum on,
  no content size (the stream is written before its size is known). Levels
  up to 19 use at most an 8 MiB window. Needs ``CONFIG_RD_ZSTD``.
* ``xz`` (level 6): ``lzma`` with ``FORMAT_XZ`` and ``CHECK_CRC32``; XZ
  Embedded in the kernel supports only CRC32 or no check (not the xz tool's
  default CRC64); plain LZMA2, no BCJ filter. Single-threaded (the standard
  library has no threaded encoder). Needs ``CONFIG_RD_XZ``.
* ``lz4`` (level 9, high compression): the *legacy* lz4 format, the only one
  ``lib/decompress_unlz4.c`` reads (what `lz4 -l` writes): the magic
  0x184C2102 (little-endian), then per 8 MiB of input one little-endian u32
  compressed length and one raw LZ4 block (``lz4.block.compress(...,
  store_size=False)``); no end mark, no checksum, no size trailer. Blocks
  are independent, so they are compressed in parallel (same bytes for any
  thread count). Needs ``CONFIG_RD_LZ4``.
* ``none``: the plain archive.
"""

import argparse
import dataclasses
import gzip as gzip_module
import lzma
import os
import re
import stat
import struct
import sys
from typing import BinaryIO, List, Optional

from ..errors import ERROR_PREFIX, TdxError
from ..fsutil import atomic_output
from . import newc, pgzip

COMPRESSIONS = ("gzip", "zstd", "xz", "lz4", "none")
KERNEL_OPTION = {"gzip": "CONFIG_RD_GZIP", "zstd": "CONFIG_RD_ZSTD", "xz": "CONFIG_RD_XZ", "lz4": "CONFIG_RD_LZ4"}
DEFAULT_LEVEL = {"gzip": pgzip.DEFAULT_LEVEL, "zstd": 19, "xz": 6, "lz4": 9, "none": None}
LEVEL_RANGE = {"gzip": (1, 9), "zstd": (1, 22), "xz": (0, 9), "lz4": (1, 12)}
SUFFIX = {"gzip": ".gz", "zstd": ".zst", "xz": ".xz", "lz4": ".lz4", "none": ""}

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # the kernel decodes each block into an 8 MiB buffer
BUFFER = 1 << 20


# --- compressors -------------------------------------------------------------

class _PlainWriter(pgzip.CountingWriter):
    def __init__(self, dst: BinaryIO):
        super().__init__()
        self._dst = dst
        self._kernel_copy = hasattr(os, "copy_file_range")

    def _write(self, data) -> None:
        self._dst.write(data)

    def copy_from(self, inp: BinaryIO, offset: int, size: int) -> bool:
        """Copy ``size`` bytes of ``inp`` from ``offset`` inside the kernel (copy_file_range);
        False if the kernel cannot, and the caller copies them itself."""
        if not self._kernel_copy or self._closed:
            return False
        self._dst.flush()
        out_fd, in_fd = self._dst.fileno(), inp.fileno()
        done = 0
        try:
            while done < size:
                copied = os.copy_file_range(in_fd, out_fd, size - done, offset + done)
                if not copied:
                    raise TdxError(f"{inp.name} shrank while it was being archived: rebuild")
                done += copied
        except OSError:
            if done:
                raise
            self._kernel_copy = False  # e.g. across filesystems on old kernels: copy in Python
            return False
        finally:
            self._dst.seek(0, os.SEEK_END)  # the buffered file's position follows the fd again
        self._size += size
        return True

    def _finish(self) -> None:
        pass


class _XzWriter(pgzip.CountingWriter):
    def __init__(self, dst: BinaryIO, level: int):
        super().__init__()
        self._dst = dst
        self._comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                         filters=[{"id": lzma.FILTER_LZMA2, "preset": level}])

    def _write(self, data) -> None:
        out = self._comp.compress(data)
        if out:
            self._dst.write(out)

    def _finish(self) -> None:
        self._dst.write(self._comp.flush())


class _ZstdWriter(pgzip.CountingWriter):
    def __init__(self, dst: BinaryIO, level: int, threads: int):
        super().__init__()
        import zstandard

        # threads >= 1 keeps zstd in its multi-threaded mode, whose output does
        # not depend on the worker count (0 would be the single-threaded mode).
        self._comp = zstandard.ZstdCompressor(level=level, threads=max(1, threads), write_checksum=True,
                                              write_content_size=False, write_dict_id=False)
        self._stream = self._comp.stream_writer(dst, closefd=False)

    def _write(self, data) -> None:
        self._stream.write(data)

    def _finish(self) -> None:
        self._stream.close()  # ends the frame; leaves dst open (closefd=False)


class _Lz4LegacyWriter(pgzip.CountingWriter):
    def __init__(self, dst: BinaryIO, level: int, threads: int):
        super().__init__()
        import lz4.block

        self._lz4 = lz4.block
        self._level = level
        self._dst = dst
        self._buffer = bytearray()
        # 8 MiB blocks: keep few in flight (each pending block holds input and output).
        self._pool = pgzip.OrderedPool(self._compress, self._emit, threads, depth=threads + 1)
        dst.write(struct.pack("<I", LZ4_LEGACY_MAGIC))

    def _compress(self, block: bytes) -> bytes:
        if self._level < 3:  # lz4 -1/-2: the fast compressor, as the lz4 tool does
            return self._lz4.compress(block, mode="default", store_size=False)
        return self._lz4.compress(block, mode="high_compression", compression=self._level, store_size=False)

    def _emit(self, packed: bytes) -> None:
        self._dst.write(struct.pack("<I", len(packed)))
        self._dst.write(packed)

    def _write(self, data) -> None:
        self._buffer += data
        while len(self._buffer) >= LZ4_LEGACY_BLOCK:
            with memoryview(self._buffer) as view:
                block = bytes(view[:LZ4_LEGACY_BLOCK])
            del self._buffer[:LZ4_LEGACY_BLOCK]
            self._pool.submit(block)

    def _finish(self) -> None:
        try:
            if self._buffer:
                self._pool.submit(bytes(self._buffer))
                self._buffer = bytearray()
            self._pool.finish()
        except BaseException:
            self._pool.close()
            raise

    def abort(self) -> None:
        super().abort()
        self._buffer = bytearray()
        self._pool.close()


@dataclasses.dataclass(frozen=True)
class Compressor:
    """A compression choice; call it on a binary file to get a writer (a context manager).

    The writer has ``write``, ``tell`` (uncompressed bytes so far) and
    ``close`` (ends the stream, leaves the file open); leaving its ``with``
    block through an exception abandons the stream.
    """

    name: str
    level: Optional[int]
    threads: int

    @property
    def suffix(self) -> str:
        return SUFFIX[self.name]

    def __call__(self, dst: BinaryIO):
        if self.name == "gzip":
            return pgzip.GzipWriter(dst, self.level, self.threads)
        if self.name == "zstd":
            return _ZstdWriter(dst, self.level, self.threads)
        if self.name == "xz":
            return _XzWriter(dst, self.level)
        if self.name == "lz4":
            return _Lz4LegacyWriter(dst, self.level, self.threads)
        return _PlainWriter(dst)


def compressor(name: str, level: Optional[int] = None, threads=None) -> Compressor:
    """Check ``name``/``level``/``threads`` and return the :class:`Compressor`.

    ``level=None`` picks the default of the compression; ``threads=None``
    (or ``"all"``) uses every available CPU; the output never depends on it.
    """
    if name not in COMPRESSIONS:
        raise TdxError(f"unknown compression {name!r}: pick one of {', '.join(COMPRESSIONS)}")
    if name == "none":
        if level is not None:
            raise TdxError("--level has no meaning with compression 'none': drop it or pick a compression")
    elif level is None:
        level = DEFAULT_LEVEL[name]
    else:
        low, high = LEVEL_RANGE[name]
        if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
            raise TdxError(f"{name} level {level!r} is out of range: pick {low}..{high}")
    if name == "lz4":
        _require_lz4()
    return Compressor(name, level, pgzip.resolve_threads(threads))


def _require_lz4() -> None:
    try:
        import lz4.block  # noqa: F401
    except ImportError:
        raise TdxError("compression 'lz4' needs the Python package lz4: pip install lz4, "
                       "or pick gzip, zstd or xz") from None


# --- kernel support ----------------------------------------------------------

def _config_value(text: str, option: str) -> Optional[str]:
    match = re.search(rf"^{option}=(\S+)\s*$", text, re.M)
    return match.group(1) if match else None


def check_kernel_supports(compression: str, kernel_config_text: Optional[str]) -> None:
    """Refuse a compression the kernel (given by its ``.config`` text) cannot unpack.

    ``None`` means the config is unknown: nothing is checked.
    """
    if compression not in COMPRESSIONS:
        raise TdxError(f"unknown compression {compression!r}: pick one of {', '.join(COMPRESSIONS)}")
    if kernel_config_text is None:
        return
    if re.search(r"^# CONFIG_BLK_DEV_INITRD is not set", kernel_config_text, re.M):
        raise TdxError("kernel config has CONFIG_BLK_DEV_INITRD unset: this kernel loads no initramfs at all; "
                       "rebuild it with CONFIG_BLK_DEV_INITRD=y")
    if compression == "none":
        return
    option = KERNEL_OPTION[compression]
    if _config_value(kernel_config_text, option) == "y":
        return
    usable = [name for name in COMPRESSIONS
              if name == "none" or _config_value(kernel_config_text, KERNEL_OPTION[name]) == "y"]
    raise TdxError(f"kernel config has no {option}=y: pick {_or_list(usable)} or rebuild the kernel with {option}=y")


def _or_list(names: List[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def read_kernel_config(path) -> str:
    """The text of a kernel ``.config`` (or a gzipped one such as ``/proc/config.gz``)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(64 << 20)
    except OSError as error:
        raise TdxError(f"--kernel-config: cannot read {path}: {error.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip_module.decompress(raw)
        except (OSError, EOFError) as error:
            raise TdxError(f"--kernel-config: {path} is a corrupt gzip file ({error})") from None
    text = raw.decode("utf-8", "replace")
    if not re.search(r"^(# )?CONFIG_\w+", text, re.M):
        raise TdxError(f"--kernel-config: {path} does not look like a kernel .config (no CONFIG_ lines)")
    return text


# --- the tree ----------------------------------------------------------------

def file_mode(st_mode: int) -> int:
    """Permission bits of a regular file in the image (see the module docstring)."""
    if st_mode & 0o111:
        return 0o755 | (st_mode & (stat.S_ISUID | stat.S_ISGID))
    return 0o644


def dir_mode(st_mode: int) -> int:
    return 0o1777 if st_mode & stat.S_ISVTX else 0o755


_KIND = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
         (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


def tree_entries(root) -> List[newc.Entry]:
    """The members for the tree under ``root`` (not sorted; :func:`newc.merge` sorts)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "does not exist" if not os.path.lexists(root) else "is not a directory"
        raise TdxError(f"{root} {what}: give the directory to pack")
    entries = []
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as error:
            raise TdxError(f"{directory}: cannot list the directory ({error.strerror}): "
                           "make it readable or remove it from the tree") from None
        for item in items:
            name = prefix + item.name
            path = item.path
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as error:
                raise TdxError(f"{path}: cannot stat ({error.strerror}): fix it or remove it from the tree") from None
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                entries.append(newc.Entry(newc.check_name(name), stat.S_IFDIR | dir_mode(mode)))
                stack.append((name + "/", path))
            elif stat.S_ISREG(mode):
                # Checked before writing for a clear message; a read error while writing is
                # still caught (pack_tree) and leaves no output.
                if not os.access(path, os.R_OK):
                    raise TdxError(f"{path}: cannot read the file (Permission denied): "
                                   "make it readable or remove it from the tree")
                entries.append(newc.Entry(newc.check_name(name), stat.S_IFREG | file_mode(mode), st.st_size,
                                          path=path))
            elif stat.S_ISLNK(mode):
                try:
                    target = os.fsencode(os.readlink(path))  # any bytes, UTF-8 or not
                except OSError as error:
                    raise TdxError(f"{path}: cannot read the symlink ({error.strerror})") from None
                entries.append(newc.Entry(newc.check_name(name), stat.S_IFLNK | 0o777, len(target), data=target))
            else:
                kind = next((label for test, label in _KIND if test(mode)), "special file")
                raise TdxError(f"{path} is a {kind}: pack takes only files, directories and symlinks "
                               "(the guest's /dev comes from devtmpfs); remove it from the tree")
    return entries


@dataclasses.dataclass(frozen=True)
class PackResult:
    members: int
    archive_bytes: int  # the uncompressed newc archive
    output_bytes: int


def pack_tree(directory, out, compression: str = "gzip", level: Optional[int] = None, threads=None,
              epoch: int = 0) -> PackResult:
    """Write the tree under ``directory`` as a compressed newc initramfs at ``out`` (atomically).

    Every member gets uid/gid 0 and mtime ``epoch``; the bytes do not depend
    on ``threads``.
    """
    comp = compressor(compression, level, threads)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 1 << 32:
        raise TdxError(f"epoch {epoch!r} does not fit a newc mtime: give seconds since 1970 below 2**32")
    directory, out = os.fspath(directory), os.fspath(out)
    entries = newc.merge([tree_entries(directory)])
    real_root = os.path.realpath(directory)
    real_out_dir = os.path.realpath(os.path.dirname(os.path.abspath(out)))
    if os.path.commonpath([real_root, real_out_dir]) == real_root:
        raise TdxError(f"output {out} is inside the tree {directory} it packs: write it elsewhere")
    try:
        with atomic_output(out) as raw:
            with comp(raw) as sink:
                newc.write_archive(sink, entries, mtime=epoch)
            archive_bytes = sink.tell()
    except OSError as error:
        name = error.filename or out
        raise TdxError(f"{name}: {error.strerror or error} while writing {out}: fix it and pack again") from None
    return PackResult(len(entries), archive_bytes, os.path.getsize(out))


# --- command line ------------------------------------------------------------

PACK_HELP = "a deterministic compressed initramfs (newc cpio) from a directory"
PACK_EPILOG = """example:
  tdx-rules pack rootfs/ -o initramfs.cpio.zst --compress zstd --kernel-config /boot/config-$(uname -r)
members are sorted, owned by root, dated --epoch (default $SOURCE_DATE_EPOCH, else 0); files are
0755 if executable else 0644, directories 0755; the output does not depend on --threads."""


def _threads_arg(text: str):
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError("give at least 1 thread, or 'all'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tdx-rules pack`` (for a subparser of the main command)."""
    parser.add_argument("directory", help="the tree to pack (its root becomes the initramfs root)")
    parser.add_argument("-o", "--output", required=True, help="the initramfs to write (replaced atomically)")
    parser.add_argument("--compress", default="gzip", metavar="|".join(COMPRESSIONS),
                        help="compression (default gzip)")
    defaults = ", ".join(f"{name} {level}" for name, level in DEFAULT_LEVEL.items() if level is not None)
    parser.add_argument("--level", type=int, help=f"compression level (defaults: {defaults})")
    parser.add_argument("--threads", type=_threads_arg, default=None,
                        help="compression threads, a number or 'all' (default all; the bytes are the same)")
    parser.add_argument("--kernel-config", help="the kernel's .config (or config.gz): refuse a compression "
                                                "it cannot unpack")
    parser.add_argument("--epoch", type=int, default=None,
                        help="mtime of every member (default $SOURCE_DATE_EPOCH, else 0)")
    parser.add_argument("--compressor", metavar="IDENTITY",
                        help="gzip only: stop unless the deflate library is this one, e.g. "
                             "'zlib-ng 2.3.3 (python zlib-ng 1.1.0)' (TdxPack passes what the build saw)")


def run(args) -> None:
    """Carry out parsed ``pack`` arguments; raises :class:`TdxError`."""
    comp = compressor(args.compress, args.level, args.threads)
    if args.compressor is not None:
        if comp.name != "gzip":
            raise TdxError(f"--compressor names the gzip library; compression {comp.name!r} does not use it: drop it")
        pgzip.check_compressor(args.compressor)
    if args.kernel_config:
        check_kernel_supports(comp.name, read_kernel_config(args.kernel_config))
    epoch = args.epoch
    if epoch is None:
        source = os.environ.get("SOURCE_DATE_EPOCH", "")
        try:
            epoch = int(source) if source else 0
        except ValueError:
            raise TdxError(f"SOURCE_DATE_EPOCH={source!r} is not a number of seconds: fix or unset it") from None
    pack_tree(args.directory, args.output, comp.name, comp.level, comp.threads, epoch)


def main_pack(argv=None) -> int:
    """``tdx-rules pack DIR -o OUT ...``: 0 on success, 1 on a TdxError (one line), 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="tdx-rules pack", description=PACK_HELP, epilog=PACK_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        run(args)
    except TdxError as error:
        print(ERROR_PREFIX + str(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main_pack())
