"""The download and artifact cache shared by every project on the machine.

Layout (see fetch.py): ``sha256/<hex>/<name>`` pinned downloads, ``url/<key>/<name>``
checksum files and package indexes, ``apt/*.deb`` from apt-get download,
``kernels/<key>/`` unpacked kernels, ``rootfs/<key>.ext4`` container root filesystems,
``locks/`` lock files.
"""

import os
import shutil
import time
from typing import List, Tuple

AREAS = ("sha256", "url", "apt", "kernels", "rootfs")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for top, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def entries(cache: str) -> List[Tuple[str, int, float]]:
    """(path relative to the cache, bytes, mtime) of every entry, sorted by path."""
    found = []
    for area in AREAS:
        top = os.path.join(cache, area)
        if not os.path.isdir(top):
            continue
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if name.startswith(".") or name.endswith((".lock", ".part", ".tmp")):
                continue
            if area in ("sha256", "url") and os.path.isdir(path):
                for inner in sorted(os.listdir(path)):
                    if not inner.startswith("."):
                        full = os.path.join(path, inner)
                        found.append((os.path.relpath(full, cache), _size(full), os.path.getmtime(full)))
            else:
                found.append((os.path.relpath(path, cache), _size(path), os.path.getmtime(path)))
    return found


def clean(cache: str, older_than_days: float = 0) -> Tuple[int, int]:
    """Remove entries not modified for ``older_than_days`` (0: all); (entries, bytes) removed.

    Each entry is renamed aside before it is deleted, so a build reading it at that moment
    keeps its open file and a later build never sees half a directory.
    """
    cutoff = time.time() - older_than_days * 86400
    removed = freed = 0
    for relative, size, mtime in entries(cache):
        if older_than_days and mtime > cutoff:
            continue
        path = os.path.join(cache, relative)
        aside = os.path.join(os.path.dirname(path), f".removing-{os.getpid()}-{os.path.basename(path)}")
        try:
            os.replace(path, aside)
        except OSError:
            continue
        if os.path.isdir(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.unlink(aside)
        parent = os.path.dirname(path)
        if os.path.basename(os.path.dirname(parent)) in ("sha256", "url"):
            try:
                os.rmdir(parent)  # the now empty <hex>/ directory
            except OSError:
                pass
        removed += 1
        freed += size
    return removed, freed
