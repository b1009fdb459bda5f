"""The TCB status of a TDX quote under Intel's collateral (tdx_rules.attest.collateral), with the
dcap-qvl sample quote and the collateral dcap-qvl verifies it with: UpToDate at the time dcap-qvl
checks it; expired, not yet valid, tampered, revoked and malformed collateral refused by name;
TCB level matching against levels read from the TCB info JSON in the test itself; and fuzzing
of the DER reader and of tcb_status with mutated collateral."""

import dataclasses
import datetime
import functools
import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.attest import collateral as col
from tdx_rules.attest import pck
from tdx_rules.attest.quote import parse_quote
from tdx_rules.attest.sgx_extension import SGX_EXTENSION_OID, parse_sgx_extension, pck_tcb, read_tlvs
from tdx_rules.errors import TdxError
from tests.conftest import ROOT, fuzz_examples

DATA = os.path.join(ROOT, "..", "shared", "testdata", "tdx-attestation")
QUOTE = os.path.join(DATA, "quotes", "dcap-qvl_tdx_quote.bin")
COLLATERAL = os.path.join(DATA, "collateral", "dcap-qvl_tdx_quote_collateral.json")
BODY = 48  # a version 4 quote's TD report body follows the 48-byte header; TEE_TCB_SVN opens it
DAY = datetime.timedelta(days=1)


def at(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# dcap-qvl tests/verify_quote.rs:99-110 verifies its sample at the collateral's earliest nextUpdate minus
# one second (1752919234) and asserts TCB status UpToDate with no advisory IDs.
DCAP_QVL_NOW = at("2025-07-19T10:00:34Z")


@functools.lru_cache(maxsize=None)
def _raw():
    with open(QUOTE, "rb") as handle:
        quote = handle.read()
    with open(COLLATERAL) as handle:
        return quote, handle.read()


def sample():
    """(raw quote, parsed quote, PCK chain, a fresh copy of the collateral dict)."""
    raw, text = _raw()
    quote = parse_quote(raw)
    return raw, quote, pck.load_chain(quote.pck_chain_pem), json.loads(text)


def with_tee_tcb_svn(raw: bytes, index: int, value: int):
    """The sample quote with TEE_TCB_SVN[index] set (its signature no longer verifies; matching does not care)."""
    data = bytearray(raw)
    data[BODY + index] = value
    quote = parse_quote(bytes(data))
    assert quote.body["tee_tcb_svn"][index] == value
    return quote


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --- the sample, as dcap-qvl checks it ---------------------------------------------------------

def test_dcap_qvl_sample_is_up_to_date_at_the_time_dcap_qvl_checks_it():
    _, quote, certs, collateral = sample()
    result = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert result.problems == []
    assert (result.status, result.advisory_ids) == ("UpToDate", [])
    assert (result.platform_status, result.qe_status) == ("UpToDate", "UpToDate")


def test_the_fmspc_read_from_the_pck_certificate_is_the_collaterals():
    _, quote, certs, collateral = sample()
    assert json.loads(collateral["tcb_info"])["fmspc"] == "B0C06F000000"
    assert pck_tcb(certs[0]).fmspc.hex() == "b0c06f000000"
    assert col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW).fmspc == "b0c06f000000"


def test_load_collateral_reads_the_sample_file():
    assert col.load_collateral(COLLATERAL) == sample()[3]


# --- time ------------------------------------------------------------------------------------

def test_after_next_update_the_problems_name_the_expiry():
    _, quote, certs, collateral = sample()
    problems = col.tcb_status(collateral, quote, certs, at("2025-08-01T00:00:00Z")).problems
    for label, next_update in (("TCB info", "2025-07-19T10:16:03Z"), ("QE identity", "2025-07-19T10:32:27Z"),
                               ("PCK CRL", "2025-07-19T10:00:35Z")):
        assert any(p.startswith(f"the {label} expired at its nextUpdate {next_update}") for p in problems), problems
    assert len(problems) == 3


