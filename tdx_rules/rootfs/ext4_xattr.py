"""Extended attributes of ext4 inodes: the entries as ext4 stores them (in the inode's spare
bytes or in one xattr block), their hashes, and POSIX ACLs in ext4's on-disk form."""

import struct
from typing import List, Optional, Tuple

# xattr name prefixes and their on-disk index (longest prefix first).
XATTR_INDEX = (("system.posix_acl_access", 2), ("system.posix_acl_default", 3), ("system.richacl", 8),
               ("security.", 6), ("trusted.", 4), ("user.", 1), ("system.", 7))
_M32 = 0xFFFFFFFF


class XattrError(ValueError):
    """An xattr ext4 cannot store."""


def entry_hash(name: bytes, value: bytes) -> int:
    """The hash of one entry (name suffix and value), as ext4 checks it."""
    h = 0
    for c in name:
        h = ((h << 5) ^ (h >> 27) ^ c) & _M32
    if value:
        padded = value + b"\0" * (-len(value) % 4)
        for (word,) in struct.iter_unpack("<I", padded):
            h = ((h << 16) ^ (h >> 16) ^ word) & _M32
    return h


def acl_to_disk(value: bytes, name: str) -> bytes:
    """A POSIX ACL from the xattr interface (version 2) to ext4's on-disk form (version 1)."""
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value)[0] != 2:
        raise XattrError(f"xattr {name} is not a POSIX ACL in the xattr format (version 2)")
    out = [struct.pack("<I", 1)]
    for tag, perm, ident in struct.iter_unpack("<HHI", value[4:]):
        out.append(struct.pack("<HHI", tag, perm, ident) if tag in (0x02, 0x08) else struct.pack("<HH", tag, perm))
    return b"".join(out)


def entries(xattrs) -> List[Tuple[int, bytes, bytes]]:
    """(index, name suffix, stored value), sorted as ext4 keeps a block's entries."""
    found = []
    for name, value in xattrs:
        for prefix, index in XATTR_INDEX:
            if name == prefix or (prefix.endswith(".") and name.startswith(prefix)):
                break
        else:
            raise XattrError(f"xattr {name!r} has a namespace ext4 does not store (user., trusted., security., "
                             "system.)")
        suffix = b"" if not prefix.endswith(".") else name[len(prefix):].encode("utf-8", "surrogateescape")
        if index in (2, 3):
            value = acl_to_disk(value, name)
        if len(suffix) > 255:
            raise XattrError(f"xattr name {name[:40]!r}... is longer than 255 bytes")
        found.append((index, suffix, bytes(value)))
    found.sort(key=lambda e: (e[0], len(e[1]), e[1]))
    return found


def area(entries_: List[Tuple[int, bytes, bytes]], size: int, first: int, value_base: int) -> Optional[bytearray]:
    """Entries from ``first`` and values from the end of a ``size``-byte area; None if they do not fit.
    Value offsets are relative to ``value_base``."""
    out = bytearray(size)
    pos, end = first, size
    for index, name, value in entries_:
        need = 16 + ((len(name) + 3) & ~3)
        vlen = (len(value) + 3) & ~3
        if pos + need + 4 > end - vlen:
            return None
        end -= vlen
        out[end:end + len(value)] = value
        struct.pack_into("<BBHIII", out, pos, len(name), index, (end - value_base) if value else 0, 0,
                         len(value), entry_hash(name, value))
        out[pos + 16:pos + 16 + len(name)] = name
        pos += need
    return out
