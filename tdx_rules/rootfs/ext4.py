"""Reproducible ext4 root filesystem images from an unpacked container image, without root.

:func:`build_ext4` turns a :class:`tdx_rules.rootfs.tree.Tree` (or a list of its
entries) plus an agent binary into an ext4 image. The filesystem is written
by :mod:`tdx_rules.rootfs.ext4_writer`, block by block, from the model: no staging
tree, no ``mkfs``, no mount, no loop device, no root. Owners, modes
(setuid, setgid, sticky), device nodes, fifos, hard links, symlinks and xattrs
come from the model alone, so the host never creates a device node or chowns
a file. File bodies are copied with ``copy_file_range`` from where the tree
keeps them: the layer tar itself (uncompressed layers) or the tree's bodies file.

``e2fsck -fn`` checks the result before it is renamed over ``out``; nothing
is left behind on failure.

Same tree, agent, epoch, size and label give a byte-identical image whatever
the host, its clock, umask, file times or the build directory:

* the filesystem UUID is derived from a SHA-256 over the whole input: paths,
  metadata, symlink targets, xattrs, every file's size and CRC-32C (worked out in a thread while the bytes are copied; a
  fingerprint, not a security digest: the rootfs cache is keyed by the layers'
  SHA-256 digests), epoch, size and label. The same tree therefore gives the
  same image from a plain or a compressed layer, or from layers whose tar
  headers differ in what the image does not keep (member mtimes, say). The
  metadata checksum seed and the journal's UUID follow from the UUID. The
  directory hash seed (which orders the entries of htree directories, so it is
  needed before any block is placed) is a SHA-256 over the tree's paths;
* every timestamp (inodes, superblock write/check/mkfs times) is ``epoch``,
  inode generations are 0, nothing counts bytes written;
* inode numbers and block allocation follow the sorted path order.

Size: ``size='auto'`` takes the estimated need of the tree (data, directory,
symlink, xattr and extent blocks, inode tables, journal, group metadata:
:func:`needed_size`) plus 20 %, at least 16 MiB, rounded up to a MiB. A
fixed size (``'64M'``, ``'1G'``, bytes as int) smaller than the need raises
TdxError "needs at least N MiB".
"""

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import TdxError
from ..fsutil import RangeHasher
from . import ext4_writer as writer
from .member import BLOCK as BLOCK_DEV
from .member import CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK

Node = writer.Node

BLOCK = writer.BLOCK
INODE_SIZE = writer.INODE_SIZE
INODE_RATIO = 16384
HEADROOM_FRACTION = 0.20
HEADROOM_MIN = 16 << 20
MIB = 1 << 20
LABEL = "rootfs"
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
FORMAT = "tdx-rules ext4 writer 2"  # bump when the bytes written for the same input change

_TYPES = (FILE, DIR, SYMLINK, CHAR, BLOCK_DEV, FIFO)


@dataclasses.dataclass(frozen=True)
class Ext4Image:
    """What :func:`build_ext4` produced."""

    path: str
    size: int
    uuid: str
    inodes: int


def _key(path: str) -> Tuple[bytes, ...]:
    return tuple(part for part in os.fsencode(path).split(b"/") if part)


def _names(node: Node) -> List[str]:
    """Every path of ``node``: its first, then its hard links' (``aliases``)."""
    return [node.path] + (node.aliases or [])


def _inodes(entries: Iterable) -> Dict[str, Node]:
    """The writer's nodes keyed by path (hard links: one node under each of its paths, the
    other paths its ``aliases``). Directories get their ``children`` later (:func:`_link`)."""
    by_path: Dict[str, Node] = {}
    for entry in entries:
        if entry.type == HARDLINK:
            owner = by_path.get(entry.target)
            if owner is None or owner.type == DIR:
                what = "a directory" if owner is not None else "not in the tree (or listed after the link)"
                raise TdxError(f"hard link {entry.path!r} points to {entry.target!r}, which is {what}; "
                               "rebuild the tree with tdx_rules.rootfs.tree.apply_layers")
            if owner.aliases is None:
                owner.aliases = []
            owner.aliases.append(entry.path)
            owner.links += 1
            by_path[entry.path] = owner
            continue
        if entry.type not in _TYPES:
            raise TdxError(f"{entry.path!r}: unknown entry type {entry.type!r}; rebuild the tree")
        offset = getattr(entry, "offset", None)
        size = entry.size
        if entry.type == FILE and entry.body is not None and offset is None:
            try:
                size = os.stat(entry.body).st_size
            except OSError as exc:
                raise TdxError(f"{entry.path!r}: its body {entry.body} cannot be read ({exc.strerror or exc}); "
                               "keep the tree (its staging directory, its layer files) until the image is "
                               "built") from None
        body = entry.body if entry.type == FILE else None
        by_path[entry.path] = Node(
            entry.type, entry.mode & 0o7777, entry.uid, entry.gid, entry.rdev, tuple(entry.xattrs),
            os.fsencode(entry.target) if entry.type == SYMLINK else None, body, offset or 0,
            size if body is not None else 0, children={} if entry.type == DIR else None, path=entry.path)
    if "/" not in by_path:
        by_path["/"] = _dir("/")
    elif by_path["/"].type != DIR:
        raise TdxError("the tree's root is not a directory; rebuild the tree")
    return by_path


