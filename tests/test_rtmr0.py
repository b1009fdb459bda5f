"""The RTMR[0] events that depend only on the firmware: the CFV digest, the Secure Boot variables
and the separator (tdx_rules.measure.rtmr0), and how verify holds a log against them.

Outside references: real TD event logs (trustee's log of an OVMF TD without enrolled keys,
go-tdx-guest's cos-113 log with enrolled keys), whose variable events are the UEFI_VARIABLE_DATA
structures the digests are taken of; Debian's firmware images; and virt-firmware's virt-fw-vars
(Red Hat's edk2 variable store tool) for the variable store of an image with Microsoft's keys.
"""

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest

from tdx_rules.attest.eventlog import parse_eventlog
from tdx_rules.measure import rtmr0
from tests import debian
from tests.test_quote import DATA

TRUSTEE_OVMF = os.path.join(DATA, "eventlogs", "trustee_CCEL_data_ovmf")
COS113 = os.path.join(DATA, "eventlogs", "go-tdx-guest_cos113_ccel_data.dat")


def log_of(path):
    return parse_eventlog(open(path, "rb").read())


def driver_config(log):
    return [e for e in log.events if e.rtmr == 0 and e.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG"]


def test_an_empty_variable_store_predicts_the_secure_boot_events_of_a_td_without_keys():
    predicted = rtmr0.secure_boot_events({})
    logged = driver_config(log_of(TRUSTEE_OVMF))
    assert [e.decoded().split(" ")[0] for e in logged] == [name for name, _ in rtmr0.SECURE_BOOT_VARIABLES]
    assert [p["digest"] for p in predicted] == [e.sha384.hex() for e in logged]


def test_variable_data_rebuilds_the_structures_a_td_with_keys_measured():
    for event in driver_config(log_of(COS113)):
        raw = event.data
        guid = uuid.UUID(bytes_le=raw[:16])
        name_length = int.from_bytes(raw[16:24], "little")
        data_length = int.from_bytes(raw[24:32], "little")
        name = raw[32:32 + 2 * name_length].decode("utf-16-le")
        data = raw[32 + 2 * name_length:]
        assert len(data) == data_length
        assert rtmr0.variable_data(name, guid, data) == raw
        assert hashlib.sha384(raw).digest() == event.sha384
    # Keys are enrolled (PK, KEK, db, dbx hold data) and yet SecureBoot is 0: its value is not
    # the store's, which is why it is not predicted when a PK is enrolled.
    secure_boot, pk = driver_config(log_of(COS113))[:2]
    assert secure_boot.data == rtmr0.variable_data("SecureBoot", rtmr0.EFI_GLOBAL_VARIABLE, b"\x00")
    assert int.from_bytes(pk.data[24:32], "little") > 0


def virt_fw_vars(image, tmp_path):
    out = tmp_path / "vars.json"
    subprocess.run([sys.executable, "-m", "virt.firmware.vars", "--input", str(image), "--output-json", str(out)],
                   check=True, capture_output=True)
    return {(item["name"], uuid.UUID(item["guid"])): bytes.fromhex(item["data"])
            for item in json.load(open(out))["variables"]}


@pytest.mark.slow
def test_the_variable_store_of_debians_tdx_firmware_reads_as_virt_fw_vars_reads_it(tmp_path):
    deb = debian.sid_deb("ovmf-inteltdx")
    subprocess.run(["dpkg-deb", "-x", deb, str(tmp_path / "x")], check=True)
    image = tmp_path / "x" / "usr" / "share" / "ovmf" / "OVMF.inteltdx.ms.fd"
    expected = virt_fw_vars(image, tmp_path)
    events = rtmr0.firmware_events(str(image))
    data = open(image, "rb").read()
    cfv = data[:540672]
    assert rtmr0.variable_store(cfv, "cfv") == expected
    assert {("PK", rtmr0.EFI_GLOBAL_VARIABLE), ("db", rtmr0.EFI_IMAGE_SECURITY_DATABASE)} <= set(expected)
    # Where OVMF measures the CFV from: the trustee OVMF TD's log names the same place and size.
    cfv_event = [e for e in log_of(TRUSTEE_OVMF).events if e.type_name == "EV_EFI_PLATFORM_FIRMWARE_BLOB2"][0]
    assert cfv_event.data[-16:] == (0xffc00000).to_bytes(8, "little") + (540672).to_bytes(8, "little")
    assert events[0]["description"] == "CFV, 540672 bytes at 0xffc00000"
    assert events[0]["digest"] == hashlib.sha384(cfv).hexdigest()
    assert [e.get("variable") for e in events[1:-1]] == ["PK", "KEK", "db", "dbx"]  # SecureBoot: decided at boot
    assert [e["type"] for e in events] == ["EV_EFI_PLATFORM_FIRMWARE_BLOB2"] + \
        ["EV_EFI_VARIABLE_DRIVER_CONFIG"] * 4 + ["EV_SEPARATOR"]


def test_debian_12_firmware_measures_its_cfv_where_the_cos113_firmware_did():
    events = rtmr0.firmware_events("/usr/share/ovmf/OVMF.fd")
    cfv_event = [e for e in log_of(COS113).events if e.type_name == "EV_EFI_PLATFORM_FIRMWARE_BLOB2"][0]
    assert cfv_event.data[-16:] == (0xffe00000).to_bytes(8, "little") + (131072).to_bytes(8, "little")
    assert events[0]["description"] == "CFV, 131072 bytes at 0xffe00000"
    assert [e["digest"] for e in events[1:6]] == [e["digest"] for e in rtmr0.secure_boot_events({})]
