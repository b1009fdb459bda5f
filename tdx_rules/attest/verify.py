"""Check a live TD's evidence (its quote, its CCEL event log) against the manifest of its image.

:func:`verify` runs the checks the evidence allows, in this order, each with status ``ok``,
``differs`` (the TD is genuine but runs something else than the manifest says) or ``failed``
(the evidence is not genuine, not current, or not acceptable whatever the manifest says):

- with a quote: ``quote-signature``, ``qe-report``, ``pck-chain`` (:mod:`tdx_rules.attest.pck`);
  with collateral also ``tcb-status`` (:mod:`tdx_rules.attest.collateral`; UpToDate passes,
  other statuses only when the caller accepts them);
- ``td-attributes``: a TD with DEBUG set fails whatever the manifest says (the host can read its
  memory); otherwise the attributes must be the manifest's ``launch.td_attributes`` and XFAM must
  hold the manifest's fixed bits;
- ``mrtd``, ``rtmr1``, ``rtmr2``: the quote's registers against the manifest's (without a quote,
  RTMR[1] and RTMR[2] come from the replayed event log);
- with an event log: ``eventlog-replay`` (the log replays to the quote's four RTMRs; a log that
  does not is refused), then its RTMR[1] and RTMR[2] events are compared with the manifest's
  ``events`` in order and the first that differs is reported; ``rtmr0-firmware`` checks the
  RTMR[0] events that depend only on the firmware (the manifest's ``rtmr0_firmware``: CFV,
  Secure Boot variables, separator; :mod:`tdx_rules.measure.rtmr0`) and lists the others (TD
  HOB, ACPI tables, boot variables) with their digests as platform values the verifier may pin.

The verdict is ``failed`` if any check failed, else ``differs`` if any differs, else ``ok``.
"""

import datetime
from typing import List, Optional

from ..errors import TdxError
from . import pck
from .eventlog import EventLog
from .quote import Quote

DEBUG = 1  # TD attribute bit 0
OK, DIFFERS, FAILED = "ok", "differs", "failed"


def _hex_field(value: str, what: str, size: int) -> bytes:
    try:
        data = bytes.fromhex(value)
    except (TypeError, ValueError):
        data = b""
    if len(data) != size:
        raise TdxError(f"manifest: {what} {value!r} is not {size} bytes of hex; use the manifest the build wrote")
    return data


def _manifest_registers(manifest: dict) -> dict:
    measurements = manifest.get("measurements")
    if not isinstance(measurements, dict):
        raise TdxError("manifest: no measurements object; pass the <name>-manifest.json of a tdx-rules image")
    return {name: _hex_field(measurements.get(name), f"measurements.{name}", 48) for name in ("mrtd", "rtmr1", "rtmr2")}


def _manifest_events(manifest: dict) -> List[dict]:
    events = manifest["measurements"].get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) and e.get("register") in (1, 2) for e in events):
        raise TdxError("manifest: measurements.events is not a list of RTMR[1]/RTMR[2] events")
    for event in events:
        _hex_field(event.get("digest"), "event digest", 48)
    return events


class _Checks:
    def __init__(self):
        self.items = []

    def add(self, name: str, status: str, detail: str) -> str:
        self.items.append({"name": name, "status": status, "detail": detail})
        return status


