"""What differs between two images or two manifests: the first thing to run when a
measurement does not match.

Images are compared member by member (type, mode, owner, size, link target, device
number and the SHA-256 of file contents); manifests key by key, with the measurement
events compared position by position so the first differing event is named.
"""

import json
from typing import List

from ..errors import TdxError
from ..fsutil import read_json_object
from ..initramfs import archive

FIELDS = ("kind", "mode", "uid", "gid", "size", "target", "rdev", "sha256")


def is_manifest(path) -> bool:
    """A manifest is a JSON object file; anything else is read as an image."""
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == b"{"
    except OSError as error:
        raise TdxError(f"{path}: cannot read: {error.strerror}") from None


def _listing(path) -> dict:
    found = {}
    for member in archive.members(path, with_hash=True):
        found[member.path.lstrip("/").removeprefix("./") or "."] = member  # a later duplicate wins, as in the kernel
    return found


def _describe(name, value):
    if name == "mode":
        return f"{value:o}"
    return str(value)


def diff_images(a, b) -> List[str]:
    """Lines ``+ path``, ``- path`` and ``~ path: field old -> new, ...``, sorted by path."""
    left, right = _listing(a), _listing(b)
    lines = []
    for path in sorted(set(left) | set(right)):
        if path not in left:
            lines.append(f"+ {path}")
        elif path not in right:
            lines.append(f"- {path}")
        else:
            changes = []
            for field in FIELDS:
                old, new = getattr(left[path], field), getattr(right[path], field)
                if old != new:
                    changes.append(f"{field} {_describe(field, old)} -> {_describe(field, new)}")
            if changes:
                lines.append(f"~ {path}: " + ", ".join(changes))
    return lines


def _load_manifest(path) -> dict:
    return read_json_object(path, "manifest", "give a <name>-manifest.json written by the image rule")


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for key in value:
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and prefix == "outputs":
        for item in value:
            if isinstance(item, dict) and "path" in item:
                _flatten({k: v for k, v in item.items() if k != "path"}, f"outputs[{item['path']}]", out)
    elif isinstance(value, list) and value and all(isinstance(item, (dict, list)) for item in value):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}[{index}]", out)
    else:
        out[prefix] = value


def diff_manifests(a, b) -> List[str]:
    """Lines naming each changed, added or removed key; measurement events come with their
    register and description so a mismatching event can be told at once."""
    left, right = {}, {}
    _flatten(_load_manifest(a), "", left)
    _flatten(_load_manifest(b), "", right)
    lines = []
    for key in sorted(set(left) | set(right), key=_order):
        old, new = left.get(key, _ABSENT), right.get(key, _ABSENT)
        if old == new:
            continue
        label = key
        if key.startswith("measurements.events[") and key.endswith(".digest"):
            event = key[:-len(".digest")]
            register = right.get(f"{event}.register", left.get(f"{event}.register"))
            description = right.get(f"{event}.description", left.get(f"{event}.description"))
            label = f"{key} (RTMR[{register}] {description})"
        if old is _ABSENT:
            lines.append(f"+ {label}: {_show(new)}")
        elif new is _ABSENT:
            lines.append(f"- {label}: {_show(old)}")
        else:
            lines.append(f"~ {label}: {_show(old)} -> {_show(new)}")
    return lines


class _Absent:
    pass


_ABSENT = _Absent()
_SECTIONS = ("name", "settings", "inputs", "lock", "initramfs", "launch", "measurements", "rootfs", "outputs")


def _order(key: str):
    section = key.split(".", 1)[0].split("[", 1)[0]
    rank = _SECTIONS.index(section) if section in _SECTIONS else len(_SECTIONS)
    # events in measurement order, not string order
    if key.startswith("measurements.events["):
        index = int(key[len("measurements.events["):].split("]", 1)[0])
        return rank, "measurements.events", index, key
    return rank, key, 0, key


def _show(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
