"""The shared-library closure of a dynamically linked program, resolved as glibc's loader does.

Everything is read from the ELF files themselves (:func:`tdx_rules.elf.read_elf`): the
program's ``PT_INTERP``, then breadth first, as ``ld.so`` maps objects, every ``DT_NEEDED``
name of every object, looked up in the loader's order (glibc's ``elf/dl-load.c``):

1. unless the requesting object has ``DT_RUNPATH``: the ``DT_RPATH`` of the requester and of
   each object that loaded it, up to the program (an object with ``DT_RUNPATH`` lends none);
2. the requester's own ``DT_RUNPATH``;
3. unless the requester has ``DF_1_NODEFLIB``: the directories of ``/etc/ld.so.conf`` (and
   its ``include`` files), in file order, standing for ``ld.so.cache``; then the loader's
   default directories (Debian's multiarch glibc: ``/lib/x86_64-linux-gnu``,
   ``/usr/lib/x86_64-linux-gnu``, ``/lib``, ``/usr/lib``).

``$ORIGIN`` (also ``${ORIGIN}``) is the directory of the requesting object: on the host, where
the file is; in the image, where it goes. ``$LIB`` and ``$PLATFORM`` expand as Debian's loader
expands them. A name with a ``/`` is a path. A name already loaded (by file name or
``DT_SONAME``) is not looked up again, and a candidate that is not an x86-64 ELF is passed
over, as the loader passes over a library of the wrong class. ``LD_LIBRARY_PATH`` and the
hardware-capability subdirectories are not searched: the closure does not depend on the
build machine's environment or CPU.

Each absolute directory is looked up in *trees*, in order: the unpacked ``apt:`` packages the
user names, then the host (root ``/``); a file found in a package wins over the host's. A
library goes into the image at the path the loader will look for: the directory where it
was found (or, for ``$ORIGIN``, the same place relative to its requester in the image), with
each symlink on the way kept as a symlink (``/lib64/ld-linux-x86-64.so.2`` ->
``/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2``, ``libstdc++.so.6`` -> ``libstdc++.so.6.0.30``).
The image has no ``ld.so.cache``: a library found through ``ld.so.conf`` in a directory the
loader does not search by default (``/usr/local/lib``) also gets a symlink of the name asked
for in the first default directory, pointing at where it lies. Nothing is executed: neither
``ldd`` nor the loader.
"""

import dataclasses
import glob
import os
import stat
from typing import Dict, List, Optional, Tuple

from ..elf import ElfInfo, read_elf
from ..errors import TdxError
from ..fsutil import sha256_file
from . import newc

# glibc's system search path as Debian builds it for x86-64 (`ld.so --help` lists it).
DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib")
LD_SO_CONF = "/etc/ld.so.conf"
# What Debian's loader substitutes for $LIB and $PLATFORM on x86-64.
LIB_TOKEN = "lib/x86_64-linux-gnu"
PLATFORM_TOKEN = "x86_64"
MAX_SYMLINKS = 40  # as the kernel's limit on symlinks followed in one lookup
MAX_INCLUDE_DEPTH = 8


@dataclasses.dataclass(frozen=True)
class Tree:
    """Where absolute paths are looked up: ``root`` (``/`` for the host) and how the manifest
    names its files (``origin``: ``{}`` for the host; package, version and spec for a package)."""

    root: str
    origin: Tuple[Tuple[str, str], ...] = ()

    @property
    def is_host(self) -> bool:
        return self.root == "/"

    def host_path(self, guest: str) -> str:
        return guest if self.is_host else os.path.join(self.root, guest.lstrip("/"))


HOST = Tree("/")


@dataclasses.dataclass(frozen=True)
class Member:
    """One entry the closure puts into the image: a file read from ``host`` or a symlink (``host``
    empty for a link of our own, that no file on the host stands for)."""

    guest: str
    tree: Tree
    host: str
    link: Optional[str] = None


@dataclasses.dataclass
class Object:
    """An object the loader maps: the program, its interpreter, each library."""

    guest: str
    host: str
    tree: Tree
    info: ElfInfo
    parent: Optional["Object"] = None


