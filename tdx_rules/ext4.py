"""Reproducible ext4 root filesystem images from an unpacked container image, without root.

:func:`build_ext4` turns a :class:`tdx_rules.oci.Tree` (or a list of its
entries) plus an agent binary into an ext4 image in three steps, none of
which needs root, a mount or a loop device:

1. a staging directory gets the regular files, directories and symlinks
   (host modes 0600/0700, every mtime and atime set to ``epoch``); device
   nodes and fifos are never created on the host;
2. ``mkfs.ext4 -d STAGING`` (e2fsprogs >= 1.47.0) builds the filesystem;
3. one ``debugfs -w -f SCRIPT`` run sets what an unprivileged staging copy
   cannot carry: owners, exact modes (setuid, setgid, sticky), device nodes
   and fifos (``mknod``), hard links to them and to symlinks (``expand_dir``,
   ``ln`` plus ``links_count``; hard links of regular files are host hard
   links in the staging directory, which mkfs links and counts), xattrs
   (``ea_set``) and every timestamp (``atime``/``ctime``/``mtime``/``crtime``
   and their ``*_extra`` words) of every inode, to ``epoch``.

``e2fsck -fn`` checks the result before it is renamed over ``out``; nothing
is left behind on failure.

Same tree, agent, epoch, size and label give a byte-identical image,
whatever the host: the sources of variation neutralised are

* filesystem UUID and directory hash seed: ``-U`` and ``-E hash_seed=`` are
  derived from a SHA-256 over the whole input (paths, metadata, content
  digests, agent, epoch, size, label); the metadata checksum seed and the
  journal superblock's UUID follow from the UUID;
* clocks: ``E2FSPROGS_FAKE_TIME=epoch`` makes libext2fs stamp ``s_mkfs_time``,
  ``s_lastcheck``, ``s_wtime`` (mkfs and debugfs), new inodes' ``crtime`` and
  the journal, resize and lost+found inodes with ``epoch``. libext2fs takes 0
  as "unset" and would use the real clock, so epoch 0 is passed as 2**32,
  which its 32-bit fields truncate to 0. The superblock stamps are read back
  and checked;
* host metadata copied by ``mkfs -d``: owner, mode and atime/mtime/ctime of
  the staging files (the host ctime cannot be set) are overwritten by the
  debugfs script; their xattrs (SELinux labels, default ACLs inherited from
  the output directory) are never copied (``-E no_copy_xattrs``: removing
  them afterwards would leave an empty in-inode xattr header behind);
* order: ``mkfs -d`` scans directories with ``alphasort`` (``strcoll``), so it
  runs with ``LC_ALL=C``; inode and block allocation then follow that order;
  the debugfs script is written in sorted order;
* configuration: a private ``mke2fs.conf`` (``MKE2FS_CONFIG``) pins the
  features, and the environment is reduced to ``PATH`` and the variables
  above (no ``MKE2FS_*`` / ``E2FSPROGS_*`` settings of the caller leak in);
* lazy initialisation: ``-E assume_storage_prezeroed=1,nodiscard`` on a
  freshly created (all-zero) image file marks inode tables as zeroed whatever
  the host kernel supports (mkfs otherwise probes
  ``/sys/fs/ext4/features/lazy_itable_init`` and the discard support of the
  host filesystem);
* inode generation numbers are 0 (libext2fs never sets them) and
  ``s_kbytes_written`` counts the same writes every time.

The image still depends on the e2fsprogs version, which a caching rule must
include in its signature.

Size: ``size='auto'`` takes the estimated need of the tree (data blocks,
directory blocks, xattr blocks, inode tables, journal, group metadata:
``needed_size``) plus 20 %, at least 16 MiB, rounded up to a MiB. A fixed size
(``'64M'``, ``'1G'``, bytes as int) smaller than the estimated need raises
TdxError "needs at least N MiB"; so does an mkfs or debugfs run that runs
out of space.
"""

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

from .errors import TdxError
from .fsutil import CHUNK, sha256_file

