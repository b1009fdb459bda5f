"""TDX quotes, versions 4 and 5: the header, the TD report body, and the signature data.

Layout (Intel's "TDX DCAP Quote Generation Library and Quote Verification Library" API
reference, appendix "Quote format"; the same offsets are in MEASUREMENT-FACTS.md and in the
public parsers google/go-tdx-guest and Phala-Network/dcap-qvl, whose test quotes
tests/test_quote.py reads):

- header, 48 bytes: version u16 @0 (4 or 5), attestation key type u16 @2 (2: ECDSA P-256),
  TEE type u32 @4 (0x81: TDX), QE SVN u16 @8, PCE SVN u16 @10, QE vendor id @12 (16),
  user data @28 (20);
- version 4: the TD report body @48, 584 bytes (TDX 1.0); version 5: body type u16 @48
  (2: TDX 1.0, 584 bytes; 3: TDX 1.5, 648 bytes), body size u32 @50, the body @54;
- then a u32 length and the signature data: the ECDSA signature (r || s, 64) over everything
  before the length; the attestation key (x || y, 64); certification data (type u16, size u32):
  type 6 holds the QE report (384 bytes, an SGX REPORT body), its signature (64), the QE
  authentication data (u16 size + bytes) and nested certification data of type 5, the PEM
  chain of the PCK certificate (leaf, intermediate CA, root CA).

:func:`parse_quote` checks every length against the bytes there are and returns the fields;
it verifies nothing (that is :mod:`tdx_rules.attest.pck`). Bytes after the signature data
(zero padding of a configfs-tsm buffer, say) are outside what is signed and are counted in
``trailing``. Malformed input raises TdxError naming the offset, never another exception.
"""

import struct
from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import TdxError

TEE_TDX = 0x81
ECDSA_P256 = 2
HEADER_SIZE = 48
BODY_SIZES = {2: 584, 3: 648}  # v5 body type -> size; version 4 carries a TDX 1.0 body
QE_REPORT_CERT = 6
PCK_CHAIN_CERT = 5
QE_REPORT_SIZE = 384

# The TD report body: field -> (offset, size). TEE_TCB_SVN2 and MRSERVICETD only in TDX 1.5 bodies.
BODY_FIELDS = {
    "tee_tcb_svn": (0, 16), "mr_seam": (16, 48), "mr_signer_seam": (64, 48), "seam_attributes": (112, 8),
    "td_attributes": (120, 8), "xfam": (128, 8), "mrtd": (136, 48), "mr_config_id": (184, 48),
    "mr_owner": (232, 48), "mr_owner_config": (280, 48), "rtmr0": (328, 48), "rtmr1": (376, 48),
    "rtmr2": (424, 48), "rtmr3": (472, 48), "report_data": (520, 64),
}
BODY15_FIELDS = {"tee_tcb_svn2": (584, 16), "mr_service_td": (600, 48)}
# The SGX REPORT body of the quoting enclave: field -> (offset, size).
QE_REPORT_FIELDS = {"cpu_svn": (0, 16), "misc_select": (16, 4), "attributes": (48, 16), "mr_enclave": (64, 32),
                    "mr_signer": (128, 32), "isv_prod_id": (256, 2), "isv_svn": (258, 2), "report_data": (320, 64)}


@dataclass(frozen=True)
class Quote:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: Optional[int]      # version 5 only
    body: Dict[str, bytes]        # BODY_FIELDS (and BODY15_FIELDS for TDX 1.5 bodies)
    signed: bytes                 # header and body: what the attestation key signs
    signature: bytes              # r || s
    attestation_key: bytes        # x || y
    qe_report: bytes              # 384 bytes
    qe_report_signature: bytes    # r || s, by the PCK key
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing: int                 # bytes after the signature data

    @property
    def qe_report_fields(self) -> Dict[str, bytes]:
        return {name: self.qe_report[offset:offset + size] for name, (offset, size) in QE_REPORT_FIELDS.items()}

    def as_json(self) -> dict:
        """Every field as lowercase hex of its bytes as they stand in the quote (so numbers are
        little-endian: version 4 is "0400"), as the public parsers print them."""
        out = {"version": self.signed[0:2].hex(), "att_key_type": self.signed[2:4].hex(),
               "tee_type": self.signed[4:8].hex(), "qe_vendor_id": self.qe_vendor_id.hex(),
               "user_data": self.user_data.hex()}
        if self.body_type is not None:
            out["body_type"] = self.signed[48:50].hex()
        out.update({name: value.hex() for name, value in self.body.items()})
        return out


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.what, self.pos = data, what, 0

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise TdxError(f"{self.what}: {field} at offset {self.pos} needs {size} bytes, only "
                           f"{max(0, len(self.data) - self.pos)} are left; pass the whole quote")
        part = self.data[self.pos:self.pos + size]
        self.pos += size
        return part

    def number(self, fmt: str, field: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), field))[0]


