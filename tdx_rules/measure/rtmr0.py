"""The RTMR[0] events of a TD that depend only on its firmware image.

OVMF's TDX boot measures into RTMR[0], in this order (edk2 OvmfPkg: TdxHelperMeasureCfvImage,
then TdTcg2Dxe's MeasureAllSecureVariables and the separator of PCR 7; the event logs in
../shared/testdata show the same order):

1. the TD HOB (EV_EFI_HANDOFF_TABLES2): built by the VMM from the memory map, so a platform value;
2. the configuration firmware volume, CFV (EV_EFI_PLATFORM_FIRMWARE_BLOB2): the SHA-384 of the
   CFV bytes exactly as the image holds them (the TDVF section of type CFV);
3. the Secure Boot variables SecureBoot, PK, KEK (EFI global variable GUID) and db, dbx (the image
   security database GUID), each EV_EFI_VARIABLE_DRIVER_CONFIG whose digest is the SHA-384 of a
   UEFI_VARIABLE_DATA structure (UEFI 2.10 section 38.4.1 "UEFI_VARIABLE_DATA"): the vendor GUID,
   the name's length in characters (u64), the data's length (u64), the name in UCS-2 without its
   NUL, the data. PK, KEK, db and dbx hold what the CFV's variable store holds (an empty value
   when a variable is absent). SecureBoot is absent (empty) when no PK is enrolled, as the log of
   a TD without keys shows; with a PK its value (0 or 1) is decided at boot from further settings
   (the cos-113 log has a PK and SecureBoot 0), so it is then left to the platform values;
4. the separator (EV_SEPARATOR, four zero bytes);

then platform values again: the ACPI tables QEMU builds, the boot variables. The CFV's variable
store is read in the authenticated-variable format of edk2 (MdeModulePkg VariableFormat.h): an
EFI_FIRMWARE_VOLUME_HEADER, the VARIABLE_STORE_HEADER (28 bytes) and 4-byte aligned
AUTHENTICATED_VARIABLE_HEADER records (60 bytes: StartId 0x55AA, State, attributes, monotonic
count, time stamp, public key index, name size, data size, vendor GUID), name and data.
"""

import hashlib
import struct
import uuid
from typing import Dict, List, Tuple

from tdx_rules.errors import TdxError
from tdx_rules.measure.tdvf import TYPE_CFV, open_firmware, parse_open

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SECURE_BOOT_VARIABLES = (("SecureBoot", EFI_GLOBAL_VARIABLE), ("PK", EFI_GLOBAL_VARIABLE),
                         ("KEK", EFI_GLOBAL_VARIABLE), ("db", EFI_IMAGE_SECURITY_DATABASE),
                         ("dbx", EFI_IMAGE_SECURITY_DATABASE))
_STORE_HEADER = 28
_VARIABLE_HEADER = 60
_START_ID = 0x55AA
_VAR_ADDED = 0x3F
_VAR_IN_DELETED_TRANSITION = 0xFE  # ANDed into State while a newer copy is written


def variable_data(name: str, guid: uuid.UUID, data: bytes) -> bytes:
    """The UEFI_VARIABLE_DATA structure OVMF measures for a variable."""
    return guid.bytes_le + struct.pack("<QQ", len(name), len(data)) + name.encode("utf-16-le") + data


def variable_store(cfv: bytes, what: str) -> Dict[Tuple[str, uuid.UUID], bytes]:
    """The live variables of a CFV's authenticated variable store: {(name, vendor GUID): data}."""
    if len(cfv) < 0x38:
        raise TdxError(f"{what}: the CFV is {len(cfv)} bytes, too small for a firmware volume header")
    header_length = struct.unpack_from("<H", cfv, 0x30)[0]
    offset = header_length + _STORE_HEADER
    if header_length < 0x38 or offset > len(cfv):
        raise TdxError(f"{what}: the CFV's firmware volume header length {header_length} is not possible")
    variables = {}
    while offset + _VARIABLE_HEADER <= len(cfv):
        start, state = struct.unpack_from("<HB", cfv, offset)
        if start != _START_ID:
            break
        name_size, data_size = struct.unpack_from("<II", cfv, offset + 36)
        end = offset + _VARIABLE_HEADER + name_size + data_size
        if end > len(cfv) or name_size % 2:
            raise TdxError(f"{what}: the variable at CFV offset {offset} runs past the store; the firmware is damaged")
        if state in (_VAR_ADDED, _VAR_ADDED & _VAR_IN_DELETED_TRANSITION):
            raw_name = cfv[offset + _VARIABLE_HEADER:offset + _VARIABLE_HEADER + name_size]
            name = raw_name.decode("utf-16-le", "replace").split("\0", 1)[0]
            guid = uuid.UUID(bytes_le=cfv[offset + 44:offset + 60])
            variables[(name, guid)] = cfv[offset + _VARIABLE_HEADER + name_size:end]
        offset = (end + 3) & ~3
    return variables


def secure_boot_events(variables: Dict[Tuple[str, uuid.UUID], bytes]) -> List[dict]:
    """The Secure Boot variable events for a variable store (see the module docstring)."""
    events = []
    enrolled = bool(variables.get(("PK", EFI_GLOBAL_VARIABLE)))
    for name, guid in SECURE_BOOT_VARIABLES:
        if name == "SecureBoot" and enrolled:
            continue  # decided at boot: a platform value
        data = variables.get((name, guid), b"")
        events.append({"register": 0, "type": "EV_EFI_VARIABLE_DRIVER_CONFIG", "variable": name,
                       "description": f"{name} ({len(data)} bytes)",
                       "digest": hashlib.sha384(variable_data(name, guid, data)).hexdigest()})
    return events


def firmware_events(path) -> List[dict]:
    """The firmware-only RTMR[0] events of a TDVF image, in measurement order."""
    with open_firmware(path) as handle:
        metadata = parse_open(handle, str(path))
        cfv = [s for s in metadata.sections if s.type == TYPE_CFV]
        if len(cfv) != 1:
            raise TdxError(f"{path}: {len(cfv)} CFV sections in the TDVF metadata; a TDX firmware has one")
        section = cfv[0]
        handle.seek(section.data_offset)
        data = handle.read(section.raw_data_size)
    events = [{"register": 0, "type": "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
               "description": f"CFV, {section.raw_data_size} bytes at {section.memory_address:#x}",
               "digest": hashlib.sha384(data).hexdigest()}]
    events += secure_boot_events(variable_store(data, str(path)))
    events.append({"register": 0, "type": "EV_SEPARATOR", "description": "separator",
                   "digest": hashlib.sha384(bytes(4)).hexdigest()})
    return events
