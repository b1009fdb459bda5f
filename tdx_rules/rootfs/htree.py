"""Hashed ext4 directories (``dir_index``, the htree): the name hash and the index blocks.

A directory whose entries need more than one block is written as an htree, the way the
kernel and ``e2fsck -D`` lay one out (Documentation/filesystems/ext4/directory.rst):

* logical block 0, the root: ``.`` and ``..`` (whose record spans the block), the root info
  (hash version 1 = half-MD4, info length 8, the number of index levels), then the index:
  ``limit``/``count`` in place of the first entry's hash, then ``(hash, block)`` pairs, and
  the checksum tail (``dx_tail``) right after ``limit`` entries;
* with more leaves than the root holds, one level of interior nodes (an empty dirent
  spanning the block, then the same index layout);
* the leaves: ordinary directory blocks (with their checksum tail), the names in hash
  order, every block filled before the next is begun. An index entry gives the smallest
  hash of its leaf; when a leaf begins with the hash the previous leaf ended with (two
  names whose hashes collide across the boundary), its entry's low bit is set, as the
  kernel does when it splits a run of equal hashes.

The hash is half-MD4 over the name with the filesystem's ``s_hash_seed``, with the bytes
of the name read as signed chars (the superblock says so: ``EXT2_FLAGS_SIGNED_HASH``).
Everything here is a pure function of the names and the seed.
"""

import struct
from typing import Dict, List, Sequence, Tuple

BLOCK = 4096
DIR_TAIL = 12
HASH_VERSION = 1  # half-MD4 (signed chars)
ROOT_ENTRIES_AT = 0x20  # ".", "..", then the 8-byte root info
NODE_ENTRIES_AT = 0x08  # an empty dirent spanning the block
ROOT_LIMIT = (BLOCK - ROOT_ENTRIES_AT - 8) // 8  # 507: eight bytes go to the checksum tail
NODE_LIMIT = (BLOCK - NODE_ENTRIES_AT - 8) // 8  # 510
MAX_LEAVES = ROOT_LIMIT * NODE_LIMIT  # two index levels (the largedir feature would allow three)
INDEX_FL = 0x1000

_M32 = 0xFFFFFFFF
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_EOF_HASH = 0x7FFFFFFF << 1  # reserved for "end of directory" in 32-bit readdir cookies