@dataclasses.dataclass
class Closure:
    program: Object
    interpreter: Optional[str]                  # the guest path of PT_INTERP
    members: Dict[str, Member]                   # guest path -> member
    loaded: List[Tuple[str, str, str]]           # (requester guest, DT_NEEDED name, resolved guest path)
    missing: List[Tuple[str, str]]               # (requester, name) that nothing provides

    def host_files(self) -> List[str]:
        """Every host path the closure reads (symlinks and files), sorted: its dependencies."""
        return sorted({m.host for m in self.members.values() if m.tree.is_host and m.host})

    def entries(self) -> List[newc.Entry]:
        """The closure as archive entries (unsorted; :func:`newc.merge` sorts and adds parents)."""
        out = []
        for member in self.members.values():
            if member.link is not None:
                out.append(newc.symlink(member.guest, member.link))
            else:
                executable = member.guest == self.interpreter or os.stat(member.host).st_mode & 0o111
                out.append(newc.disk_file(member.guest, member.host, 0o755 if executable else 0o644))
        return out

    def records(self, relative_to: Optional[str] = None) -> List[dict]:
        """The manifest's view, sorted by image path: each file's SHA-256, size and where it came
        from (a host path, relative to ``relative_to`` when inside it; or package, version and
        member), each symlink's target."""
        out = []
        for guest in sorted(self.members):
            member = self.members[guest]
            if member.link is not None:
                out.append({"path": guest, "link": member.link})
                continue
            if member.tree.is_host:
                where = os.path.abspath(member.host)
                if relative_to and where.startswith(os.path.abspath(relative_to) + os.sep):
                    where = os.path.relpath(where, relative_to)
                source = {"host": where}
            else:
                source = dict(member.tree.origin, member=os.path.relpath(member.host, member.tree.root))
            out.append({"path": guest, "sha256": sha256_file(member.host), "size": os.path.getsize(member.host),
                        "from": source})
        return out