def test_one_second_after_the_pck_crls_next_update_only_the_crl_is_stale():
    _, quote, certs, collateral = sample()
    problems = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW + datetime.timedelta(seconds=2)).problems
    assert problems == ["the PCK CRL expired at its nextUpdate 2025-07-19T10:00:35Z, before 2025-07-19T10:00:36Z; "
                        "fetch fresh collateral"]


def test_before_the_issue_date_the_collateral_is_not_yet_valid():
    _, quote, certs, collateral = sample()
    problems = col.tcb_status(collateral, quote, certs, at("2025-06-01T00:00:00Z")).problems
    for label in ("TCB info", "QE identity", "PCK CRL"):
        assert any(p.startswith(f"the {label} is issued at") and "not yet valid" in p for p in problems), problems


# --- tampering -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,label,old,new", [
    ("tcb_info", "TCB info", '"issueDate":"2025-06-19T10:16:03Z"', '"issueDate":"2025-06-18T10:16:03Z"'),
    ("qe_identity", "QE identity", '"issueDate":"2025-06-19T10:32:27Z"', '"issueDate":"2025-06-18T10:32:27Z"'),
])
def test_one_changed_digit_breaks_the_signature_of_the_tcb_info_or_qe_identity(key, label, old, new):
    _, quote, certs, collateral = sample()
    assert collateral[key].count(old) == 1
    collateral[key] = collateral[key].replace(old, new)
    json.loads(collateral[key])  # still JSON, still inside its window: only the signature tells
    problems = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW).problems
    assert problems == [f"the {label} signature does not verify with 'Intel SGX TCB Signing''s key: the {label} "
                        "was changed or is not Intel's"]


def test_an_fmspc_that_is_not_the_pck_certificates_is_a_problem():
    _, quote, certs, collateral = sample()
    body = json.loads(collateral["tcb_info"])
    body["fmspc"] = "00906ED50000"
    collateral["tcb_info"] = json.dumps(body)
    problems = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW).problems
    assert any("FMSPC b0c06f000000 is not the TCB info's 00906ed50000" in p for p in problems)
    assert any("TCB info signature does not verify" in p for p in problems)


def test_the_collateral_of_one_platform_does_not_pass_for_another_platforms_quote():
    with open(os.path.join(DATA, "quotes", "go-tdx-guest_tdx_prod_quote_SPR_E4.dat"), "rb") as handle:
        quote = parse_quote(handle.read())
    problems = col.tcb_status(sample()[3], quote, pck.load_chain(quote.pck_chain_pem), DCAP_QVL_NOW).problems
    assert "the PCK certificate's FMSPC 50806f000000 is not the TCB info's b0c06f000000: the TCB info is for " \
           "another platform" in problems


# --- revocation ----------------------------------------------------------------------------

def throwaway_ca(subject: x509.Name, now):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def crl_revoking(subject: x509.Name, key, serials, now, next_update=DAY):
    builder = x509.CertificateRevocationListBuilder().issuer_name(subject).last_update(now - DAY) \
        .next_update(now + next_update)
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - DAY).build())
    return builder.sign(key, hashes.SHA256())


