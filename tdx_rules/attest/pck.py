"""The signature chain of a TDX quote, checked with the ``cryptography`` package.

A quote is genuine when, in this order (Intel's DCAP quote verification, as the public
verifiers go-tdx-guest and dcap-qvl implement it):

1. ``quote-signature``: the ECDSA P-256 signature over the header and TD report body verifies
   with the attestation key the quote carries;
2. ``qe-report``: the quoting enclave's report is signed by the PCK certificate's key, and its
   REPORTDATA binds that attestation key: the first 32 bytes are SHA-256(attestation key ||
   QE authentication data), the other 32 are zero;
3. ``pck-chain``: the PCK certificate chain (leaf, intermediate CA, root CA) verifies link by
   link up to Intel's SGX Root CA, recognised by the SHA-256 of its DER encoding (pinned below),
   every issuer is a CA, and every certificate is valid at the time of the check.

Each check returns None when it holds, or one line saying what does not. Nothing here is a
cryptographic primitive of ours: signatures, keys and certificates are ``cryptography``'s.
"""

import datetime
import hashlib
from typing import List, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import TdxError

# Intel SGX Root CA (CN=Intel SGX Root CA, O=Intel Corporation, serial
# 22650cd65a9d3489f383b49552bf501b392706ac, valid 2018-05-21 to 2049-12-31), as Intel publishes it
# at https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer
# and as go-tdx-guest (verify/trusted_root.pem) and dcap-qvl (src/TrustedRootCA.der) pin it.
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


def p256_key(raw: bytes):
    """The public key of a raw x || y P-256 point, or None if it is not one."""
    if len(raw) != 64:
        return None
    try:
        return ec.EllipticCurvePublicNumbers(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"),
                                             ec.SECP256R1()).public_key()
    except ValueError:
        return None


def verifies(key, raw_signature: bytes, message: bytes) -> bool:
    """Whether an r || s ECDSA P-256 signature over ``message`` (SHA-256) verifies with ``key``."""
    if len(raw_signature) != 64:
        return False
    signature = encode_dss_signature(int.from_bytes(raw_signature[:32], "big"), int.from_bytes(raw_signature[32:], "big"))
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def load_chain(pem: bytes, what: str = "PCK certificate chain") -> List[x509.Certificate]:
    """The certificates of a PEM chain, leaf first; TdxError if it holds none or a damaged one."""
    try:
        certs = x509.load_pem_x509_certificates(bytes(pem))
        # cryptography decodes names, extensions and keys when first asked: ask now, so that a
        # damaged certificate is refused here and not half-way through a check.
        for cert in certs:
            cert.subject, cert.issuer, cert.extensions, cert.public_key(), cert.signature_hash_algorithm
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as error:
        raise TdxError(f"{what}: not a PEM certificate chain ({error})") from None
    if not certs:
        raise TdxError(f"{what}: no certificate in it")
    return certs


def check_quote_signature(quote) -> Optional[str]:
    key = p256_key(quote.attestation_key)
    if key is None:
        return "the attestation key in the quote is not a P-256 point"
    if not verifies(key, quote.signature, quote.signed):
        return "the signature over the header and TD report does not verify with the quote's attestation key"
    return None


def check_qe_report(quote, pck_leaf: x509.Certificate) -> Optional[str]:
    key = pck_leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return "the PCK certificate's key is not a P-256 key"
    if not verifies(key, quote.qe_report_signature, quote.qe_report):
        return "the QE report's signature does not verify with the PCK certificate's key"
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    report_data = quote.qe_report_fields["report_data"]
    if report_data[:32] != binding or any(report_data[32:]):
        return ("the QE report's REPORTDATA is not SHA-256(attestation key || QE authentication data) followed "
                "by zeros: the attestation key is not the quoting enclave's")
    return None


def _name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def check_chain(certs: List[x509.Certificate], now: datetime.datetime, root_sha256: str = INTEL_SGX_ROOT_CA_SHA256,
                label: str = "PCK") -> Optional[str]:
    """A chain, leaf first, up to the pinned root; every link, CA flag and validity period."""
    root = certs[-1]
    digest = hashlib.sha256(root.public_bytes(Encoding.DER)).hexdigest()
    if digest != root_sha256:
        return (f"the {label} chain ends at {_name(root)!r} (SHA-256 {digest[:16]}…), not at Intel's SGX Root CA "
                f"(SHA-256 {root_sha256[:16]}…)")
    for cert, issuer in zip(certs, certs[1:] + [root]):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return f"{_name(cert)!r} is not signed by {_name(issuer)!r} in the {label} chain"
    for issuer in certs[1:]:
        try:
            constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            return f"{_name(issuer)!r} issues certificates in the {label} chain but is not a CA"
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (f"{_name(cert)!r} is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                    f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {now:%Y-%m-%dT%H:%M:%SZ}")
    return None