def _dir(path: str, mode: int = 0o755) -> Node:
    return Node(DIR, mode, children={}, path=path)


def _parse_size(size) -> Optional[int]:
    if size == "auto" or size is None:
        return None
    if isinstance(size, bool):
        raise TdxError(f"size {size!r} is not a size; pass 'auto', bytes, or a string like '64M' or '1G'")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(size), re.I)
        if not match:
            raise TdxError(f"size {size!r} is not a size; pass 'auto', bytes, or a string like '64M' or '1G'")
        value = int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    if value <= 0:
        raise TdxError(f"size {size!r} is not positive; pass 'auto' or a size like '64M'")
    return -(-value // BLOCK) * BLOCK


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if path is None:
        raise TdxError(f"{name} not found; install e2fsprogs")
    return path


def _check_path(path: str) -> None:
    for part in os.fsencode(path).split(b"/"):
        if len(part) > 255:
            raise TdxError(f"image path {path!r} has a name longer than 255 bytes, the ext4 limit; rename it")


# --------------------------------------------------------------------------- agent

def _place_agent(inodes: Dict[str, Node], agent: str, guest_path: str) -> str:
    """Put the agent at ``guest_path`` (parents resolved through the image's own
    symlinks, missing ones created 0755 root); return the path it lands at."""
    if not isinstance(guest_path, str) or not guest_path.startswith("/") or "\0" in guest_path:
        raise TdxError(f"agent_guest_path {guest_path!r} is not an absolute path; pass e.g. '/sbin/vm-agent'")
    wanted = [part for part in guest_path.split("/") if part not in ("", ".")]
    if not wanted or ".." in wanted:
        raise TdxError(f"agent_guest_path {guest_path!r} must name a file without '..'; pass e.g. '/sbin/vm-agent'")
    current: List[str] = []
    pending = wanted[:-1]
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = "/" + "/".join(current + [part])
        inode = inodes.get(candidate)
        if inode is None or inode.type == DIR:
            current.append(part)
            continue
        if inode.type != SYMLINK:
            raise TdxError(f"agent_guest_path {guest_path!r}: {candidate} is a {inode.type} in the image, not a "
                           "directory; pick another agent path")
        hops += 1
        if hops > 40:
            raise TdxError(f"agent_guest_path {guest_path!r}: too many symlinks in the image; pick another path")
        target = os.fsdecode(inode.target)
        if target.startswith("/"):
            current = []
        pending = target.split("/") + pending
    parent = "/" + "/".join(current)
    for i in range(1, len(current) + 1):
        path = "/" + "/".join(current[:i])
        if path not in inodes:
            inodes[path] = _dir(path)
    final = (parent.rstrip("/") + "/" + wanted[-1])
    existing = inodes.get(final)
    if existing is not None:
        if existing.type == DIR:
            raise TdxError(f"agent_guest_path {guest_path!r}: {final} is a directory in the image; pick another path")
        names = _names(existing)
        names.remove(final)
        del inodes[final]
        if names:  # the agent replaces one name of a hard-linked file: the others keep it
            existing.path, existing.aliases, existing.links = names[0], names[1:] or None, len(names)
    try:
        with open(agent, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise TdxError(f"agent {agent}: cannot read ({exc.strerror or exc}); build the agent first") from None
    inodes[final] = Node(FILE, 0o755, body=agent, size=size, path=final)
    return final


# --------------------------------------------------------------------------- size

def _content_blocks(nodes: List[Node], hash_seed: bytes) -> int:
    """Blocks for file data, directories, long symlinks, xattr blocks and extent leaves; sets
    each directory node's layout, which that count went by."""
    blocks = 0
    for node in nodes:
        if node.type == FILE:
            data = -(-node.size // BLOCK)
            extents = -(-data // writer.MAX_EXTENT) + data // writer.BLOCKS_PER_GROUP
            blocks += data + (0 if extents <= 4 else -(-extents // writer.EXTENTS_PER_LEAF))
        elif node.type == SYMLINK and len(node.target) >= 60:
            blocks += 1
        elif node.type == DIR:
            try:
                node.layout = writer.dir_layout(list(node.children), hash_seed)
            except writer.LayoutError as exc:
                raise TdxError(f"directory {node.path!r}: {exc}; split it into subdirectories") from None
            count = node.layout.count
            blocks += max(count, writer.LOST_FOUND_BLOCKS) if node.path == "/lost+found" else count
        if node.xattrs and not writer.xattrs_in_inode(node.xattrs):
            blocks += 1
    return blocks


def _inode_count(used: int, size: int) -> int:
    return max(used + max(used // 5, 256), size // INODE_RATIO)


def _needed_blocks(content: int, used_inodes: int, size: int) -> int:
    """Blocks an image of ``size`` bytes needs for the tree: content plus the
    metadata laid out for that size (a margin of 64 blocks covers extents
    split around the backup superblocks)."""
    total = size // BLOCK
    try:
        geometry = writer.Geometry(total, _inode_count(used_inodes, size))
    except writer.NoSpace as exc:
        return max(exc.blocks, total + 1)
    backups = sum(length for _, length in geometry.reserved[1:])
    return geometry.metadata_end + backups + writer.journal_blocks(geometry.blocks) + content + 64


def _smallest_fit(content: int, used_inodes: int, start: int, headroom) -> int:
    """Smallest size in whole MiB, at least ``start``, that holds the estimate for
    an image of that very size plus ``headroom(estimate)`` (the metadata grows
    with the size: iterate to the fixed point)."""
    size = max(MIB, -(-start // MIB) * MIB)
    for _ in range(100):
        need = _needed_blocks(content, used_inodes, size) * BLOCK
        want = -(-(need + headroom(need)) // MIB) * MIB
        if want <= size:
            return size
        size = want
    return size


def needed_size(content: int, used_inodes: int, size: Optional[int] = None) -> Tuple[int, int]:
    """(minimum bytes, auto size in bytes) for ``content`` blocks and
    ``used_inodes`` inodes. The minimum is the smallest size (in whole MiB) the
    estimate fits, at least ``size`` when given; the auto size adds 20 % of
    the estimate, at least 16 MiB."""
    minimum = _smallest_fit(content, used_inodes, MIB, lambda need: 0)
    auto = _smallest_fit(content, used_inodes, minimum,
                         lambda need: max(int(need * HEADROOM_FRACTION), HEADROOM_MIN))
    if size is not None and _needed_blocks(content, used_inodes, size) * BLOCK > size:
        minimum = _smallest_fit(content, used_inodes, max(size, minimum), lambda need: 0)
    return minimum, auto


# --------------------------------------------------------------------------- build

def _identity(nodes: List[Node], crcs: Iterable[int], epoch: int, size: int, label: str) -> bytes:
    """SHA-256 over everything that goes into the image; ``crcs``: the CRC-32C of each
    file body, in the order of ``nodes``."""
    crcs = iter(crcs)
    digest = hashlib.sha256(FORMAT.encode() + b"\0")
    digest.update(f"{epoch}\0{size}\0{label}\0".encode())
    for node in nodes:
        for path in _names(node):
            digest.update(os.fsencode(path) + b"\0")
        content = f"{node.size}:crc32c:{next(crcs):08x}" if node.type == FILE and node.body is not None else None
        digest.update(f"|{node.type}|{node.mode:o}|{node.uid}|{node.gid}|{node.rdev}|{node.size}|"
                      f"{content}|".encode())
        digest.update((node.target or b"") + b"\0")
        for name, value in node.xattrs:
            digest.update(os.fsencode(name) + b"\0" + len(value).to_bytes(8, "little") + value)
        digest.update(b"\n")
    return digest.digest()


def _hash_seed(paths: List[str]) -> bytes:
    """The directory hash seed: derived from every path of the tree, ``paths`` in sorted
    order (known before any body is read, since the htree layout depends on it), never random."""
    digest = hashlib.sha256(FORMAT.encode() + b"\0hash_seed\0")
    for path in paths:
        digest.update(os.fsencode(path) + b"\0")
    return bytes.fromhex(_uuid(digest.digest()).replace("-", ""))


def _uuid(seed: bytes) -> str:
    raw = bytearray(seed[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom (derived from SHA-256)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _check_inode(inode: Node) -> None:
    """Refuse what ext4 cannot hold, before anything is written."""
    path = inode.path
    if inode.type in (CHAR, BLOCK_DEV):
        major, minor = inode.rdev or (0, 0)
        if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
            raise TdxError(f"device {path!r} has number {major}:{minor}, beyond ext4's 12-bit major and 20-bit "
                           "minor; remove it from the image")
    elif inode.type == SYMLINK and len(inode.target) >= BLOCK:
        raise TdxError(f"symlink {path!r} has a target longer than 4095 bytes; shorten it")
    if inode.xattrs:
        try:
            writer.xattrs_in_inode(inode.xattrs)
        except writer.LayoutError as exc:
            raise TdxError(f"{path!r}: {exc}; remove it from the image") from None
    if max(inode.uid, inode.gid) >= 1 << 32:
        raise TdxError(f"{path!r} has owner {inode.uid}:{inode.gid}, beyond 32 bits; fix the image")


def _link(inodes: Dict[str, Node]) -> None:
    """Give every directory its ``children`` by name (bytes), in the order of ``inodes``."""
    for path, node in inodes.items():
        if path != "/":
            parent, _, name = path.rpartition("/")
            inodes[parent or "/"].children[os.fsencode(name)] = node


def _space_error(out: str, given: Optional[int], minimum: int, auto: int, detail: str) -> TdxError:
    at_least = max(minimum, (given or 0) + MIB) // MIB
    size = f"size {given // MIB} MiB is too small: " if given else ""
    return TdxError(f"{out}: {size}the tree needs at least {at_least} MiB ({detail}); pass a larger size or "
                    f"size='auto' ({auto // MIB} MiB)")


def build_ext4(tree, agent_path_on_host, agent_guest_path: str = "/sbin/vm-agent", *, out, size="auto",
               epoch: int = 0, label: str = LABEL) -> Ext4Image:
    """Write an ext4 image of ``tree`` plus the agent to ``out``, atomically.

    ``tree`` is a :class:`tdx_rules.rootfs.tree.Tree` or a list of its entries (any
    objects with the attributes of :class:`tdx_rules.rootfs.tree.Entry`). The
    agent lands at ``agent_guest_path`` (parents resolved through the image's
    symlinks, so ``/sbin`` -> ``usr/sbin`` is honoured) with mode 0755 and
    owner 0:0. ``size`` is ``'auto'`` (estimated need + 20 %, at least
    +16 MiB, in whole MiB), bytes, or a string like ``'64M'``/``'2G'``.
    Every timestamp is ``epoch`` (0 <= epoch < 2**32). Needs no root: no
    mount, mknod or chown on the host. Raises TdxError on any failure; ``out``
    is then left as it was.
    """
    out = os.path.abspath(os.fspath(out))
    agent = os.fspath(agent_path_on_host)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < 1 << 32:
        raise TdxError(f"epoch {epoch!r} is not a time between 0 and 2**32-1 seconds; pass SOURCE_DATE_EPOCH")
    if not isinstance(label, str) or len(label.encode()) > 16:
        raise TdxError(f"label {label!r} is longer than 16 bytes; pass a shorter filesystem label")
    if not os.path.isfile(agent):
        raise TdxError(f"agent {agent}: no such file; build the agent first or fix the path")
    given = _parse_size(size)
    inodes = _inodes(tree.iter_entries() if hasattr(tree, "iter_entries") else tree)
    _place_agent(inodes, agent, agent_guest_path)
    lost = inodes.get("/lost+found")
    if lost is not None and lost.type != DIR:
        raise TdxError("/lost+found is not a directory in the image; remove it from the image")
    if lost is None:
        inodes["/lost+found"] = _dir("/lost+found", 0o700)

    for node in {id(node): node for node in inodes.values() if node.aliases}.values():
        names = sorted(_names(node), key=_key)  # the first name in sorted order carries the inode
        node.path, node.aliases = names[0], names[1:]
    nodes: List[Node] = []  # each inode once, root first, in the sorted order of its first name
    paths = sorted(inodes, key=_key)
    for path in paths:
        _check_path(path)
        node = inodes[path]
        if node.path == path:
            nodes.append(node)
            _check_inode(node)
    hash_seed = _hash_seed(paths)
    del paths
    _link(inodes)
    del inodes  # from here on, the nodes alone
    content = _content_blocks(nodes, hash_seed)
    used_inodes = len(nodes) + writer.FIRST_INO - 2
    minimum, auto = needed_size(content, used_inodes, given)
    image_size = given if given is not None else auto
    if given is not None and (given < minimum or _needed_blocks(content, used_inodes, given) * BLOCK > given):
        raise _space_error(out, given, minimum, auto, "estimated from its files, directories and metadata")
    inode_count = _inode_count(used_inodes, image_size)
    e2fsck = tool("e2fsck")  # before anything is written
    # The bodies' fingerprints (the image identity covers the content) are worked out by
    # another thread while the writer allocates blocks and copies the bytes.
    hasher = RangeHasher(((node.body, node.offset, node.size) for node in nodes
                          if node.type == FILE and node.body is not None), writer.Crc32c, writer.Crc32c.value)
    ids: Dict[str, str] = {}

    def identity() -> bytes:
        try:
            crcs = hasher.result()
        except (OSError, EOFError) as exc:
            raise TdxError(f"{out}: a file body cannot be read ({getattr(exc, 'strerror', None) or exc}); keep the "
                           "tree (its staging directory, its layer files) until the image is built") from None
        seed = _identity(nodes, crcs, epoch, image_size, label)
        ids["uuid"] = _uuid(seed)
        return bytes.fromhex(ids["uuid"].replace("-", ""))

    directory = os.path.dirname(out)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, image = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise TdxError(f"{out}: cannot create a temporary file beside it ({exc.strerror or exc}); "
                       "check the path and permissions") from None
    hasher.start()
    try:
        try:
            with os.fdopen(fd, "r+b") as handle:
                geometry = writer.write_image(handle.fileno(), image_size // BLOCK, inode_count, nodes,
                                              hash_seed=hash_seed, identity=identity, label=label.encode(), epoch=epoch)
        except writer.NoSpace as exc:
            raise _space_error(out, given, max(minimum, (exc.blocks or 0) * BLOCK), auto, str(exc)) from None
        except writer.LayoutError as exc:
            raise TdxError(f"{out}: {exc}; fix the image") from None
        except OSError as exc:
            raise TdxError(f"{out}: cannot write the image ({exc.strerror or exc}); check free space and the "
                           "tree's files") from None
        if hasattr(tree, "verify"):
            tree.verify()  # layer digest checks still running (apply_layers(defer_checks=True))
        try:
            check = _fsck(e2fsck, image)  # also flushes the image to disk (e2fsck fsyncs what it checked)
        except OSError as exc:
            raise TdxError(f"{out}: cannot run {e2fsck} ({exc.strerror or exc}); install e2fsprogs") from None
        if check.returncode != 0:
            lines = [line.strip() for line in (check.stdout + check.stderr).decode("utf-8", "replace").splitlines()]
            detail = " ".join([line for line in lines if line and not line.startswith("e2fsck ")][-3:])
            raise TdxError(f"{out}: e2fsck found errors in the new image ({detail}); report this as a bug")
        os.chmod(image, 0o644)
        os.replace(image, out)
    finally:
        hasher.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    return Ext4Image(out, geometry.blocks * BLOCK, ids["uuid"], geometry.inodes)


def _fsck(e2fsck: str, path: str) -> subprocess.CompletedProcess:
    """``e2fsck -fn PATH``: read-only, every check forced."""
    return subprocess.run([e2fsck, "-fn", path], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                          stdin=subprocess.DEVNULL, capture_output=True)


def is_valid_image(path) -> bool:
    """True if ``path`` has the ext4 magic 0xEF53 (offset 1080) and ``e2fsck -fn`` finds no error."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            handle.seek(1080)
            if handle.read(2) != b"\x53\xef":
                return False
    except OSError:
        return False
    try:
        e2fsck = tool("e2fsck")
    except TdxError:
        return False
    with contextlib.suppress(OSError):
        return _fsck(e2fsck, path).returncode == 0
    return False
