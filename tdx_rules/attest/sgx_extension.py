"""The SGX extension of a PCK certificate: the platform's TCB, its PCE-ID and its FMSPC.

Intel's PCK certificates carry a non-critical X.509 extension, OID 1.2.840.113741.1.13.1, laid
out by Intel's "SGX PCK Certificate and Certificate Revocation List Profile Specification" and
read here as the public verifiers Phala-Network/dcap-qvl (src/intel.rs, src/oids.rs) and
google/go-tdx-guest (pcs/pcs.go) read it. Its value is a DER SEQUENCE of SEQUENCE { OBJECT
IDENTIFIER, value } pairs, the OIDs below that one:

- ``.1`` PPID, OCTET STRING (16);
- ``.2`` TCB, a SEQUENCE of the same pairs: ``.2.1`` .. ``.2.16`` the 16 SGX TCB component SVNs
  (INTEGER 0..255), ``.2.17`` the PCESVN (INTEGER 0..65535), ``.2.18`` the CPUSVN (OCTET STRING, 16);
- ``.3`` PCE-ID, OCTET STRING (2); ``.4`` FMSPC, OCTET STRING (6);
- ``.5`` SGX type and, on multi-package platforms, ``.6`` and ``.7``: skipped.

:func:`read_tlvs` is a small DER reader (parsing, not cryptography): definite lengths in their
shortest form, one-byte tags, every element inside its parent, at most 4 length bytes and
:data:`MAX_ITEMS` elements a level. :func:`parse_sgx_extension` reads the pairs, refusing a
missing, repeated or ill-typed one. Anything malformed raises TdxError naming the extension,
never another exception.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from cryptography import x509

from ..errors import TdxError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
INTEGER, OCTET_STRING, OID, SEQUENCE = 0x02, 0x04, 0x06, 0x30
MAX_SIZE = 1 << 16  # the extension of a real PCK certificate is some 550 bytes
MAX_ITEMS = 64
WHAT = "the PCK certificate's SGX extension (OID 1.2.840.113741.1.13.1)"


@dataclass(frozen=True)
class PckTcb:
    sgx_svns: Tuple[int, ...]     # the 16 SGX TCB component SVNs
    pce_svn: int
    cpu_svn: bytes                # 16 bytes
    pce_id: bytes                 # 2 bytes
    fmspc: bytes                  # 6 bytes
    ppid: Optional[bytes]


def _fail(what: str, why: str) -> TdxError:
    return TdxError(f"{what}: {why}; the certificate is damaged, take the PCK chain from the quote or the PCS")


def read_tlvs(data: bytes, what: str = WHAT) -> List[Tuple[int, bytes]]:
    """The (tag, value) elements that fill ``data`` exactly, in order."""
    data = bytes(data)
    if len(data) > MAX_SIZE:
        raise _fail(what, f"{len(data)} bytes, more than the {MAX_SIZE} an SGX extension may take")
    items, pos = [], 0
    while pos < len(data):
        if len(items) == MAX_ITEMS:
            raise _fail(what, f"more than {MAX_ITEMS} elements in one SEQUENCE")
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise _fail(what, f"multi-byte tag at offset {pos}")
        if pos + 1 >= len(data):
            raise _fail(what, f"element at offset {pos} has no length byte")
        first, pos = data[pos + 1], pos + 2
        if first < 0x80:
            size = first
        else:
            count = first & 0x7F
            if count == 0:
                raise _fail(what, f"indefinite length at offset {pos - 1}, which DER forbids")
            if count > 4 or pos + count > len(data):
                raise _fail(what, f"length of {count} bytes at offset {pos - 1} does not fit")
            size = int.from_bytes(data[pos:pos + count], "big")
            if size < 0x80 or data[pos] == 0:
                raise _fail(what, f"length {size} at offset {pos - 1} is not in its shortest form")
            pos += count
        if size > len(data) - pos:
            raise _fail(what, f"element at offset {pos} claims {size} bytes, only {len(data) - pos} are left")
        items.append((tag, data[pos:pos + size]))
        pos += size
    return items


def read_one(data: bytes, tag: int, what: str = WHAT) -> bytes:
    """The value of the single element of type ``tag`` that ``data`` holds."""
    items = read_tlvs(data, what)
    if len(items) != 1 or items[0][0] != tag:
        raise _fail(what, f"expected one element of tag 0x{tag:02x}, found "
                          f"{', '.join(f'0x{t:02x}' for t, _ in items) or 'nothing'}")
    return items[0][1]


def decode_oid(value: bytes, what: str = WHAT) -> str:
    """The dotted form of an OBJECT IDENTIFIER's content octets."""
    if not value or len(value) > 64 or value[-1] & 0x80:
        raise _fail(what, "an OBJECT IDENTIFIER that is empty, too long or cut off")
    arcs, number, fresh = [], 0, True
    for byte in value:
        if fresh and byte == 0x80:
            raise _fail(what, "an OBJECT IDENTIFIER arc with a leading zero byte")
        number, fresh = (number << 7) | (byte & 0x7F), not byte & 0x80
        if fresh:
            arcs.append(number)
            number = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first] + arcs[1:])


