"""Write an ext4 filesystem image straight from an inode model: no mkfs, no mount, no root.

:func:`write_image` lays out and writes one image file in three phases:
every block is allocated first, then the file bytes are copied (nothing that
depends on the UUID), then the caller's ``identity()`` gives the UUID and all
metadata is written with its checksums. The layout:

* 4096-byte blocks, 32768 blocks per group, 256-byte inodes;
* features ``has_journal ext_attr dir_index filetype extent flex_bg
  sparse_super large_file huge_file dir_nlink extra_isize metadata_csum``
  (crc32c checksums on the superblock, group descriptors, bitmaps, inodes,
  extent blocks, directory blocks and xattr blocks);
* group 0 holds the superblock, the group descriptors and then, as one flex
  group, every group's block bitmap, inode bitmap and inode table; groups 1
  and the powers of 3, 5 and 7 hold backup copies of the first two;
* inode 2 is the root, 8 the journal (all zeros but its superblock, like a
  freshly made one), 11 ``/lost+found`` (four empty blocks), then every other
  inode in the given order from 12;
* blocks are handed out from the end of the metadata on: the journal, then,
  inode by inode in that order, its data (directory blocks, a long symlink's
  target, file bytes), its extent leaf blocks (past 4 extents, which the inode
  holds itself; one index level), its xattr block;
* a directory that fits one block is linear, entries in name byte order; a
  larger one is an htree (:mod:`tdx_rules.rootfs.htree`), names in hash order
  under the superblock's hash seed; xattrs live in the inode when they fit in
  its 92 spare bytes, else in one xattr block;
* file bodies are copied with ``copy_file_range`` from ``(host file, offset)``
  into a sparse image file, so a tar layer is never unpacked on the host.
  Nothing is fsynced here; the ``e2fsck`` check of the caller flushes the file.

Everything in the image is a function of the arguments: there is no clock, no
host path, no random number. Sizes that do not fit raise :class:`NoSpace`
with the number of blocks the layout needed.
"""

import dataclasses
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import ext4_xattr, htree

try:
    import google_crc32c
except ImportError:  # a bare python3 (no virtualenv): the slow table-driven fallback below
    google_crc32c = None

BLOCK = 4096
INODE_SIZE = 256
BLOCKS_PER_GROUP = 32768
INODES_PER_BLOCK = BLOCK // INODE_SIZE
EXTRA_ISIZE = 32
MAX_EXTENT = 32768  # blocks in one initialised extent
EXTENTS_PER_LEAF = (BLOCK - 12 - 4) // 12  # header and checksum tail
DIR_TAIL = 12
ROOT_INO, JOURNAL_INO, LOST_FOUND_INO, FIRST_INO = 2, 8, 11, 12
LOST_FOUND_BLOCKS = 4
RESERVED_PERCENT = 5

COMPAT = 0x0004 | 0x0008 | 0x0020  # has_journal, ext_attr, dir_index
INCOMPAT = 0x0002 | 0x0040 | 0x0200  # filetype, extent, flex_bg
RO_COMPAT = 0x0001 | 0x0002 | 0x0008 | 0x0020 | 0x0040 | 0x0400  # sparse_super, large_file, huge_file,
#                                                                     dir_nlink, extra_isize, metadata_csum
EXTENTS_FL = 0x80000
BG_ITABLE_ZEROED = 0x0004

S_IFMT = {"file": 0o100000, "dir": 0o040000, "symlink": 0o120000, "char": 0o020000, "block": 0o060000,
          "fifo": 0o010000}
DIRENT_TYPE = {"file": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "symlink": 7}

XATTR_MAGIC = 0xEA020000

_M32 = 0xFFFFFFFF


class NoSpace(Exception):
    """The tree does not fit; ``blocks`` or ``inodes`` says what the layout needed."""

    def __init__(self, what: str, blocks: int = 0, inodes: int = 0):
        super().__init__(what)
        self.blocks = blocks
        self.inodes = inodes


class LayoutError(ValueError):
    """Something in the tree that ext4 cannot hold (the message names it)."""


def _crc_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc_table() if google_crc32c is None else None


def crc32c(seed: int, data) -> int:
    """The kernel's crc32c_le(seed, data): no inversion on the way in or out."""
    if google_crc32c is not None:
        return google_crc32c.extend(seed ^ _M32, bytes(data)) ^ _M32
    crc = seed
    for byte in bytes(data):
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