def parse_quote(data: bytes, what: str = "quote") -> Quote:
    """The fields of a TDX quote of version 4 or 5 (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray)):
        raise TdxError(f"{what}: expected bytes")
    data = bytes(data)
    read = _Reader(data, what)
    header = read.take(HEADER_SIZE, "the header")
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", header)
    if version not in (4, 5):
        raise TdxError(f"{what}: quote version {version}; only TDX quotes of version 4 and 5 are read")
    if tee_type != TEE_TDX:
        raise TdxError(f"{what}: TEE type 0x{tee_type:x} is not TDX (0x81); this is not a TDX quote")
    if key_type != ECDSA_P256:
        raise TdxError(f"{what}: attestation key type {key_type}; only ECDSA P-256 (2) quotes can be checked")
    body_type = None
    if version == 4:
        size = BODY_SIZES[2]
    else:
        body_type = read.number("H", "the body type")
        size = read.number("I", "the body size")
        if BODY_SIZES.get(body_type) != size:
            raise TdxError(f"{what}: body type {body_type} of {size} bytes; a TDX quote has body type 2 "
                           "(584 bytes) or 3 (648 bytes)")
    body_bytes = read.take(size, "the TD report body")
    fields = dict(BODY_FIELDS, **(BODY15_FIELDS if size == BODY_SIZES[3] else {}))
    body = {name: body_bytes[offset:offset + length] for name, (offset, length) in fields.items()}
    signed = data[:read.pos]
    length = read.number("I", "the signature data length")
    end = read.pos + length
    if end > len(data):
        raise TdxError(f"{what}: the signature data claims {length} bytes at offset {read.pos}, only "
                       f"{len(data) - read.pos} are left; pass the whole quote")
    sig = _Reader(data[:end], what)
    sig.pos = read.pos
    signature = sig.take(64, "the quote signature")
    key = sig.take(64, "the attestation key")
    cert_type, cert_size = sig.number("H", "the certification data type"), sig.number("I", "the certification data size")
    if cert_type != QE_REPORT_CERT:
        raise TdxError(f"{what}: certification data of type {cert_type}; quotes are checked through the QE "
                       "report certification data (type 6)")
    cert = _Reader(sig.take(cert_size, "the certification data"), what)
    base = sig.pos - cert_size
    qe_report = cert.take(QE_REPORT_SIZE, "the QE report")
    qe_signature = cert.take(64, "the QE report signature")
    auth = cert.take(cert.number("H", "the QE authentication data size"), "the QE authentication data")
    inner_type, inner_size = cert.number("H", "the PCK certification data type"), cert.number("I", "its size")
    if inner_type != PCK_CHAIN_CERT:
        raise TdxError(f"{what}: the QE report certification data nests type {inner_type} at offset "
                       f"{base + cert.pos - 6}; only a PEM PCK certificate chain (type 5) can be checked")
    chain = cert.take(inner_size, "the PCK certificate chain")
    if cert.pos != len(cert.data):
        raise TdxError(f"{what}: {len(cert.data) - cert.pos} bytes after the PCK certificate chain inside the "
                       "certification data; the quote is malformed")
    if sig.pos != end:
        raise TdxError(f"{what}: {end - sig.pos} bytes after the certification data inside the signature data; "
                       "the quote is malformed")
    return Quote(version, key_type, tee_type, qe_svn, pce_svn, header[12:28], header[28:48], body_type, body,
                 signed, signature, key, qe_report, qe_signature, auth, chain.rstrip(b"\0"), len(data) - end)