def _half_md4(buf: List[int], w: Sequence[int]) -> None:
    """One half-MD4 transform of ``buf`` (4 words) by ``w`` (8 words): MD4's three rounds over
    eight words instead of sixteen, with MD4's round constants. Unrolled: it runs per name."""
    m = _M32
    a, b, c, d = buf
    # Round 1: F(x, y, z) = z ^ (x & (y ^ z)), shifts 3 7 11 19.
    a = (a + (d ^ (b & (c ^ d))) + w[0]) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + (c ^ (a & (b ^ c))) + w[1]) & m; d = ((d << 7) | (d >> 25)) & m  # noqa: E702
    c = (c + (b ^ (d & (a ^ b))) + w[2]) & m; c = ((c << 11) | (c >> 21)) & m  # noqa: E702
    b = (b + (a ^ (c & (d ^ a))) + w[3]) & m; b = ((b << 19) | (b >> 13)) & m  # noqa: E702
    a = (a + (d ^ (b & (c ^ d))) + w[4]) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + (c ^ (a & (b ^ c))) + w[5]) & m; d = ((d << 7) | (d >> 25)) & m  # noqa: E702
    c = (c + (b ^ (d & (a ^ b))) + w[6]) & m; c = ((c << 11) | (c >> 21)) & m  # noqa: E702
    b = (b + (a ^ (c & (d ^ a))) + w[7]) & m; b = ((b << 19) | (b >> 13)) & m  # noqa: E702
    # Round 2: G(x, y, z) = (x & y) + ((x ^ y) & z), constant 0x5A827999, shifts 3 5 9 13.
    k = 0x5A827999
    a = (a + ((b & c) + ((b ^ c) & d)) + w[1] + k) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + ((a & b) + ((a ^ b) & c)) + w[3] + k) & m; d = ((d << 5) | (d >> 27)) & m  # noqa: E702
    c = (c + ((d & a) + ((d ^ a) & b)) + w[5] + k) & m; c = ((c << 9) | (c >> 23)) & m  # noqa: E702
    b = (b + ((c & d) + ((c ^ d) & a)) + w[7] + k) & m; b = ((b << 13) | (b >> 19)) & m  # noqa: E702
    a = (a + ((b & c) + ((b ^ c) & d)) + w[0] + k) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + ((a & b) + ((a ^ b) & c)) + w[2] + k) & m; d = ((d << 5) | (d >> 27)) & m  # noqa: E702
    c = (c + ((d & a) + ((d ^ a) & b)) + w[4] + k) & m; c = ((c << 9) | (c >> 23)) & m  # noqa: E702
    b = (b + ((c & d) + ((c ^ d) & a)) + w[6] + k) & m; b = ((b << 13) | (b >> 19)) & m  # noqa: E702
    # Round 3: H(x, y, z) = x ^ y ^ z, constant 0x6ED9EBA1, shifts 3 9 11 15.
    k = 0x6ED9EBA1
    a = (a + (b ^ c ^ d) + w[3] + k) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + (a ^ b ^ c) + w[7] + k) & m; d = ((d << 9) | (d >> 23)) & m  # noqa: E702
    c = (c + (d ^ a ^ b) + w[2] + k) & m; c = ((c << 11) | (c >> 21)) & m  # noqa: E702
    b = (b + (c ^ d ^ a) + w[6] + k) & m; b = ((b << 15) | (b >> 17)) & m  # noqa: E702
    a = (a + (b ^ c ^ d) + w[1] + k) & m; a = ((a << 3) | (a >> 29)) & m  # noqa: E702
    d = (d + (a ^ b ^ c) + w[5] + k) & m; d = ((d << 9) | (d >> 23)) & m  # noqa: E702
    c = (c + (d ^ a ^ b) + w[0] + k) & m; c = ((c << 11) | (c >> 21)) & m  # noqa: E702
    b = (b + (c ^ d ^ a) + w[4] + k) & m; b = ((b << 15) | (b >> 17)) & m  # noqa: E702
    buf[0] = (buf[0] + a) & m
    buf[1] = (buf[1] + b) & m
    buf[2] = (buf[2] + c) & m
    buf[3] = (buf[3] + d) & m


def _hash_words(chunk: bytes, remaining: int) -> List[int]:
    """Eight words of up to 32 name bytes (signed), padded with a pattern of the length left."""
    pad = (remaining | (remaining << 8)) & _M32
    pad = (pad | (pad << 16)) & _M32
    words, value = [], pad
    for i, byte in enumerate(chunk[:32]):
        value = ((byte - 256 if byte >= 128 else byte) + (value << 8)) & _M32
        if i % 4 == 3:
            words.append(value)
            value = pad
    if len(words) < 8:
        words.append(value)
    return words + [pad] * (8 - len(words))


def name_hash(name: bytes, seed: Tuple[int, int, int, int]) -> Tuple[int, int]:
    """``(hash, minor hash)`` of a directory entry name, as ext4 computes them for half-MD4."""
    buf = list(seed if any(seed) else _DEFAULT_SEED)
    for start in range(0, len(name), 32):
        _half_md4(buf, _hash_words(name[start:], len(name) - start))
    major = buf[1] & ~1
    if major == _EOF_HASH:
        major = (0x7FFFFFFF - 1) << 1
    return major, buf[2]


def seed_words(hash_seed: bytes) -> Tuple[int, int, int, int]:
    """The superblock's 16-byte ``s_hash_seed`` as the four words the hash starts from."""
    return struct.unpack("<4I", hash_seed)


def rec_len(name: bytes) -> int:
    return (8 + len(name) + 3) & ~3