def _signature_checks(checks: _Checks, quote: Quote, now, collateral, accept_tcb) -> None:
    reason = pck.check_quote_signature(quote)
    checks.add("quote-signature", FAILED if reason else OK, reason or "signed by the quote's attestation key")
    try:
        certs = pck.load_chain(quote.pck_chain_pem)
    except TdxError as error:
        checks.add("qe-report", FAILED, str(error))
        checks.add("pck-chain", FAILED, str(error))
        return
    reason = pck.check_qe_report(quote, certs[0])
    checks.add("qe-report", FAILED if reason else OK,
               reason or "signed by the PCK key; REPORTDATA binds the attestation key")
    reason = pck.check_chain(certs, now)
    checks.add("pck-chain", FAILED if reason else OK,
               reason or f"{len(certs)} certificates up to Intel's SGX Root CA, valid at {now:%Y-%m-%dT%H:%M:%SZ}")
    if collateral is not None:
        from .collateral import tcb_status

        result = tcb_status(collateral, quote, certs, now)
        advisories = f"; advisories {', '.join(result.advisory_ids)}" if result.advisory_ids else ""
        if result.problems:
            checks.add("tcb-status", FAILED, "; ".join(result.problems))
        elif result.status == "UpToDate" or result.status in accept_tcb:
            checks.add("tcb-status", OK, f"{result.status} (FMSPC {result.fmspc}){advisories}")
        else:
            checks.add("tcb-status", FAILED, f"{result.status} (platform {result.platform_status}, QE "
                                              f"{result.qe_status}){advisories}; accept it with --accept-tcb "
                                              f"{result.status} if your policy allows")


def _attribute_check(checks: _Checks, quote: Quote, manifest: dict) -> None:
    attributes = int.from_bytes(quote.body["td_attributes"], "little")
    xfam = int.from_bytes(quote.body["xfam"], "little")
    launch = manifest.get("launch") or {}
    if attributes & DEBUG:
        checks.add("td-attributes", FAILED, f"TD attributes {quote.body['td_attributes'].hex()} have DEBUG set: "
                                            "the host can read this TD's memory")
        return
    expected = launch.get("td_attributes")
    if expected is None:
        checks.add("td-attributes", DIFFERS, f"the manifest states no launch.td_attributes; the TD reports "
                                             f"{quote.body['td_attributes'].hex()}")
        return
    fixed = int.from_bytes(_hex_field((launch.get("xfam") or {}).get("fixed1", "0" * 16), "launch.xfam.fixed1", 8),
                           "little")
    if _hex_field(expected, "launch.td_attributes", 8) != quote.body["td_attributes"]:
        checks.add("td-attributes", DIFFERS, f"TD attributes {quote.body['td_attributes'].hex()}, the launch asks "
                                             f"for {expected}")
    elif xfam & fixed != fixed:
        checks.add("td-attributes", DIFFERS, f"XFAM {quote.body['xfam'].hex()} lacks bits the TDX module fixes "
                                             f"({fixed:#x})")
    else:
        checks.add("td-attributes", OK, f"{expected} as the launch asks; XFAM {quote.body['xfam'].hex()} "
                                        "(from the host CPU)")


def _register_checks(checks: _Checks, actual: dict, expected: dict, source: str) -> None:
    for name in ("mrtd", "rtmr1", "rtmr2"):
        if name not in actual:
            continue
        if actual[name] == expected[name]:
            checks.add(name, OK, f"{expected[name].hex()} ({source})")
        else:
            checks.add(name, DIFFERS, f"{source} {actual[name].hex()}, manifest {expected[name].hex()}")


def first_difference(log: EventLog, events: List[dict]) -> Optional[dict]:
    """The first RTMR[1] or RTMR[2] event where the log and the manifest's events part, or None."""
    for register in (1, 2):
        ours = [e for e in events if e["register"] == register]
        theirs = [e for e in log.events if e.rtmr == register]
        for index in range(max(len(ours), len(theirs))):
            mine = ours[index] if index < len(ours) else None
            logged = theirs[index] if index < len(theirs) else None
            if mine is not None and logged is not None and logged.sha384 is not None \
                    and logged.sha384.hex() == mine["digest"]:
                continue
            return {
                "register": f"rtmr{register}", "index": index,
                "manifest": None if mine is None else {"description": mine["description"], "digest": mine["digest"]},
                "eventlog": None if logged is None else {
                    "log_index": logged.index, "event_type": logged.type_name,
                    "digest": logged.sha384.hex() if logged.sha384 else None, "data": logged.decoded()},
            }
    return None


