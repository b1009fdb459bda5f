"""``tdx.lock``: every upstream input of every image, resolved once and pinned by SHA-256.

The file (JSON, sorted keys, one entry a line, so diffs read well) beside the SConstruct:

    {"version": 1, "locked": "20261201T235900Z",
     "specs": {"<spec as the SConstruct gives it>": [<file>, ...], ...}}

where each file is what the spec resolved to when the lock was written: ``spec`` (the spec of
that download: a named upstream, or an ``apt:`` package a spec led to), ``file``, ``sha256``,
``size``, ``url`` (where it came from), for ``apt:`` packages ``package`` and ``version``, and
``snapshot`` (``archive`` and ``path``): where the snapshot archive of its distribution keeps the
same file, for when the archive or the host's apt no longer offers it. ``locked`` is when the
specs were resolved (the snapshot time); it changes only when a spec's files do.

``scons --tdx-lock`` writes or refreshes the lock (resolving every spec as a build without a lock
does, signatures included). A build with a lock uses exactly the locked files, verified by
SHA-256, without fetching an index; a spec missing from the lock stops the build with one line.
``file:`` specs are the user's own files and are not locked.
"""

import datetime
import json
import os
from typing import Dict, List, Optional

from ..errors import TdxError
from ..fsutil import atomic_output

LOCK_NAME = "tdx.lock"
VERSION = 1
# The snapshot archives a locked file falls back to, by the archive it came from; TDX_SNAPSHOT
# (``name=URL,...``) overrides them.
SNAPSHOT_BASES = {"debian": "https://snapshot.debian.org/archive/debian",
                  "debian-security": "https://snapshot.debian.org/archive/debian-security",
                  "ubuntu": "https://snapshot.ubuntu.com/ubuntu"}
_FIELDS = ("spec", "file", "sha256", "size", "url", "package", "version", "snapshot")


def snapshot_bases(value: Optional[str]) -> Dict[str, str]:
    """:data:`SNAPSHOT_BASES` with the overrides of a ``TDX_SNAPSHOT`` value."""
    bases = dict(SNAPSHOT_BASES)
    for item in (value or "").split(","):
        if item.strip():
            name, sep, url = item.partition("=")
            if not sep or not url.strip():
                raise TdxError(f"TDX_SNAPSHOT: {item!r} is not NAME=URL (e.g. ubuntu=https://snapshot.ubuntu.com/ubuntu)")
            bases[name.strip()] = url.strip().rstrip("/")
    return bases


def read_lock(path: str) -> Optional[dict]:
    """The lock at ``path``, checked; None when there is none."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            lock = json.load(handle)
    except (OSError, ValueError) as error:
        raise TdxError(f"{path}: not a readable lock file ({error}); run scons --tdx-lock to write it again") from None
    if not isinstance(lock, dict) or lock.get("version") != VERSION or not isinstance(lock.get("specs"), dict) \
            or not isinstance(lock.get("locked"), str):
        raise TdxError(f"{path}: not a version-{VERSION} tdx.lock; run scons --tdx-lock to write it again")
    for spec, files in lock["specs"].items():
        if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("sha256"), str)
                                                  and isinstance(f.get("spec"), str) for f in files):
            raise TdxError(f"{path}: the entry of {spec!r} is damaged; run scons --tdx-lock to write it again")
    return lock


def entry(lock: dict, spec: str, path: str, where: str) -> dict:
    """What a stage needs to resolve ``spec`` from the lock: its files and the lock's time."""
    files = lock["specs"].get(spec)
    if files is None:
        raise TdxError(f"{where}: {spec} is not in {path} (the SConstruct changed since it was written); "
                       "run scons --tdx-lock to refresh the lock")
    return {"locked": lock["locked"], "files": files}


def lock_record(record: dict) -> dict:
    return {key: record[key] for key in _FIELDS if record.get(key) is not None}


def build_lock(resolved: Dict[str, List[dict]], previous: Optional[dict],
               now: Optional[datetime.datetime] = None) -> dict:
    """The lock of ``resolved`` ({spec: the records its stage wrote}); keeps the previous lock's
    time when no spec's files changed (refreshing an unchanged lock changes nothing)."""
    specs = {spec: [lock_record(r) for r in records if not str(r.get("spec", "")).startswith("file:")]
             for spec, records in sorted(resolved.items()) if not spec.startswith("file:")}
    if previous is not None and previous.get("specs") == specs:
        return previous
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return {"version": VERSION, "locked": now.strftime("%Y%m%dT%H%M%SZ"), "specs": specs}


def render(lock: dict) -> str:
    return json.dumps(lock, indent=1, sort_keys=True) + "\n"


def write_or_check(path: str, infos: Dict[str, str], check: bool) -> Optional[str]:
    """Write the lock of ``infos`` ({spec: its stage's info JSON}) to ``path``; with ``check``, only
    compare: None when the lock is current, else one line saying what differs."""
    resolved = {}
    for spec, info_path in infos.items():
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        resolved[spec] = info.get("inputs", [])
        if info.get("inputs_by_spec"):  # a stage of several specs (ssh): each spec takes its own records
            resolved[spec] = [record for record in resolved[spec] if record.get("spec") == spec]
    previous = read_lock(path)
    lock = build_lock(resolved, previous)
    if check:
        if previous is None:
            return f"{path} does not exist; run scons --tdx-lock (or tdx-rules lock) to write it"
        if lock is not previous:
            changed = sorted(set(lock["specs"]) ^ set(previous["specs"]) | {
                spec for spec in lock["specs"] if lock["specs"][spec] != previous["specs"].get(spec)})
            return f"{path} is not current: {', '.join(changed)} resolve to other files now; run tdx-rules lock"
        return None
    if lock is not previous:
        with atomic_output(path, "w") as handle:
            handle.write(render(lock))
    return None