class Crc32c:
    """CRC-32C as a hashlib-style object (``update``, ``hexdigest``): the standard
    checksum (check value of b"123456789": e3069283), for fingerprinting bytes."""

    def __init__(self):
        self._crc = _M32

    def update(self, data) -> None:
        self._crc = crc32c(self._crc, data)

    def value(self) -> int:
        return self._crc ^ _M32

    def hexdigest(self) -> str:
        return f"{self.value():08x}"


# --------------------------------------------------------------------------- model

@dataclasses.dataclass(slots=True)
class Node:
    """One inode to write. A regular file's ``size`` bytes are in the host file ``body``
    from ``offset`` (no ``body``: an empty file); ``children`` maps a directory's names
    (bytes) to nodes. ``aliases`` are a caller's other names of a hard-linked inode (the
    writer counts names by ``links``). ``start`` and ``plan`` are the writer's: where
    the blocks went (one run from ``start`` is kept as that number alone: one small
    record per inode of a large tree is what the plans would otherwise cost)."""

    type: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    rdev: Optional[Tuple[int, int]] = None
    xattrs: Sequence[Tuple[str, bytes]] = ()
    target: Optional[bytes] = None
    body: Optional[str] = None
    offset: int = 0
    size: int = 0
    links: int = 1
    children: Optional[Dict[bytes, "Node"]] = None
    path: str = ""  # the first name, for messages
    aliases: Optional[List[str]] = None
    ino: int = 0
    parent: int = 0  # inode number of the parent directory (directories only)
    layout: Optional["DirLayout"] = None  # a directory's, when the caller worked it out already
    start: int = 0
    plan: Optional["_Plan"] = None


@dataclasses.dataclass(slots=True)
class DirLayout:
    """A directory's blocks: ``linear`` (names per block, ``.`` and ``..`` first) when one
    block holds them all, else an htree: ``leaves`` (names per leaf) under index blocks
    whose entries carry ``hashes``."""

    blocks: List[List[bytes]]
    hashes: Optional[List[int]] = None

    @property
    def count(self) -> int:
        return len(self.blocks) if self.hashes is None else htree.block_count(len(self.blocks))


def dir_layout(names: Sequence[bytes], hash_seed: bytes) -> DirLayout:
    """The layout of a directory holding ``names`` (besides . and ..)."""
    if sum(htree.rec_len(name) for name in names) <= BLOCK - DIR_TAIL - 2 * htree.rec_len(b"."):
        return DirLayout(_pack_dir(sorted(names)))  # one block: linear
    leaves = htree.pack_leaves(names, hash_seed)
    try:
        htree.interior_nodes(len(leaves))
    except ValueError as exc:
        raise LayoutError(str(exc)) from None
    return DirLayout([leaf for _, leaf in leaves], [index_hash for index_hash, _ in leaves])


def dir_blocks(names: Sequence[bytes], hash_seed: bytes) -> int:
    """Blocks a directory with ``names`` (besides . and ..) takes."""
    return dir_layout(names, hash_seed).count


def _pack_dir(names: Sequence[bytes]) -> List[List[bytes]]:
    """Names per block, ``.`` and ``..`` first; every block keeps room for the tail."""
    blocks: List[List[bytes]] = [[]]
    used = 0
    for name in [b".", b".."] + list(names):
        need = htree.rec_len(name)
        if used + need > BLOCK - DIR_TAIL:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


# --------------------------------------------------------------------------- layout

def has_super(group: int) -> bool:
    """sparse_super: groups 0, 1 and the powers of 3, 5 and 7 carry a superblock copy."""
    if group <= 1:
        return True
    for base in (3, 5, 7):
        power = base
        while power < group:
            power *= base
        if power == group:
            return True
    return False


