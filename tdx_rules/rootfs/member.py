"""One entry of a container image layer, whatever its source, and the entry types of the model.

A :class:`Member` is what a layer reader (:mod:`tdx_rules.rootfs.layers`) yields for a tar
header or a directory entry. Whiteouts (``.wh.NAME``, the opaque marker ``.wh..wh..opq``)
are ordinary members here; :mod:`tdx_rules.rootfs.tree` gives them their meaning.
"""

import dataclasses
from typing import Dict, Tuple

# Entry types of the model.
FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "file", "dir", "symlink", "hardlink", "char", "block", "fifo"
TYPES = (FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclasses.dataclass(slots=True)
class Member:
    """One entry of a layer, whatever its source (tar header or directory entry).

    ``name`` is relative to the image root and not yet checked; whiteouts are
    ordinary members whose last component starts with ``.wh.``.
    """

    name: str
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    rdev: Tuple[int, int] = (0, 0)
    linkname: str = ""
    size: int = 0
    xattrs: Dict[str, bytes] = dataclasses.field(default_factory=dict)
