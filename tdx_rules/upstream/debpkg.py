"""Read Debian ``.deb`` packages in pure Python, streaming, and extract them safely.

A ``.deb`` is an ``ar`` archive of ``debian-binary``, ``control.tar[.gz|.xz|.zst]``
and ``data.tar[.gz|.xz|.zst|.bz2|.lzma]``. :class:`DebPackage` only seeks over
the ``ar`` headers; the data member is decompressed and untarred as a stream,
so a 100 MB kernel package never sits in memory whole.

:func:`extract` writes selected members below a directory and refuses
anything that could reach outside it: ``..`` or absolute names, symlinks that
resolve outside, and writes through an already-extracted symlink (every parent
is opened with ``O_NOFOLLOW`` relative to the destination). Device nodes and
FIFOs are skipped; hard links become plain copies; setuid/setgid/sticky and
group/other write bits are dropped.

Every failure raises :class:`~tdx_rules.errors.TdxError`; damaged input reads
as ``<path>: not a valid .deb (<what>)``.
"""

import bz2
import contextlib
import errno
import gzip
import lzma
import os
import stat
import tarfile
import zlib
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import zstandard

from ..errors import TdxError
from ..fsutil import CHUNK, FileSlice, expansion_exceeded

AR_MAGIC = b"!<arch>\n"
AR_HEADER_LEN = 60

_COMPRESSIONS = ("", ".gz", ".xz", ".zst", ".bz2", ".lzma")
# Exceptions that mean "the bytes are damaged", turned into one TdxError line.
_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, zstandard.ZstdError, tarfile.TarError,
            ValueError, UnicodeDecodeError, OSError)


def _invalid(path: str, why: str) -> TdxError:
    return TdxError(f"{path}: not a valid .deb ({why}); download it again or check the source spec")


class _Counting:
    """Pass-through reader that counts the bytes handed out and stops a decompression bomb.

    ``compressed`` is the size of the member being decompressed; ``where`` names it in the error.
    """

    def __init__(self, inner, compressed: int = 0, where: str = ""):
        self._inner = inner
        self._compressed = compressed
        self._where = where
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.total += len(data)
        if expansion_exceeded(self._compressed, self.total):
            raise TdxError(f"{self._where}: expands to more than {self.total} bytes from {self._compressed} "
                           "(a decompression bomb?); refusing this package")
        return data


class _Guarded:
    """File object of one data member; turns read errors into TdxError.

    Valid only until the iteration of :meth:`DebPackage.iter_data` moves on.
    """

    def __init__(self, inner, path: str, name: str):
        self._inner = inner
        self._path = path
        self._name = name

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except _CORRUPT as exc:
            raise _invalid(self._path, f"member {self._name}: {exc}") from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decompressor(stream: BinaryIO, suffix: str):
    if suffix == "":
        return stream
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if suffix == ".xz":
        return lzma.LZMAFile(stream, format=lzma.FORMAT_XZ)
    if suffix == ".lzma":
        return lzma.LZMAFile(stream, format=lzma.FORMAT_ALONE)
    if suffix == ".bz2":
        return bz2.BZ2File(stream)
    if suffix == ".zst":
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    raise AssertionError(suffix)


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if name not in ("", "/") else name
    return name or "."


def _read_ar(path: str, handle: BinaryIO, file_size: int) -> List[Tuple[str, int, int]]:
    """(name, data offset, size) of every ``ar`` member, found by seeking over headers."""
    if handle.read(len(AR_MAGIC)) != AR_MAGIC:
        raise _invalid(path, "no '!<arch>' header")
    members = []
    long_names = b""
    offset = len(AR_MAGIC)
    while offset < file_size:
        if offset % 2:
            offset += 1  # members start on even offsets; the last pad byte may be missing
            if offset >= file_size:
                break
        handle.seek(offset)
        header = handle.read(AR_HEADER_LEN)
        if len(header) < AR_HEADER_LEN:
            raise _invalid(path, f"truncated ar header at byte {offset}")
        if header[58:60] != b"`\n":
            raise _invalid(path, f"bad ar member header at byte {offset}")
        raw_name = header[0:16].decode("ascii", "replace").rstrip(" ")
        size_field = header[48:58].strip()
        if not size_field.isdigit():
            raise _invalid(path, f"bad ar member size {size_field!r} at byte {offset}")
        size = int(size_field)
        start = offset + AR_HEADER_LEN
        if start + size > file_size:
            raise _invalid(path, f"truncated: member {raw_name!r} needs {start + size} bytes, file has {file_size}")
        if raw_name == "//":  # GNU long-name table
            handle.seek(start)
            long_names = handle.read(size)
            name = None
        elif raw_name == "/" or raw_name == "/SYM64/":  # symbol tables
            name = None
        elif raw_name.startswith("#1/") and raw_name[3:].isdigit():  # BSD: name at the start of the data
            name_len = int(raw_name[3:])
            if name_len > size:
                raise _invalid(path, f"bad BSD ar name at byte {offset}")
            handle.seek(start)
            name = handle.read(name_len).rstrip(b"\0").decode("utf-8", "replace")
            start += name_len
            size -= name_len
        elif raw_name.startswith("/") and raw_name[1:].isdigit():
            index = int(raw_name[1:])
            end = long_names.find(b"/\n", index)
            if index >= len(long_names) or end < 0:
                raise _invalid(path, f"bad GNU ar long name {raw_name!r}")
            name = long_names[index:end].decode("utf-8", "replace")
        else:
            name = raw_name[:-1] if raw_name.endswith("/") else raw_name
        if name is not None:
            members.append((name, start, size))
        offset = start + size
    return members