def test_revoked_serials_reads_a_crl_only_with_its_issuers_key():
    _, _, certs, _ = sample()
    key, ca = throwaway_ca(certs[0].issuer, DCAP_QVL_NOW)
    crl = crl_revoking(certs[0].issuer, key, [certs[0].serial_number, 7], DCAP_QVL_NOW)
    assert col.revoked_serials(crl, key.public_key()) == {certs[0].serial_number, 7}
    assert col.revoked_serials(crl, ec.generate_private_key(ec.SECP256R1()).public_key()) is None
    assert col.crl_problems(crl, ca, DCAP_QVL_NOW, "PCK CRL") == []
    assert col.crl_problems(crl, ca, DCAP_QVL_NOW + 2 * DAY, "PCK CRL")[0].startswith("the PCK CRL expired")
    stranger = throwaway_ca(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")]), DCAP_QVL_NOW)[1]
    assert col.crl_problems(crl, stranger, DCAP_QVL_NOW, "PCK CRL") == [
        "the PCK CRL is issued by 'Intel SGX PCK Platform CA', not by 'someone'",
        "the PCK CRL's signature does not verify with 'someone''s key"]


def test_intels_pck_crl_does_not_list_the_sample_pck_certificate():
    _, _, certs, collateral = sample()
    crl = x509.load_der_x509_crl(bytes.fromhex(collateral["pck_crl"]))
    platform_ca = pck.load_chain(collateral["pck_crl_issuer_chain"].encode())[0]
    serials = col.revoked_serials(crl, platform_ca.public_key())
    assert len(serials) == len(crl) == 44 and certs[0].serial_number not in serials
    assert col.revoked_serials(crl, certs[-1].public_key()) is None  # the root did not sign it


def test_a_pck_crl_listing_the_pck_certificate_from_a_ca_outside_intels_tree_is_refused():
    _, quote, certs, collateral = sample()
    key, ca = throwaway_ca(certs[0].issuer, DCAP_QVL_NOW)  # Intel's CA's name, not its key
    crl = crl_revoking(certs[0].issuer, key, [certs[0].serial_number], DCAP_QVL_NOW)
    collateral["pck_crl"] = crl.public_bytes(Encoding.DER).hex()
    collateral["pck_crl_issuer_chain"] = ca.public_bytes(Encoding.PEM).decode()
    result = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert any(p.startswith("the PCK CRL issuer chain ends at 'Intel SGX PCK Platform CA'") and
               "not at Intel's SGX Root CA" in p for p in result.problems), result.problems
    assert any(p.startswith("the PCK certificate (serial 3c16ed54") for p in result.problems)
    assert result.status == "Revoked"


# --- TCB levels ----------------------------------------------------------------------------

def test_a_lower_pcesvn_selects_the_older_level_with_its_status_and_advisories():
    raw, quote, certs, collateral = sample()
    levels = json.loads(collateral["tcb_info"])["tcbLevels"]
    assert levels[0]["tcb"]["pcesvn"] > 10 >= levels[1]["tcb"]["pcesvn"]
    tcb = dataclasses.replace(pck_tcb(certs[0]), pce_svn=10)
    info = col.parse_tcb_info(collateral["tcb_info"])
    level = col.match_tcb_level(info, tcb, quote.body["tee_tcb_svn"])
    assert (level.status, list(level.advisory_ids)) == (levels[1]["tcbStatus"], levels[1]["advisoryIDs"])
    verdict = col.platform_status(info, tcb, quote.body)
    assert (verdict.status, list(verdict.advisory_ids)) == ("OutOfDate", sorted(levels[1]["advisoryIDs"]))


def test_a_tee_tcb_svn_below_every_levels_tdx_components_is_unrecognized():
    raw, _, certs, collateral = sample()
    levels = json.loads(collateral["tcb_info"])["tcbLevels"]
    assert all(level["tcb"]["tdxtcbcomponents"][2]["svn"] == 2 for level in levels)
    quote = with_tee_tcb_svn(raw, 2, 1)
    info = col.parse_tcb_info(collateral["tcb_info"])
    assert col.match_tcb_level(info, pck_tcb(certs[0]), quote.body["tee_tcb_svn"]) is None
    result = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert result.status == result.platform_status == "Unrecognized"
    assert [p for p in result.problems if p.startswith("no TCB level matches")]


def test_a_lowered_tee_tcb_svn_selects_an_older_level_whose_tdx_components_it_reaches():
    # The sample's two levels ask for the same TDX SVNs; lower the older one's here (matching reads no signature).
    raw, _, certs, collateral = sample()
    body = json.loads(collateral["tcb_info"])
    body["tcbLevels"][1]["tcb"]["tdxtcbcomponents"][2]["svn"] = 1
    older = body["tcbLevels"][1]
    info = col.parse_tcb_info(json.dumps(body))
    quote = with_tee_tcb_svn(raw, 2, 1)
    level = col.match_tcb_level(info, pck_tcb(certs[0]), quote.body["tee_tcb_svn"])
    assert (level.status, list(level.advisory_ids), level.pce_svn) == \
        (older["tcbStatus"], older["advisoryIDs"], older["tcb"]["pcesvn"])


def test_the_tdx_module_svn_selects_the_module_identitys_level():
    raw, _, certs, collateral = sample()
    body = json.loads(collateral["tcb_info"])
    identity = [m for m in body["tdxModuleIdentities"] if m["id"] == "TDX_01"][0]  # TEE_TCB_SVN[1] is 1
    expected = [lv for lv in identity["tcbLevels"] if lv["tcb"]["isvsvn"] <= 3][0]
    quote = with_tee_tcb_svn(raw, 0, 3)  # below the newest level's tdxtcbcomponents[0] (5): bytes 0, 1 are the module's
    info = col.parse_tcb_info(collateral["tcb_info"])
    tcb = pck_tcb(certs[0])
    assert col.match_tcb_level(info, tcb, quote.body["tee_tcb_svn"]).pce_svn == body["tcbLevels"][0]["tcb"]["pcesvn"]
    module = col.tdx_module_status(info, quote.body)
    assert (module.status, module.problems) == (expected["tcbStatus"], []) == ("OutOfDate", [])
    assert col.platform_status(info, tcb, quote.body).status == "OutOfDate"
    assert col.tdx_module_status(info, with_tee_tcb_svn(raw, 0, 1).body).status == "Unrecognized"
    problems = col.tdx_module_status(info, with_tee_tcb_svn(raw, 1, 7).body).problems
    assert problems == ["the TCB info has no TDX module identity TDX_07 for the quote's TDX module "
                        "(TEE_TCB_SVN 06070300000000000000000000000000)"]


def test_a_qe_report_unlike_the_qe_identity_is_a_problem_and_an_old_qe_is_out_of_date():
    _, quote, _, collateral = sample()
    identity = col.parse_qe_identity(collateral["qe_identity"])
    report = dict(quote.qe_report_fields)
    assert col.qe_status(identity, report) == col.Verdict("UpToDate", (), [])
    older = dataclasses.replace(identity, levels=(col.Level("UpToDate", (), isv_svn=8),
                                                  col.Level("OutOfDate", ("INTEL-SA-00615",), isv_svn=6)))
    assert col.qe_status(older, report) == col.Verdict("OutOfDate", ("INTEL-SA-00615",), [])
    assert col.qe_status(older, dict(report, isv_svn=b"\x05\x00")).status == "Unrecognized"
    wrong = dict(report, mr_signer=b"\x01" * 32, isv_prod_id=b"\x01\x00", attributes=b"\x13" + report["attributes"][1:])
    problems = col.qe_status(identity, wrong).problems
    assert [p.split(" ")[2] for p in problems] == ["MRSIGNER", "ISVPRODID", "ATTRIBUTES"]
    assert col.qe_status(identity, dict(report, attributes=b"\x15" + report["attributes"][1:])).problems == []


@pytest.mark.parametrize("platform,other,converged", [  # Intel QVL Checks/TcbLevelCheck.cpp, TdxModuleCheck.cpp
    ("UpToDate", "OutOfDate", "OutOfDate"), ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
    ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
    ("OutOfDate", "OutOfDate", "OutOfDate"), ("Revoked", "OutOfDate", "Revoked"), ("UpToDate", "Revoked", "Revoked"),
    ("ConfigurationNeeded", "UpToDate", "ConfigurationNeeded"), ("SWHardeningNeeded", None, "SWHardeningNeeded"),
    ("UpToDate", "Unrecognized", "Unrecognized"), ("Unrecognized", "UpToDate", "Unrecognized"),
])
def test_statuses_converge_as_intels_qvl_converges_them(platform, other, converged):
    assert col.converge(platform, other) == converged


# --- malformed collateral ------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("tcb_info_signature", "not hex", "collateral: tcb_info_signature: not hex"),
    ("qe_identity_signature", "00" * 63, "collateral: qe_identity_signature: 63 bytes, not 64"),
    ("pck_crl", "zz", "collateral: pck_crl: not hex"),
    ("root_ca_crl", "3000", "collateral: root_ca_crl: not a DER CRL"),
    ("tcb_info", '{"id": "TDX"', "collateral: tcb_info: not JSON"),
    ("qe_identity", "[]", "collateral: qe_identity: not a JSON object"),
    ("tcb_info_issuer_chain", "no PEM here", "collateral: tcb_info_issuer_chain: not a PEM certificate chain"),
    ("pck_crl_issuer_chain", 17, "collateral: pck_crl_issuer_chain: not a string"),
])
def test_collateral_that_cannot_be_read_raises_one_line_naming_the_key(key, value, message):
    _, quote, certs, collateral = sample()
    collateral[key] = value
    with pytest.raises(TdxError) as error:
        col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert one_line(error).startswith(message)


