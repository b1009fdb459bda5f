"""Layer readers: the members of one container image layer, read only when the layer is applied.

* :class:`TarLayer`: a tar stream, plain, gzip or zstd (recognised by their magic bytes,
  so a ``docker save`` ``layer.tar`` that is in fact compressed works too). The blob's
  digest and size and the ``diff_id`` of the uncompressed tar are checked when the image
  names them. An uncompressed blob that lies in a file (an OCI blob, a member of a
  ``docker save`` tarball) is read in place: a thread hashes it (:class:`DigestCheck`)
  while :func:`~tdx_rules.rootfs.tarscan.scan_tar` reads its headers, and bodies are
  handed out as :class:`BodyRef` slices of the blob. Any other blob is decompressed in a
  thread of its own (:class:`~tdx_rules.rootfs.decompress.Decompressor`: zlib-ng's inflate
  for gzip, every member of a multi-member stream, libzstd for zstd; both release the GIL)
  while the caller's thread hashes the blob and the tar, appends the tar to a spool file
  and reads its headers as they arrive; bodies are then :class:`BodyRef` slices of the
  spool. Decompression is bounded: a layer that expands out of proportion to its size is
  refused.
* :class:`DirLayer`: a Docker overlay2 ``diff/`` directory, read with ``O_NOFOLLOW``
  relative to directory descriptors, so no symlink of the image is followed on the host.
  Whiteouts there are character devices 0:0 or ``.wh.`` files; opaque directories carry
  the ``trusted.overlay.opaque`` (or ``user.overlay.opaque``) xattr, which is only readable
  with root rights: without them an opaque directory reads as a plain one (use
  ``docker save`` instead).

Damaged or unreadable bytes raise :class:`~tdx_rules.errors.TdxError` naming the layer and
the fix.
"""

import base64
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import TdxError
from ..fsutil import FileSlice, RangeHasher
from .decompress import CORRUPT_STREAM, GZIP_MAGIC, ZSTD_MAGIC, Decompressor
from .member import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, OPAQUE, SYMLINK, WHITEOUT, Member
from .tarscan import ChunkStream, Sequential, Unsupported, iter_members, scan_tar

# Exceptions that mean "the bytes of a layer are damaged".
_CORRUPT = CORRUPT_STREAM + (tarfile.TarError, ValueError, UnicodeError, OverflowError)

# xattrs of overlay2 directories that describe the storage, not the image.
_HOST_XATTRS = ("trusted.overlay.", "user.overlay.", "security.selinux")


