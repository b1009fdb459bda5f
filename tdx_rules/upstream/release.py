"""A Debian-style archive's ``Release`` file: the signed list of its indexes' hashes.

The format is Debian's (https://wiki.debian.org/DebianRepository/Format, "Release files"):
RFC 822 fields, ``Date`` and ``Valid-Until`` in RFC 2822 time, and multi-line fields ``SHA256``
(and older ``MD5Sum``/``SHA1``) whose lines are ``<hex> <size> <path>`` relative to the suite's
directory. Only the SHA-256 entries are used. The text parsed here is what gpgv printed as the
signed content, never the raw download, so nothing outside the signature is read.
"""

import datetime
import email.utils
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import TdxError

_HASH_LINE = re.compile(r"^\s+([0-9a-fA-F]{64})\s+(\d+)\s+(\S+)\s*$")


@dataclass(frozen=True)
class Release:
    fields: Dict[str, str]
    sha256: Dict[str, Tuple[str, int]]   # path below the suite -> (hex, size)
    valid_until: Optional[datetime.datetime]


def parse_release(text: bytes, what: str) -> Release:
    """The fields and SHA-256 entries of a Release file."""
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise TdxError(f"{what}: not UTF-8 text; not a Release file") from None
    fields, sha256, current = {}, {}, None
    for line in lines:
        if not line.strip():
            continue
        if line[0] in " \t":
            if current == "SHA256":
                match = _HASH_LINE.match(line)
                if not match:
                    raise TdxError(f"{what}: malformed SHA256 line {line.strip()[:80]!r}")
                sha256[match.group(3)] = (match.group(1).lower(), int(match.group(2)))
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise TdxError(f"{what}: malformed line {line[:80]!r}; not a Release file")
        current = key.strip()
        fields[current] = value.strip()
    valid_until = None
    if fields.get("Valid-Until"):
        try:
            valid_until = email.utils.parsedate_to_datetime(fields["Valid-Until"])
        except (TypeError, ValueError):
            raise TdxError(f"{what}: Valid-Until {fields['Valid-Until']!r} is not a date") from None
        if valid_until.tzinfo is None:
            valid_until = valid_until.replace(tzinfo=datetime.timezone.utc)
    return Release(fields, sha256, valid_until)


def check_current(release: Release, what: str, now: Optional[datetime.datetime] = None) -> None:
    """TdxError when the Release's ``Valid-Until`` has passed (a replayed, stale archive state)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if release.valid_until is not None and now > release.valid_until:
        raise TdxError(f"{what}: expired (Valid-Until {release.fields['Valid-Until']}); the mirror serves a stale "
                       "archive: use an up-to-date mirror")
