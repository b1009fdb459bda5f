"""The newc ("070701") cpio format: deterministic writer, streaming reader, fragments.

A *fragment* is a newc stream without the trailer whose entries carry names
relative to the image root (``bin/busybox``), inode 0 and mtime 0. Stages
write fragments; the cpio stage merges them with files from disk into one
archive (:func:`write_archive`): entries sorted by name, every parent
directory present, inode numbers counted in that order, uid/gid 0, one
mtime for all. File bodies are copied in chunks; nothing is held in memory
whole.
"""

import dataclasses
import hashlib
import os
import stat
from typing import BinaryIO, Iterable, Iterator, List, Optional

from ..errors import TdxError
from ..fsutil import CHUNK, atomic_output

MAGIC = b"070701"
HEADER_LEN = 110
TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One archive member.

    ``data`` holds the bytes of small members (symlink targets, rendered
    scripts); ``path``/``offset`` point at the bytes of large ones on disk.
    """

    name: str
    mode: int
    size: int = 0
    data: Optional[bytes] = None
    path: Optional[str] = None
    offset: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def check_name(name: str) -> str:
    """Return ``name`` normalised to a relative member name, or raise TdxError."""
    if not isinstance(name, str) or not name:
        raise TdxError(f"empty archive member name {name!r}")
    if "\0" in name or "\n" in name:
        raise TdxError(f"archive member name {name!r} contains a NUL or newline: rename the file")
    stripped = name.lstrip("/")
    if stripped.startswith("./"):
        stripped = stripped[2:]
    parts = stripped.split("/")
    if not stripped or any(part in ("", ".", "..") for part in parts):
        raise TdxError(f"archive member name {name!r} is not a plain path inside the image (no '..', no empty parts)")
    return stripped


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(check_name(name), stat.S_IFDIR | mode)


def symlink(name: str, target: str) -> Entry:
    data = target.encode()
    return Entry(check_name(name), stat.S_IFLNK | 0o777, len(data), data=data)


def blob(name: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(check_name(name), stat.S_IFREG | mode, len(data), data=data)


def disk_file(name: str, path: str, mode: Optional[int] = None) -> Entry:
    """A regular file whose bytes are read from ``path`` when the archive is written."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise TdxError(f"{path} is not a regular file")
    perm = stat.S_IMODE(st.st_mode) if mode is None else mode
    return Entry(check_name(name), stat.S_IFREG | perm, st.st_size, path=os.fspath(path))


def _header(entry: Entry, ino: int, mtime: int, nlink: int) -> bytes:
    name = entry.name.encode("utf-8", "surrogateescape") + b"\0"
    fields = (ino, entry.mode, 0, 0, nlink, mtime, entry.size, 0, 0,
              entry.rdevmajor, entry.rdevminor, len(name), 0)
    head = MAGIC + b"".join(b"%08X" % value for value in fields) + name
    return head + b"\0" * (-len(head) % 4)


def _copy_body(entry: Entry, out: BinaryIO) -> None:
    if entry.data is not None:
        out.write(entry.data)
    elif entry.size:
        with open(entry.path, "rb") as inp:
            copy_from = getattr(out, "copy_from", None)
            if copy_from is not None and copy_from(inp, entry.offset, entry.size):
                out.write(b"\0" * (-entry.size % 4))
                return
            for chunk in _chunks(inp, entry):
                out.write(chunk)
    out.write(b"\0" * (-entry.size % 4))


def _chunks(inp: BinaryIO, entry: Entry) -> Iterator[bytes]:
    """The bytes of the on-disk ``entry`` from the open file ``inp``, in chunks."""
    inp.seek(entry.offset)
    left = entry.size
    while left:
        chunk = inp.read(min(CHUNK, left))
        if not chunk:
            raise TdxError(f"{entry.path} shrank while it was being read (member {entry.name!r}): rebuild")
        yield chunk
        left -= len(chunk)


def _write_entries(out: BinaryIO, entries: Iterable[Entry], mtime: int, number: bool) -> None:
    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if entry.is_dir else 1
        out.write(_header(entry, ino if number else 0, mtime, nlink))
        _copy_body(entry, out)


def write_fragment(path, entries: Iterable[Entry]) -> None:
    """Atomically write ``entries`` (in the given order) as a fragment."""
    with atomic_output(path) as out:
        _write_entries(out, entries, mtime=0, number=False)