def test_a_missing_key_or_field_is_named():
    _, quote, certs, collateral = sample()
    del collateral["root_ca_crl"]
    with pytest.raises(TdxError) as error:
        col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert one_line(error).startswith("collateral: no 'root_ca_crl'")
    _, _, _, collateral = sample()
    body = json.loads(collateral["tcb_info"])
    del body["tcbLevels"][1]["tcb"]["pcesvn"]
    collateral["tcb_info"] = json.dumps(body)
    with pytest.raises(TdxError) as error:
        col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    assert one_line(error).startswith("collateral: tcb_info.tcbLevels[1].tcb.pcesvn: missing")


def test_load_collateral_names_the_file_and_the_key(tmp_path):
    collateral = sample()[3]
    del collateral["qe_identity"]
    path = tmp_path / "collateral.json"
    path.write_text(json.dumps(collateral))
    with pytest.raises(TdxError) as error:
        col.load_collateral(str(path))
    assert one_line(error).startswith(f"{path}: no 'qe_identity'")
    path.write_text("{")
    with pytest.raises(TdxError) as error:
        col.load_collateral(str(path))
    assert one_line(error).startswith(f"{path}: not a JSON file")
    with pytest.raises(TdxError) as error:
        col.load_collateral(str(tmp_path / "absent.json"))
    assert "cannot read the collateral" in one_line(error)


