"""dm-verity hash trees in the on-disk format ``veritysetup format`` writes, computed in Python.

The format (cryptsetup's docs/on-disk-format for verity, "DMVerity" in its wiki, and the
kernel's Documentation/admin-guide/device-mapper/verity.rst and drivers/md/dm-verity-target.c):

- the hash file starts with a 512-byte superblock in a block of its own: "verity\\0\\0",
  version 1, hash type 1 (the normal format: the salt is hashed *before* each block), a UUID,
  the algorithm name (32 bytes, NUL padded), the data and hash block sizes (u32), the number of
  data blocks (u64), the salt size (u16), 6 bytes of padding, the salt (256 bytes, zero padded),
  168 bytes of padding; all little-endian;
- then the tree: level 0 holds hash(salt || data block) of every data block, each level above
  the hashes of the level below's blocks, packed ``hash block size / digest size`` to a block
  (rounded down to a power of two, as the kernel's hash_per_block_bits), the rest of a block
  zero; the levels are stored from the top (one block) down to level 0, as the kernel locates
  them (verity_ctr: hash_level_block[levels - 1] first);
- the root hash is hash(salt || the top block); for a single data block there is no level and
  the root hash is that block's hash.

Deterministic: the caller passes the salt and UUID (the rootfs stage derives both from the ext4
image's content-derived UUID and size, never random), so the same data gives the same files.
Streaming: the data file is read in 4 MiB chunks and hashed in threads (hashlib releases the
GIL); only the tree is held in memory (32 bytes per 4 KiB data block with SHA-256, 0.8 %). ``veritysetup verify`` and ``veritysetup dump`` (Debian's
cryptsetup-bin) check the result in tests/test_verity.py, and ``veritysetup format`` given the
same salt and UUID writes the same bytes.
"""

import hashlib
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import TdxError
from ..fsutil import atomic_output

BLOCK = 4096
ALGORITHMS = {"sha256": 32, "sha512": 64}
# How the image's init meets the tree: the kernel parameter it reads, the helper that opens the device.
KERNEL_PARAMETER = "tdx.verity"
GUEST_HELPER = "/sbin/tdx-verity-open"
SIGNATURE = b"verity\0\0"
SUPERBLOCK_SIZE = 512
_CHUNK_BLOCKS = 1024  # 4 MiB of data per read


@dataclass(frozen=True)
class VerityTree:
    """What the kernel needs to open the device, besides the two files."""

    root_hash: str
    salt: str
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    hash_blocks: int       # the tree's blocks, without the superblock (as veritysetup dump counts them)
    hash_start_block: int  # where the tree starts in the hash file: after the superblock

    def kernel_argument(self) -> str:
        """The one ``tdx.verity=`` word of the kernel command line that the image's init reads."""
        return (f"{KERNEL_PARAMETER}={self.root_hash},{self.salt},{self.data_blocks},{self.algorithm},"
                f"{self.data_block_size},{self.hash_block_size}")

    def veritysetup_verify(self, data: str, hashes: str) -> str:
        """The ``veritysetup verify`` command that checks the files without trusting the superblock."""
        return (f"veritysetup verify {data} {hashes} {self.root_hash} --no-superblock --format=1 "
                f"--hash={self.algorithm} --data-block-size={self.data_block_size} "
                f"--hash-block-size={self.hash_block_size} --data-blocks={self.data_blocks} "
                f"--hash-offset={self.hash_start_block * self.hash_block_size} --salt={self.salt}")


def superblock(algorithm: str, data_blocks: int, salt: bytes, uuid: bytes) -> bytes:
    """The 512-byte version-1 superblock."""
    return struct.pack("<8sII16s32sIIQH6s256s168s", SIGNATURE, 1, 1, uuid, algorithm.encode(), BLOCK, BLOCK,
                       data_blocks, len(salt), b"", salt, b"")


def parse_superblock(raw: bytes) -> dict:
    """The fields of a superblock (for checks and tests); TdxError if it is not one."""
    if len(raw) < SUPERBLOCK_SIZE or raw[:8] != SIGNATURE:
        raise TdxError("not a dm-verity hash file: no 'verity' superblock at its start")
    _, version, hash_type, uuid, algorithm, data_size, hash_size, blocks, salt_size, _, salt, _ = struct.unpack(
        "<8sII16s32sIIQH6s256s168s", raw[:SUPERBLOCK_SIZE])
    return {"version": version, "hash_type": hash_type, "uuid": uuid, "algorithm": algorithm.rstrip(b"\0").decode(),
            "data_block_size": data_size, "hash_block_size": hash_size, "data_blocks": blocks,
            "salt": salt[:min(salt_size, 256)]}


def _per_block(digest_size: int) -> int:
    count = BLOCK // digest_size
    return 1 << (count.bit_length() - 1)


def _pack(digests, per_block: int) -> list:
    """Hash blocks holding ``digests``, each block zero padded."""
    return [b"".join(digests[i:i + per_block]).ljust(BLOCK, b"\0") for i in range(0, len(digests), per_block)]


