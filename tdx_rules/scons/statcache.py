"""A content decider that does not re-hash unchanged files on every run.

SCons's ``content`` decider re-reads every file younger than ``max_drift`` (two days) on
each run, and its ``content-timestamp`` decider trusts whole-second timestamps, which
miss a same-size edit within the second.  This decider keeps SCons's content semantics
and remembers, per file, the content signature SCons computed together with the file's
full stat (device, inode, size, mtime and ctime in nanoseconds).  A remembered signature
is reused only while that stat is unchanged and the file was last modified well before it
was hashed, so an edit landing in the same timestamp tick as the hashing is never mistaken
for "unchanged".  Filesystem timestamps come from a clock that ticks every few
milliseconds (``RACY_MARGIN_NS`` is ten ticks at HZ=100); a file whose times are whole
seconds may live on a filesystem that keeps only seconds (or two, as FAT does), and gets
``COARSE_RACY_MARGIN_NS``.

The cache is one JSON file beside the SConstruct (``.tdx-csig.json``), written atomically
at exit when it changed.
"""

import atexit
import json
import os
import time

import SCons.Node.FS

CACHE_NAME = ".tdx-csig.json"
RACY_MARGIN_NS = 100_000_000
COARSE_RACY_MARGIN_NS = 2_000_000_000
VERSION = 1

_caches = {}


class StatCache:
    """Remembered (stat, hashed_at, csig) per absolute path."""

    def __init__(self, path: str):
        self.path = path
        self.entries = {}
        self.dirty = False
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict) and data.get("version") == VERSION and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError):
            pass  # no cache, or an unreadable one: start empty

    def prime(self, node) -> None:
        """Give ``node`` its content signature from the cache, or hash it and remember it."""
        ninfo = node.get_ninfo()
        if getattr(ninfo, "csig", None):
            return
        path = node.get_abspath()
        try:
            st = os.stat(path)
        except OSError:
            return
        key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self.entries.get(path)
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == key and _settled(st, entry[1]):
            ninfo.csig = entry[2]
            return
        hashed_at = time.time_ns()
        csig = node.get_csig()
        if csig:
            self.entries[path] = [key, hashed_at, csig]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        alive = {path: entry for path, entry in self.entries.items() if os.path.exists(path)}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump({"version": VERSION, "files": alive}, handle, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self.dirty = False


def _settled(st, hashed_at: int) -> bool:
    """Whether the file's last change lies safely before ``hashed_at`` (nanoseconds)."""
    changed = max(st.st_mtime_ns, st.st_ctime_ns)
    coarse = st.st_mtime_ns % 1_000_000_000 == 0 or st.st_ctime_ns % 1_000_000_000 == 0
    return changed + (COARSE_RACY_MARGIN_NS if coarse else RACY_MARGIN_NS) <= hashed_at


def cache_for(directory: str) -> StatCache:
    path = os.path.join(directory, CACHE_NAME)
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = StatCache(path)
        atexit.register(cache.save)
    return cache


def decider(dependency, target, prev_ni, repo_node=None) -> bool:
    """SCons's ``content`` decision, with file signatures served from the stat cache."""
    if isinstance(dependency, SCons.Node.FS.File):
        top = dependency.fs.SConstruct_dir  # None when SCons runs without an SConstruct
        cache_for(top.get_abspath() if top is not None else os.getcwd()).prime(dependency)
    return dependency.changed_content(target, prev_ni, repo_node)