def sgx_extension_der() -> bytes:
    cert = sample()[2][0]
    return cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value.value


def cert_with_extension(value: bytes) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a PCK certificate with a damaged extension")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(DCAP_QVL_NOW - DAY).not_valid_after(DCAP_QVL_NOW + DAY)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), value), critical=False)
            .sign(key, hashes.SHA256()))


def test_the_sgx_extension_of_the_sample_pck_certificate():
    tcb = parse_sgx_extension(sgx_extension_der())
    assert tcb.sgx_svns == (3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8 and tcb.pce_svn == 11
    assert tcb.cpu_svn == bytes(tcb.sgx_svns)  # this platform's CPUSVN bytes are its component SVNs
    assert (tcb.pce_id.hex(), tcb.fmspc.hex()) == ("0000", "b0c06f000000")


def test_a_truncated_sgx_extension_raises_one_line_naming_it():
    damaged = sgx_extension_der()[:-5]
    with pytest.raises(TdxError) as error:
        parse_sgx_extension(damaged)
    assert "SGX extension (OID 1.2.840.113741.1.13.1)" in one_line(error)
    _, quote, _, collateral = sample()
    with pytest.raises(TdxError) as error:
        col.tcb_status(collateral, quote, [cert_with_extension(damaged)], DCAP_QVL_NOW)
    assert one_line(error).startswith("PCK certificate: the PCK certificate's SGX extension")


@pytest.mark.parametrize("der,why", [
    (b"\x30\x80\x00\x00", "indefinite length"),
    (b"\x30\x81\x05\x02\x01\x00\x02\x01", "not in its shortest form"),
    (b"\x30\x05\x02\x01\x00", "claims 5 bytes"),
    (b"\x1f\x01\x00", "multi-byte tag"),
    (b"\x30\x00\x30\x00", "expected one element"),
])
def test_the_der_reader_refuses_what_der_does_not_allow(der, why):
    with pytest.raises(TdxError) as error:
        parse_sgx_extension(der)
    assert why in one_line(error)


def test_a_repeated_fmspc_is_refused():
    der = sgx_extension_der()
    fmspc = bytes.fromhex("3014060a2a864886f84d010d01040406b0c06f000000")
    outer = read_tlvs(der)[0][1] + fmspc
    with pytest.raises(TdxError) as error:
        parse_sgx_extension(b"\x30\x82" + len(outer).to_bytes(2, "big") + outer)
    assert "1.2.840.113741.1.13.1.4 appears twice" in one_line(error)


# --- fuzzing ---------------------------------------------------------------------------------

@settings(max_examples=fuzz_examples(100), deadline=None)
@given(st.binary(max_size=700))
def test_the_der_reader_returns_a_tcb_or_raises_tdx_error_on_any_bytes(data):
    try:
        parse_sgx_extension(data)
    except TdxError:
        pass


@settings(max_examples=fuzz_examples(100), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 553), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 554))
def test_a_mutated_sgx_extension_parses_or_raises_tdx_error(changes, length):
    data = bytearray(sgx_extension_der())
    for position, value in changes:
        data[position] = value
    try:
        parse_sgx_extension(bytes(data[:length]))
    except TdxError:
        pass