class Layer:
    """One layer of an image, read only when iterated with :meth:`members`.

    ``digest`` names the layer in messages: ``sha256:…`` for blobs, the
    ``diff_id`` or member path for old ``docker save`` layers, the directory
    for overlay2 layers.
    """

    def __init__(self, digest: str, media_type: Optional[str] = None, size: Optional[int] = None):
        self.digest = digest
        self.media_type = media_type
        self.size = size

    def members(self, checks: Optional[list] = None,
                spool: Optional[str] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """Yield ``(Member, reader)``; ``reader`` is set for regular files and
        valid until the next member is requested. A layer may leave its digest
        check running and append it to ``checks`` (a list of :class:`DigestCheck`)
        instead of finishing it before the first member. ``spool`` is a path (not
        yet a file) where a layer may keep its uncompressed tar, handing out
        bodies as :class:`BodyRef` slices of it that stay valid as long as the file."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.digest!r})"


_TAR_KINDS = {tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.LNKTYPE: HARDLINK, tarfile.CHRTYPE: CHAR,
              tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO}


def _tar_member(info: tarfile.TarInfo) -> Member:
    # isreg() also covers the old '\0' and contiguous-file types, so it is asked first.
    kind = FILE if info.isreg() else _TAR_KINDS.get(info.type)
    if kind is None:
        raise ValueError(f"member {info.name!r} has unsupported tar type {info.type!r}")
    xattrs = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            xattrs[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return Member(info.name, kind, info.mode & 0o7777, info.uid, info.gid, (info.devmajor, info.devminor),
                  info.linkname, info.size if kind == FILE else 0, xattrs)


class BodyRef:
    """A regular file's bytes left where they are: ``size`` bytes at ``offset`` of
    the host file ``path`` (an uncompressed layer blob). Readable like any member body."""

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size
        self._handle = None
        self._stream = None

    def read(self, size: int = -1) -> bytes:
        if self._stream is None:
            self._handle = open(self.path, "rb")
            self._stream = FileSlice(self._handle, self.offset, self.size)
        data = self._stream.read(size)
        if not data:
            self._handle.close()
        return data


class _Window(io.RawIOBase):
    """Seekable view of ``size`` bytes at ``base`` of an open file, positions relative to ``base``."""

    def __init__(self, handle, base: int, size: int):
        super().__init__()
        self._handle, self._base, self._size, self._pos = handle, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        want = max(0, min(len(buffer), self._size - self._pos))
        if not want:
            return 0
        self._handle.seek(self._base + self._pos)
        n = self._handle.readinto(memoryview(buffer)[:want])
        self._pos += n
        return n


class DigestCheck:
    """The digest check of an uncompressed layer blob, hashed in a thread from creation on."""

    def __init__(self, layer: "TarLayer", path: str, base: int, size: int):
        self._layer, self._size = layer, size
        self._hasher = RangeHasher([(path, base, size)])
        self._hasher.start()

    def wait(self, tar_check=None, quiet: bool = False) -> None:
        """Wait for the hash; raise TdxError naming the layer unless it matches the image
        (or, ``quiet``, just wait)."""
        try:
            got = "sha256:" + self._hasher.result()[0]
        except (OSError, EOFError) as exc:
            if quiet:
                return
            raise TdxError(f"layer {self._layer.digest}: cannot read ({getattr(exc, 'strerror', None) or exc}); "
                           "check that the image file is readable") from None
        if not quiet:
            try:
                self._layer._check_in_place(got, self._size, tar_check)
            except _CORRUPT as exc:
                raise self._layer._corrupt(exc) from None


class TarLayer(Layer):
    """A layer stored as a (possibly compressed) tar stream.

    ``opener()`` returns a context manager yielding the raw blob bytes.
    ``blob_digest`` (of the raw bytes) and ``diff_id`` (of the uncompressed
    tar) are checked when given. ``location`` is ``(host file, offset, size or
    None)`` of the raw blob when it lies in a file: an uncompressed blob there
    is read in place (hashed once, then its members' bodies are handed out as
    :class:`BodyRef`, never copied).
    """

    def __init__(self, digest: str, opener: Callable, media_type: Optional[str] = None,
                 size: Optional[int] = None, blob_digest: Optional[str] = None, diff_id: Optional[str] = None,
                 location: Optional[Tuple[str, int, Optional[int]]] = None):
        super().__init__(digest, media_type, size)
        self._opener = opener
        self.blob_digest = blob_digest
        self.diff_id = diff_id
        self.location = location

    def _corrupt(self, why) -> TdxError:
        return TdxError(f"layer {self.digest}: corrupt or truncated ({why}); pull or save the image again")

    def members(self, checks: Optional[list] = None,
                spool: Optional[str] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """See :meth:`Layer.members`. A blob that is not read in place is decompressed into
        ``spool`` (a new file, created 0600; without it, a temporary file removed when the
        iteration ends) and its bodies are :class:`BodyRef` slices of it; every digest is
        checked before the iteration ends."""
        if self.location is not None:
            try:
                with open(self.location[0], "rb") as handle:
                    handle.seek(self.location[1])
                    head = handle.read(4)
            except OSError as exc:
                raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                               "check that the image file is readable") from None
            if head[:2] != GZIP_MAGIC and head != ZSTD_MAGIC:
                yield from self._members_in_place(checks)
                return
        scratch = None
        if spool is None:
            scratch = tempfile.mkdtemp(prefix="tdx-layer-")
            spool = os.path.join(scratch, "layer.tar")
        try:
            yield from self._members_spooled(spool)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _members_spooled(self, path: str) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """The blob decompressed by a :class:`Decompressor` while this thread hashes the tar,
        appends it to ``path`` and reads its headers as they arrive (:func:`iter_members`;
        what that leaves to tarfile is read from ``path`` once it is complete)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _SpoolFile.write_error(self, path, exc) from None
        decompressor = Decompressor(self._opener, f"layer {self.digest}")
        spool = _SpoolFile(self, decompressor, fd, path)
        decompressor.start()
        try:
            scanned = 0
            try:
                for member, data in iter_members(ChunkStream(spool.next_chunk)):
                    scanned += 1
                    yield member, (BodyRef(path, data, member.size) if member.type == FILE else None)
            except Unsupported:
                spool.drain()
                with open(path, "rb") as handle:
                    yield from self._members_by_tarfile(handle, 0, spool.size, skip=scanned, bodies=path)
            spool.drain()  # padding and what follows the end-of-archive block: hashed too
            self._verify(decompressor, spool)
        except _CORRUPT as exc:
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None
        finally:
            decompressor.stop()
            os.close(fd)

    def _members_in_place(self, checks: Optional[list]) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """An uncompressed blob in a host file: its members read in place.

        One sequential read scans the headers while a thread hashes the whole
        blob. Without ``checks`` the digest is checked before the first member;
        with it, the check keeps running and is appended to ``checks`` (the
        caller waits for it before it publishes anything). The bodies' own
        digests are left to the consumer (``Entry.sha256`` is None):
        :func:`tdx_rules.rootfs.ext4.build_ext4` works them out while it copies them.
        """
        path, base, size = self.location
        try:
            with open(path, "rb") as handle:
                if size is None:
                    size = os.fstat(handle.fileno()).st_size - base
                check = DigestCheck(self, path, base, size)
                if checks is not None and size:
                    yield from self._members_in_place_streamed(handle, path, base, size, check, checks)
                    return
                try:
                    scanned = scan_tar(handle.fileno(), base, size) if size else []
                except BaseException:
                    check.wait(quiet=True)
                    raise
                if scanned is None:  # something only tarfile reads: it checks the whole archive first
                    check.wait(tar_check=lambda: self._members_by_tarfile(handle, base, size))
                    yield from self._members_by_tarfile(handle, base, size)
                    return
                if checks is None:
                    check.wait()
                else:
                    checks.append(check)
                for member, data in scanned:
                    yield member, (BodyRef(path, base + data, member.size) if member.type == FILE else None)
        except _CORRUPT as exc:
            raise self._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None

    def _members_in_place_streamed(self, handle, path: str, base: int, size: int, check: "DigestCheck",
                                   checks: list) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        """The members of a blob read in place, each yielded as soon as its header is read
        (so that a layer of many members is never held in memory at once), while ``check``
        runs; it joins ``checks`` once the last member is out. What the scanner leaves to
        tarfile: the whole archive is checked by tarfile, then the members after those
        already yielded are read by it."""
        scanned = 0
        try:
            try:
                for member, data in iter_members(Sequential(handle.fileno(), base, size)):
                    scanned += 1
                    yield member, (BodyRef(path, base + data, member.size) if member.type == FILE else None)
            except Unsupported:
                check.wait(tar_check=lambda: self._members_by_tarfile(handle, base, size))
                yield from self._members_by_tarfile(handle, base, size, skip=scanned)
                return
        except BaseException:
            check.wait(quiet=True)
            raise
        checks.append(check)

    def _check_in_place(self, got: str, size: int, tar_check=None) -> None:
        """The blob's size and digests; ``tar_check`` (members from tarfile, read to the end)
        runs between the blob digest and the diff_id, so a damaged tar is named as such."""
        if self.size is not None and size != self.size:
            raise TdxError(f"layer {self.digest}: {size} bytes, the manifest says {self.size}; "
                           "the image is corrupt: pull or save it again")
        if self.blob_digest is not None and got != self.blob_digest:
            raise TdxError(f"layer {self.digest}: content has digest {got}, not the one the manifest names; "
                           "the image is corrupt: pull or save it again")
        if tar_check is not None:
            for _ in tar_check():
                pass
        if self.diff_id is not None and got != self.diff_id:
            raise TdxError(f"layer {self.digest}: content has digest {got}, not the diff_id {self.diff_id} of the "
                           "image config; the image is corrupt: pull or save it again")

    def _members_by_tarfile(self, handle, base: int, size: int, skip: int = 0, bodies: Optional[str] = None):
        """The members of the tar of ``size`` bytes at ``base`` of ``handle``, read by tarfile,
        after the first ``skip`` (those a scan already yielded). Bodies are readers, or, with
        ``bodies`` (the path of ``handle``), :class:`BodyRef` slices of it where not sparse."""
        tar = tarfile.open(fileobj=_Window(handle, base, size), mode="r:", errors="surrogateescape")
        count = 0
        while True:
            info = tar.next()
            tar.members.clear()  # a stream of many members must not pile up TarInfo objects
            if info is None:
                if size < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError("the tar stream ends before its end-of-archive block")
                return
            count += 1
            if count <= skip:
                continue
            member = _tar_member(info)
            reader = None
            if member.type == FILE and bodies is not None and info.sparse is None:
                reader = BodyRef(bodies, base + info.offset_data, info.size)
            elif member.type == FILE:
                reader = _TarFileReader(tar.extractfile(info), self)
            yield member, reader

    def _verify(self, decompressor: Decompressor, spool: "_SpoolFile") -> None:
        if self.blob_digest is not None:
            got = "sha256:" + decompressor.blob_sha256.hexdigest()
            if got != self.blob_digest:
                raise TdxError(f"layer {self.blob_digest}: content has digest {got}, not the one the manifest names; "
                               "the image is corrupt: pull or save it again")
        if self.size is not None and decompressor.blob_size != self.size:
            raise TdxError(f"layer {self.digest}: {decompressor.blob_size} bytes, the manifest says {self.size}; "
                           "the image is corrupt: pull or save it again")
        if self.diff_id is not None:
            got = "sha256:" + spool.sha256.hexdigest()
            if got != self.diff_id:
                raise TdxError(f"layer {self.digest}: uncompressed content has digest {got}, not the diff_id "
                               f"{self.diff_id} of the image config; the image is corrupt: pull or save it again")


class _SpoolFile:
    """The uncompressed tar of a layer as its :class:`Decompressor` hands it out: hashed
    (SHA-256, for the diff_id), counted and appended to the spool file ``fd`` at ``path``."""

    def __init__(self, layer: TarLayer, decompressor: Decompressor, fd: int, path: str):
        self._layer, self._decompressor, self._fd, self.path = layer, decompressor, fd, path
        self.sha256 = hashlib.sha256()
        self.size = 0

    @staticmethod
    def write_error(layer: TarLayer, path: str, exc: OSError) -> TdxError:
        return TdxError(f"layer {layer.digest}: cannot write its uncompressed tar to {path} "
                        f"({exc.strerror or exc}); check free space and permissions")

    def next_chunk(self) -> bytes:
        """The next chunk of the tar, already in the spool; b"" at the end."""
        chunk = self._decompressor.next_chunk()
        if chunk:
            self.sha256.update(chunk)
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                raise self.write_error(self._layer, self.path, exc) from None
            self.size += len(chunk)
        return chunk

    def drain(self) -> None:
        """Spool the rest of the stream."""
        while self.next_chunk():
            pass


class _TarFileReader:
    """Body of a tar member; damaged data raises TdxError naming the layer."""

    def __init__(self, inner, layer: TarLayer):
        self._inner, self._layer = inner, layer

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except _CORRUPT as exc:
            raise self._layer._corrupt(exc) from None
        except OSError as exc:
            raise TdxError(f"layer {self._layer.digest}: cannot read ({exc.strerror or exc}); "
                           "check that the image file is readable") from None


class DirLayer(Layer):
    """A layer stored as a directory tree (Docker overlay2 ``diff/``).

    Read with ``O_NOFOLLOW`` relative to directory descriptors: symlinks of
    the layer are read as data, never followed. Character devices 0:0 are
    whiteouts; an opaque xattr on a directory adds a ``.wh..wh..opq`` member.
    """

    def __init__(self, path: str):
        super().__init__(f"overlay2 layer {path}")
        self.path = path

    def _fail(self, rel: str, exc: OSError) -> TdxError:
        where = os.path.join(self.path, rel) if rel else self.path
        if isinstance(exc, PermissionError):
            return TdxError(f"{where}: permission denied; read Docker's storage as root or use 'docker save' "
                            "to get a tarball")
        return TdxError(f"{where}: cannot read ({exc.strerror or exc}); check the overlay2 directory")

    @staticmethod
    def _xattrs(target) -> Dict[str, bytes]:
        result = {}
        try:
            names = os.listxattr(target, follow_symlinks=False) if isinstance(target, str) else os.listxattr(target)
        except OSError:
            return result
        for name in sorted(names):
            if name.startswith(_HOST_XATTRS):
                continue
            try:
                result[name] = (os.getxattr(target, name, follow_symlinks=False) if isinstance(target, str)
                                else os.getxattr(target, name))
            except OSError:
                continue
        return result

    @staticmethod
    def _opaque(fd: int) -> bool:
        for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
            try:
                if os.getxattr(fd, name) == b"y":
                    return True
            except OSError:
                continue
        return False

    def members(self, checks: Optional[list] = None,
                spool: Optional[str] = None) -> Iterator[Tuple[Member, Optional[BinaryIO]]]:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            root = os.open(self.path, flags)
        except OSError as exc:
            raise self._fail("", exc) from None
        seen: Dict[Tuple[int, int], str] = {}
        stack: List[Tuple[int, str]] = [(root, "")]
        try:
            while stack:
                dirfd, rel = stack.pop()
                try:
                    try:
                        names = sorted(os.listdir(dirfd))
                    except OSError as exc:
                        raise self._fail(rel, exc) from None
                    subdirs = []
                    for name in names:
                        child = f"{rel}/{name}" if rel else name
                        try:
                            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                        except OSError as exc:
                            raise self._fail(child, exc) from None
                        yield from self._entry(dirfd, name, child, st, seen, subdirs)
                    for name, child in reversed(subdirs):
                        try:
                            stack.append((os.open(name, flags, dir_fd=dirfd), child))
                        except OSError as exc:
                            raise self._fail(child, exc) from None
                finally:
                    os.close(dirfd)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _entry(self, dirfd: int, name: str, rel: str, st: os.stat_result, seen, subdirs):
        mode = stat.S_IMODE(st.st_mode)
        full = os.path.join(self.path, rel)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            try:
                xattrs, opaque = self._xattrs(fd), self._opaque(fd)
            finally:
                os.close(fd)
            yield Member(rel, DIR, mode, st.st_uid, st.st_gid, xattrs=xattrs), None
            if opaque:
                yield Member(f"{rel}/{OPAQUE}", FILE), io.BytesIO(b"")
            subdirs.append((name, rel))
            return
        if fmt == stat.S_IFCHR and st.st_rdev == 0:
            parent, _, base = rel.rpartition("/")
            yield Member(f"{parent}/{WHITEOUT}{base}" if parent else WHITEOUT + base, FILE), io.BytesIO(b"")
            return
        if fmt == stat.S_IFSOCK:
            return  # sockets have no tar form; Docker drops them too
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in seen:
            yield Member(rel, HARDLINK, mode, st.st_uid, st.st_gid, linkname=seen[key]), None
            return
        if st.st_nlink > 1:
            seen[key] = rel
        if fmt == stat.S_IFREG:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            with os.fdopen(fd, "rb") as handle:
                yield Member(rel, FILE, mode, st.st_uid, st.st_gid, size=st.st_size,
                             xattrs=self._xattrs(handle.fileno())), _GuardedReader(handle, self, rel)
        elif fmt == stat.S_IFLNK:
            try:
                target = os.readlink(name, dir_fd=dirfd)
            except OSError as exc:
                raise self._fail(rel, exc) from None
            yield Member(rel, SYMLINK, mode, st.st_uid, st.st_gid, linkname=target, xattrs=self._xattrs(full)), None
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = CHAR if fmt == stat.S_IFCHR else BLOCK
            yield Member(rel, kind, mode, st.st_uid, st.st_gid, (os.major(st.st_rdev), os.minor(st.st_rdev)),
                         xattrs=self._xattrs(full)), None
        elif fmt == stat.S_IFIFO:
            yield Member(rel, FIFO, mode, st.st_uid, st.st_gid, xattrs=self._xattrs(full)), None


class _GuardedReader:
    """File reader of a directory layer; read errors become TdxError."""

    def __init__(self, handle, layer: DirLayer, rel: str):
        self._handle, self._layer, self._rel = handle, layer, rel

    def read(self, size: int = -1) -> bytes:
        try:
            return self._handle.read(size)
        except OSError as exc:
            raise self._layer._fail(self._rel, exc) from None