def journal_blocks(blocks: int) -> int:
    """Journal size for a filesystem of ``blocks`` 4 KiB blocks (e2fsprogs' default table; 0: none)."""
    for limit, size in ((2048, 0), (32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size
    return 262144


class Geometry:
    """Where the fixed metadata of an image of ``blocks`` blocks and ``inodes`` inodes goes."""

    def __init__(self, blocks: int, inodes: int):
        self.groups = -(-blocks // BLOCKS_PER_GROUP)
        if self.groups > 1 and blocks - (self.groups - 1) * BLOCKS_PER_GROUP < 64:
            self.groups -= 1  # a tail too small to be a group is left out
            blocks = self.groups * BLOCKS_PER_GROUP
        self.blocks = blocks
        self.gdt_blocks = -(-self.groups * 32 // BLOCK)
        per_group = -(-max(inodes, FIRST_INO) // self.groups)
        self.inodes_per_group = -(-per_group // INODES_PER_BLOCK) * INODES_PER_BLOCK
        if self.inodes_per_group > BLOCK * 8:
            raise NoSpace("too many inodes for the size", inodes=inodes,
                          blocks=-(-inodes // (BLOCK * 8)) * BLOCKS_PER_GROUP)
        self.inodes = self.inodes_per_group * self.groups
        self.itable_blocks = self.inodes_per_group // INODES_PER_BLOCK
        self.reserved = [(g * BLOCKS_PER_GROUP, 1 + self.gdt_blocks) for g in range(self.groups) if has_super(g)]
        start = 1 + self.gdt_blocks
        self.block_bitmap = [start + g for g in range(self.groups)]
        self.inode_bitmap = [start + self.groups + g for g in range(self.groups)]
        self.cursor = start + 2 * self.groups
        if self.cursor > min(BLOCKS_PER_GROUP, blocks):
            raise NoSpace("no room for the group metadata", blocks=self.cursor + self.groups * self.itable_blocks)
        self.inode_table = [self.contiguous(self.itable_blocks) for _ in range(self.groups)]
        self.metadata_end = self.cursor

    def _skip_reserved(self, start: int, count: int) -> int:
        """The first block >= start where ``count`` blocks do not overlap a reserved range."""
        for first, length in self.reserved:
            if start < first + length and first < start + count:
                start = first + length
        return start

    def contiguous(self, count: int) -> int:
        start = self._skip_reserved(self.cursor, count)
        if start + count > self.blocks:
            raise NoSpace("out of blocks", blocks=start + count)
        self.cursor = start + count
        return start

    def runs(self, count: int) -> List[Tuple[int, int]]:
        """``count`` blocks as (start, length) runs of at most MAX_EXTENT, around reserved ranges."""
        result: List[Tuple[int, int]] = []
        while count:
            start = self._skip_reserved(self.cursor, 1)
            limit = self.blocks
            for first, _ in self.reserved:
                if first >= start:
                    limit = min(limit, first)
                    break
            length = min(count, limit - start, MAX_EXTENT)
            if length <= 0:
                raise NoSpace("out of blocks", blocks=start + count)
            if result and result[-1][0] + result[-1][1] == start and result[-1][1] + length <= MAX_EXTENT:
                result[-1] = (result[-1][0], result[-1][1] + length)
            else:
                result.append((start, length))
            self.cursor = start + length
            count -= length
        return result


def xattrs_in_inode(xattrs) -> bool:
    """Whether ``xattrs`` fit in an inode's spare bytes (else they take an xattr block).
    Raises LayoutError for a namespace or a value ext4 cannot store."""
    return ext4_xattr.area(_xattr_entries(xattrs), INODE_SIZE - 160, 4, 4) is not None


def _xattr_entries(xattrs) -> List[Tuple[int, bytes, bytes]]:
    try:
        return ext4_xattr.entries(xattrs)
    except ext4_xattr.XattrError as exc:
        raise LayoutError(str(exc)) from None


# --------------------------------------------------------------------------- writer

@dataclasses.dataclass(slots=True)
class _Plan:
    """Where one inode's blocks go, decided before anything is written."""

    runs: Tuple[Tuple[int, int], ...]  # data (file bytes, directory blocks, a long symlink's target)
    leaves: Tuple[int, ...]  # extent leaf blocks, when the runs do not fit the inode
    xattr_block: int  # 0: the xattrs (if any) live in the inode
    xattr_area: Optional[bytearray]  # the inode's spare bytes or the xattr block, checksum left out


class _Writer:
    def __init__(self, fd: int, geometry: Geometry, epoch: int):
        self.fd = fd
        self.geo = geometry
        self.epoch = epoch & _M32
        self.extra = 1 if epoch & (1 << 31) else 0  # epoch bits of the *_extra words: the low 32 are signed
        self.uuid = b""
        self.seed = 0
        self.used_blocks = [0] * geometry.groups  # per group: int bitmaps
        self.used_inodes = [0] * geometry.groups
        self.dirs = [0] * geometry.groups
        self.table_blocks: Dict[int, bytearray] = {}  # inode table blocks not yet written, by block number
        self.sources: Dict[str, int] = {}

    def set_uuid(self, uuid: bytes) -> None:
        """The filesystem UUID; every metadata checksum is seeded from it."""
        self.uuid = uuid
        self.seed = crc32c(_M32, uuid)

    # ---- block accounting

    def mark(self, start: int, count: int) -> None:
        while count:
            group, offset = divmod(start, BLOCKS_PER_GROUP)
            take = min(count, BLOCKS_PER_GROUP - offset)
            self.used_blocks[group] |= ((1 << take) - 1) << offset
            start += take
            count -= take

    def runs(self, count: int) -> List[Tuple[int, int]]:
        runs = self.geo.runs(count)
        for start, length in runs:
            self.mark(start, length)
        return runs

    def pwrite(self, data, block: int, offset: int = 0) -> None:
        view = memoryview(data)
        position = block * BLOCK + offset
        while view:
            done = os.pwrite(self.fd, view, position)
            view, position = view[done:], position + done

    # ---- phase 1: allocation

    def allocate(self, node: Node, data_blocks: int) -> None:
        """:meth:`plan` ``node``'s blocks and keep the plan on it (a single run as its start)."""
        plan = self.plan(node, data_blocks)
        if len(plan.runs) == 1 and not plan.leaves and plan.xattr_area is None:
            node.start = plan.runs[0][0]
        elif plan.runs or plan.xattr_area is not None:
            node.plan = plan

    @staticmethod
    def plan_of(node: Node, data_blocks: int) -> _Plan:
        """The plan :meth:`allocate` kept for ``node`` (``data_blocks`` as then)."""
        if node.plan is not None:
            return node.plan
        return _Plan(((node.start, data_blocks),) if data_blocks else (), (), 0, None)

    def plan(self, node: Node, data_blocks: int) -> _Plan:
        """Allocate ``data_blocks`` for ``node``, then its extent leaves, then its xattr block."""
        runs = tuple(self.runs(data_blocks)) if data_blocks else ()  # tuples: one plan per inode is held
        leaves = ()
        if len(runs) > 4:
            count = -(-len(runs) // EXTENTS_PER_LEAF)
            if count > 4:
                raise LayoutError("too many extents for one level of extent blocks")
            leaves = tuple(self.runs(1)[0][0] for _ in range(count))
        xattr_block, area = 0, None
        if node.xattrs:
            entries = _xattr_entries(node.xattrs)
            area = ext4_xattr.area(entries, INODE_SIZE - 160, 4, 4)
            if area is not None:
                struct.pack_into("<I", area, 0, XATTR_MAGIC)
            else:
                area = ext4_xattr.area(entries, BLOCK, 32, 0)
                if area is None:
                    raise LayoutError("its xattrs take more than one 4 KiB block")
                xattr_block = self.runs(1)[0][0]
                block_hash = 0
                for _, name, value in entries:
                    block_hash = ((block_hash << 16) ^ (block_hash >> 16) ^ ext4_xattr.entry_hash(name, value)) & _M32
                struct.pack_into("<IIII", area, 0, XATTR_MAGIC, 1, 1, block_hash)
        return _Plan(runs, leaves, xattr_block, area)

    # ---- phase 2: file bytes (no checksum covers them)

    def copy(self, path: str, offset: int, size: int, runs: List[Tuple[int, int]]) -> None:
        src = self.sources.get(path)
        if src is None:
            src = self.sources[path] = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        for start, length in runs:
            want = min(size, length * BLOCK)
            dst = start * BLOCK
            while want:
                try:
                    done = os.copy_file_range(src, self.fd, want, offset, dst)
                except OSError:
                    done = 0
                if not done:  # not supported here, or the source is shorter: read and write
                    data = os.pread(src, min(want, 1 << 20), offset)
                    if not data:
                        raise LayoutError(f"{path} ends before offset {offset + want}")
                    done = os.pwrite(self.fd, data, dst)
                offset, dst, want, size = offset + done, dst + done, want - done, size - done

    # ---- phase 3: metadata

    def inode_seed(self, ino: int) -> int:
        return crc32c(crc32c(self.seed, struct.pack("<I", ino)), b"\0\0\0\0")  # generation 0

    def extent_root(self, ino: int, plan: _Plan) -> bytes:
        """i_block bytes for the plan's runs; writes its extent leaf blocks."""
        extents, logical = [], 0
        for start, length in plan.runs:
            extents.append(struct.pack("<IHHI", logical, length, start >> 32, start & _M32))
            logical += length
        if not plan.leaves:
            return struct.pack("<HHHHI", 0xF30A, len(extents), 4, 0, 0) + b"".join(extents)
        index, first_logical = [], 0
        for number, block in enumerate(plan.leaves):
            leaf = extents[number * EXTENTS_PER_LEAF:(number + 1) * EXTENTS_PER_LEAF]
            data = bytearray(BLOCK)
            struct.pack_into("<HHHHI", data, 0, 0xF30A, len(leaf), EXTENTS_PER_LEAF, 0, 0)
            data[12:12 + 12 * len(leaf)] = b"".join(leaf)
            tail = 12 + 12 * EXTENTS_PER_LEAF
            struct.pack_into("<I", data, tail, crc32c(self.inode_seed(ino), data[:tail]))
            self.pwrite(data, block)
            index.append(struct.pack("<IIHH", first_logical, block & _M32, block >> 32, 0))
            first_logical += sum(struct.unpack_from("<H", e, 4)[0] for e in leaf)
        return struct.pack("<HHHHI", 0xF30A, len(index), 4, 1, 0) + b"".join(index)

    def put_inode(self, node: Node, plan: _Plan, i_block: bytes, size: int, flags: int) -> None:
        """Encode, checksum and keep inode ``node.ino`` (and write its xattr block)."""
        ino = node.ino
        raw = bytearray(INODE_SIZE)
        if plan.xattr_block:
            area = plan.xattr_area
            struct.pack_into("<I", area, 16, 0)
            struct.pack_into("<I", area, 16, crc32c(crc32c(self.seed, struct.pack("<Q", plan.xattr_block)), area))
            self.pwrite(area, plan.xattr_block)
        elif plan.xattr_area is not None:
            raw[160:] = plan.xattr_area
        blocks = sum(length for _, length in plan.runs) + len(plan.leaves) + (1 if plan.xattr_block else 0)
        mode = S_IFMT[node.type] | (node.mode & 0o7777)
        sectors = blocks * (BLOCK // 512)
        t = self.epoch
        struct.pack_into("<HHIIIIIHHII", raw, 0, mode, node.uid & 0xFFFF, size & _M32, t, t, t, 0,
                         node.gid & 0xFFFF, node.links, sectors & _M32, flags)
        raw[0x28:0x28 + len(i_block)] = i_block
        struct.pack_into("<III", raw, 0x64, 0, plan.xattr_block & _M32, size >> 32)
        struct.pack_into("<HHHH", raw, 0x74, (sectors >> 32) & 0xFFFF, plan.xattr_block >> 32, node.uid >> 16,
                         node.gid >> 16)
        struct.pack_into("<HHIIIII", raw, 0x80, EXTRA_ISIZE, 0, self.extra, self.extra, self.extra, t, self.extra)
        checksum = crc32c(self.inode_seed(ino), raw)
        struct.pack_into("<H", raw, 0x7C, checksum & 0xFFFF)
        struct.pack_into("<H", raw, 0x82, checksum >> 16)
        self._put_in_table(ino, raw)
        group, index = divmod(ino - 1, self.geo.inodes_per_group)
        self.used_inodes[group] |= 1 << index
        if node.type == "dir":
            self.dirs[group] += 1

    def write_dir(self, node: Node, plan: _Plan, layout: DirLayout) -> None:
        blocks = [start + i for start, length in plan.runs for i in range(length)]
        seed = self.inode_seed(node.ino)
        flags = EXTENTS_FL
        if layout.hashes is not None:
            index = htree.index_blocks(layout.hashes, node.ino, node.parent, lambda data: crc32c(seed, data))
            for logical, data in index.items():
                self.pwrite(data, blocks[logical])
            blocks = blocks[len(index):]
            flags |= htree.INDEX_FL
        for block, block_names in zip(blocks, layout.blocks):
            self.pwrite(self._dirent_block(node, block_names, seed), block)
        self.put_inode(node, plan, self.extent_root(node.ino, plan), layout.count * BLOCK, flags)

    @staticmethod
    def _dirent_block(node: Node, names: Sequence[bytes], seed: int) -> bytearray:
        """One block of directory entries (the last record spans to the checksum tail)."""
        data = bytearray(BLOCK)
        pos = 0
        for i, name in enumerate(names):
            if name == b"." and pos == 0:
                ino, kind = node.ino, 2
            elif name == b".." and pos == 12:
                ino, kind = node.parent, 2
            else:
                child = node.children[name]
                ino, kind = child.ino, DIRENT_TYPE[child.type]
            rec = htree.rec_len(name) if i + 1 < len(names) else BLOCK - DIR_TAIL - pos
            struct.pack_into("<IHBB", data, pos, ino, rec, len(name), kind)
            data[pos + 8:pos + 8 + len(name)] = name
            pos += rec
        if not names:
            struct.pack_into("<IH", data, 0, 0, BLOCK - DIR_TAIL)
        struct.pack_into("<IHBBI", data, BLOCK - DIR_TAIL, 0, DIR_TAIL, 0, 0xDE, crc32c(seed, data[:BLOCK - DIR_TAIL]))
        return data

    def write_inode(self, node: Node, plan: _Plan) -> None:
        """The metadata of a file, symlink, device or fifo (file bytes are already in place)."""
        if node.type == "file":
            self.put_inode(node, plan, self.extent_root(node.ino, plan), _file_size(node), EXTENTS_FL)
        elif node.type == "symlink" and plan.runs:
            self.pwrite(node.target, plan.runs[0][0])
            self.put_inode(node, plan, self.extent_root(node.ino, plan), len(node.target), EXTENTS_FL)
        elif node.type == "symlink":
            self.put_inode(node, plan, node.target, len(node.target), 0)
        else:
            i_block = b""
            if node.type in ("char", "block"):
                major, minor = node.rdev or (0, 0)
                if major < 256 and minor < 256:
                    i_block = struct.pack("<II", (major << 8) | minor, 0)
                else:
                    i_block = struct.pack("<II", 0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
            self.put_inode(node, plan, i_block, 0, 0)

    def write_journal(self, plan: _Plan) -> bytes:
        count = sum(length for _, length in plan.runs)
        header = bytearray(1024)
        struct.pack_into(">IIIIIIII", header, 0, 0xC03B3998, 4, 0, BLOCK, count, 1, 1, 0)
        header[0x30:0x40] = self.uuid
        struct.pack_into(">I", header, 0x40, 1)  # one user: this filesystem
        self.pwrite(header, plan.runs[0][0])
        i_block = self.extent_root(JOURNAL_INO, plan)
        self.put_inode(Node("file", 0o600, ino=JOURNAL_INO), plan, i_block, count * BLOCK, EXTENTS_FL)
        return i_block

    def _put_in_table(self, ino: int, raw: bytes) -> None:
        """Place inode ``ino`` in its inode table block. Inodes come in ascending order (but
        for the first few), so the blocks below the current one are complete: they are
        written out at once and the tables never sit in memory whole. Table blocks no
        inode lands in stay zero (the image file is sparse)."""
        group, index = divmod(ino - 1, self.geo.inodes_per_group)
        block_number = self.geo.inode_table[group] + index // INODES_PER_BLOCK
        block = self.table_blocks.get(block_number)
        if block is None:
            block = self.table_blocks[block_number] = bytearray(BLOCK)
        offset = (index % INODES_PER_BLOCK) * INODE_SIZE
        block[offset:offset + INODE_SIZE] = raw
        if len(self.table_blocks) > 1:
            self._flush_table_blocks(block_number)

    def _flush_table_blocks(self, below: Optional[int]) -> None:
        """Write the pending inode table blocks (those before block ``below``; None: all)."""
        for number in sorted(self.table_blocks):
            if below is not None and number >= below:
                break
            self.pwrite(self.table_blocks.pop(number), number)

    def finish(self, label: bytes, hash_seed: bytes, journal: Optional[bytes], journal_count: int) -> None:
        geo = self.geo
        for first, length in geo.reserved:
            self.mark(first, length)
        for g in range(geo.groups):
            self.mark(geo.block_bitmap[g], 1)
            self.mark(geo.inode_bitmap[g], 1)
            self.mark(geo.inode_table[g], geo.itable_blocks)
        for ino in range(1, FIRST_INO - 1):  # reserved inodes 1-10 count as used
            self.used_inodes[0] |= 1 << (ino - 1)
        self._flush_table_blocks(None)
        ipg = geo.inodes_per_group
        # Bitmaps and group descriptors.
        descs = bytearray(geo.gdt_blocks * BLOCK)
        free_blocks = free_inodes = 0
        for g in range(geo.groups):
            in_group = min(BLOCKS_PER_GROUP, geo.blocks - g * BLOCKS_PER_GROUP)
            bits = self.used_blocks[g] | (((1 << (BLOCKS_PER_GROUP - in_group)) - 1) << in_group)
            block_bitmap = bits.to_bytes(BLOCK, "little")
            inode_bits = self.used_inodes[g]
            inode_bitmap = (inode_bits | (((1 << (BLOCK * 8 - ipg)) - 1) << ipg)).to_bytes(BLOCK, "little")
            self.pwrite(block_bitmap, geo.block_bitmap[g])
            self.pwrite(inode_bitmap, geo.inode_bitmap[g])
            group_free_blocks = in_group - self.used_blocks[g].bit_count()
            group_free_inodes = ipg - inode_bits.bit_count()
            free_blocks += group_free_blocks
            free_inodes += group_free_inodes
            unused = ipg - inode_bits.bit_length()
            desc = bytearray(32)
            struct.pack_into("<IIIHHHHIHHHH", desc, 0, geo.block_bitmap[g], geo.inode_bitmap[g], geo.inode_table[g],
                             group_free_blocks, group_free_inodes, self.dirs[g], BG_ITABLE_ZEROED, 0,
                             crc32c(self.seed, block_bitmap) & 0xFFFF,
                             crc32c(self.seed, inode_bitmap[:ipg // 8]) & 0xFFFF, unused, 0)
            struct.pack_into("<H", desc, 0x1E, crc32c(crc32c(self.seed, struct.pack("<I", g)), desc) & 0xFFFF)
            descs[g * 32:(g + 1) * 32] = desc
        # Superblock, then its backups with the descriptors.
        sb = bytearray(1024)
        struct.pack_into("<13IHh4H4I2HI2H3I", sb, 0,
                         geo.inodes, geo.blocks, geo.blocks * RESERVED_PERCENT // 100, free_blocks, free_inodes,
                         0, 2, 2, BLOCKS_PER_GROUP, BLOCKS_PER_GROUP, ipg, 0, self.epoch,
                         0, -1, 0xEF53, 1, 1, 0, self.epoch, 0, 0, 1, 0, 0,
                         FIRST_INO - 1, INODE_SIZE, 0, COMPAT if journal else COMPAT & ~0x0004, INCOMPAT, RO_COMPAT)
        sb[0x68:0x78] = self.uuid
        sb[0x78:0x78 + len(label)] = label
        sb[0xEC:0xFC] = hash_seed
        struct.pack_into("<BB", sb, 0xFC, 1, 1 if journal else 0)  # half_md4 hashes; journal blocks backed up
        struct.pack_into("<I", sb, 0x100, 0x000C)  # default mount options: user_xattr, acl
        struct.pack_into("<I", sb, 0x108, self.epoch)
        if journal:
            struct.pack_into("<I", sb, 0xE0, JOURNAL_INO)
            sb[0x10C:0x10C + 60] = journal.ljust(60, b"\0")
            struct.pack_into("<II", sb, 0x10C + 60, 0, journal_count * BLOCK)
        struct.pack_into("<HHI", sb, 0x15C, EXTRA_ISIZE, EXTRA_ISIZE, 0x0001)  # signed directory hash
        sb[0x174] = max(4, (geo.groups - 1).bit_length())  # one flex group holds all metadata
        sb[0x175] = 1  # crc32c
        for first, _ in geo.reserved:
            group = first // BLOCKS_PER_GROUP
            struct.pack_into("<H", sb, 0x5A, group)
            struct.pack_into("<I", sb, 0x3FC, crc32c(_M32, sb[:0x3FC]))
            self.pwrite(sb, first, 1024 if group == 0 else 0)
            self.pwrite(descs, first + 1)


def _file_size(node: Node) -> int:
    """Bytes of a regular file's data (none without a body)."""
    return node.size if node.body is not None else 0


def _data_blocks(node: Node) -> int:
    """Data blocks of ``node``: file bytes, directory blocks (its layout), a long symlink's target."""
    if node.type == "file":
        return -(-_file_size(node) // BLOCK)
    if node.type == "dir":
        return node.layout.count
    if node.type == "symlink":
        return 1 if len(node.target) >= 60 else 0
    return 0


def write_image(fd: int, blocks: int, inodes: int, tree: Sequence[Node], *, hash_seed: bytes,
                identity: Callable[[], bytes], label: bytes, epoch: int) -> Geometry:
    """Write an ext4 filesystem of ``blocks`` 4 KiB blocks into ``fd`` (an empty file).

    ``tree[0]`` is the root directory and ``tree`` lists every other inode once
    (directories with their ``children`` set, ``/lost+found`` among them or
    not: one is made when missing); ``links`` of non-directories is their
    number of names. ``inodes`` is the minimum inode count.

    ``hash_seed`` (16 bytes) seeds the directory name hashes, which decide the
    layout of the directories that get an htree. Blocks are allocated first,
    then the file bytes copied; only then is ``identity()`` called for the
    UUID (16 bytes), which the metadata checksums depend on: a caller can work
    out the identity while the bytes are copied. Raises :class:`NoSpace` (nothing usable
    written) or :class:`LayoutError`.
    """
    geometry = Geometry(blocks, inodes)
    root = tree[0]
    lost = root.children.get(b"lost+found")
    if lost is None:
        lost = Node("dir", 0o700, children={})
        root.children[b"lost+found"] = lost
    others = [node for node in tree[1:] if node is not lost]
    if FIRST_INO - 1 + len(others) > geometry.inodes:
        raise NoSpace("out of inodes", inodes=FIRST_INO - 1 + len(others))
    root.ino, lost.ino = ROOT_INO, LOST_FOUND_INO
    for number, node in enumerate(others, FIRST_INO):
        node.ino = number
    ordered = [root, lost] + others
    for node in ordered:
        if node.type == "dir":
            subdirs = 0
            for child in node.children.values():
                if child.type == "dir":
                    child.parent = node.ino
                    subdirs += 1
            node.links = 2 + subdirs if subdirs + 2 < 65000 else 1
    root.parent = ROOT_INO
    os.ftruncate(fd, geometry.blocks * BLOCK)
    writer = _Writer(fd, geometry, epoch)
    try:
        journal_count = journal_blocks(geometry.blocks)
        journal_plan = writer.plan(Node("file"), journal_count) if journal_count else None
        for node in ordered:
            try:
                if node.type == "dir":
                    if node.layout is None:
                        node.layout = dir_layout(list(node.children), hash_seed)
                    if node is lost and node.layout.hashes is None:
                        node.layout.blocks += [[] for _ in range(LOST_FOUND_BLOCKS - len(node.layout.blocks))]
                elif node.type == "symlink" and len(node.target) >= BLOCK:
                    raise LayoutError("its symlink target is longer than 4095 bytes")
                writer.allocate(node, _data_blocks(node))
            except LayoutError as exc:
                raise LayoutError(f"{node.path or f'inode {node.ino}'}: {exc}") from None
        for node in ordered:
            if node.type == "file" and _file_size(node):
                writer.copy(node.body, node.offset, node.size, writer.plan_of(node, _data_blocks(node)).runs)
        writer.set_uuid(identity())
        journal = writer.write_journal(journal_plan) if journal_plan else None
        for node in ordered:
            plan = writer.plan_of(node, _data_blocks(node))
            if node.type == "dir":
                writer.write_dir(node, plan, node.layout)
            else:
                writer.write_inode(node, plan)
        writer.finish(label, hash_seed, journal, journal_count)
    finally:
        for src in writer.sources.values():
            os.close(src)
    return geometry
