"""`tdx-rules verify`: a TD's quote and CCEL event log against a manifest.

The evidence is public projects' test data: go-tdx-guest's cos-113 quote with the event log of
the same TD (go-tdx-guest replays one against the other in rtmr/ccel_test.go:24-51), trustee's
quote whose TD has DEBUG set (trustee's parse_tdx_claims_expected.json says "debug": true), and
another TD's log. The manifests are written here in the form the image rule writes them.
"""

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest

from tdx_rules.attest.eventlog import parse_eventlog
from tdx_rules.attest.quote import parse_quote
from tdx_rules.attest.verify import verify
from tests.conftest import ROOT
from tests.test_quote import DATA, at, quote_bytes

COS113_QUOTE = "go-tdx-guest_cos-113-tdx-quote.dat"
COS113_LOG = os.path.join(DATA, "eventlogs", "go-tdx-guest_cos113_ccel_data.dat")
NOW = "2025-01-01T00:00:00Z"


def cos113():
    return parse_quote(quote_bytes(COS113_QUOTE)), parse_eventlog(open(COS113_LOG, "rb").read())


def manifest_for(quote, log) -> dict:
    """The manifest of an image whose TD is exactly the cos-113 TD."""
    events = [{"register": e.rtmr, "description": e.type_name, "digest": e.sha384.hex()}
              for e in log.events if e.rtmr in (1, 2)]
    return {"name": "cos113", "launch": {"td_attributes": quote.body["td_attributes"].hex(),
                                         "xfam": {"fixed1": "0300000000000000"}},
            "measurements": {"mrtd": quote.body["mrtd"].hex(), "rtmr1": quote.body["rtmr1"].hex(),
                             "rtmr2": quote.body["rtmr2"].hex(), "events": events}}


def replay(events, register):
    value = bytes(48)
    for event in events:
        if event["register"] == register:
            value = hashlib.sha384(value + bytes.fromhex(event["digest"])).digest()
    return value.hex()


def statuses(result):
    return {check["name"]: check["status"] for check in result["checks"]}


def test_the_cos113_td_is_exactly_a_manifest_of_its_own_measurements():
    quote, log = cos113()
    result = verify(manifest_for(quote, log), quote, log, at(NOW))
    assert statuses(result) == {name: "ok" for name in (
        "quote-signature", "qe-report", "pck-chain", "td-attributes", "mrtd", "rtmr1", "rtmr2", "eventlog-replay",
        "rtmr0-firmware")}, result
    assert result["verdict"] == "ok" and result["first_difference"] is None


def test_a_manifest_that_differs_in_one_rtmr2_event_names_that_event():
    quote, log = cos113()
    manifest = manifest_for(quote, log)
    rtmr2 = [i for i, e in enumerate(manifest["measurements"]["events"]) if e["register"] == 2]
    changed = rtmr2[1]
    manifest["measurements"]["events"][changed]["digest"] = "ab" * 48
    manifest["measurements"]["events"][changed]["description"] = "kernel command line of another build"
    manifest["measurements"]["rtmr2"] = replay(manifest["measurements"]["events"], 2)
    result = verify(manifest, quote, log, at(NOW))
    assert result["verdict"] == "differs"
    assert statuses(result)["rtmr2"] == "differs" and statuses(result)["rtmr1"] == "ok"
    difference = result["first_difference"]
    logged = [e for e in log.events if e.rtmr == 2][1]
    assert difference["register"] == "rtmr2" and difference["index"] == 1
    assert difference["manifest"] == {"description": "kernel command line of another build", "digest": "ab" * 48}
    assert difference["eventlog"]["digest"] == logged.sha384.hex()
    assert difference["eventlog"]["event_type"] == logged.type_name
    assert difference["eventlog"]["log_index"] == logged.index
    # The data as the firmware measured it, decoded: grub's EV_IPL text, as the raw bytes say.
    assert logged.data.rstrip(b"\0").decode("ascii", "replace")[:20] in difference["eventlog"]["data"]


def test_a_log_of_another_td_does_not_replay_to_this_quote_and_fails():
    quote, _ = cos113()
    other = parse_eventlog(open(os.path.join(DATA, "eventlogs", "trustee_CCEL_data_ovmf"), "rb").read())
    result = verify(manifest_for(*cos113()), quote, other, at(NOW))
    assert statuses(result)["eventlog-replay"] == "failed" and result["verdict"] == "failed"


def test_a_td_with_the_debug_attribute_fails_whatever_the_manifest_says():
    quote = parse_quote(quote_bytes("trustee_tdx_quote_4.dat"))
    manifest = {"launch": {"td_attributes": quote.body["td_attributes"].hex(), "xfam": {"fixed1": "0300000000000000"}},
                "measurements": {name: quote.body[name].hex() for name in ("mrtd", "rtmr1", "rtmr2")}}
    manifest["measurements"]["events"] = []
    result = verify(manifest, quote, None, at(NOW))
    check = [c for c in result["checks"] if c["name"] == "td-attributes"][0]
    assert check["status"] == "failed" and "DEBUG" in check["detail"] and result["verdict"] == "failed"