def header_fields(head: bytes) -> Optional[List[int]]:
    """The 13 numbers of a 110-byte newc header (ino, mode, uid, gid, nlink, mtime, filesize,
    devmajor, devminor, rdevmajor, rdevminor, namesize, check), or None if one is not hex."""
    try:
        return [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    except ValueError:
        return None


def read_entries(path) -> Iterator[Entry]:
    """Stream the entries of a newc file (fragment or archive) without reading bodies.

    Stops at the trailer or the end of the file. Yields entries whose bodies
    point back into ``path``.
    """
    path = os.fspath(path)
    with open(path, "rb") as inp:
        end = os.fstat(inp.fileno()).st_size
        while True:
            pos = inp.tell()
            head = inp.read(HEADER_LEN)
            if not head:
                return
            if len(head) < HEADER_LEN or head[:6] != MAGIC:
                raise TdxError(f"{path}: not a newc cpio archive at offset {pos}")
            fields = header_fields(head)
            if fields is None:
                raise TdxError(f"{path}: corrupt newc header at offset {pos}")
            mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
            raw = inp.read(namesize)
            if namesize == 0 or len(raw) != namesize or raw[-1:] != b"\0":
                raise TdxError(f"{path}: corrupt member name at offset {pos}")
            name = raw[:-1].decode("utf-8", "surrogateescape")
            inp.seek(-(HEADER_LEN + namesize) % 4, os.SEEK_CUR)
            if name == TRAILER:
                return
            offset = inp.tell()
            if offset + size > end:
                raise TdxError(f"{path}: member {name!r} runs past the end of the file (truncated archive)")
            yield Entry(name, mode, size, path=path, offset=offset, rdevmajor=rmaj, rdevminor=rmin)
            inp.seek(size + (-size % 4), os.SEEK_CUR)


def read_body(entry: Entry) -> bytes:
    """The bytes of a (small) entry; for symlink targets and scripts, not for large files."""
    if entry.data is not None:
        return entry.data
    with open(entry.path, "rb") as inp:
        inp.seek(entry.offset)
        return inp.read(entry.size)


def body_digest(entry: Entry) -> bytes:
    """SHA-256 of an entry's bytes, read in chunks."""
    digest = hashlib.sha256()
    if entry.data is not None:
        digest.update(entry.data)
    elif entry.size:
        with open(entry.path, "rb") as inp:
            for chunk in _chunks(inp, entry):
                digest.update(chunk)
    return digest.digest()


def same_member(a: Entry, b: Entry) -> bool:
    """Whether two entries put the same thing at their path: type, mode, device and bytes."""
    return ((a.mode, a.size, a.rdevmajor, a.rdevminor) == (b.mode, b.size, b.rdevmajor, b.rdevminor)
            and (a.is_dir or body_digest(a) == body_digest(b)))


def merge(layers: Iterable[Iterable[Entry]]) -> List[Entry]:
    """Merge entry lists: a later layer replaces an earlier entry of the same name.

    Adds every missing parent directory (0755) and returns the entries sorted
    by their UTF-8 name, so parents always precede their children.
    """
    by_name = {}
    for layer in layers:
        for entry in layer:
            name = check_name(entry.name)
            old = by_name.get(name)
            if old is not None and old.is_dir and entry.is_dir:
                continue  # the first declaration of a directory keeps its mode
            by_name[name] = entry if entry.name == name else dataclasses.replace(entry, name=name)
    for name in list(by_name):
        parent = os.path.dirname(name)
        while parent and parent not in by_name:
            by_name[parent] = directory(parent)
            parent = os.path.dirname(parent)
    for name, entry in by_name.items():
        parent = os.path.dirname(name)
        if parent and not by_name[parent].is_dir:
            raise TdxError(f"image path /{name} needs /{parent} to be a directory, but another input makes it a file")
    return [by_name[name] for name in sorted(by_name, key=lambda n: n.encode("utf-8", "surrogateescape"))]


def write_archive(out: BinaryIO, entries: Iterable[Entry], mtime: int = 0) -> None:
    """Write sorted ``entries`` and the trailer as one newc archive to ``out``."""
    _write_entries(out, entries, mtime=mtime, number=True)
    out.write(_header(Entry(TRAILER, 0), 0, 0, 1))
    # The kernel reads the archive in 512-byte blocks like GNU cpio writes it.
    out.write(b"\0" * (-out.tell() % 512))