def _eventlog_checks(checks: _Checks, log: EventLog, quote: Optional[Quote], manifest: dict, registers: dict):
    replayed = log.replay()
    if quote is not None:
        wrong = [f"RTMR[{i}]" for i in range(4) if replayed[i] != quote.body[f"rtmr{i}"]]
        if wrong:
            checks.add("eventlog-replay", FAILED, f"the log replays to other values than the quote reports for "
                                                  f"{', '.join(wrong)}: it is not this TD's log")
            return None
        checks.add("eventlog-replay", OK, f"{len(log.events)} events replay to the quote's RTMR[0..3]")
    else:
        checks.add("eventlog-replay", OK, f"{len(log.events)} events replayed (no quote to hold them against)")
        _register_checks(checks, {"rtmr1": replayed[1], "rtmr2": replayed[2]}, registers, "replayed log")
    _rtmr0_check(checks, log, manifest["measurements"].get("rtmr0_firmware"))
    return first_difference(log, _manifest_events(manifest))


def _rtmr0_check(checks: _Checks, log: EventLog, expected) -> None:
    """The log's firmware-only RTMR[0] events (CFV, Secure Boot variables, the first separator)
    against the manifest's; the other RTMR[0] events are listed as platform values."""
    rtmr0 = [e for e in log.events if e.rtmr == 0]
    matched, differing = set(), []
    for item in expected or []:
        if item.get("type") == "EV_EFI_VARIABLE_DRIVER_CONFIG":
            found = [e for e in rtmr0 if e.type_name == item["type"] and e.decoded().split(" ", 1)[0] == item["variable"]]
        else:
            found = [e for e in rtmr0 if e.type_name == item.get("type")]
        event = next((e for e in found if e.index not in matched), None)
        if event is None:
            differing.append(f"{item.get('description')}: not in the log")
            continue
        matched.add(event.index)
        if event.sha384 is None or event.sha384.hex() != item.get("digest"):
            differing.append(f"{item.get('description')}: log event {event.index} has "
                             f"{event.sha384.hex() if event.sha384 else 'no SHA-384'}, the firmware gives "
                             f"{item.get('digest')}")
    platform = ", ".join(f"{e.index} {e.type_name} {e.decoded()[:40]!r} {e.sha384.hex() if e.sha384 else '-'}"
                         for e in rtmr0 if e.index not in matched)
    if not expected:
        checks.add("rtmr0-firmware", OK, f"the manifest predicts no RTMR[0] events; platform values: {platform}")
    elif differing:
        checks.add("rtmr0-firmware", DIFFERS, "; ".join(differing) + f"; platform values: {platform}")
    else:
        checks.add("rtmr0-firmware", OK, f"{len(expected)} firmware events as the firmware gives them; "
                                         f"platform values to pin: {platform}")


def verify(manifest: dict, quote: Optional[Quote] = None, log: Optional[EventLog] = None,
           now: Optional[datetime.datetime] = None, collateral: Optional[dict] = None, accept_tcb=()) -> dict:
    """The checks, the verdict and the first differing event (see the module docstring)."""
    if quote is None and log is None:
        raise TdxError("verify: give --quote, --eventlog or both")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    registers = _manifest_registers(manifest)
    checks = _Checks()
    if quote is not None:
        _signature_checks(checks, quote, now, collateral, accept_tcb)
        _attribute_check(checks, quote, manifest)
        _register_checks(checks, {name: quote.body[name] for name in registers}, registers, "quote")
    difference = _eventlog_checks(checks, log, quote, manifest, registers) if log is not None else None
    statuses = {item["status"] for item in checks.items}
    verdict = FAILED if FAILED in statuses else DIFFERS if DIFFERS in statuses or difference else OK
    return {"verdict": verdict, "checks": checks.items, "first_difference": difference}
