"""The TCB status of a TDX quote from Intel's collateral: is the platform, its TDX module and its
quoting enclave current, and does Intel still stand behind the certificates?

The inputs: the collateral JSON that Intel's PCS or a PCCS serves for a quote (the keys of
:data:`KEYS`: the TCB info and QE identity as the exact JSON strings Intel signed, their r || s
ECDSA P-256 signatures in hex and their issuer chains in PEM, the PCK CRL and root CA CRL in hex
DER with the PCK CRL's issuer chain), the parsed quote, its PCK chain (leaf first) and a time.
The rules are those of Intel's "TDX DCAP Quote Verification Library", read from its public
source (intel/SGX-TDX-DCAP-QuoteVerificationLibrary, src/Verifiers: QuoteVerifier.cpp,
Checks/TcbLevelCheck.cpp, Checks/TdxModuleCheck.cpp, EnclaveReportVerifier.cpp,
TCBSigningChain.cpp, PckCrlVerifier.cpp, whose step numbers 4.1.2.4.x follow Intel's document)
and from the public verifiers Phala-Network/dcap-qvl (src/verify.rs, src/tcb_info.rs) and
google/go-tdx-guest (verify/verify.go); where they differ, Intel's QVL is followed:

1. the TCB info and the QE identity verify with the leaf of their issuer chain ("Intel SGX TCB
   Signing"), which chains to the pinned Intel SGX Root CA at ``now``; ``now`` lies within each
   one's ``issueDate``..``nextUpdate``; their ``id`` is "TDX" (version 3) and "TD_QE" (version 2);
2. the root CA CRL is signed by the root, the PCK CRL by the leaf of its chain (a PCK CA chaining
   to the root) and names the PCK certificate's issuer; both are current (``thisUpdate`` <= now <=
   ``nextUpdate``). A PCK certificate in the PCK CRL, or its CA in the root CA CRL, makes the
   status "Revoked" and is a problem (a CRL counts when its signature verifies with its issuer's
   key); a TCB signing or PCK CRL issuer certificate in the root CA CRL is a problem;
3. the FMSPC and PCE-ID of the PCK certificate's SGX extension (:mod:`.sgx_extension`) are the
   TCB info's;
4. the platform's level: TCB levels in Intel's order (highest SGX component SVNs, then PCESVN,
   then TDX component SVNs), the first whose 16 SGX SVNs and PCESVN the PCK certificate reaches
   and whose 16 TDX SVNs the quote's TEE_TCB_SVN reaches; when TEE_TCB_SVN[1] (the TDX module's
   major version) is non-zero its bytes 0 and 1 are left out, and the ``tdxModuleIdentities``
   entry ``TDX_<byte 1 in hex>`` gives the module's own level (first with isvsvn <= byte 0).
   MRSIGNERSEAM must be that identity's (or ``tdxModule``'s) mrsigner, and SEAMATTRIBUTES its
   attributes under the mask with no bit outside it (dcap-qvl; Intel's QVL asks for zero, the
   same under the all-ones mask and zero attributes Intel publishes). No level: "Unrecognized";
5. the QE report: MRSIGNER, ISVPRODID, MISCSELECT and ATTRIBUTES under their masks as the QE
   identity says; its ISVSVN selects the QE's level (first with isvsvn <= the report's);
6. the statuses converge as Intel's QVL does (:func:`converge`): an OutOfDate QE or TDX module
   turns UpToDate and SWHardeningNeeded into OutOfDate, ConfigurationNeeded and
   ConfigurationAndSWHardeningNeeded into OutOfDateConfigurationNeeded; Revoked wins; the
   advisory IDs of every selected level are united and sorted.

Collateral that cannot be read (a key missing, hex that is not hex, JSON that is not JSON or lacks
a field of the format, damaged DER) raises TdxError naming the key. Everything that reads but does
not check out is one line in ``TcbResult.problems``; an empty list means the collateral is Intel's,
current, and about this quote. Not covered: the TD relaunch advice Intel's QVL derives from
TEE_TCB_SVN2 of TDX 1.5 bodies. No cryptography of ours: signatures, certificates and CRLs are
``cryptography``'s, through :mod:`.pck`.
"""

