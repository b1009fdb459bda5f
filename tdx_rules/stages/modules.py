"""Stage: the kernel-module bundle (TDX guest driver, vsock) as a fragment.

Reads each module's own ``.modinfo`` ELF section for its ``depends=`` list and
resolves the full dependency closure without running ``depmod``. The fragment
holds, under ``lib/modules/<release>/``:

* every bundled module, decompressed to a plain ``.ko`` (mode 0644) at its
  original relative directory, so busybox ``modprobe``/``insmod`` needs no
  decompression support; module files named in ``kernel_modules`` go to
  ``extra/``;
* ``modules.dep`` in depmod's format: ``path/a.ko: path/b.ko path/c.ko`` lists
  a module's whole dependency chain, nearest first and deepest last (modprobe
  loads the list from its end, then the module itself);
* ``tdx-rules.load``: the canonical names of all bundled modules, one a line,
  in load order (dependencies first), for the init script's ``modprobe``.

Memory stays bounded: decompression streams in 1 MiB chunks into a temporary
file (beside the output in :func:`bundle`, anonymous in :func:`read_modinfo`)
and stops at :data:`MAX_MODULE_SIZE`; the ELF parser then seeks in that file
and reads only the section headers, the section-name table and ``.modinfo``
(a few KB). No module is ever held in memory whole.
"""

import argparse
import contextlib
import gzip
import hashlib
import heapq
import io
import lzma
import os
import stat
import struct
import sys
import tempfile
import zlib

import zstandard

from ..errors import TdxError
from ..fsutil import CACHE_PREFIX, CHUNK, read_json_object, resolve_recorded, sha256_file, write_json
from ..initramfs import newc
from ._entry import remote_arguments, run

# The modules a TDX guest needs for attestation (configfs-tsm, tdx_guest) and
# for talking to the host over virtio-vsock.
TDX_MODULES = ["configfs", "tsm", "tdx_guest", "vsock", "vmw_vsock_virtio_transport",
               "vmw_vsock_virtio_transport_common"]

SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
# The largest in-tree module (amdgpu) is about 30 MB decompressed.
MAX_MODULE_SIZE = 256 << 20
LOAD_FILE = "tdx-rules.load"

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SHT_NOBITS = 8
_SHN_XINDEX = 0xFFFF
_MAX_SECTIONS = 1 << 16


def canonical(name: str) -> str:
    """The kernel treats '-' and '_' in module names as the same character."""
    return name.replace("-", "_")


def module_suffix(filename: str):
    """The module suffix of ``filename`` (``.ko``, ``.ko.xz`` ...), or None."""
    for suffix in SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return suffix
    return None


def _stem(filename: str) -> str:
    return filename[: -len(module_suffix(filename))]


# --- reading modules -------------------------------------------------------

@contextlib.contextmanager
def _open_decompressed(path):
    """A binary stream of the module's plain ELF bytes, chosen by file suffix."""
    suffix = module_suffix(os.path.basename(path))
    with open(path, "rb") as raw:
        if suffix == ".ko.xz":
            with lzma.open(raw) as stream:
                yield stream
        elif suffix == ".ko.gz":
            with gzip.open(raw) as stream:
                yield stream
        elif suffix == ".ko.zst":
            with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                yield stream
        else:
            yield raw


def decompress(path, out) -> str:
    """Stream the plain bytes of module ``path`` into ``out``; return their SHA-256.

    Raises TdxError for corrupt compressed data or a module over MAX_MODULE_SIZE.
    """
    digest = hashlib.sha256()
    total = 0
    try:
        with _open_decompressed(path) as stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > MAX_MODULE_SIZE:
                    raise TdxError(f"kernel module {path} decompresses to more than {MAX_MODULE_SIZE >> 20} MiB; "
                                   "it is not a kernel module, remove it")
                digest.update(chunk)
                out.write(chunk)
    except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, EOFError) as error:
        raise TdxError(f"kernel module {path} is not valid compressed data ({error}); "
                       "replace the file with an intact copy") from None
    except OSError as error:
        raise TdxError(f"cannot read kernel module {path}: {error.strerror or error}") from None
    return digest.hexdigest()


def _read_exact(handle, offset: int, size: int, label: str, what: str) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise TdxError(f"kernel module {label} is corrupt: its {what} runs past the end of the file")
    return data