class DebPackage:
    """A ``.deb`` file opened for reading; only its ``ar`` headers are read up front.

    ``control`` is the parsed ``control`` file; :meth:`iter_data` streams the
    data tarball. Raises TdxError if the file is missing or not a .deb.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                members = _read_ar(self.path, handle, size)
                if not members or members[0][0] != "debian-binary":
                    raise _invalid(self.path, "first member is not debian-binary")
                handle.seek(members[0][1])
                version = handle.read(min(members[0][2], 64))
        except FileNotFoundError:
            raise TdxError(f"{self.path}: no such .deb file; check the path") from None
        except IsADirectoryError:
            raise TdxError(f"{self.path}: is a directory, not a .deb file; check the path") from None
        except PermissionError:
            raise TdxError(f"{self.path}: cannot read (permission denied); fix the file permissions") from None
        if not version.startswith(b"2."):
            raise _invalid(self.path, f"unsupported format version {version.strip()!r}")
        self._control_member = self._find(members, "control.tar")
        self._data_member = self._find(members, "data.tar")
        self._control: Optional[Dict[str, str]] = None

    def _find(self, members, stem):
        for name, offset, size in members:
            if name.startswith(stem):
                suffix = name[len(stem):]
                if suffix not in _COMPRESSIONS:
                    raise _invalid(self.path, f"unsupported compression of member {name}")
                return name, offset, size, suffix
        raise _invalid(self.path, f"no {stem} member")

    @contextlib.contextmanager
    def _tar(self, member) -> Iterator[Tuple[tarfile.TarFile, _Counting]]:
        name, offset, size, suffix = member
        with open(self.path, "rb") as handle:
            stream = _decompressor(FileSlice(handle, offset, size), suffix)
            counting = _Counting(stream, size, f"{self.path}: {name}")
            try:
                with tarfile.open(fileobj=counting, mode="r|") as tar:
                    yield tar, counting
            finally:
                stream.close()

    @property
    def control(self) -> Dict[str, str]:
        """Fields of the control file, as ``dpkg-deb -f`` prints them: continuation
        lines of ``Description`` are kept as written (joined with ``\\n``, leading
        blank kept); those of other fields are folded into one line with spaces."""
        if self._control is None:
            text = None
            try:
                with self._tar(self._control_member) as (tar, _):
                    for info in tar:
                        if _normalise(info.name) == "control" and info.isreg():
                            text = tar.extractfile(info).read().decode("utf-8")
                            break
            except _CORRUPT as exc:
                raise _invalid(self.path, f"{self._control_member[0]}: {exc}") from None
            if text is None:
                raise _invalid(self.path, "control.tar has no control file")
            self._control = _parse_control(self.path, text)
        return dict(self._control)

    def iter_data(self) -> Iterator[Tuple[tarfile.TarInfo, Optional[BinaryIO]]]:
        """Yield ``(TarInfo, fileobj)`` for each data member in archive order.

        Names (and hard-link targets) have leading ``./`` removed; the root
        entry is ``"."``. ``fileobj`` is set for regular files only and is
        readable until the next item is requested (the tar is read as a stream).
        """
        try:
            with self._tar(self._data_member) as (tar, counting):
                for info in tar:
                    info.name = _normalise(info.name)
                    if info.islnk():
                        info.linkname = _normalise(info.linkname)
                    fileobj = tar.extractfile(info) if info.isreg() else None
                    yield info, (_Guarded(fileobj, self.path, info.name) if fileobj is not None else None)
                    # Read what the consumer left of the body: tarfile would skip it by
                    # seeking, which on a stream loops over the *declared* size (a header
                    # claiming 100 GB in front of a short body took minutes).
                    body = fileobj if fileobj is not None else (
                        tar.extractfile(info) if info.type not in tarfile.SUPPORTED_TYPES else None)
                    if body is not None:
                        while body.read(CHUNK):
                            pass
                # tarfile ends quietly at a bare end of data: demand the end-of-archive
                # block, then read the rest so the decompressor checks its trailer.
                if counting.total < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError("data ends before the end of the tar archive")
                while counting.read(CHUNK):
                    pass
        except _CORRUPT as exc:
            raise _invalid(self.path, f"{self._data_member[0]}: {exc}") from None


# Fields whose line breaks carry meaning (Debian Policy 5.1); all others are folded.
_MULTILINE = frozenset(("Description", "Conffiles"))


def _parse_control(path: str, text: str) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    last = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if fields:
                break  # a binary control file has one stanza
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if last is None:
                raise _invalid(path, f"control line {number} continues no field")
            if last in _MULTILINE:
                fields[last] += "\n" + line.rstrip()
            else:
                fields[last] = (fields[last] + " " + line.strip()).strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key or " " in key:
            raise _invalid(path, f"control line {number} is not 'Field: value'")
        last = key
        fields[key] = value.strip()
    if not fields:
        raise _invalid(path, "empty control file")
    return fields


def _member_parts(deb: str, name: str) -> List[str]:
    """Components of a member name, or TdxError for absolute / ``..`` names."""
    if name.startswith("/"):
        raise TdxError(f"{deb}: member {name!r} has an absolute path; refusing to extract this package")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TdxError(f"{deb}: member {name!r} contains '..'; refusing to extract this package")
    if any("\0" in part for part in parts):
        raise TdxError(f"{deb}: member {name!r} contains a NUL byte; refusing to extract this package")
    return parts


class _Tree:
    """A destination directory written only through ``O_NOFOLLOW`` directory fds."""

    def __init__(self, deb: str, dest: str):
        self.deb = deb
        self.dest = dest
        os.makedirs(dest, exist_ok=True)
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)

    def close(self):
        os.close(self.root)

    def _refuse(self, rel: str, why: str) -> TdxError:
        return TdxError(f"{self.deb}: member {rel!r} {why}; refusing to extract this package")

    def parent(self, parts: List[str]) -> int:
        """Open (creating as needed) the parent directory of ``parts``; never follows a symlink."""
        fd = os.dup(self.root)
        try:
            for i, part in enumerate(parts[:-1]):
                try:
                    new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    new = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._refuse("/".join(parts), f"would be written through {'/'.join(parts[:i + 1])!r}, "
                                           "which is not a real directory") from None
                    raise
                os.close(fd)
                fd = new
            return fd
        except BaseException:
            os.close(fd)
            raise

    def clear(self, dirfd: int, name: str, rel: str, keep_dir: bool = False) -> bool:
        """Remove a non-directory at ``name``; return True if a directory is there (kept)."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            raise self._refuse(rel, "would replace a directory")
        os.unlink(name, dir_fd=dirfd)
        return False

    def write_file(self, parts: List[str], source, mode: int) -> None:
        rel = "/".join(parts)
        dirfd = self.parent(parts)
        try:
            self.clear(dirfd, parts[-1], rel)
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: source.read(CHUNK), b""):
                    out.write(chunk)
                os.fchmod(out.fileno(), mode & 0o755)
        finally:
            os.close(dirfd)

    def open_file(self, parts: List[str]):
        dirfd = self.parent(parts)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
        finally:
            os.close(dirfd)
        return os.fdopen(fd, "rb")

    def make_dir(self, parts: List[str], mode: int) -> None:
        dirfd = self.parent(parts)
        try:
            if not self.clear(dirfd, parts[-1], "/".join(parts), keep_dir=True):
                os.mkdir(parts[-1], 0o755, dir_fd=dirfd)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            try:
                os.fchmod(fd, (mode & 0o755) | 0o700)
            finally:
                os.close(fd)
        finally:
            os.close(dirfd)

    def make_symlink(self, parts: List[str], target: str) -> None:
        rel = "/".join(parts)
        if not target or "\0" in target:
            raise self._refuse(rel, f"is a symlink with a bad target {target!r}")
        if not self.inside(parts[:-1], target):
            raise self._refuse(rel, f"is a symlink to {target!r}, which is outside the destination")
        dirfd = self.parent(parts)
        try:
            self.clear(dirfd, parts[-1], rel)
            os.symlink(target, parts[-1], dir_fd=dirfd)
        finally:
            os.close(dirfd)

    def inside(self, base: List[str], target: str) -> bool:
        """Whether ``target`` (relative to ``base``; absolute means relative to the
        destination, as inside the image) stays within the destination, following
        symlinks already extracted."""
        pending = target.split("/")
        current = [] if target.startswith("/") else list(base)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    return False
                current.pop()
                continue
            candidate = current + [part]
            try:
                link = os.readlink(os.path.join(self.dest, *candidate))
            except OSError:  # missing or not a symlink: take the name as it is
                current = candidate
                continue
            hops += 1
            if hops > 40:
                return False
            pending = link.split("/") + pending
            if link.startswith("/"):
                current = []
        return True


