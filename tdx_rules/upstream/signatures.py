"""OpenPGP signatures of the named upstreams, checked by ``gpgv`` (apt's own verifier) against
public keys pinned by fingerprint.

Which key may sign what (:data:`PINNED`), each fingerprint with its public source:

- ``ubuntu-kernel:``: the Ubuntu archive's automatic signing keys of 2012 and 2018, which sign
  the archive's ``InRelease`` / ``Release.gpg``. The keys ship in ``keys/ubuntu-archive.gpg``,
  exported from Debian's ``ubuntu-keyring`` package (2023.11.28.1-0.2, its
  ``ubuntu-archive-keyring.gpg``); the fingerprints are those Ubuntu lists on
  https://wiki.ubuntu.com/SecurityTeam/FAQ ("ftpmaster@ubuntu.com").
- ``alpine:``: Alpine's release signing key (Natanael Copa), which signs every release file's
  detached ``.asc``; its fingerprint is the one https://alpinelinux.org/downloads/ publishes
  (the key is https://alpinelinux.org/keys/ncopa.asc). The key ships in ``keys/alpine-release.gpg``
  (exported minimal: the primary key, its user ID and encryption subkey); the fingerprint check
  below, not where the file came from, is what makes it Alpine's.
- ``canonical-ovmf:``: the signing key of Canonical's TDX PPA (kobuk-team/tdx-release). No
  public source of its fingerprint was found, so none is pinned: the key is a required setting
  (``TDX_RULES_KEYRING``) rather than whatever key the PPA serves.

``TDX_RULES_KEYRING`` (and the construction variable ``TDX_KEYRING``) names extra public key
files, armored or binary, colon-separated: trusted for every upstream, in addition to the pinned
keys, never instead of them. A mirror (``TDX_RULES_MIRROR``) changes where files come from, never
which keys are trusted.

A signature is accepted when gpgv reports a valid signature (VALIDSIG) whose primary key is a
pinned one or one of the extra keys; anything else (no signature, a bad one, an unknown, expired
or revoked key) is a :class:`~tdx_rules.errors.TdxError` naming the file, the key and the fix.
"""

import base64
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import TdxError

KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keys")
KEYRING_VARIABLE = "TDX_RULES_KEYRING"


@dataclass(frozen=True)
class PinnedKey:
    label: str
    fingerprint: str       # 40 uppercase hex digits, the primary key's
    file: Optional[str]    # in KEYS_DIR, or None when the key does not ship


PINNED: Dict[str, Tuple[PinnedKey, ...]] = {
    "ubuntu-kernel": (
        PinnedKey("Ubuntu Archive Automatic Signing Key (2012)", "790BC7277767219C42C86F933B4FE6ACC0B21F32",
                  "ubuntu-archive.gpg"),
        PinnedKey("Ubuntu Archive Automatic Signing Key (2018)", "F6ECB3762474EDA9D21B7022871920D1991BC93C",
                  "ubuntu-archive.gpg"),
    ),
    "alpine": (
        PinnedKey("Alpine Linux release signing key (Natanael Copa)", "0482D84022F52DF1C4E7CD43293ACD0907D9495A",
                  "alpine-release.gpg"),
    ),
    "canonical-ovmf": (),
}
# Where a user finds a key that does not ship.
KEY_SOURCES = {"canonical-ovmf": "the PPA's page on Launchpad (https://launchpad.net/~kobuk-team/+archive/ubuntu/"
                                 "tdx-release, 'Signing key')"}


def spaced(fingerprint: str) -> str:
    return " ".join(fingerprint[i:i + 4] for i in range(0, len(fingerprint), 4))


def dearmor(data: bytes, what: str) -> bytes:
    """Binary OpenPGP packets of an ASCII-armored key file (binary files come back as they are)."""
    text = data.decode("ascii", "replace")
    if "-----BEGIN PGP" not in text:
        return data
    out = []
    for block in text.split("-----BEGIN PGP")[1:]:
        lines = block.splitlines()[1:]
        while lines and lines[0].strip() and ":" in lines[0]:  # armor headers
            lines = lines[1:]
        body = []
        for line in lines:
            line = line.strip()
            if line.startswith("-----END") or line.startswith("="):
                break
            body.append(line)
        try:
            out.append(base64.b64decode("".join(body), validate=True))
        except ValueError:
            raise TdxError(f"{what}: not a readable ASCII-armored OpenPGP key") from None
    return b"".join(out)


def keyring_files(value: Optional[str]) -> List[str]:
    """The files of a ``TDX_RULES_KEYRING`` value (colon-separated); TdxError if one is missing."""
    files = [part for part in (value or "").split(":") if part]
    for path in files:
        if not os.path.isfile(path):
            raise TdxError(f"{KEYRING_VARIABLE}: {path} is not a file; give public key files, colon-separated")
    return files


def _gpg_fingerprints(keyring: bytes, home: str) -> List[str]:
    path = os.path.join(home, "show.gpg")
    with open(path, "wb") as handle:
        handle.write(keyring)
    done = subprocess.run(["gpg", "--homedir", home, "--batch", "--show-keys", "--with-colons", path],
                          capture_output=True, text=True)
    fingerprints, after_pub = [], False
    for line in done.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            after_pub = True
        elif fields[0] == "fpr" and after_pub:
            fingerprints.append(fields[9].upper())
            after_pub = False
    return fingerprints


@dataclass(frozen=True)
class Verified:
    fingerprint: str   # of the primary key that signed
    content: bytes     # the signed bytes (for a clearsigned file: its text, as gpgv wrote it out)