# Entry types, as tdx_rules.oci names them (not imported: this module needs no
# third-party package, so it also runs under a bare python3).
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK_DEV, FIFO = "file", "dir", "symlink", "hardlink", "char", "block", "fifo"

BLOCK = 4096
INODE_SIZE = 256
BLOCKS_PER_GROUP = 32768
INODE_RATIO = 16384
HEADROOM_FRACTION = 0.20
HEADROOM_MIN = 16 << 20
MIB = 1 << 20
LABEL = "rootfs"
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
MAX_SCRIPT_LINE = 8000  # debugfs reads script lines into an 8192-byte buffer

MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 5.0
	lazy_itable_init = 1
	lazy_journal_init = 1

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
		flex_bg_size = 16
	}
	default = {
	}
"""

_S_IFMT = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
           BLOCK_DEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_TIME_FIELDS = ("atime", "mtime", "ctime", "crtime")
_SPACE_ERRORS = ("could not allocate", "no space left", "not enough space",
                 "too many inodes", "filesystem too small", "inode table", "file too big")


@dataclasses.dataclass(frozen=True)
class Ext4Image:
    """What :func:`build_ext4` produced."""

    path: str
    size: int
    uuid: str
    inodes: int


@dataclasses.dataclass
class _Inode:
    type: str
    mode: int
    uid: int
    gid: int
    rdev: Optional[Tuple[int, int]]
    xattrs: Tuple[Tuple[str, bytes], ...]
    target: Optional[str]
    body: Optional[str]
    size: int
    sha256: Optional[str]
    paths: List[str]


def _key(path: str) -> Tuple[bytes, ...]:
    return tuple(os.fsencode(part) for part in path.split("/") if part)


def _inodes(entries: Iterable) -> Dict[str, _Inode]:
    """Inodes keyed by their first path; hard links become extra paths."""
    by_path: Dict[str, _Inode] = {}
    for entry in entries:
        if entry.type == HARDLINK:
            owner = by_path.get(entry.target)
            if owner is None or owner.type == DIR:
                what = "a directory" if owner is not None else "not in the tree (or listed after the link)"
                raise TdxError(f"hard link {entry.path!r} points to {entry.target!r}, which is {what}; "
                               "rebuild the tree with tdx_rules.oci.apply_layers")
            owner.paths.append(entry.path)
            by_path[entry.path] = owner
            continue
        if entry.type not in _S_IFMT:
            raise TdxError(f"{entry.path!r}: unknown entry type {entry.type!r}; rebuild the tree")
        digest, size = entry.sha256, entry.size
        if entry.type == FILE and entry.body is not None:
            try:
                size = os.stat(entry.body).st_size
                if digest is None:
                    digest = sha256_file(entry.body)  # the image identity must cover the content
            except OSError as exc:
                raise TdxError(f"{entry.path!r}: its body {entry.body} cannot be read ({exc.strerror or exc}); "
                               "keep the tree's staging directory until the image is built") from None
        by_path[entry.path] = _Inode(entry.type, entry.mode & 0o7777, entry.uid, entry.gid, entry.rdev,
                                     tuple(entry.xattrs), entry.target, entry.body, size, digest, [entry.path])
    if "/" not in by_path:
        by_path["/"] = _Inode(DIR, 0o755, 0, 0, None, (), None, None, 0, None, ["/"])
    elif by_path["/"].type != DIR:
        raise TdxError("the tree's root is not a directory; rebuild the tree")
    return by_path


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
        raise TdxError(f"{name} not found; install e2fsprogs (1.47.0 or newer)")
    return path


def _env(epoch: int, work: str) -> Dict[str, str]:
    """A clean environment: only what makes e2fsprogs deterministic."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin") + os.pathsep + os.pathsep.join(SBIN),
        "LC_ALL": "C",
        "TZ": "UTC",
        # libext2fs reads 0 as "unset"; 2**32 truncates to 0 in its 32-bit time fields.
        "E2FSPROGS_FAKE_TIME": str(epoch if epoch else 1 << 32),
        "SOURCE_DATE_EPOCH": str(epoch),
        "MKE2FS_CONFIG": os.path.join(work, "mke2fs.conf"),
    }