import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import TdxError
from . import pck
from .sgx_extension import PckTcb, pck_tcb

KEYS = ("tcb_info", "tcb_info_signature", "tcb_info_issuer_chain", "qe_identity", "qe_identity_signature",
        "qe_identity_issuer_chain", "pck_crl", "pck_crl_issuer_chain", "root_ca_crl")
UP_TO_DATE, SW_HARDENING, CONFIGURATION = "UpToDate", "SWHardeningNeeded", "ConfigurationNeeded"
CONFIGURATION_SW, OUT_OF_DATE = "ConfigurationAndSWHardeningNeeded", "OutOfDate"
OUT_OF_DATE_CONFIGURATION, REVOKED, UNRECOGNIZED = "OutOfDateConfigurationNeeded", "Revoked", "Unrecognized"
# The statuses each kind of level may carry (Intel's QVL Verifiers/TcbStatus.h).
PLATFORM_STATUSES = frozenset({UP_TO_DATE, SW_HARDENING, CONFIGURATION, CONFIGURATION_SW, OUT_OF_DATE,
                               OUT_OF_DATE_CONFIGURATION, REVOKED})
MODULE_STATUSES = frozenset({UP_TO_DATE, OUT_OF_DATE, REVOKED})
QE_STATUSES = frozenset({UP_TO_DATE, CONFIGURATION, OUT_OF_DATE, OUT_OF_DATE_CONFIGURATION, REVOKED})
FIX = "pass the collateral the PCS or PCCS serves for this quote"
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")


@dataclass(frozen=True)
class Level:
    """A TCB level: of the platform (SVN vectors, PCESVN) or of a QE or TDX module (ISVSVN)."""
    status: str
    advisory_ids: Tuple[str, ...]
    sgx_svns: Tuple[int, ...] = ()
    pce_svn: int = 0
    tdx_svns: Tuple[int, ...] = ()
    isv_svn: int = 0


@dataclass(frozen=True)
class ModuleIdentity:
    id: str                     # "" for the TCB info's tdxModule
    mrsigner: bytes             # 48
    attributes: bytes           # 8
    attributes_mask: bytes      # 8
    levels: Tuple[Level, ...]