def pack_leaves(names: Sequence[bytes], hash_seed: bytes) -> List[Tuple[int, List[bytes]]]:
    """The leaves of an htree over ``names`` (not ``.``/``..``): ``(index hash, names)`` per
    leaf in hash order; the index hash has its low bit set when the leaf continues a run of
    equal hashes."""
    seed = seed_words(hash_seed)
    hashed = []  # (major << 32 | minor, name): one small tuple a name, for directories of many
    for name in names:
        major, minor = name_hash(name, seed)
        hashed.append((major << 32 | minor, name))
    hashed.sort()
    leaves: List[Tuple[int, List[bytes]]] = []
    used, last_hash = BLOCK, None
    for key, name in hashed:
        major = key >> 32
        need = rec_len(name)
        if used + need > BLOCK - DIR_TAIL:
            leaves.append((major | (1 if major == last_hash else 0), []))
            used = 0
        leaves[-1][1].append(name)
        used += need
        last_hash = major
    return leaves


def block_count(leaves: int) -> int:
    """Blocks of an htree directory with ``leaves`` leaves: the root, interior nodes, leaves."""
    return 1 + interior_nodes(leaves) + leaves


def interior_nodes(leaves: int) -> int:
    if leaves > MAX_LEAVES:
        raise ValueError(f"more than {MAX_LEAVES} directory blocks in one directory")
    return 0 if leaves <= ROOT_LIMIT else -(-leaves // NODE_LIMIT)


def index_blocks(leaf_hashes: Sequence[int], self_ino: int, parent_ino: int,
                 checksum) -> Dict[int, bytes]:
    """The root and interior node blocks, by logical block number, for leaves with these index
    hashes (leaf ``i`` at logical block ``1 + interior nodes + i``). ``checksum(data)`` is the
    directory's metadata checksum (crc32c seeded by the inode) of the bytes given."""
    nodes = interior_nodes(len(leaf_hashes))
    first_leaf = 1 + nodes
    entries = [(h, first_leaf + i) for i, h in enumerate(leaf_hashes)]
    blocks: Dict[int, bytes] = {}
    if nodes:
        per_node = -(-len(entries) // nodes)  # even fill: no node is much emptier than another
        children = []
        for n in range(nodes):
            part = entries[n * per_node:(n + 1) * per_node]
            block = bytearray(BLOCK)
            struct.pack_into("<IHBB", block, 0, 0, BLOCK, 0, 0)
            _put_index(block, NODE_ENTRIES_AT, NODE_LIMIT, part, checksum)
            blocks[1 + n] = bytes(block)
            children.append((part[0][0], 1 + n))
        entries = children
    root = bytearray(BLOCK)
    struct.pack_into("<IHBB4s", root, 0, self_ino, 12, 1, 2, b".")
    struct.pack_into("<IHBB4s", root, 12, parent_ino, BLOCK - 12, 2, 2, b"..")
    struct.pack_into("<IBBBB", root, 24, 0, HASH_VERSION, 8, 1 if nodes else 0, 0)
    _put_index(root, ROOT_ENTRIES_AT, ROOT_LIMIT, entries, checksum)
    blocks[0] = bytes(root)
    return blocks


def _put_index(block: bytearray, at: int, limit: int, entries, checksum) -> None:
    """``limit``/``count``/first block, the other ``(hash, block)`` entries, the dx_tail."""
    struct.pack_into("<HHI", block, at, limit, len(entries), entries[0][1])
    for i, (hash_value, child) in enumerate(entries[1:], 1):
        struct.pack_into("<II", block, at + 8 * i, hash_value, child)
    tail = at + 8 * limit
    # The checksum covers the used entries, then the tail's reserved word and a zero checksum.
    covered = bytes(block[:at + 8 * len(entries)]) + bytes(block[tail:tail + 4]) + b"\0\0\0\0"
    struct.pack_into("<II", block, tail, 0, checksum(covered))