class Trust:
    """The keys that may sign the files of one kind of upstream."""

    def __init__(self, kind: str, extra_files: Sequence[str] = ()):
        self.kind = kind
        self.pinned = PINNED.get(kind, ())
        self.extra_files = tuple(extra_files)

    def _keyring(self, home: str) -> Tuple[bytes, Dict[str, str]]:
        """The binary keyring gpgv gets, and {fingerprint: label} of the keys it may accept."""
        parts, allowed = [], {}
        shipped = sorted({key.file for key in self.pinned if key.file})
        for name in shipped:
            with open(os.path.join(KEYS_DIR, name), "rb") as handle:
                data = handle.read()
            present = _gpg_fingerprints(data, home)
            for key in self.pinned:
                if key.file == name and key.fingerprint not in present:
                    raise TdxError(f"the shipped key file {name} lacks {key.label} ({spaced(key.fingerprint)}); "
                                   "reinstall tdx-rules")
            parts.append(data)
        allowed.update({key.fingerprint: key.label for key in self.pinned})
        for path in self.extra_files:
            with open(path, "rb") as handle:
                data = dearmor(handle.read(), path)
            for fingerprint in _gpg_fingerprints(data, home):
                allowed.setdefault(fingerprint, f"a key of {KEYRING_VARIABLE} ({os.path.basename(path)})")
            parts.append(data)
        return b"".join(parts), allowed

    def describe(self) -> str:
        names = [f"{key.label} {spaced(key.fingerprint)}" for key in self.pinned]
        if self.extra_files:
            names.append(f"the keys of {KEYRING_VARIABLE}")
        return ", ".join(names) or "no key"

    def verify(self, what: str, signed: bytes, signature: Optional[bytes] = None) -> Verified:
        """Check a detached ``signature`` over ``signed``, or (``signature`` None) the clearsigned
        file ``signed``; return who signed it and the signed content."""
        if shutil.which("gpgv") is None or shutil.which("gpg") is None:
            raise TdxError(f"{what}: gpgv and gpg are needed to check its signature; install them "
                           "(Debian: apt-get install gpgv gpg)")
        home = tempfile.mkdtemp(prefix="tdx-gpgv-")
        try:
            keyring, allowed = self._keyring(home)
            if not keyring:
                shown = " or ".join(f"{k.label} ({spaced(k.fingerprint)})" for k in self.pinned) or "its signing key"
                raise TdxError(f"{what}: no trusted key for {self.kind}: specs: {shown} does not ship with "
                               f"tdx-rules; put it in {KEYRING_VARIABLE} (from {KEY_SOURCES.get(self.kind, 'its owner')})")
            keyring_path = os.path.join(home, "trusted.gpg")
            with open(keyring_path, "wb") as handle:
                handle.write(keyring)
            data_path = os.path.join(home, "signed")
            with open(data_path, "wb") as handle:
                handle.write(signed)
            command = ["gpgv", "--homedir", home, "--status-fd", "1", "--keyring", keyring_path]
            out_path = os.path.join(home, "content")
            if signature is None:
                command += ["--output", out_path, data_path]
            else:
                sig_path = os.path.join(home, "signature")
                with open(sig_path, "wb") as handle:
                    handle.write(signature)
                command += [sig_path, data_path]
            done = subprocess.run(command, capture_output=True, text=True)
            status = [line.split() for line in done.stdout.splitlines() if line.startswith("[GNUPG:] ")]
            valid = [fields for fields in status if fields[1] == "VALIDSIG"]
            if done.returncode == 0 and valid:
                primary = valid[0][-1].upper()
                if primary not in allowed:
                    raise TdxError(f"{what}: signed by {spaced(primary)}, which is not trusted for {self.kind}: "
                                   f"specs ({self.describe()}); add its key to {KEYRING_VARIABLE} if you trust it")
                content = signed
                if signature is None:
                    with open(out_path, "rb") as handle:
                        content = handle.read()
                return Verified(primary, content)
            raise TdxError(self._refusal(what, status, done))
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def _refusal(self, what: str, status, done) -> str:
        kinds = {fields[1]: fields for fields in status}
        if "BADSIG" in kinds:
            return (f"{what}: BAD signature by key {kinds['BADSIG'][2]}: the file was changed after it was signed; "
                    "fetch it again from a trusted source")
        if "EXPKEYSIG" in kinds or "EXPSIG" in kinds:
            return f"{what}: signed by an expired key or an expired signature; the upstream must re-sign it"
        if "REVKEYSIG" in kinds:
            return f"{what}: signed by a revoked key ({kinds['REVKEYSIG'][2]}); do not use it"
        if "NO_PUBKEY" in kinds or "ERRSIG" in kinds:
            keyid = (kinds.get("NO_PUBKEY") or kinds["ERRSIG"])[2]
            return (f"{what}: signed by key {keyid}, which is not trusted for {self.kind}: specs "
                    f"(trusted: {self.describe()}); add its public key to {KEYRING_VARIABLE} if you trust it")
        if "NODATA" in kinds or not status:
            return f"{what}: no OpenPGP signature in it; fetch the signed file from a trusted source"
        return f"{what}: the signature does not verify ({' '.join(kinds)})"


def trust_for(kind: str, keyring_value: Optional[str] = None) -> Trust:
    """The Trust of one kind of upstream with the extra keys of a ``TDX_RULES_KEYRING`` value."""
    return Trust(kind, keyring_files(keyring_value))