@dataclass(frozen=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    fmspc: bytes
    pce_id: bytes
    levels: Tuple[Level, ...]
    module: Optional[ModuleIdentity]
    module_identities: Tuple[ModuleIdentity, ...]


@dataclass(frozen=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime.datetime
    next_update: datetime.datetime
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    levels: Tuple[Level, ...]


@dataclass(frozen=True)
class TcbResult:
    status: str                 # the converged status (see the module docstring)
    advisory_ids: List[str]     # sorted, unique
    platform_status: str        # the TCB level's, converged with the TDX module's
    qe_status: str
    fmspc: str                  # lowercase hex, from the PCK certificate
    problems: List[str]         # one line each; empty when the collateral checks out


@dataclass(frozen=True)
class Collateral:
    tcb_info: TcbInfo
    tcb_info_body: bytes        # the bytes Intel signed
    tcb_info_signature: bytes
    tcb_info_chain: List[x509.Certificate]
    qe_identity: QeIdentity
    qe_identity_body: bytes
    qe_identity_signature: bytes
    qe_identity_chain: List[x509.Certificate]
    pck_crl: x509.CertificateRevocationList
    pck_crl_chain: List[x509.Certificate]
    root_ca_crl: x509.CertificateRevocationList


@dataclass(frozen=True)
class Verdict:
    status: Optional[str]       # None: nothing to converge (a TDX module of major version 0)
    advisory_ids: Tuple[str, ...]
    problems: List[str]


# --- reading the collateral ------------------------------------------------------------------

def bad(where: str, why: str) -> TdxError:
    return TdxError(f"{where}: {why}; {FIX}")


def _get(obj, key: str, kind, where: str, required: bool = True):
    if not isinstance(obj, dict):
        raise bad(where, "not a JSON object")
    if key not in obj:
        if required:
            raise bad(f"{where}.{key}", "missing")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad(f"{where}.{key}", f"a JSON {type(value).__name__}, not a {kind.__name__}")
    return value


def _number(obj, key: str, limit: int, where: str) -> int:
    value = _get(obj, key, int, where)
    if not 0 <= value <= limit:
        raise bad(f"{where}.{key}", f"{value} is outside 0..{limit}")
    return value


def unhex(text: str, size: Optional[int], where: str) -> bytes:
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise bad(where, "not hex")
    data = bytes.fromhex(text)
    if size is not None and len(data) != size:
        raise bad(where, f"{len(data)} bytes, not {size}")
    return data


def _hex(obj, key: str, size: int, where: str) -> bytes:
    return unhex(_get(obj, key, str, where), size, f"{where}.{key}")


def _date(obj, key: str, where: str) -> datetime.datetime:
    text = _get(obj, key, str, where)
    try:
        if not _DATE.fullmatch(text):
            raise ValueError(text)
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise bad(f"{where}.{key}", f"{text[:40]!r} is not a date like 2025-06-19T10:16:03Z") from None


def _no_duplicates(pairs):
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key appears twice in one object")
    return dict(pairs)


def _no_constant(name):
    raise ValueError(f"{name} is not a number")


def _json(text: str, where: str) -> dict:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        raise bad(where, f"not JSON ({str(error)[:80]})") from None
    if not isinstance(value, dict):
        raise bad(where, "not a JSON object")
    return value


def utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(where, "holds characters that are not UTF-8") from None


def _svns(obj, key: str, where: str) -> Tuple[int, ...]:
    components = _get(obj, key, list, where)
    if len(components) != 16:
        raise bad(f"{where}.{key}", f"{len(components)} components, not 16")
    return tuple(_number(c, "svn", 255, f"{where}.{key}[{i}]") for i, c in enumerate(components))


def _status_of(obj, where: str) -> Tuple[str, Tuple[str, ...]]:
    ids = _get(obj, "advisoryIDs", list, where, required=False) or []
    if not all(isinstance(i, str) for i in ids):
        raise bad(f"{where}.advisoryIDs", "not a list of strings")
    return _get(obj, "tcbStatus", str, where), tuple(ids)


def _isv_levels(obj, where: str, limit: int) -> Tuple[Level, ...]:
    levels = []
    for index, level in enumerate(_get(obj, "tcbLevels", list, where)):
        here = f"{where}.tcbLevels[{index}]"
        status, ids = _status_of(level, here)
        levels.append(Level(status, ids, isv_svn=_number(_get(level, "tcb", dict, here), "isvsvn", limit,
                                                          f"{here}.tcb")))
    return tuple(levels)


def _module(obj, where: str, with_levels: bool) -> ModuleIdentity:
    return ModuleIdentity(_get(obj, "id", str, where) if with_levels else "", _hex(obj, "mrsigner", 48, where),
                          _hex(obj, "attributes", 8, where), _hex(obj, "attributesMask", 8, where),
                          _isv_levels(obj, where, 255) if with_levels else ())


def parse_tcb_info(text: str, where: str = "tcb_info") -> TcbInfo:
    """A TDX TCB info as the PCS serves it, read strictly: no duplicate key, no NaN, every field of
    the format present with its type, size (16 components, 6-byte FMSPC, ...) and range."""
    obj = _json(text, where)
    levels = []
    for index, level in enumerate(_get(obj, "tcbLevels", list, where)):
        here = f"{where}.tcbLevels[{index}]"
        tcb = _get(level, "tcb", dict, here)
        status, ids = _status_of(level, here)
        levels.append(Level(status, ids, _svns(tcb, "sgxtcbcomponents", f"{here}.tcb"),
                            _number(tcb, "pcesvn", 0xFFFF, f"{here}.tcb"), _svns(tcb, "tdxtcbcomponents", f"{here}.tcb")))
    module = _get(obj, "tdxModule", dict, where, required=False)
    identities = _get(obj, "tdxModuleIdentities", list, where, required=False) or []
    return TcbInfo(_get(obj, "id", str, where), _get(obj, "version", int, where), _date(obj, "issueDate", where),
                   _date(obj, "nextUpdate", where), _hex(obj, "fmspc", 6, where), _hex(obj, "pceId", 2, where),
                   tuple(levels), None if module is None else _module(module, f"{where}.tdxModule", False),
                   tuple(_module(m, f"{where}.tdxModuleIdentities[{i}]", True) for i, m in enumerate(identities)))


def parse_qe_identity(text: str, where: str = "qe_identity") -> QeIdentity:
    """A TD QE identity as the PCS serves it, read as strictly as :func:`parse_tcb_info`."""
    obj = _json(text, where)
    return QeIdentity(_get(obj, "id", str, where), _get(obj, "version", int, where), _date(obj, "issueDate", where),
                      _date(obj, "nextUpdate", where), _hex(obj, "miscselect", 4, where),
                      _hex(obj, "miscselectMask", 4, where), _hex(obj, "attributes", 16, where),
                      _hex(obj, "attributesMask", 16, where), _hex(obj, "mrsigner", 32, where),
                      _number(obj, "isvprodid", 0xFFFF, where), _isv_levels(obj, where, 0xFFFF))


def _crl(text: str, where: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(unhex(text, None, where))
        crl.issuer, crl.extensions, crl.last_update_utc, crl.next_update_utc  # parsed lazily: read them once here
        for entry in crl:
            entry.serial_number
    except (ValueError, x509.InvalidVersion) as error:
        raise bad(where, f"not a DER CRL ({str(error)[:80]})") from None
    return crl


def read_chain(certs: Sequence[x509.Certificate], what: str) -> List[x509.Certificate]:
    """``certs``, each one's lazily parsed parts (names, extensions, key) read once: TdxError if damaged."""
    for index, cert in enumerate(certs):
        try:
            cert.subject, cert.issuer, cert.extensions, cert.public_key(), cert.signature_hash_algorithm
        except (ValueError, UnsupportedAlgorithm) as error:
            raise bad(what, f"certificate {index} is damaged ({str(error)[:80]})") from None
    return list(certs)


def _chain(text: str, where: str) -> List[x509.Certificate]:
    return pck.load_chain(utf8(text, where), where)  # reads every lazily parsed part: TdxError if damaged


def parse_collateral(collateral: dict, what: str = "collateral") -> Collateral:
    """Every part of the collateral read and decoded (nothing verified); TdxError naming the key."""
    if not isinstance(collateral, dict):
        raise TdxError(f"{what}: not a JSON object with the keys {', '.join(KEYS)}; {FIX}")
    for key in KEYS:
        if key not in collateral:
            raise TdxError(f"{what}: no {key!r}; {FIX}")
        if not isinstance(collateral[key], str):
            raise bad(f"{what}: {key}", "not a string")
    part = {key: f"{what}: {key}" for key in KEYS}
    chains = {key: _chain(collateral[key], part[key])
              for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain")}
    return Collateral(
        parse_tcb_info(collateral["tcb_info"], part["tcb_info"]), utf8(collateral["tcb_info"], part["tcb_info"]),
        unhex(collateral["tcb_info_signature"], 64, part["tcb_info_signature"]), chains["tcb_info_issuer_chain"],
        parse_qe_identity(collateral["qe_identity"], part["qe_identity"]),
        utf8(collateral["qe_identity"], part["qe_identity"]),
        unhex(collateral["qe_identity_signature"], 64, part["qe_identity_signature"]),
        chains["qe_identity_issuer_chain"], _crl(collateral["pck_crl"], part["pck_crl"]),
        chains["pck_crl_issuer_chain"], _crl(collateral["root_ca_crl"], part["root_ca_crl"]))


def load_collateral(path: str) -> dict:
    """The collateral JSON file at ``path``, every key checked to read (see :func:`parse_collateral`)."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except OSError as error:
        raise TdxError(f"{path}: cannot read the collateral ({error.strerror}); {FIX}") from None
    except (ValueError, RecursionError) as error:
        raise TdxError(f"{path}: not a JSON file ({str(error)[:80]}); {FIX}") from None
    parse_collateral(data, path)
    return data


# --- signatures, chains and CRLs ----------------------------------------------------------

def _stamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cn(cert_or_name) -> str:
    name = cert_or_name.subject if isinstance(cert_or_name, x509.Certificate) else cert_or_name
    names = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else name.rfc4514_string()


def _key(cert: x509.Certificate, p256: bool = False):
    """The certificate's public key (only a P-256 one if ``p256``), or None."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    return key if not p256 or isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1) \
        else None


def window_problem(label: str, start: Optional[datetime.datetime], end: Optional[datetime.datetime],
                   now: datetime.datetime) -> Optional[str]:
    """None when start <= now <= end, else a line naming the side ``now`` falls on."""
    if start is None or end is None:
        return f"the {label} states no {'start' if start is None else 'nextUpdate'}: it cannot be current"
    if now < start:
        return (f"the {label} is issued at {_stamp(start)}, after {_stamp(now)}: not yet valid (check the clock "
                "or the time given)")
    if now > end:
        return f"the {label} expired at its nextUpdate {_stamp(end)}, before {_stamp(now)}; fetch fresh collateral"
    return None


def signed_problems(label: str, body: bytes, signature: bytes, chain: List[x509.Certificate],
                    now: datetime.datetime) -> List[str]:
    """The TCB info or QE identity: signed by "Intel SGX TCB Signing", chaining to the pinned root."""
    reason = pck.check_chain(chain, now, label="TCB signing")
    problems = [f"{label}: {reason}"] if reason else []
    if "SGX TCB Signing" not in _cn(chain[0]):
        problems.append(f"{label}: signed by {_cn(chain[0])!r}, not by Intel's SGX TCB Signing certificate")
    key = _key(chain[0], p256=True)
    if key is None or not pck.verifies(key, signature, body):
        problems.append(f"the {label} signature does not verify with {_cn(chain[0])!r}'s key: the {label} was "
                        "changed or is not Intel's")
    return problems


def revoked_serials(crl: x509.CertificateRevocationList, issuer_key) -> Optional[FrozenSet[int]]:
    """The serial numbers a CRL revokes, or None when its signature does not verify with ``issuer_key``."""
    try:
        valid = crl.is_signature_valid(issuer_key)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        return None
    try:
        return frozenset(entry.serial_number for entry in crl)
    except ValueError:
        raise TdxError("CRL: a damaged revoked entry; pass the CRL the PCS or PCCS serves") from None


def crl_problems(crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime.datetime,
                 label: str) -> List[str]:
    """A CRL issued and signed by ``issuer`` and current at ``now`` (thisUpdate..nextUpdate)."""
    problems = []
    if crl.issuer != issuer.subject:
        problems.append(f"the {label} is issued by {_cn(crl.issuer)!r}, not by {_cn(issuer)!r}")
    key = _key(issuer)
    if key is None or revoked_serials(crl, key) is None:
        problems.append(f"the {label}'s signature does not verify with {_cn(issuer)!r}'s key")
    reason = window_problem(label, crl.last_update_utc, crl.next_update_utc, now)
    return problems + ([reason] if reason else [])


def pinned_root(certs: Sequence[x509.Certificate],
                root_sha256: str = pck.INTEL_SGX_ROOT_CA_SHA256) -> Optional[x509.Certificate]:
    """The certificate among ``certs`` whose DER has the pinned SHA-256, or None."""
    for cert in certs:
        if hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == root_sha256:
            return cert
    return None


# --- TCB levels -------------------------------------------------------------------------------

def intel_order(levels: Sequence[Level]) -> List[Level]:
    """Platform levels as Intel's QVL keeps them: highest SGX SVNs first, then PCESVN, then TDX SVNs."""
    return sorted(levels, key=lambda level: (level.sgx_svns, level.pce_svn, level.tdx_svns), reverse=True)


def match_tcb_level(tcb_info: TcbInfo, tcb: PckTcb, tee_tcb_svn: bytes) -> Optional[Level]:
    """The platform's level (step 4 of the module docstring), or None when no level matches."""
    skip = 2 if tee_tcb_svn[1] > 0 else 0  # the module's SVN and version: its identity's matter
    for level in intel_order(tcb_info.levels):
        if all(a >= b for a, b in zip(tcb.sgx_svns, level.sgx_svns)) and tcb.pce_svn >= level.pce_svn and \
                all(tee_tcb_svn[i] >= level.tdx_svns[i] for i in range(skip, 16)):
            return level
    return None


def _isv_level(levels: Sequence[Level], isv_svn: int) -> Optional[Level]:
    return next((level for level in sorted(levels, key=lambda l: l.isv_svn, reverse=True)
                 if isv_svn >= level.isv_svn), None)


def tdx_module_status(tcb_info: TcbInfo, body: Dict[str, bytes]) -> Verdict:
    """The TDX module: MRSIGNERSEAM and SEAMATTRIBUTES as the TCB info says; for a module of major
    version > 0 the level of its identity ``TDX_<version>`` (Intel's TdxModuleCheck.cpp)."""
    tee = body["tee_tcb_svn"]
    expected, identity, problems = tcb_info.module, None, []
    if tee[1] > 0:
        wanted = f"TDX_{tee[1]:02X}"
        identity = next((m for m in tcb_info.module_identities if m.id.upper() == wanted), None)
        if identity is None:
            return Verdict(UNRECOGNIZED, (), [f"the TCB info has no TDX module identity {wanted} for the quote's TDX "
                                              f"module (TEE_TCB_SVN {tee.hex()})"])
        expected = identity
    if expected is None:
        problems.append("the TCB info has no tdxModule to check the quote's TDX module against")
    else:
        if body["mr_signer_seam"] != expected.mrsigner:
            problems.append(f"the quote's MRSIGNERSEAM {body['mr_signer_seam'].hex()[:16]}… is not the TDX module "
                            f"signer the TCB info names ({expected.mrsigner.hex()[:16]}…)")
        if any(a & m != e & m or a & ~m & 0xFF for a, e, m in
               zip(body["seam_attributes"], expected.attributes, expected.attributes_mask)):
            problems.append(f"the quote's SEAMATTRIBUTES {body['seam_attributes'].hex()} are not the TDX module "
                            f"attributes {expected.attributes.hex()} under mask {expected.attributes_mask.hex()}")
    if identity is None:
        return Verdict(None, (), problems)
    level = _isv_level(identity.levels, tee[0])
    if level is None:
        return Verdict(UNRECOGNIZED, (), problems + [f"the TDX module's SVN {tee[0]} is below every level of "
                                                     f"identity {identity.id}"])
    if level.status not in MODULE_STATUSES:
        return Verdict(UNRECOGNIZED, (), problems + [f"TDX module level status {level.status!r} is not one Intel "
                                                     "defines"])
    return Verdict(level.status, level.advisory_ids, problems)


def converge(status: str, other: Optional[str]) -> str:
    """``status`` with a QE's or TDX module's status folded in, as Intel's QVL does it
    (convergeTcbStatusWithQeTcbStatus, convergeTcbStatusWithTdxModuleStatus)."""
    if status == UNRECOGNIZED or other is None or other == UP_TO_DATE:
        return status
    if other in (UNRECOGNIZED, REVOKED):
        return other
    # The other is OutOfDate (the QVL counts any other status of a QE level as OutOfDate).
    if status in (UP_TO_DATE, SW_HARDENING):
        return OUT_OF_DATE
    if status in (CONFIGURATION, CONFIGURATION_SW):
        return OUT_OF_DATE_CONFIGURATION
    return status


def platform_status(tcb_info: TcbInfo, tcb: PckTcb, body: Dict[str, bytes]) -> Verdict:
    """The platform's level (:func:`match_tcb_level`) converged with the TDX module's."""
    level = match_tcb_level(tcb_info, tcb, body["tee_tcb_svn"])
    if level is None:
        return Verdict(UNRECOGNIZED, (), [
            f"no TCB level matches the PCK certificate's SGX SVNs {'.'.join(map(str, tcb.sgx_svns))}, PCESVN "
            f"{tcb.pce_svn} and the quote's TEE_TCB_SVN {body['tee_tcb_svn'].hex()}: the platform's TCB is not one "
            "the TCB info recognises"])
    if level.status not in PLATFORM_STATUSES:
        return Verdict(UNRECOGNIZED, (), [f"TCB level status {level.status!r} is not one Intel defines"])
    module = tdx_module_status(tcb_info, body)
    return Verdict(converge(level.status, module.status), tuple(sorted(set(level.advisory_ids + module.advisory_ids))),
                   module.problems)


def qe_status(identity: QeIdentity, report: Dict[str, bytes]) -> Verdict:
    """The QE report against the QE identity (Intel's EnclaveReportVerifier.cpp), and its level."""
    problems = []
    if report["mr_signer"] != identity.mrsigner:
        problems.append(f"the QE's MRSIGNER {report['mr_signer'].hex()} is not the QE identity's "
                        f"{identity.mrsigner.hex()}")
    if int.from_bytes(report["isv_prod_id"], "little") != identity.isvprodid:
        problems.append(f"the QE's ISVPRODID {int.from_bytes(report['isv_prod_id'], 'little')} is not the QE "
                        f"identity's {identity.isvprodid}")
    for field, name, expected, mask in (("misc_select", "MISCSELECT", identity.miscselect, identity.miscselect_mask),
                                        ("attributes", "ATTRIBUTES", identity.attributes, identity.attributes_mask)):
        if any(r & m != e for r, e, m in zip(report[field], expected, mask)):
            problems.append(f"the QE's {name} {report[field].hex()} under mask {mask.hex()} is not the QE "
                            f"identity's {expected.hex()}")
    isv_svn = int.from_bytes(report["isv_svn"], "little")
    level = _isv_level(identity.levels, isv_svn)
    if level is None:
        return Verdict(UNRECOGNIZED, (), problems + [f"the QE's ISVSVN {isv_svn} is below every level of the QE "
                                                     "identity"])
    if level.status not in QE_STATUSES:
        return Verdict(UNRECOGNIZED, (), problems + [f"QE level status {level.status!r} is not one Intel defines"])
    return Verdict(level.status, level.advisory_ids, problems)


# --- all of it ----------------------------------------------------------------------------------

def _utc(now) -> datetime.datetime:
    if not isinstance(now, datetime.datetime):
        raise TdxError(f"tcb status: the time {now!r} is not a datetime")
    return now.replace(tzinfo=datetime.timezone.utc) if now.tzinfo is None else now


def _crl_checks(c: Collateral, pck_certs: Sequence[x509.Certificate], now) -> Tuple[List[str], List[str]]:
    """Step 2: (problems, revocations)."""
    problems, revoked = [], []
    root = pinned_root(list(c.pck_crl_chain) + list(c.tcb_info_chain) + list(c.qe_identity_chain) + list(pck_certs))
    root_revoked = frozenset()
    if root is None:
        problems.append("no Intel SGX Root CA in the collateral's chains: the root CA CRL cannot be checked")
    else:
        problems += crl_problems(c.root_ca_crl, root, now, "root CA CRL")
        root_revoked = revoked_serials(c.root_ca_crl, root.public_key()) or frozenset()
    problems += filter(None, [pck.check_chain(c.pck_crl_chain, now, label="PCK CRL issuer")])
    issuer = c.pck_crl_chain[0]
    problems += crl_problems(c.pck_crl, issuer, now, "PCK CRL")
    if c.pck_crl.issuer != pck_certs[0].issuer:
        problems.append(f"the PCK CRL is {_cn(c.pck_crl.issuer)!r}'s, the PCK certificate is issued by "
                        f"{_cn(pck_certs[0].issuer)!r}: pass the CRL of the PCK certificate's CA")
    key = _key(issuer)
    pck_revoked = (revoked_serials(c.pck_crl, key) if key is not None else None) or frozenset()
    if pck_certs[0].serial_number in pck_revoked:
        revoked.append(f"the PCK certificate (serial {pck_certs[0].serial_number:x}) is revoked by the PCK CRL")
    if len(pck_certs) > 1 and pck_certs[1].serial_number in root_revoked:
        revoked.append(f"{_cn(pck_certs[1])!r} (serial {pck_certs[1].serial_number:x}) is revoked by the root CA CRL")
    for label, cert in (("TCB info", c.tcb_info_chain[0]), ("QE identity", c.qe_identity_chain[0]),
                        ("PCK CRL", issuer)):
        if cert is not root and cert.serial_number in root_revoked:
            problems.append(f"the {label}'s issuer {_cn(cert)!r} is revoked by the root CA CRL")
    return problems, revoked


def tcb_status(collateral: dict, quote, pck_certs: Sequence[x509.Certificate], now: datetime.datetime) -> TcbResult:
    """The TCB status of ``quote`` under ``collateral`` at ``now`` (see the module docstring)."""
    now = _utc(now)
    c = parse_collateral(collateral)
    if not pck_certs:
        raise TdxError("tcb status: no PCK certificate; pass the chain from the quote")
    pck_certs = read_chain(pck_certs, "the quote's PCK certificate chain")
    tcb = pck_tcb(pck_certs[0])
    problems = signed_problems("TCB info", c.tcb_info_body, c.tcb_info_signature, c.tcb_info_chain, now)
    problems += signed_problems("QE identity", c.qe_identity_body, c.qe_identity_signature, c.qe_identity_chain, now)
    for label, part in (("TCB info", c.tcb_info), ("QE identity", c.qe_identity)):
        problems += filter(None, [window_problem(label, part.issue_date, part.next_update, now)])
    for label, part, wanted in (("TCB info", c.tcb_info, ("TDX", 3)), ("QE identity", c.qe_identity, ("TD_QE", 2))):
        if (part.id, part.version) != wanted:
            problems.append(f"the {label} is {part.id!r} version {part.version}, not {wanted[0]!r} version "
                            f"{wanted[1]}, the one for TDX quotes")
    crl_problem_lines, revoked = _crl_checks(c, pck_certs, now)
    problems += crl_problem_lines + revoked
    if tcb.fmspc != c.tcb_info.fmspc:
        problems.append(f"the PCK certificate's FMSPC {tcb.fmspc.hex()} is not the TCB info's "
                        f"{c.tcb_info.fmspc.hex()}: the TCB info is for another platform")
    if tcb.pce_id != c.tcb_info.pce_id:
        problems.append(f"the PCK certificate's PCE-ID {tcb.pce_id.hex()} is not the TCB info's {c.tcb_info.pce_id.hex()}")
    platform = platform_status(c.tcb_info, tcb, quote.body)
    qe = qe_status(c.qe_identity, quote.qe_report_fields)
    problems += platform.problems + qe.problems
    status = REVOKED if revoked else converge(platform.status, qe.status)
    return TcbResult(status, sorted(set(platform.advisory_ids) | set(qe.advisory_ids)), platform.status, qe.status,
                     tcb.fmspc.hex(), problems)