def decode_uint(value: bytes, limit: int, what: str = WHAT) -> int:
    """A non-negative INTEGER no greater than ``limit``, in its shortest encoding."""
    if not value or value[0] & 0x80:
        raise _fail(what, "an INTEGER that is empty or negative")
    if len(value) > 1 and value[0] == 0 and not value[1] & 0x80:
        raise _fail(what, "an INTEGER not in its shortest form")
    number = int.from_bytes(value, "big")
    if number > limit:
        raise _fail(what, f"an SVN of {number}, more than {limit}")
    return number


def _pairs(value: bytes, prefix: str, what: str) -> Dict[int, Tuple[int, bytes]]:
    """SEQUENCE of SEQUENCE { OID prefix.n, value } -> {n: (tag, value)}; other OIDs are skipped."""
    found = {}
    for tag, pair in read_tlvs(value, what):
        if tag != SEQUENCE:
            raise _fail(what, f"an element of tag 0x{tag:02x} where a SEQUENCE {{OID, value}} belongs")
        parts = read_tlvs(pair, what)
        if len(parts) != 2 or parts[0][0] != OID:
            raise _fail(what, "a pair that is not SEQUENCE { OBJECT IDENTIFIER, value }")
        oid = decode_oid(parts[0][1], what)
        head, _, tail = oid.rpartition(".")
        if head != prefix:
            continue
        if int(tail) in found:
            raise _fail(what, f"{oid} appears twice")
        found[int(tail)] = parts[1]
    return found


def _octets(pairs: Dict[int, Tuple[int, bytes]], number: int, size: int, prefix: str, what: str) -> bytes:
    if number not in pairs:
        raise _fail(what, f"no {prefix}.{number}")
    tag, value = pairs[number]
    if tag != OCTET_STRING or len(value) != size:
        raise _fail(what, f"{prefix}.{number} is not an OCTET STRING of {size} bytes")
    return value


def _integer(pairs: Dict[int, Tuple[int, bytes]], number: int, limit: int, prefix: str, what: str) -> int:
    if number not in pairs:
        raise _fail(what, f"no {prefix}.{number}")
    tag, value = pairs[number]
    if tag != INTEGER:
        raise _fail(what, f"{prefix}.{number} is not an INTEGER")
    return decode_uint(value, limit, what)


def parse_sgx_extension(der: bytes, what: str = WHAT) -> PckTcb:
    """The TCB, PCE-ID, FMSPC (and PPID) of the extension's DER value (see the module docstring)."""
    top = _pairs(read_one(der, SEQUENCE, what), SGX_EXTENSION_OID, what)
    if 2 not in top or top[2][0] != SEQUENCE:
        raise _fail(what, f"no TCB SEQUENCE ({SGX_EXTENSION_OID}.2)")
    prefix = f"{SGX_EXTENSION_OID}.2"
    tcb = _pairs(top[2][1], prefix, what)
    svns = tuple(_integer(tcb, n, 255, prefix, what) for n in range(1, 17))
    ppid = _octets(top, 1, 16, SGX_EXTENSION_OID, what) if 1 in top else None
    return PckTcb(svns, _integer(tcb, 17, 0xFFFF, prefix, what), _octets(tcb, 18, 16, prefix, what),
                  _octets(top, 3, 2, SGX_EXTENSION_OID, what), _octets(top, 4, 6, SGX_EXTENSION_OID, what), ppid)


def pck_tcb(cert: x509.Certificate, what: str = "PCK certificate") -> PckTcb:
    """The SGX extension of a PCK certificate; TdxError if it has none or a damaged one."""
    try:
        extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except x509.ExtensionNotFound:
        raise TdxError(f"{what}: no SGX extension ({SGX_EXTENSION_OID}); this is not an Intel PCK "
                       "certificate") from None
    except ValueError as error:
        raise TdxError(f"{what}: its extensions do not parse ({error}); the certificate is damaged") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise TdxError(f"{what}: the SGX extension is not raw DER")
    return parse_sgx_extension(value.value, f"{what}: {WHAT}")