def _quote(value: str) -> bytes:
    """One debugfs (libss) argument: double quotes, with a quote written as two."""
    return b'"' + os.fsencode(value).replace(b'"', b'""') + b'"'


def _check_path(path: str) -> None:
    if "\n" in path or "\r" in path:
        raise TdxError(f"image path {path!r} contains a newline or carriage return, which debugfs scripts cannot "
                       "express; rename it in the image")
    for part in path.split("/"):
        if len(os.fsencode(part)) > 255:
            raise TdxError(f"image path {path!r} has a name longer than 255 bytes, the ext4 limit; rename it")
    if len(os.fsencode(path)) * 2 + 64 > MAX_SCRIPT_LINE:
        raise TdxError(f"image path {path[:60]!r}... is too long for a debugfs script line; shorten it")


# --------------------------------------------------------------------------- agent

def _place_agent(inodes: Dict[str, _Inode], agent: str, guest_path: str) -> str:
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
        if inode.target.startswith("/"):
            current = []
        pending = inode.target.split("/") + pending
    parent = "/" + "/".join(current)
    for i in range(1, len(current) + 1):
        path = "/" + "/".join(current[:i])
        if path not in inodes:
            inodes[path] = _Inode(DIR, 0o755, 0, 0, None, (), None, None, 0, None, [path])
    final = (parent.rstrip("/") + "/" + wanted[-1])
    existing = inodes.get(final)
    if existing is not None:
        if existing.type == DIR:
            raise TdxError(f"agent_guest_path {guest_path!r}: {final} is a directory in the image; pick another path")
        existing.paths.remove(final)
        del inodes[final]
        if existing.paths:
            existing.paths.sort(key=_key)
            for path in existing.paths:
                inodes[path] = existing
    try:
        size = os.stat(agent).st_size
        digest = sha256_file(agent)
    except OSError as exc:
        raise TdxError(f"agent {agent}: cannot read ({exc.strerror or exc}); build the agent first") from None
    inodes[final] = _Inode(FILE, 0o755, 0, 0, None, (), None, agent, size, digest, [final])
    return final


# --------------------------------------------------------------------------- size