MUTATION_CHARS = "0123456789abcdefABCDEF\"{}[],:- =/+\\\n"


def check_result_or_tdx_error(collateral, quote, certs):
    try:
        result = col.tcb_status(collateral, quote, certs, DCAP_QVL_NOW)
    except TdxError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(result, col.TcbResult) and all(isinstance(p, str) for p in result.problems)


@pytest.mark.filterwarnings("ignore")  # cryptography warns of the odd certificates and CRLs mutations make
@settings(max_examples=fuzz_examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(col.KEYS), st.integers(0, 6000), st.sampled_from(["replace", "delete", "insert", "cut"]),
       st.sampled_from(MUTATION_CHARS))
def test_tcb_status_of_mutated_collateral_is_a_result_or_tdx_error(key, position, how, char):
    _, quote, certs, collateral = sample()
    text = collateral[key]
    position %= len(text)
    collateral[key] = {"replace": text[:position] + char + text[position + 1:],
                       "delete": text[:position] + text[position + 1:],
                       "insert": text[:position] + char + text[position:], "cut": text[:position]}[how]
    check_result_or_tdx_error(collateral, quote, certs)


def leaves(value, path=()):
    """The paths to every value inside a parsed JSON document."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from leaves(inner, path + (key,))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.floats(allow_nan=False)
                           | st.text(max_size=8) | st.sampled_from(["00" * 8, "FF" * 48, "2025-07-01T00:00:00Z",
                                                                     "TDX_01", "UpToDate", "Revoked"]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


@settings(max_examples=fuzz_examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["tcb_info", "qe_identity"]), st.integers(0, 10 ** 6), JSON_VALUES,
       st.booleans())
def test_tcb_status_of_collateral_with_a_json_value_replaced_is_a_result_or_tdx_error(key, pick, value, drop):
    _, quote, certs, collateral = sample()
    body = json.loads(collateral[key])
    paths = [path for path in leaves(body) if path]
    path = paths[pick % len(paths)]
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    collateral[key] = json.dumps(body)
    check_result_or_tdx_error(collateral, quote, certs)
