"""TDX quotes from public projects' test data: parsed fields against the values those projects
assert, and the signature chain (quote signature, QE report, PCK chain to Intel's SGX Root CA)
at the times they check it. Tampered, expired and self-signed quotes are refused by name."""

import datetime
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.attest import pck
from tdx_rules.attest.quote import parse_quote
from tdx_rules.errors import TdxError
from tests.conftest import ROOT, fuzz_examples

DATA = os.path.join(ROOT, "..", "shared", "testdata", "tdx-attestation")


def quote_bytes(name):
    with open(os.path.join(DATA, "quotes", name), "rb") as handle:
        return handle.read()


def at(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# Values the projects assert (testdata README): go-tdx-guest validate/validate_test.go lines 42-75.
SPR_E4 = {
    "tee_tcb_svn": "03000400000000000000000000000000", "td_attributes": "0000004000000000", "xfam": "e71a060000000000",
    "mr_seam": "2fd279c16164a93dd5bf373d834328d46008c2b693af9ebb865b08b2ced320c9a89b4869a9fab60fbe9d0c5a5363c656",
    "mrtd": "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb",
    "mr_config_id": "00" * 48, "mr_owner": "00" * 48, "mr_owner_config": "00" * 48,
    "rtmr0": "2927da70461cd63266f43230cc1849c03ef25ebe490062a801d8fcc80af42976823adf08f833c1e50b51779c6593f32a",
    "rtmr1": "2c700b8ba9b85783f8be9fb9443647bdc0bb3c50747f06297cc6538c25a5f589c4b56d035c59107c6bc5800db2cacb61",
    "rtmr2": "8652f0caaba7e215ea442dc36a4499d8fec3362f3a0b2ca151cbe4b3e6466fe59c7368b3c2287fc7c3bf5c924eb4424e",
    "rtmr3": "00" * 48,
    "report_data": "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545eb7406a38d1eed313b987a467dacead6"
                   "f0c87a6d766c66f6f29f8acb281f1113",
}
# dcap-qvl tests/snapshots/verify_quote__could_parse_tdx_quote.snap (lines 56-669, as decimal byte arrays).
DCAP_QVL = {
    "tee_tcb_svn": "06010300000000000000000000000000", "td_attributes": "0000001000000000", "xfam": "e702060000000000",
    "mrtd": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
    "rtmr0": "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c48aca29b220b80b6a540cf994b9bc9c0",
    "rtmr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7aea8c323c173019b3093d54e579e9378",
    "rtmr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3ba80b70870d7330733642e01d48c3132",
    "rtmr3": "00" * 48,
    "report_data": "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9eca3efdbb481601c163cf52493d6e44a"
                   "ed55d51ec39b7e518fadb92c2b523f20",
}
# The times the projects verify at (README): go-tdx-guest verify_test.go:38 and :287/:339; dcap-qvl
# tests/verify_quote.rs (the collateral's earliest nextUpdate minus one second). The trustee quotes
# and the cos-113 quote come with no time: one inside every certificate of theirs is used.
CHECKED_AT = {
    "go-tdx-guest_tdx_prod_quote_SPR_E4.dat": "2023-07-01T01:00:00Z",
    "go-tdx-guest_quote_v5_sample.dat": "2026-02-03T01:00:00Z",
    "dcap-qvl_tdx_quote.bin": "2025-07-19T10:00:34Z",
    "trustee_tdx_quote_4.dat": "2025-01-01T00:00:00Z",
    "trustee_tdx_quote_5.dat": "2025-01-01T00:00:00Z",
    "go-tdx-guest_cos-113-tdx-quote.dat": "2025-01-01T00:00:00Z",
}


def chain_result(quote, now):
    certs = pck.load_chain(quote.pck_chain_pem)
    return pck.check_quote_signature(quote), pck.check_qe_report(quote, certs[0]), pck.check_chain(certs, now)


def test_go_tdx_guest_spr_quote_has_the_fields_go_tdx_guest_asserts():
    quote = parse_quote(quote_bytes("go-tdx-guest_tdx_prod_quote_SPR_E4.dat"))
    assert quote.version == 4 and quote.tee_type == 0x81 and quote.att_key_type == 2 and quote.body_type is None
    assert {name: quote.as_json()[name] for name in SPR_E4} == SPR_E4


def test_dcap_qvl_quote_has_the_fields_dcap_qvl_asserts():
    assert {name: parse_quote(quote_bytes("dcap-qvl_tdx_quote.bin")).as_json()[name] for name in DCAP_QVL} == DCAP_QVL


def test_trustee_quote_parses_to_the_claims_trustee_expects():
    expected = json.load(open(os.path.join(DATA, "quotes", "trustee_parse_tdx_claims_expected.json")))["quote"]
    fields = parse_quote(quote_bytes("trustee_tdx_quote_4.dat")).as_json()
    names = {"mr_td": "mrtd", "mrsigner_seam": "mr_signer_seam", "tcb_svn": "tee_tcb_svn", "rtmr_0": "rtmr0",
             "rtmr_1": "rtmr1", "rtmr_2": "rtmr2", "rtmr_3": "rtmr3"}
    for theirs, value in expected["body"].items():
        assert fields[names.get(theirs, theirs)] == value, theirs
    header = expected["header"]
    assert (fields["version"], fields["att_key_type"], fields["tee_type"], fields["qe_vendor_id"],
            fields["user_data"]) == (header["version"], header["att_key_type"], header["tee_type"],
                                     header["vendor_id"], header["user_data"])


@pytest.mark.parametrize("name", ["go-tdx-guest_quote_v5_sample.dat", "trustee_tdx_quote_5.dat"])
def test_version_5_quotes_carry_a_tdx_1_5_body(name):
    data = quote_bytes(name)
    quote = parse_quote(data)
    assert quote.version == 5 and quote.body_type == 3
    fields = quote.as_json()
    assert fields["version"] == "0500" and fields["body_type"] == "0300"
    # TEE_TCB_SVN2 and MRSERVICETD sit at body offsets 584 and 600; the body starts at 54 in version 5.
    assert fields["tee_tcb_svn2"] == data[54 + 584:54 + 600].hex()
    assert fields["mr_service_td"] == data[54 + 600:54 + 648].hex()


def test_trustee_version_5_quote_has_a_service_td():
    assert any(parse_quote(quote_bytes("trustee_tdx_quote_5.dat")).body["mr_service_td"])


@pytest.mark.parametrize("name", sorted(CHECKED_AT))
def test_each_real_quote_verifies_up_to_intels_root_at_the_time_it_is_checked(name):
    assert chain_result(parse_quote(quote_bytes(name)), at(CHECKED_AT[name])) == (None, None, None)


def test_the_spr_quote_is_refused_in_2053_as_go_tdx_guest_expects():
    reason = chain_result(parse_quote(quote_bytes("go-tdx-guest_tdx_prod_quote_SPR_E4.dat")), at("2053-01-01T00:00:00Z"))[2]
    assert reason and "not at 2053-01-01" in reason and "valid from" in reason


def test_a_certificate_before_its_validity_is_refused():
    quote = parse_quote(quote_bytes("go-tdx-guest_quote_v5_sample.dat"))  # its PCK leaf starts 2026-01-27
    assert "not at 2026-01-01" in chain_result(quote, at("2026-01-01T00:00:00Z"))[2]


SIGNED = parse_quote(quote_bytes("dcap-qvl_tdx_quote.bin"))


def test_every_one_byte_change_of_the_signed_region_is_refused():
    data = bytearray(quote_bytes("dcap-qvl_tdx_quote.bin"))
    for offset in range(len(SIGNED.signed)):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        try:
            quote = parse_quote(bytes(changed))
        except TdxError:
            continue  # version, TEE type or key type no longer a TDX quote: refused as input
        assert pck.check_quote_signature(quote), offset


def test_a_changed_qe_report_attestation_key_or_certificate_is_refused_by_its_check():
    data = quote_bytes("dcap-qvl_tdx_quote.bin")
    start = len(SIGNED.signed) + 4
    now = at(CHECKED_AT["dcap-qvl_tdx_quote.bin"])
    cases = {"qe report": (start + 128 + 6 + 10, 1), "attestation key": (start + 64 + 5, 0),
             "qe auth data": (start + 128 + 6 + 384 + 64 + 2 + 3, 1)}
    for label, (offset, check) in cases.items():
        changed = bytearray(data)
        changed[offset] ^= 0x01
        results = chain_result(parse_quote(bytes(changed)), now)
        assert results[check], (label, results)
    pem = SIGNED.pck_chain_pem
    leaf_end = pem.index(b"-----END CERTIFICATE-----")
    changed = bytearray(data)
    changed[data.index(pem) + leaf_end - 40] ^= 0x02  # inside the leaf's base64 (its signature)
    try:
        results = chain_result(parse_quote(bytes(changed)), now)
        assert results[1] or results[2]
    except TdxError:
        pass  # no longer a readable certificate: refused as input


def _sign(key, message):
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _cert(subject, issuer, key, issuer_key, ca):
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def forged_quote(body_from: bytes) -> bytes:
    """A quote of correct form whose whole chain is made here: a self-made root 'Intel SGX Root CA',
    an intermediate, a PCK leaf, an attestation key, each signature computed with cryptography."""
    original = parse_quote(body_from)
    root_key, ca_key, pck_key, att_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    root = _cert("Intel SGX Root CA", "Intel SGX Root CA", root_key, root_key, True)
    ca = _cert("Intel SGX PCK Platform CA", "Intel SGX Root CA", ca_key, root_key, True)
    leaf = _cert("Intel SGX PCK Certificate", "Intel SGX PCK Platform CA", pck_key, ca_key, False)
    numbers = att_key.public_key().public_numbers()
    raw_key = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    auth = original.qe_auth_data
    qe_report = original.qe_report[:320] + hashlib.sha256(raw_key + auth).digest() + bytes(32)
    chain = b"".join(cert.public_bytes(Encoding.PEM) for cert in (leaf, ca, root))
    inner = struct.pack("<HI", 5, len(chain)) + chain
    cert_data = qe_report + _sign(pck_key, qe_report) + struct.pack("<H", len(auth)) + auth + inner
    signature_data = _sign(att_key, original.signed) + raw_key + struct.pack("<HI", 6, len(cert_data)) + cert_data
    return original.signed + struct.pack("<I", len(signature_data)) + signature_data


def test_a_quote_signed_under_a_self_made_ca_is_refused_at_the_root():
    quote = parse_quote(forged_quote(quote_bytes("dcap-qvl_tdx_quote.bin")))
    signature, qe_report, chain = chain_result(quote, at("2026-01-01T00:00:00Z"))
    assert signature is None and qe_report is None  # every signature in it holds...
    assert chain and "not at Intel's SGX Root CA" in chain  # ...but not under Intel's root


def test_quote_command_prints_the_fields_and_json(tmp_path):
    path = os.path.join(DATA, "quotes", "go-tdx-guest_tdx_prod_quote_SPR_E4.dat")
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "tdx_rules", "quote", path, "--json"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    fields = json.loads(done.stdout)
    assert {name: fields[name] for name in SPR_E4} == SPR_E4
    assert set(fields) >= {"version", "tee_type", "att_key_type", "tee_tcb_svn", "mr_seam", "mr_signer_seam",
                           "seam_attributes", "td_attributes", "xfam", "mrtd", "mr_config_id", "mr_owner",
                           "mr_owner_config", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data"}
    done = subprocess.run([sys.executable, "-m", "tdx_rules", "quote", path], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and f"mrtd             {SPR_E4['mrtd']}" in done.stdout
    bad = tmp_path / "short.bin"
    bad.write_bytes(quote_bytes("dcap-qvl_tdx_quote.bin")[:600])
    done = subprocess.run([sys.executable, "-m", "tdx_rules", "quote", str(bad)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 1 and done.stderr.startswith("tdx-rules: error: ") and done.stderr.count("\n") == 1


REAL = quote_bytes("trustee_tdx_quote_5.dat")


@settings(max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=6000),
                 st.tuples(st.integers(0, len(REAL) - 1), st.integers(1, 255), st.integers(0, len(REAL))).map(
                     lambda t: (REAL[:t[0]] + bytes([REAL[t[0]] ^ t[1]]) + REAL[t[0] + 1:])[:max(t[2], 1)]),
                 st.tuples(st.integers(0, len(REAL)), st.binary(min_size=1, max_size=8)).map(
                     lambda t: REAL[:t[0]] + t[1] + REAL[t[0]:])))
def test_fuzzed_quotes_parse_or_are_refused_in_one_line(data):
    try:
        quote = parse_quote(data)
    except TdxError as error:
        assert "\n" not in str(error)
        return
    try:
        certs = pck.load_chain(quote.pck_chain_pem)
    except TdxError:
        return
    pck.check_quote_signature(quote)
    pck.check_qe_report(quote, certs[0])
    pck.check_chain(certs, at("2025-01-01T00:00:00Z"))