def extract(deb_path, dest_dir, select: Optional[Callable[[str], bool]] = None) -> List[str]:
    """Extract the data members of ``deb_path`` for which ``select(name)`` is true
    (all if None) below ``dest_dir``; return their relative names in archive order.

    Regular files are streamed with mode ``& 0o755``; directories get
    ``(mode & 0o755) | 0o700``; symlinks are kept only if they resolve inside
    ``dest_dir`` (absolute targets count from ``dest_dir``, as in the image);
    hard links become copies (links whose target was not selected are filled
    by a second pass and listed last); device nodes and FIFOs are skipped.
    Absolute or ``..`` names, escaping symlinks and writes through a symlink
    (each parent must be a real directory) raise TdxError.
    """
    deb_path = os.fspath(deb_path)
    dest_dir = os.path.abspath(os.fspath(dest_dir))
    package = DebPackage(deb_path)
    done: List[str] = []
    files = set()
    pending: Dict[str, List[List[str]]] = {}  # hard-link target -> link names still to write
    try:
        tree = _Tree(deb_path, dest_dir)
    except OSError as exc:
        raise TdxError(f"{deb_path}: cannot create {dest_dir} ({exc.strerror or exc}); "
                       "check the path and permissions") from None
    try:
        with contextlib.closing(package.iter_data()) as members:
            for info, fileobj in members:
                parts = _member_parts(deb_path, info.name)
                if info.islnk():
                    target_parts = _member_parts(deb_path, info.linkname)
                if not parts or (select is not None and not select(info.name)):
                    continue
                rel = "/".join(parts)
                if info.isreg():
                    tree.write_file(parts, fileobj, info.mode)
                    files.add(rel)
                elif info.isdir():
                    tree.make_dir(parts, info.mode)
                elif info.issym():
                    tree.make_symlink(parts, info.linkname)
                elif info.islnk():
                    target = "/".join(target_parts)
                    if target not in files:
                        pending.setdefault(target, []).append(parts)
                        continue
                    with tree.open_file(target_parts) as source:
                        tree.write_file(parts, source, os.fstat(source.fileno()).st_mode)
                    files.add(rel)
                else:
                    continue  # device nodes, FIFOs: never created
                done.append(rel)
        if pending:
            _resolve_hard_links(package, tree, pending, done)
    except OSError as exc:
        raise TdxError(f"{deb_path}: cannot extract into {dest_dir} ({exc.strerror or exc}); "
                       "check free space and permissions") from None
    finally:
        tree.close()
    return done


def _resolve_hard_links(package: DebPackage, tree: _Tree, pending, done: List[str]) -> None:
    """Second pass for hard links whose target was not selected: copy the target's bytes."""
    with contextlib.closing(package.iter_data()) as members:
        for info, fileobj in members:
            if info.isreg() and info.name in pending:
                links = pending.pop(info.name)
                tree.write_file(links[0], fileobj, info.mode)
                for parts in links[1:]:
                    with tree.open_file(links[0]) as source:
                        tree.write_file(parts, source, info.mode)
                done.extend("/".join(parts) for parts in links)
                if not pending:
                    return
    name, links = next(iter(pending.items()))
    raise TdxError(f"{package.path}: hard link {'/'.join(links[0])!r} points at {name!r}, which is not a regular "
                   "file in the package; refusing to extract this package")
