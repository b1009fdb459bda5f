"""The filesystem an image unpacks to: its layers applied in order, with the OCI whiteout rules.

:func:`apply_layers` streams the layers into a :class:`Tree`. Bodies of an
uncompressed layer that lies in a file stay where they are: the tree records
their offset in the blob (its digest is checked while the headers are read).
A compressed layer is decompressed into one private file per layer below a
staging directory (the layer's uncompressed tar, written while its headers are
read), and its bodies are recorded by their offset there; bodies of directory
layers are appended to one more such file (mode 0600 files, 0700 directories:
the real mode and owner live in the model only), while paths, types, modes
including setuid/setgid/sticky, owners, device numbers, xattrs, symlink
targets and hard links are kept in memory. Whiteouts follow the OCI rules
(``.wh.NAME`` hides NAME of lower layers, ``.wh..wh..opq`` hides a
directory's lower contents; neither hides what the same layer adds).

Nothing from an image is ever written outside the staging directory, no
symlink of an image is followed on the host, and device nodes are never
created: they exist only in the model. Every failure is a
:class:`~tdx_rules.errors.TdxError` naming the input (layer digest, path) and
the fix.
"""

import contextlib
import dataclasses
import os
import shutil
import tempfile
import types
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from ..errors import TdxError
from ..fsutil import CHUNK
from .layers import BodyRef, DigestCheck, Layer
from .member import BLOCK, CHAR, DIR, FILE, HARDLINK, OPAQUE, SYMLINK, WHITEOUT, Member


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One path of the final filesystem.

    ``path`` is absolute inside the image (``/`` is the root). ``type`` is one
    of :data:`~tdx_rules.rootfs.member.TYPES`. For ``hardlink`` entries ``target`` is the path of the
    entry that carries the inode (the first of its names in sorted order) and
    the other fields repeat that inode's metadata. ``target`` of a symlink is
    its target, verbatim. ``body`` is the host file that holds a regular
    file's bytes, ``size`` of them from ``offset`` (None: the whole file): an
    uncompressed layer blob or the tree's bodies file. ``rdev`` is
    ``(major, minor)`` for devices. ``xattrs`` is a sorted tuple of
    ``(name, value bytes)``.
    """

    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: Optional[Tuple[int, int]] = None
    xattrs: Tuple[Tuple[str, bytes], ...] = ()
    target: Optional[str] = None
    body: Optional[str] = None
    size: int = 0
    offset: Optional[int] = None


# The xattrs of the many nodes without any: one shared, read-only mapping.
_NO_XATTRS: Mapping[str, bytes] = types.MappingProxyType({})


class _Node:
    """An inode of the model; hard links are several directory entries sharing one."""

    __slots__ = ("type", "mode", "uid", "gid", "rdev", "xattrs", "target", "body", "size", "offset",
                 "children")

    def __init__(self, kind: str, mode: int, uid: int = 0, gid: int = 0):
        self.type = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev: Optional[Tuple[int, int]] = None
        self.xattrs: Mapping[str, bytes] = _NO_XATTRS
        self.target: Optional[str] = None
        self.body: Optional[str] = None
        self.size = 0
        self.offset: Optional[int] = None
        self.children: Optional[Dict[str, "_Node"]] = {} if kind == DIR else None


def _sort_key(name: str) -> bytes:
    return os.fsencode(name)


class Tree:
    """The filesystem an image unpacks to: a model in memory, bodies on disk.

    ``staging`` is the directory holding ``store/``: ``bodies``, the private
    file (mode 0600) the bodies of directory layers are appended to, and
    ``layerN.tar``, the uncompressed tar of each compressed layer; entries point
    into them by offset, as into a plain layer blob.
    :meth:`cleanup` (or leaving the ``with`` block) removes what this tree
    wrote there.
    """

    def __init__(self, staging: Optional[str] = None):
        if staging is None:
            self.staging = tempfile.mkdtemp(prefix="tdx-oci-")
            self._own = True
        else:
            self.staging = os.path.abspath(os.fspath(staging))
            self._own = not os.path.exists(self.staging)
            os.makedirs(self.staging, mode=0o700, exist_ok=True)
        self.store = os.path.join(self.staging, "store")
        if self._own:
            os.chmod(self.staging, 0o700)
        os.makedirs(self.store, mode=0o700, exist_ok=True)
        os.chmod(self.store, 0o700)
        self.bodies = os.path.join(self.store, "bodies")
        self._spool = None  # the bodies file, opened at the first body
        self._spool_size = 0
        self._layer_tars = 0  # layerN.tar files handed out by layer_tar_path()
        self.root = _Node(DIR, 0o755)
        self.pending: List[DigestCheck] = []  # layer digest checks still running (apply_layers(defer_checks=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the bodies (and the staging directory if this tree created it)."""
        for check in self.pending:
            check.wait(quiet=True)
        self.pending.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        shutil.rmtree(self.staging if self._own else self.store, ignore_errors=True)

    def verify(self) -> None:
        """Wait for the layer digest checks still running; TdxError naming the layer if one
        does not match. Whatever was made from the tree must not be published before."""
        while self.pending:
            self.pending.pop(0).wait()

    # ---- lookups

    def _node(self, parts: List[str]) -> Optional[_Node]:
        node = self.root
        for part in parts:
            if node.type != DIR:
                return None
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def entries(self) -> List[Entry]:
        """Every path, sorted (depth first, names in byte order), root first."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[Entry]:
        """:meth:`entries` one by one, for a consumer that need not hold them all."""
        first_path: Dict[int, str] = {}  # the first name, in sorted order, of each inode
        stack = [("/", self.root)]
        while stack:
            path, node = stack.pop()
            if node.type == DIR:
                prefix = path if path.endswith("/") else path + "/"
                for name in sorted(node.children, key=_sort_key, reverse=True):
                    stack.append((prefix + name, node.children[name]))
            primary = first_path.setdefault(id(node), path)
            kind, target = node.type, node.target
            if primary != path:
                kind, target = HARDLINK, primary
            yield Entry(path, kind, node.mode, node.uid, node.gid, node.rdev, tuple(sorted(node.xattrs.items())),
                        target, node.body, node.size, node.offset)

    def get(self, path: str) -> Optional[Entry]:
        """The entry at an absolute image path (no symlink is followed), or None."""
        for entry in self.entries():
            if entry.path == path:
                return entry
        return None

    # ---- storing bodies

    def layer_tar_path(self) -> str:
        """A new path below the store for one layer's uncompressed tar (the layer creates the file)."""
        self._layer_tars += 1
        return os.path.join(self.store, f"layer{self._layer_tars}.tar")

    def _store(self, reader) -> Tuple[int, int]:
        """Append a body to the bodies file; its (offset, size) there."""
        if self._spool is None:
            fd = os.open(self.bodies, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            self._spool = os.fdopen(fd, "wb", buffering=0)
        offset = self._spool_size
        if reader is not None:
            while True:
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[self._spool.write(view):]
                self._spool_size += len(chunk)
        return offset, self._spool_size - offset


def _parts(name: str, layer: Layer, what: str = "member") -> List[str]:
    if "\0" in name:
        raise TdxError(f"layer {layer.digest}: {what} {name!r} contains a NUL byte; refusing this image")
    if name.startswith("/"):
        raise TdxError(f"layer {layer.digest}: {what} {name!r} has an absolute path; refusing this image")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TdxError(f"layer {layer.digest}: {what} {name!r} contains '..'; refusing this image")
    return parts


def apply_layers(layers, staging_dir=None, defer_checks: bool = False) -> Tree:
    """Apply ``layers`` (bottom first) and return the resulting :class:`Tree`.

    With ``defer_checks``, the digest checks of plain layers read in place keep
    running after this returns (their headers are read and checked for safety
    all the same); :meth:`Tree.verify` waits for them, and a caller must call
    it before it publishes anything made from the tree, as
    :func:`tdx_rules.rootfs.ext4.build_ext4` does.

    Reads every layer once (an uncompressed one in a file: its headers, then its
    bytes hashed in two threads; a compressed one: decompressed in a thread while
    its headers are read): bodies stay in such a layer, else go to the
    tree's staging directory (``staging_dir``, or a new temporary directory);
    never a whole layer in memory. Refuses (TdxError) absolute or ``..`` names, whiteouts that name
    nothing inside the tree, hard links to missing, directory or outside
    targets; a damaged layer raises TdxError naming its digest. On failure the
    staging files are removed.
    """
    tree = Tree(staging_dir)
    try:
        for layer in layers:
            _Applier(tree, layer, tree.pending if defer_checks else None).run()
    except BaseException:
        tree.cleanup()
        raise
    return tree


class _Applier:
    """Applies one layer to a tree (OCI whiteout rules: a whiteout hides only
    what lower layers put there, never what this layer adds)."""

    def __init__(self, tree: Tree, layer: Layer, checks: Optional[list] = None):
        self.tree = tree
        self.layer = layer
        self.checks = checks
        self.fresh: set = set()  # paths (tuples) this layer wrote, and their ancestors

    def _refuse(self, what: str) -> TdxError:
        return TdxError(f"layer {self.layer.digest}: {what}; refusing this image")

    def run(self) -> None:
        try:
            with contextlib.closing(self.layer.members(self.checks, self.tree.layer_tar_path())) as members:
                for member, reader in members:
                    self.member(member, reader)
        except OSError as exc:
            raise TdxError(f"layer {self.layer.digest}: cannot write the staging directory {self.tree.staging} "
                           f"({exc.strerror or exc}); check free space and permissions") from None

    def mark(self, parts: List[str]) -> None:
        for i in range(len(parts), 0, -1):
            key = tuple(parts[:i])
            if key in self.fresh:
                break
            self.fresh.add(key)

    def ensure_dir(self, parts: List[str]) -> _Node:
        node = self.tree.root
        for part in parts:
            child = node.children.get(part)
            if child is None or child.type != DIR:
                # Missing, or a non-directory below which the layer writes: a new
                # directory shadows it, as the overlay2 union does.
                child = _Node(DIR, 0o755)
                node.children[part] = child
            node = child
        return node

    def prune(self, node: _Node, parts: Tuple[str, ...]) -> None:
        """Drop what lower layers put below directory ``node`` (at ``parts``)."""
        for name in list(node.children):
            key = parts + (name,)
            child = node.children[name]
            if key not in self.fresh:
                del node.children[name]
            elif child.type == DIR:
                self.prune(child, key)

    def whiteout(self, parts: List[str]) -> None:
        parent = self.tree._node(parts[:-1])
        if parent is None or parent.type != DIR:
            return
        child = parent.children.get(parts[-1])
        if child is None:
            return
        if tuple(parts) not in self.fresh:
            del parent.children[parts[-1]]
        elif child.type == DIR:
            self.prune(child, tuple(parts))

    def member(self, member: Member, reader) -> None:
        parts = _parts(member.name, self.layer)
        if not parts:
            if member.type != DIR:
                raise self._refuse(f"the root entry {member.name!r} is not a directory")
            _set_meta(self.tree.root, member)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT):
            if base == OPAQUE:
                directory = self.ensure_dir(parts[:-1])
                self.mark(parts[:-1])
                self.prune(directory, tuple(parts[:-1]))
            elif not base.startswith(WHITEOUT + WHITEOUT):  # .wh..wh.plnk etc.: AUFS metadata, not content
                hidden = base[len(WHITEOUT):]
                if hidden in ("", ".", ".."):
                    raise self._refuse(f"whiteout {member.name!r} names {hidden!r}, which is outside the tree")
                self.whiteout(parts[:-1] + [hidden])
            return
        parent = self.ensure_dir(parts[:-1])
        if member.type == DIR:
            node = parent.children.get(base)
            if node is None or node.type != DIR:
                node = _Node(DIR, 0)
                parent.children[base] = node
            _set_meta(node, member)
        elif member.type == HARDLINK:
            target_parts = _parts(member.linkname, self.layer, "hard link target")
            target = self.tree._node(target_parts) if target_parts else None
            if target is None or target.type == DIR:
                what = "a directory" if target is not None else "not in the image"
                raise self._refuse(f"hard link {member.name!r} points to {member.linkname!r}, which is {what}")
            parent.children[base] = target
        else:
            node = _Node(member.type, 0)
            _set_meta(node, member)
            if member.type == FILE and isinstance(reader, BodyRef):
                node.body, node.offset, node.size = reader.path, reader.offset, reader.size
            elif member.type == FILE:
                node.offset, node.size = self.tree._store(reader)
                node.body = self.tree.bodies
            elif member.type == SYMLINK:
                if not member.linkname:
                    raise self._refuse(f"symlink {member.name!r} has an empty target")
                node.target = member.linkname
            elif member.type in (CHAR, BLOCK):
                node.rdev = (int(member.rdev[0]), int(member.rdev[1]))
            parent.children[base] = node
        self.mark(parts)


def _set_meta(node: _Node, member: Member) -> None:
    node.mode = member.mode & 0o7777
    node.uid = member.uid
    node.gid = member.gid
    node.xattrs = dict(member.xattrs) if member.xattrs else _NO_XATTRS