def ld_so_conf_dirs(path: str = LD_SO_CONF, _depth: int = 0) -> List[str]:
    """The directories ``path`` names, in file order, ``include`` patterns expanded (sorted, relative
    to the file's directory) and duplicates dropped; ``hwcap`` lines and relative names ignored,
    as ldconfig ignores them. A missing file names no directory."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] == "include" and _depth < MAX_INCLUDE_DEPTH:
            for pattern in words[1:]:
                if not pattern.startswith("/"):
                    pattern = os.path.join(os.path.dirname(path), pattern)
                for included in sorted(glob.glob(pattern)):
                    found += ld_so_conf_dirs(included, _depth + 1)
        elif words[0] != "hwcap":
            for word in line.replace(",", " ").replace(":", " ").split():
                word = word.split("=", 1)[0].rstrip("/") or "/"
                if word.startswith("/"):
                    found.append(os.path.normpath(word))
    return list(dict.fromkeys(found))


@dataclasses.dataclass(frozen=True)
class _Dir:
    guest: str
    host: Optional[str] = None   # set for $ORIGIN directories: the requester's real neighbourhood
    tree: Optional[Tree] = None
    cached: bool = False         # an ld.so.conf directory outside the default ones


def _expand(obj: Object, entries) -> List[_Dir]:
    out = []
    for entry in entries:
        for token, value in (("$LIB", LIB_TOKEN), ("${LIB}", LIB_TOKEN), ("$PLATFORM", PLATFORM_TOKEN),
                             ("${PLATFORM}", PLATFORM_TOKEN)):
            entry = entry.replace(token, value)
        if "$ORIGIN" in entry or "${ORIGIN}" in entry:
            def at(base):
                return os.path.normpath(entry.replace("${ORIGIN}", base).replace("$ORIGIN", base))
            guest, host = at(os.path.dirname(obj.guest)), at(os.path.dirname(obj.host))
            if guest.startswith("/"):
                out.append(_Dir(guest, host if os.path.isabs(host) else os.path.abspath(host), obj.tree))
        elif entry.startswith("/"):  # a relative entry would count from the loader's working directory
            out.append(_Dir(os.path.normpath(entry)))
    return out


def _follow(tree: Tree, host: str, guest: str):
    """The symlinks from ``guest`` to a regular file and that file, or None if there is none."""
    links = []
    for _ in range(MAX_SYMLINKS):
        try:
            st = os.lstat(host)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return links, Member(guest, tree, host)
        if not stat.S_ISLNK(st.st_mode):
            return None
        target = os.readlink(host)
        links.append(Member(guest, tree, host, link=target))
        if target.startswith("/"):
            guest = os.path.normpath(target)
            host = tree.host_path(guest)
        else:
            guest = os.path.normpath(os.path.join(os.path.dirname(guest), target))
            host = os.path.normpath(os.path.join(os.path.dirname(host), target))
        if not tree.is_host and not host.startswith(os.path.join(tree.root, "")):
            return None  # a package's symlink may not leave the package
    return None


def _candidate(tree: Tree, host: str, guest: str):
    """``_follow`` when the file is an x86-64 ELF the loader would map, else None."""
    hit = _follow(tree, host, guest)
    if hit is None:
        return None
    try:
        info = read_elf(hit[1].host, "library")
    except TdxError:
        return None
    return hit[0], hit[1], info


def _search_dirs(requester: Object) -> List[_Dir]:
    dirs = []
    if not requester.info.runpath:
        obj = requester
        while obj is not None:
            if not obj.info.runpath:
                dirs += _expand(obj, obj.info.rpath)
            obj = obj.parent
    return dirs + _expand(requester, requester.info.runpath)


def resolve(program: str, program_guest: str, trees=(HOST,), conf_dirs=(), default_dirs=DEFAULT_DIRS) -> Closure:
    """The closure of the dynamically linked ``program`` (a host path) that runs in the image at
    ``program_guest``. Names nothing provides are listed in ``missing`` (see :func:`missing_line`);
    a program that is not an x86-64 ELF raises TdxError."""
    trees = list(trees)
    exe = Object(os.path.normpath(program_guest), os.path.abspath(program), HOST, read_elf(program, "program"))
    members: Dict[str, Member] = {}
    by_name: Dict[str, Object] = {}
    by_guest: Dict[str, Object] = {}
    loaded, missing = [], []
    label = os.path.basename(program)

    def admit(links, member, info, parent, name, enqueue=True, found_in=None):
        if found_in is not None and found_in.cached:  # the image's loader would not look there
            alias = os.path.join(default_dirs[0], name)
            members.setdefault(alias, Member(alias, found_in.tree or HOST, "", link=os.path.join(found_in.guest, name)))
        for link in links:
            members.setdefault(link.guest, link)
        if member.guest in by_guest:
            obj = by_guest[member.guest]
        else:
            members.setdefault(member.guest, member)
            obj = Object(member.guest, member.host, member.tree, info, parent)
            by_guest[member.guest] = obj
            if enqueue:
                queue.append(obj)
        by_name.setdefault(name, obj)
        if obj.info.soname:
            by_name.setdefault(obj.info.soname, obj)
        return obj

    queue: List[Object] = []
    interpreter = exe.info.interpreter
    if interpreter is not None:
        if not interpreter.startswith("/"):
            raise TdxError(f"program: {program} names a relative interpreter {interpreter!r}; relink it")
        interpreter = os.path.normpath(interpreter)
        hit = next(filter(None, (_candidate(tree, tree.host_path(interpreter), interpreter) for tree in trees)), None)
        if hit is None:
            missing.append((label, interpreter))
        else:
            admit(*hit, None, os.path.basename(interpreter), enqueue=False)  # it needs nothing itself
    queue.append(exe)
    index = 0
    while index < len(queue):
        obj = queue[index]
        index += 1
        for name in obj.info.needed:
            if name in by_name:
                loaded.append((obj.guest, name, by_name[name].guest))
                continue
            hit = _lookup(obj, name, trees, conf_dirs, default_dirs)
            requester = label if obj is exe else obj.guest
            if hit is None:
                if (requester, name) not in missing:
                    missing.append((requester, name))
                continue
            target = admit(*hit[:3], obj, name, found_in=hit[3])
            loaded.append((obj.guest, name, target.guest))
    return Closure(exe, interpreter, members, loaded, missing)


def _lookup(requester: Object, name: str, trees, conf_dirs, default_dirs):
    if "/" in name:  # a path: absolute in every tree, else from the working directory (not followed)
        if not name.startswith("/"):
            return None
        guest = os.path.normpath(name)
        hit = next(filter(None, (_candidate(t, t.host_path(guest), guest) for t in trees)), None)
        return hit + (None,) if hit else None
    dirs = _search_dirs(requester)
    if not requester.info.nodeflib:
        dirs += [_Dir(d, cached=d not in default_dirs) for d in conf_dirs] + [_Dir(d) for d in default_dirs]
    for index, tree in enumerate(trees):
        for directory in dirs:
            if directory.host is not None:
                if index == 0:
                    hit = _candidate(directory.tree, os.path.join(directory.host, name),
                                     os.path.join(directory.guest, name))
                else:
                    continue
            else:
                guest = os.path.join(directory.guest, name)
                hit = _candidate(tree, tree.host_path(guest), guest)
                directory = dataclasses.replace(directory, tree=tree)
            if hit is not None:
                return hit + (directory,)
    return None


def missing_list(missing) -> str:
    """``name (needed by who), ...`` of the (requester, name) pairs nothing provides."""
    return ", ".join(f"{name} (needed by {who})" for who, name in missing)


def missing_line(what: str, missing) -> str:
    """One line naming each missing library, who needs it, and the two ways to provide it."""
    return (f"{what}: shared libraries not found: {missing_list(missing)}; install them on the host (apt-get "
            f"install the package that holds them) or name that package in TdxProgram(..., libs=['apt:PACKAGE'])")