def test_attributes_other_than_the_launch_asks_for_differ():
    quote, log = cos113()
    manifest = manifest_for(quote, log)
    manifest["launch"]["td_attributes"] = "0000000000000000"  # the TD reports SEPT_VE_DISABLE
    assert statuses(verify(manifest, quote, log, at(NOW)))["td-attributes"] == "differs"


def test_expired_certificates_fail_the_chain():
    quote, log = cos113()
    result = verify(manifest_for(quote, log), quote, log, at("2040-01-01T00:00:00Z"))
    assert statuses(result)["pck-chain"] == "failed" and result["verdict"] == "failed"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tdx_rules", "verify", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_verify_command_exit_status_json_and_lines(tmp_path):
    quote, log = cos113()
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(manifest_for(quote, log)))
    quote_path = os.path.join(DATA, "quotes", COS113_QUOTE)
    done = run_cli("--manifest", str(manifest), "--quote", quote_path, "--eventlog", COS113_LOG, "--now", NOW, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"verdict", "checks", "first_difference"} and result["verdict"] == "ok"
    assert all(set(check) == {"name", "status", "detail"} for check in result["checks"])
    done = run_cli("--manifest", str(manifest), "--quote", quote_path, "--now", NOW)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "verdict: ok"
    assert "ok       quote-signature" in done.stdout
    different = manifest_for(quote, log)
    different["measurements"]["mrtd"] = "00" * 48
    manifest.write_text(json.dumps(different))
    done = run_cli("--manifest", str(manifest), "--quote", quote_path, "--now", NOW)
    assert done.returncode == 1 and "DIFFERS  mrtd" in done.stdout and done.stdout.endswith("verdict: differs\n")
    for bad in (["--manifest", str(tmp_path / "missing.json"), "--quote", quote_path],
                ["--manifest", str(manifest), "--quote", COS113_LOG],
                ["--manifest", str(manifest), "--quote", quote_path, "--now", "yesterday"],
                ["--manifest", str(manifest)]):
        done = run_cli(*bad)
        assert done.returncode == 2 and done.stderr.startswith("tdx-rules: error: ") \
            and done.stderr.count("\n") == 1, (bad, done.stderr)


def test_a_manifest_without_measurements_is_bad_input():
    quote, log = cos113()
    manifest = copy.deepcopy(manifest_for(quote, log))
    del manifest["measurements"]
    with pytest.raises(Exception, match="no measurements object"):
        verify(manifest, quote, log, at(NOW))


def test_the_firmware_rtmr0_events_are_checked_and_the_others_listed_as_platform_values():
    from tdx_rules.measure import rtmr0

    log = parse_eventlog(open(os.path.join(DATA, "eventlogs", "trustee_CCEL_data_ovmf"), "rb").read())
    replayed = log.replay()
    events = [{"register": e.rtmr, "description": e.type_name, "digest": e.sha384.hex()}
              for e in log.events if e.rtmr in (1, 2)]
    separator = {"register": 0, "type": "EV_SEPARATOR", "description": "separator",
                 "digest": hashlib.sha384(bytes(4)).hexdigest()}
    manifest = {"measurements": {"mrtd": "00" * 48, "rtmr1": replayed[1].hex(), "rtmr2": replayed[2].hex(),
                                 "events": events, "rtmr0_firmware": rtmr0.secure_boot_events({}) + [separator]}}
    result = verify(manifest, None, log, at(NOW))
    check = [c for c in result["checks"] if c["name"] == "rtmr0-firmware"][0]
    assert check["status"] == "ok" and result["verdict"] == "ok", result
    assert "TdxTable" in check["detail"] and "ACPI DATA" in check["detail"] and "SecureBoot" not in check["detail"]
    manifest["measurements"]["rtmr0_firmware"][3]["digest"] = "cd" * 48  # db
    check = [c for c in verify(manifest, None, log, at(NOW))["checks"] if c["name"] == "rtmr0-firmware"][0]
    assert check["status"] == "differs" and check["detail"].startswith("db (0 bytes): log event 5 has")


def test_collateral_adds_the_tcb_status_dcap_qvl_asserts():
    # dcap-qvl tests/verify_quote.rs:99-110: UpToDate, no advisories, at 2025-07-19T10:00:34Z.
    quote = parse_quote(quote_bytes("dcap-qvl_tdx_quote.bin"))
    collateral = os.path.join(DATA, "collateral", "dcap-qvl_tdx_quote_collateral.json")
    manifest = {"launch": {"td_attributes": "0000001000000000", "xfam": {"fixed1": "0300000000000000"}},
                "measurements": {name: quote.body[name].hex() for name in ("mrtd", "rtmr1", "rtmr2")}}
    from tdx_rules.attest.collateral import load_collateral

    result = verify(manifest, quote, None, at("2025-07-19T10:00:34Z"), load_collateral(collateral))
    check = [c for c in result["checks"] if c["name"] == "tcb-status"][0]
    assert check["status"] == "ok" and check["detail"].startswith("UpToDate") and result["verdict"] == "ok"
    result = verify(manifest, quote, None, at("2025-08-01T00:00:00Z"), load_collateral(collateral))
    assert statuses(result)["tcb-status"] == "failed" and "nextUpdate" in \
        [c for c in result["checks"] if c["name"] == "tcb-status"][0]["detail"]