def _journal_blocks(blocks: int) -> int:
    """ext2fs_default_journal_size() of e2fsprogs 1.47."""
    for limit, size in ((2048, 0), (32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size
    return 262144


def _backup_groups(groups: int) -> int:
    """Groups holding a superblock backup (sparse_super: 0, 1, powers of 3, 5, 7)."""
    count = min(groups, 2)
    for base in (3, 5, 7):
        power = base
        while power < groups:
            count += 1
            power *= base
    return count


def _content_blocks(unique: List[_Inode], children: Dict[str, List[str]]) -> Tuple[int, int]:
    """(blocks for file data, symlinks, directories and xattr blocks; inodes used)."""
    blocks = 0
    for inode in unique:
        if inode.type == FILE:
            data = -(-inode.size // BLOCK)
            extents = -(-data // 32768)
            blocks += data + (0 if extents <= 4 else -(-extents // 340) + 1)
        elif inode.type == SYMLINK and len(os.fsencode(inode.target)) >= 60:
            blocks += 1
        elif inode.type == DIR:
            names = children.get(inode.paths[0], [])
            used = 24 + sum((8 + len(os.fsencode(n)) + 3) // 4 * 4 for n in names)
            dir_blocks = max(1, -(-used // (BLOCK - 12)))
            blocks += dir_blocks + (0 if dir_blocks == 1 else 1 + dir_blocks // 400)
        if inode.type != FILE:
            blocks += len(inode.paths) - 1  # expand_dir before each ln
        inline = sum(16 + (len(name) + 3) // 4 * 4 + (len(value) + 3) // 4 * 4 for name, value in inode.xattrs)
        if inline > INODE_SIZE - 128 - 32 - 4:
            blocks += 1
    return blocks + 4, len(unique) + 11  # lost+found: 4 blocks; inodes 1-11 are reserved


def _inode_count(used: int, size: int) -> int:
    return max(used + max(used // 5, 256), size // INODE_RATIO)


def _needed_blocks(content: int, used_inodes: int, size: int) -> int:
    """Blocks an image of ``size`` bytes needs for the tree: content plus the
    metadata mkfs lays out for that size."""
    total = size // BLOCK
    groups = max(1, -(-total // BLOCKS_PER_GROUP))
    desc_blocks = -(-groups * 64 // BLOCK)
    reserve_groups = -(-min(total * 1024, 0xFFFFFFFF) // BLOCKS_PER_GROUP)  # resize_inode: room to grow 1024x
    reserved_gdt = min(BLOCK // 4, -(-reserve_groups * 64 // BLOCK) - desc_blocks)
    inodes = _inode_count(used_inodes, size)
    inode_tables = -(-inodes * INODE_SIZE // BLOCK) + groups
    metadata = 2 * groups + _backup_groups(groups) * (1 + desc_blocks + max(0, reserved_gdt)) + inode_tables
    return content + metadata + _journal_blocks(total) + 64


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

def _identity(inodes: List[_Inode], epoch: int, size: int, label: str) -> bytes:
    """SHA-256 over everything that goes into the image."""
    digest = hashlib.sha256(b"tdx-rules ext4 v1\0")
    digest.update(f"{epoch}\0{size}\0{label}\0".encode())
    for inode in inodes:
        for path in inode.paths:
            digest.update(os.fsencode(path) + b"\0")
        digest.update(f"|{inode.type}|{inode.mode:o}|{inode.uid}|{inode.gid}|{inode.rdev}|{inode.sha256}|".encode())
        digest.update(os.fsencode(inode.target or "") + b"\0")
        for name, value in inode.xattrs:
            digest.update(os.fsencode(name) + b"\0" + len(value).to_bytes(8, "little") + value)
        digest.update(b"\n")
    return digest.digest()


def _uuid(seed: bytes) -> str:
    raw = bytearray(seed[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom (derived from SHA-256)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _copy(src: str, dst: str) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with open(src, "rb") as inp, os.fdopen(fd, "wb") as out:
        try:
            while os.copy_file_range(inp.fileno(), out.fileno(), 1 << 30):
                pass
        except OSError:  # not supported here (or across filesystems): plain copy
            inp.seek(0)
            out.seek(0)
            out.truncate()
            shutil.copyfileobj(inp, out, CHUNK)


def _link(src: str, dst: str) -> bool:
    try:
        os.link(src, dst, follow_symlinks=False)
        return True
    except OSError:  # another filesystem, or links not allowed: copy instead
        return False


def _private_body(body: str, store: Optional[str]) -> bool:
    """Whether ``body`` lies in ``store``, the image tree's own body store (never a caller's file)."""
    if not store:
        return False
    return os.path.dirname(os.path.dirname(os.path.abspath(body))) == os.path.abspath(store)


def _stage(staging: str, ordered: List[_Inode], epoch: int, store: Optional[str] = None) -> None:
    """Regular files, directories and symlinks below ``staging``, every time ``epoch``.

    A body from ``store`` (the tree's private store) is hard-linked, not copied, the first
    time it is used; the staging then changes that private file's mode and times, never a
    caller's. A second file with the same body gets a copy: mkfs -d would merge the two.
    """
    os.chmod(staging, 0o700)
    staged: List[str] = ["/"]
    linked = set()
    for inode in ordered:
        path = inode.paths[0]
        if path == "/":
            continue
        host = staging + path
        if inode.type == DIR:
            os.mkdir(host, 0o700)
            os.chmod(host, 0o700)
        elif inode.type == FILE:
            if inode.body is None:
                os.close(os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            elif inode.body not in linked and _private_body(inode.body, store) and _link(inode.body, host):
                linked.add(inode.body)
            else:
                _copy(inode.body, host)
            os.chmod(host, 0o600)
        elif inode.type == SYMLINK:
            os.symlink(inode.target, host)
        else:
            continue
        staged.append(path)
    for inode in ordered:  # hard links of regular files: mkfs -d links them (and counts the links)
        if inode.type == FILE:
            for path in inode.paths[1:]:
                os.link(staging + inode.paths[0], staging + path, follow_symlinks=False)
                staged.append(path)
    for path in sorted(staged, key=_key, reverse=True):  # children before their directory
        host = staging + path if path != "/" else staging
        os.utime(host, ns=(epoch * 10 ** 9, epoch * 10 ** 9), follow_symlinks=False)


def _extra(epoch: int) -> int:
    """The *_extra word of a timestamp: epoch bits, no nanoseconds."""
    signed = epoch - (1 << 32) if epoch & (1 << 31) else epoch
    return ((epoch - signed) >> 32) & 3


def _script(ordered: List[_Inode], epoch: int, work: str) -> bytes:
    lines: List[bytes] = []
    values: Dict[bytes, str] = {}
    if any(inode.xattrs for inode in ordered) and ("\n" in work or "\r" in work):
        raise TdxError(f"output directory {os.path.dirname(work)!r} contains a newline, which debugfs scripts cannot "
                       "express; pick another output path")

    def value_file(value: bytes) -> str:
        if value not in values:
            path = os.path.join(work, "xattr", f"{len(values)}")
            with open(path, "wb") as out:
                out.write(value)
            values[value] = path
        return values[value]

    # Device nodes and fifos, then the extra names of hard links to anything but regular files.
    for inode in ordered:
        if inode.type in (CHAR, BLOCK_DEV, FIFO):
            parent, _, name = inode.paths[0].rpartition("/")
            lines.append(b"cd " + _quote(parent or "/"))
            if inode.type == FIFO:
                lines.append(b"mknod " + _quote(name) + b" p")
            else:
                major, minor = inode.rdev or (0, 0)
                if not (0 <= major <= 65535 and 0 <= minor <= 65535):
                    raise TdxError(f"device {inode.paths[0]!r} has number {major}:{minor}, beyond what debugfs "
                                   "mknod takes (65535:65535); remove it from the image")
                lines.append(b"mknod " + _quote(name) + (b" c " if inode.type == CHAR else b" b ")
                             + f"{major} {minor}".encode())
    for inode in ordered:
        if inode.type == FILE:
            continue  # staged as host hard links
        for path in inode.paths[1:]:
            # debugfs ln does not grow a full directory (ext2fs_link): give it a free block first.
            parent, _, name = path.rpartition("/")
            lines.append(b"expand_dir " + _quote(parent or "/"))
            lines.append(b"cd " + _quote(parent or "/"))
            lines.append(b"ln " + _quote(inode.paths[0]) + b" " + _quote(name))
    lines.append(b'cd "/"')
    # Metadata of every inode.
    extra = str(_extra(epoch)).encode()
    for inode in ordered:
        target = _quote(inode.paths[0])
        sif = b"sif " + target + b" "
        lines.append(sif + b"mode " + f"0{_S_IFMT[inode.type] | inode.mode:o}".encode())
        lines.append(sif + b"uid " + str(inode.uid).encode())
        lines.append(sif + b"gid " + str(inode.gid).encode())
        if len(inode.paths) > 1:
            lines.append(sif + b"links_count " + str(len(inode.paths)).encode())
        for field in _TIME_FIELDS:
            lines.append(sif + field.encode() + b" @" + str(epoch).encode())
            lines.append(sif + field.encode() + b"_extra " + extra)
        for name, value in inode.xattrs:
            lines.append(b"ea_set -f " + _quote(value_file(value)) + b" " + target + b" " + _quote(name))
    # Reserved inodes stamped by mkfs: bad blocks, resize, journal.
    for number in (1, 7, 8):
        for field in _TIME_FIELDS:
            lines.append(f"sif <{number}> {field} @{epoch}".encode())
            lines.append(f"sif <{number}> {field}_extra ".encode() + extra)
    for line in lines:
        if len(line) >= MAX_SCRIPT_LINE:
            raise TdxError(f"debugfs script line too long ({len(line)} bytes): {line[:80]!r}...; "
                           "shorten the path or xattr name")
    return b"\n".join(lines) + b"\n"


def _run(cmd: List[str], env: Dict[str, str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    except OSError as exc:
        raise TdxError(f"cannot run {cmd[0]} for {what} ({exc.strerror or exc}); install e2fsprogs") from None


def _errors(text: bytes, banner: str) -> List[str]:
    lines = [line.strip() for line in text.decode("utf-8", "replace").splitlines()]
    return [line for line in lines if line and not line.startswith(banner)]


def _space_error(out: str, given: Optional[int], minimum: int, auto: int, detail: str) -> TdxError:
    at_least = max(minimum, (given or 0) + MIB) // MIB
    size = f"size {given // MIB} MiB is too small: " if given else ""
    return TdxError(f"{out}: {size}the tree needs at least {at_least} MiB ({detail}); pass a larger size or "
                    f"size='auto' ({auto // MIB} MiB)")


def _read_super(path: str) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(1024)
        return handle.read(1024)


def _check_super(path: str, out: str, epoch: int, uuid: str) -> None:
    sb = _read_super(path)
    if len(sb) < 1024 or sb[0x38:0x3A] != b"\x53\xef":
        raise TdxError(f"{out}: mkfs.ext4 wrote no ext4 superblock; check the e2fsprogs installation")
    wtime, = struct.unpack_from("<I", sb, 0x30)
    lastcheck, = struct.unpack_from("<I", sb, 0x40)
    mkfs_time, = struct.unpack_from("<I", sb, 0x108)
    want = epoch & 0xFFFFFFFF
    if (wtime, lastcheck, mkfs_time) != (want, want, want):
        raise TdxError(f"{out}: e2fsprogs ignored E2FSPROGS_FAKE_TIME (superblock times {wtime}/{lastcheck}/"
                       f"{mkfs_time}, wanted {want}); install e2fsprogs 1.47.0 or newer")
    if sb[0x68:0x78].hex() != uuid.replace("-", ""):
        raise TdxError(f"{out}: the filesystem UUID is not the one requested; check the e2fsprogs installation")


def build_ext4(tree, agent_path_on_host, agent_guest_path: str = "/sbin/vm-agent", *, out, size="auto",
               epoch: int = 0, label: str = LABEL) -> Ext4Image:
    """Write an ext4 image of ``tree`` plus the agent to ``out``, atomically.

    ``tree`` is a :class:`tdx_rules.oci.Tree` or a list of its entries (any
    objects with the attributes of :class:`tdx_rules.oci.Entry`). The
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
    if not isinstance(label, str) or len(label.encode()) > 16 or "\n" in label:
        raise TdxError(f"label {label!r} is longer than 16 bytes; pass a shorter filesystem label")
    if not os.path.isfile(agent):
        raise TdxError(f"agent {agent}: no such file; build the agent first or fix the path")
    given = _parse_size(size)
    entries = tree.entries() if hasattr(tree, "entries") else list(tree)
    inodes = _inodes(entries)
    _place_agent(inodes, agent, agent_guest_path)
    lost = inodes.get("/lost+found")
    if lost is not None and lost.type != DIR:
        raise TdxError("/lost+found is not a directory in the image; remove it from the image")

    unique: List[_Inode] = []
    seen = set()
    for path in sorted(inodes, key=_key):
        inode = inodes[path]
        if id(inode) not in seen:
            seen.add(id(inode))
            inode.paths.sort(key=_key)
            unique.append(inode)
    unique.sort(key=lambda inode: _key(inode.paths[0]))
    children: Dict[str, List[str]] = {}
    for path in inodes:
        _check_path(path)
        if path != "/":
            parent, _, name = path.rpartition("/")
            children.setdefault(parent or "/", []).append(name)
    children.setdefault("/", []).append("lost+found")
    if lost is None:
        unique.append(_Inode(DIR, 0o700, 0, 0, None, (), None, None, 0, None, ["/lost+found"]))

    content, used_inodes = _content_blocks(unique, children)
    minimum, auto = needed_size(content, used_inodes, given)
    image_size = given if given is not None else auto
    if given is not None and (given < minimum or _needed_blocks(content, used_inodes, given) * BLOCK > given):
        raise _space_error(out, given, minimum, auto, "estimated from its files, directories and metadata")
    inode_count = _inode_count(used_inodes, image_size)
    uuid_seed = _identity(unique, epoch, image_size, label)
    uuid = _uuid(uuid_seed)
    hash_seed = _uuid(hashlib.sha256(b"hash_seed\0" + uuid_seed).digest())

    mkfs, debugfs, e2fsck = tool("mkfs.ext4"), tool("debugfs"), tool("e2fsck")
    directory = os.path.dirname(out)
    try:
        os.makedirs(directory, exist_ok=True)
        work = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise TdxError(f"{out}: cannot create a work directory beside it ({exc.strerror or exc}); "
                       "check the path and permissions") from None
    try:
        staging = os.path.join(work, "root")
        image = os.path.join(work, "image.ext4")
        script_path = os.path.join(work, "fix.debugfs")
        os.mkdir(staging, 0o700)
        os.mkdir(os.path.join(work, "xattr"), 0o700)
        with open(os.path.join(work, "mke2fs.conf"), "w") as conf:
            conf.write(MKE2FS_CONF)
        env = _env(epoch, work)
        try:
            _stage(staging, unique, epoch, getattr(tree, "store", None))
            script = _script(unique, epoch, work)
            with open(script_path, "wb") as handle:
                handle.write(script)
        except OSError as exc:
            raise TdxError(f"{out}: cannot write the staging directory {work} ({exc.strerror or exc}); "
                           "check free space and permissions") from None

        cmd = [mkfs, "-q", "-F", "-T", "default", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-N", str(inode_count),
               "-d", staging, "-U", uuid, "-E",
               f"hash_seed={hash_seed},root_owner=0:0,assume_storage_prezeroed=1,nodiscard,no_copy_xattrs",
               "-L", label, image, f"{image_size // 1024}k"]
        result = _run(cmd, env, out)
        if result.returncode != 0:
            text = (result.stderr + result.stdout).decode("utf-8", "replace")
            detail = " ".join(_errors(result.stderr, "mke2fs ")[-2:]) or text.strip()[-200:]
            if any(marker in text.lower() for marker in _SPACE_ERRORS):
                raise _space_error(out, given, minimum, auto, f"mkfs.ext4: {detail}")
            raise TdxError(f"{out}: mkfs.ext4 failed ({detail}); check e2fsprogs (1.47.0 or newer) and free space")

        result = _run([debugfs, "-w", "-f", script_path, image], env, out)
        problems = _errors(result.stderr, "debugfs ")
        if result.returncode != 0 or problems:
            detail = problems[0] if problems else f"exit status {result.returncode}"
            if any(marker in " ".join(problems).lower() for marker in _SPACE_ERRORS):
                raise _space_error(out, given, minimum, auto, f"debugfs: {detail}")
            raise TdxError(f"{out}: debugfs could not set the image metadata ({detail}); "
                           "check the tree's names and xattrs")

        check = _run([e2fsck, "-fn", image], env, out)
        if check.returncode != 0:
            detail = " ".join(_errors(check.stdout + check.stderr, "e2fsck ")[-3:])
            raise TdxError(f"{out}: e2fsck found errors in the new image ({detail}); report this as a bug")
        _check_super(image, out, epoch, uuid)
        os.chmod(image, 0o644)
        os.replace(image, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Ext4Image(out, image_size, uuid, inode_count)


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
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    with contextlib.suppress(OSError):
        return subprocess.run([e2fsck, "-fn", path], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True).returncode == 0
    return False