def parse_modinfo(handle, label: str) -> dict:
    """Parse the ``.modinfo`` section of the ELF64 little-endian file open as ``handle``.

    Every offset and size is checked against the file size, so malformed input
    raises TdxError (naming ``label``), never struct.error or IndexError.
    """
    size = handle.seek(0, io.SEEK_END)
    bad = f"kernel module {label} is not a 64-bit little-endian ELF file; replace it with a real .ko module"
    if size < _ELF_HEADER.size:
        raise TdxError(bad)
    header = _ELF_HEADER.unpack(_read_exact(handle, 0, _ELF_HEADER.size, label, "ELF header"))
    ident, shoff, shentsize, shnum, shstrndx = header[0], header[6], header[11], header[12], header[13]
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise TdxError(bad)

    def section(index):
        offset = shoff + index * shentsize
        return _SECTION.unpack(_read_exact(handle, offset, _SECTION.size, label, "section header table"))

    if shoff == 0 or shentsize < _SECTION.size or shoff > size:
        raise TdxError(f"kernel module {label} is corrupt: it has no valid ELF section header table")
    if shnum == 0 or shstrndx == _SHN_XINDEX:  # extended numbering: the real values live in section 0
        first = section(0)
        shnum = shnum or first[5]
        if shstrndx == _SHN_XINDEX:
            shstrndx = first[6]
    if shnum > _MAX_SECTIONS or shoff + shnum * shentsize > size:
        raise TdxError(f"kernel module {label} is corrupt: its section header table runs past the end of the file")
    if shstrndx >= shnum:
        raise TdxError(f"kernel module {label} is corrupt: its section-name table index {shstrndx} is out of range")
    sections = [section(index) for index in range(shnum)]

    def body(entry, what):
        _, sh_type, _, _, offset, length = entry[:6]
        if sh_type == _SHT_NOBITS or offset > size or length > size - offset:
            raise TdxError(f"kernel module {label} is corrupt: its {what} section lies outside the file")
        return _read_exact(handle, offset, length, label, what)

    names = body(sections[shstrndx], "section-name")
    for entry in sections:
        start = entry[0]
        end = names.find(b"\0", start) if start < len(names) else -1
        if end >= 0 and names[start:end] == b".modinfo":
            data = body(entry, ".modinfo")
            break
    else:
        raise TdxError(f"kernel module {label} has no .modinfo section; it is not a kernel module")

    info = {}
    for item in data.split(b"\0"):
        if not item:
            continue  # padding between entries
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise TdxError(f"kernel module {label} is corrupt: malformed .modinfo entry {item[:40]!r}")
        info.setdefault(key.decode("utf-8", "replace"), []).append(value.decode("utf-8", "replace"))
    return info


def parse_modinfo_bytes(data: bytes, label: str = "<bytes>") -> dict:
    """:func:`parse_modinfo` over an in-memory ELF image."""
    return parse_modinfo(io.BytesIO(data), label)


def read_modinfo(path) -> dict:
    """The ``.modinfo`` key/values of a module file (.ko, .ko.xz, .ko.zst or .ko.gz).

    Compressed modules are streamed into an anonymous temporary file first.
    """
    path = os.fspath(path)
    if module_suffix(os.path.basename(path)) in (None, ".ko"):
        try:
            with open(path, "rb") as handle:
                return parse_modinfo(handle, path)
        except OSError as error:
            raise TdxError(f"cannot read kernel module {path}: {error.strerror or error}") from None
    with tempfile.TemporaryFile() as plain:
        decompress(path, plain)
        return parse_modinfo(plain, path)


def depends(info: dict) -> list:
    """The canonical names in a module's ``depends=`` field."""
    names = []
    for value in info.get("depends", []):
        names.extend(canonical(part.strip()) for part in value.split(",") if part.strip())
    return names


# --- the module tree -------------------------------------------------------