def _hash_blocks(prefix, view, count: int) -> list:
    out = []
    for i in range(count):
        h = prefix.copy()
        h.update(view[i * BLOCK:(i + 1) * BLOCK])
        out.append(h.digest())
    return out


def build_verity(data_path: str, hash_path: str, salt: bytes, uuid: bytes, algorithm: str = "sha256",
                 threads: int = None) -> VerityTree:
    """Write the hash file of ``data_path`` (whose size must be a whole number of 4 KiB blocks)
    to ``hash_path`` atomically and return the tree's parameters."""
    if algorithm not in ALGORITHMS:
        raise TdxError(f"dm-verity hash algorithm {algorithm!r} is not supported; use one of {', '.join(ALGORITHMS)}")
    if not 0 < len(salt) <= 256 or len(uuid) != 16:
        raise TdxError("dm-verity: the salt must be 1 to 256 bytes and the UUID 16")
    try:
        size = os.path.getsize(data_path)
    except OSError as error:
        raise TdxError(f"dm-verity: cannot read {data_path}: {error.strerror}") from None
    if size == 0 or size % BLOCK:
        raise TdxError(f"dm-verity: {data_path} is {size} bytes, not a whole number of {BLOCK}-byte blocks")
    data_blocks = size // BLOCK
    prefix = hashlib.new(algorithm, salt)
    per_block = _per_block(ALGORITHMS[algorithm])
    workers = threads or min(4, os.cpu_count() or 1)

    # Level 0, streamed: the data's block hashes, packed into hash blocks as they come.
    level0, pending = [], []
    with open(data_path, "rb") as data, ThreadPoolExecutor(workers) as pool:
        futures = []
        while True:
            chunk = data.read(_CHUNK_BLOCKS * BLOCK)
            if not chunk:
                break
            view = memoryview(chunk)
            step = -(-len(chunk) // BLOCK // workers) * BLOCK
            futures += [pool.submit(_hash_blocks, prefix, view[i:i + step], len(view[i:i + step]) // BLOCK)
                        for i in range(0, len(chunk), step)]
            while len(futures) > 2 * workers:
                pending += futures.pop(0).result()
                while len(pending) >= per_block:
                    level0.append(b"".join(pending[:per_block]))
                    pending = pending[per_block:]
        for future in futures:
            pending += future.result()
    if len(level0) * per_block + len(pending) != data_blocks:
        raise TdxError(f"dm-verity: {data_path} changed while it was hashed; rebuild")
    if data_blocks == 1:
        levels, root = [], pending[0]
    else:
        level = [block.ljust(BLOCK, b"\0") for block in level0] + _pack(pending, per_block)
        levels = [level]
        while len(level) > 1:
            digests = [_hash_blocks(prefix, block, 1)[0] for block in level]
            level = _pack(digests, per_block)
            levels.append(level)
        root = _hash_blocks(prefix, levels[-1][0], 1)[0]
    with atomic_output(hash_path) as out:
        out.write(superblock(algorithm, data_blocks, salt, uuid).ljust(BLOCK, b"\0"))
        for level in reversed(levels):
            for block in level:
                out.write(block)
    return VerityTree(root.hex(), salt.hex(), algorithm, BLOCK, BLOCK, data_blocks,
                      sum(len(level) for level in levels), 1)


def read_tree(hash_path: str, root_hash: str) -> VerityTree:
    """The parameters of a hash file this module wrote, with its root hash (for the stages that
    put them on the command line and in the manifest)."""
    try:
        with open(hash_path, "rb") as handle:
            fields = parse_superblock(handle.read(SUPERBLOCK_SIZE))
        size = os.path.getsize(hash_path)
    except OSError as error:
        raise TdxError(f"dm-verity hash file {hash_path}: {error.strerror}; rebuild the root filesystem") from None
    digest_size = ALGORITHMS.get(fields["algorithm"])
    if digest_size is None or len(root_hash) != 2 * digest_size:
        raise TdxError(f"dm-verity hash file {hash_path}: algorithm {fields['algorithm']!r} and root hash "
                       f"{root_hash!r} do not fit; rebuild the root filesystem")
    return VerityTree(root_hash, fields["salt"].hex(), fields["algorithm"], fields["data_block_size"],
                      fields["hash_block_size"], fields["data_blocks"], size // BLOCK - 1, 1)


def command_line(cmdline: str, hash_path=None, roothash_path=None) -> str:
    """The command line a TD boots with: ``cmdline``, plus the :meth:`VerityTree.kernel_argument`
    of a verified root filesystem when its hash file and root hash file are given."""
    if hash_path is None:
        return cmdline
    try:
        with open(roothash_path, encoding="ascii") as handle:
            root = handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise TdxError(f"root hash file {roothash_path}: {error}; rebuild the root filesystem") from None
    argument = read_tree(hash_path, root).kernel_argument()
    return f"{cmdline} {argument}" if cmdline else argument