def index_tree(modules_root) -> dict:
    """Map canonical module name -> path relative to ``modules_root`` (``lib/modules/<release>``).

    Names listed in ``modules.builtin`` but without a module file map to None:
    built into the kernel, satisfied, nothing to ship. When two files carry
    the same name, one under ``updates/`` wins, else the first in sorted order.
    """
    modules_root = os.fspath(modules_root)
    if not os.path.isdir(modules_root):
        raise TdxError(f"kernel modules directory {modules_root} does not exist; check the kernel input")
    found = {}
    for top, dirs, files in os.walk(modules_root):  # does not descend into the build/source symlinks
        dirs.sort()
        for filename in sorted(files):
            if module_suffix(filename) is None:
                continue
            rel = os.path.relpath(os.path.join(top, filename), modules_root).replace(os.sep, "/")
            name = canonical(_stem(filename))
            old = found.get(name)
            if old is None or (rel.startswith("updates/") and not old.startswith("updates/")):
                found[name] = rel
    index = {}
    builtin_list = os.path.join(modules_root, "modules.builtin")
    if os.path.isfile(builtin_list):
        with open(builtin_list, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if line and module_suffix(os.path.basename(line)):
                    index[canonical(_stem(os.path.basename(line)))] = None
    index.update(found)
    return index


def closure(wanted, index, modinfo_reader) -> list:
    """All modules needed by ``wanted``, dependencies before dependents.

    ``index`` maps canonical name -> location (None: built in, needs nothing);
    ``modinfo_reader(name)`` returns that module's modinfo dict. Built-in
    modules are left out of the result. Ties are broken by name, so the order
    is deterministic.
    """
    deps = {}
    stack = sorted({canonical(name) for name in wanted}, reverse=True)
    for name in stack:
        if name not in index:
            raise TdxError(f"module {name} is not in the kernel module tree: check the name")
    while stack:
        name = stack.pop()
        if name in deps:
            continue
        if index[name] is None:
            deps[name] = []
            continue
        mine = sorted(set(depends(modinfo_reader(name))) - {name})
        for dep in mine:
            if dep not in index:
                raise TdxError(f"module {name} ({index[name]}) depends on module {dep}, which is not in the "
                               f"kernel module tree: add {dep}'s .ko file to kernel_modules")
        deps[name] = mine
        stack.extend(dep for dep in reversed(mine) if dep not in deps)
    # Kahn's algorithm with a heap: of all modules whose dependencies are placed, the smallest name goes next.
    waiting = {name: len(mine) for name, mine in deps.items()}
    users = {name: [] for name in deps}
    for name, mine in deps.items():
        for dep in mine:
            users[dep].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(deps):
        stuck = sorted(name for name, count in waiting.items() if count)
        raise TdxError(f"modules {', '.join(stuck)} depend on each other in a cycle; the kernel module tree is broken")
    return [name for name in order if index[name] is not None]


def dependency_chains(order, deps) -> dict:
    """For each module in ``order``: its whole dependency chain as depmod lists it.

    ``deps`` maps name -> direct dependencies. The chain is sorted by reverse
    load order (nearest first, deepest last); modprobe loads it from the end.
    """
    position = {name: i for i, name in enumerate(order)}
    chains = {}
    for name in order:  # dependencies come first, so their chains are known
        chain = set()
        for dep in deps.get(name, ()):
            if dep in position:
                chain.add(dep)
                chain.update(chains[dep])
        chains[name] = sorted(chain, key=lambda n: -position[n])
    return chains


# --- the bundle ------------------------------------------------------------

def _is_path(spec: str) -> bool:
    """A kernel_modules entry naming a file (module names never hold '/' or '.ko')."""
    return "/" in spec or ".ko" in spec


class _Source:
    """Where a bundled module comes from and where it goes in the image."""

    def __init__(self, src, dest):
        self.src = src    # absolute path of the (possibly compressed) module file
        self.dest = dest  # path relative to lib/modules/<release>, ending in .ko
        self.plain = None
        self.sha256 = None
        self.info = None


def bundle(modules_root, release, default_modules, user_modules, out_fragment, out_info) -> dict:
    """Write the module fragment and its info JSON; return the info as a dict.

    ``default_modules`` that are neither in the tree nor built in are warned
    about on stderr; a missing ``user_modules`` entry is an error.
    """
    if not isinstance(release, str) or not release or "/" in release or release in (".", ".."):
        raise TdxError(f"kernel release {release!r} is not a valid directory name; check the kernel stage output")
    user_modules = list(user_modules or [])
    info = {"release": release, "bundled": [], "missing_defaults": [], "builtin": []}
    if modules_root is None:
        if user_modules:
            raise TdxError(f"kernel {release} has no loadable modules, but kernel_modules asks for "
                           f"{', '.join(user_modules)}: use a kernel built with modules or drop kernel_modules")
        newc.write_fragment(out_fragment, [])
        write_json(out_info, info)
        return info

    modules_root = os.path.abspath(modules_root)
    index = index_tree(modules_root)
    sources = {name: _Source(os.path.join(modules_root, rel), rel[: -len(module_suffix(rel))] + ".ko")
               for name, rel in index.items() if rel is not None}
    wanted, builtin, missing = set(), set(), []
    for name in default_modules:
        name = canonical(name)
        if name not in index:
            missing.append(name)
        elif index[name] is None:
            builtin.add(name)
        else:
            wanted.add(name)

    tmp_parent = os.path.dirname(os.path.abspath(out_fragment))
    os.makedirs(tmp_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".modules.", dir=tmp_parent) as tmp:
        user_dests, user_names = {}, set()
        for spec in user_modules:
            if not isinstance(spec, str) or not spec:
                raise TdxError(f"kernel_modules entry {spec!r} is not a module name or a .ko file path")
            if not _is_path(spec):
                name = canonical(spec)
                if name not in index:
                    raise TdxError(f"module {spec} not found in kernel {release}: check the name or add its .ko "
                                   "file to kernel_modules")
                (builtin if index[name] is None else wanted).add(name)
                continue
            path = os.path.abspath(spec)
            filename = os.path.basename(path)
            if module_suffix(filename) is None or not os.path.isfile(path):
                raise TdxError(f"kernel module file {spec} does not exist or is not a .ko/.ko.xz/.ko.zst/.ko.gz "
                               "file: fix the path in kernel_modules")
            dest = "extra/" + _stem(filename) + ".ko"
            if dest in user_dests:
                raise TdxError(f"kernel_modules lists two files named {_stem(filename)}.ko ({user_dests[dest]} and "
                               f"{spec}): rename one")
            user_dests[dest] = spec
            source = _Source(path, dest)
            _materialize(source, tmp)
            source.info = parse_modinfo_file(source)
            name = canonical((source.info.get("name") or [_stem(filename)])[0])
            vermagic = (source.info.get("vermagic") or [""])[0].split()
            if vermagic and vermagic[0] != release:
                raise TdxError(f"kernel module file {spec} was built for kernel {vermagic[0]}, not {release}: "
                               f"rebuild it against {release}")
            if index.get(name, "") is None:
                raise TdxError(f"kernel module file {spec} is module {name}, which is built into kernel {release}: "
                               "drop it from kernel_modules")
            if name in user_names:
                raise TdxError(f"kernel_modules lists two files for module {name} (the second is {spec}): keep one")
            user_names.add(name)
            index[name] = dest  # a module file given by the user replaces the tree's module of that name
            sources[name] = source
            wanted.add(name)

        def reader(name):
            source = sources[name]
            if source.info is None:
                _materialize(source, tmp)
                source.info = parse_modinfo_file(source)
            return source.info

        order = closure(sorted(wanted), index, reader)
        deps = {name: depends(sources[name].info) for name in order}
        chains = dependency_chains(order, deps)
        prefix = f"lib/modules/{release}/"
        entries = {}
        dep_lines = []
        for name in order:
            source = sources[name]
            if any(ch.isspace() or ch == ":" for ch in source.dest):
                raise TdxError(f"kernel module {source.src} has a space or ':' in its path, which modules.dep "
                               "cannot hold: rename it")
            if prefix + source.dest in entries:
                raise TdxError(f"kernel module {source.src} would overwrite another bundled module at "
                               f"{source.dest}: rename it")
            entries[prefix + source.dest] = newc.disk_file(prefix + source.dest, source.plain, mode=0o644)
            dep_lines.append(f"{source.dest}:" + "".join(" " + sources[d].dest for d in chains[name]) + "\n")
            info["bundled"].append({"name": name, "path": prefix + source.dest, "sha256": source.sha256})
        entries[prefix + "modules.dep"] = newc.blob(prefix + "modules.dep", "".join(dep_lines).encode())
        entries[prefix + LOAD_FILE] = newc.blob(prefix + LOAD_FILE, "".join(n + "\n" for n in order).encode())
        for name in list(entries):
            parent = os.path.dirname(name)
            while parent and parent not in entries:
                entries[parent] = newc.directory(parent)
                parent = os.path.dirname(parent)
        ordered = [entries[name] for name in sorted(entries, key=lambda n: n.encode("utf-8", "surrogateescape"))]
        newc.write_fragment(out_fragment, ordered)

    info["missing_defaults"] = sorted(set(missing))
    info["builtin"] = sorted(builtin)
    for name in info["missing_defaults"]:
        print(f"[tdx] warning: module {name} not found in {release}", file=sys.stderr)
    write_json(out_info, info)
    return info


def _materialize(source: _Source, tmp: str) -> None:
    """Give ``source`` a plain .ko on disk (decompressed into ``tmp`` if needed) and its SHA-256."""
    if source.plain is not None:
        return
    if module_suffix(os.path.basename(source.src)) == ".ko":
        try:
            st = os.stat(source.src)
        except OSError as error:
            raise TdxError(f"cannot read kernel module {source.src}: {error.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise TdxError(f"kernel module {source.src} is not a regular file: fix kernel_modules")
        source.plain = source.src
        source.sha256 = sha256_file(source.src)
        return
    fd, plain = tempfile.mkstemp(suffix=".ko", dir=tmp)
    with os.fdopen(fd, "wb") as out:
        source.sha256 = decompress(source.src, out)
    source.plain = plain


def parse_modinfo_file(source: _Source) -> dict:
    with open(source.plain, "rb") as handle:
        return parse_modinfo(handle, source.src)


# --- command line ----------------------------------------------------------

def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.modules",
                                     description="Bundle the kernel modules a TDX guest needs as a newc fragment.")
    parser.add_argument("--config", required=True, help='stage config JSON: {"kernel_modules": [...]}')
    parser.add_argument("--kernel-info", required=True, help='kernel stage JSON: {"release", "modules_root"}')
    parser.add_argument("--out", required=True, help="fragment to write")
    parser.add_argument("--info", required=True, help="info JSON to write")
    parser.add_argument("--cache", default=None, help="download cache (resolves cache: paths of the kernel info)")
    parser.add_argument("--mirror", default="", help="unused here; accepted like every fetching stage")
    parser.add_argument("--keyring", default="", help="unused here; accepted like every fetching stage")
    parser.add_argument("--snapshot", default="", help="unused here; accepted like every fetching stage")
    parser.add_argument("--refresh", action="store_true", help="unused here; accepted like every fetching stage")
    remote_arguments(parser, used=False)
    args = parser.parse_args(argv)
    config = read_json_object(args.config, "module stage config", "rebuild it")
    kernel = read_json_object(args.kernel_info, "kernel info", "rebuild it")
    user = config.get("kernel_modules") or []
    if not isinstance(user, list) or not all(isinstance(item, str) for item in user):
        raise TdxError(f"kernel_modules in {args.config} must be a list of module names or .ko file paths")
    release = kernel.get("release")
    root = kernel.get("modules_root")
    if root is not None and not isinstance(root, str):
        raise TdxError(f"modules_root in {args.kernel_info} must be a directory path or null; rebuild the kernel stage")
    if root is not None and root.startswith(CACHE_PREFIX):
        if not args.cache:
            raise TdxError(f"{args.kernel_info} names a kernel tree in the download cache; pass --cache")
        root = resolve_recorded(root, args.cache)
        if not os.path.isdir(root):
            raise TdxError(f"the kernel's modules tree {root} is not in the download cache (the kernel stage was "
                           "probably retrieved from a CacheDir without its download cache): restore the download "
                           "cache together with the CacheDir, or rebuild the kernel stage with "
                           "`scons --cache-disable <image>-kernel`")
    network = config.get("network_modules") or []
    if not isinstance(network, list) or not all(isinstance(item, str) for item in network):
        raise TdxError(f"network_modules in {args.config} must be a list of module names; regenerate the config")
    bundle(root, release, TDX_MODULES + network, user, args.out, args.info)


if __name__ == "__main__":
    run(main)
