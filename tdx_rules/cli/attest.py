"""``tdx-rules quote`` (what a TDX quote says) and ``tdx-rules verify`` (a TD's quote and event
log against its image's manifest). Exit status of ``verify``: 0 when every check passes, 1 when
something differs or fails, 2 on bad input (one ``tdx-rules: error:`` line)."""

import datetime
import json

from ..errors import TdxError
from ..fsutil import read_json_object

QUOTE_HELP = "print the header and TD report of a TDX quote (version 4 or 5)"
QUOTE_EPILOG = """examples:
  tdx-rules quote quote.bin
  tdx-rules quote quote.bin --json
in the guest: mkdir /sys/kernel/config/tsm/report/r; head -c 64 /dev/urandom >
/sys/kernel/config/tsm/report/r/inblob; cat /sys/kernel/config/tsm/report/r/outblob > quote.bin
--json prints lowercase hex of each field's bytes as they stand in the quote (version 4 is "0400")."""

VERIFY_HELP = "check a TD's quote and event log against the image's manifest"
VERIFY_EPILOG = """examples:
  tdx-rules verify --manifest hello-manifest.json --quote quote.bin --eventlog ccel.bin
  tdx-rules verify --manifest hello-manifest.json --quote quote.bin --collateral collateral.json --json
the event log is /sys/firmware/acpi/tables/data/CCEL read inside the guest. One line per check
(ok, DIFFERS, FAILED) and a verdict; with an event log, the first event that differs.
exit status 0 when every check passes, 1 when something differs or fails, 2 on bad input."""

_LABELS = {"ok": "ok", "differs": "DIFFERS", "failed": "FAILED"}


def add_quote_arguments(sub) -> None:
    sub.add_argument("quote", help="the quote (configfs-tsm outblob)")
    sub.add_argument("--json", action="store_true", help="print a JSON object of hex strings")


def add_verify_arguments(sub) -> None:
    sub.add_argument("--manifest", required=True, help="the image's <name>-manifest.json")
    sub.add_argument("--quote", help="the TD's quote")
    sub.add_argument("--eventlog", help="the TD's CCEL event log data")
    sub.add_argument("--collateral", help="Intel PCS / PCCS collateral JSON for the quote (TCB status)")
    sub.add_argument("--now", help="check certificates and collateral at this time (ISO 8601; default: now)")
    sub.add_argument("--accept-tcb", action="append", default=[], metavar="STATUS",
                     help="also accept this TCB status (e.g. SWHardeningNeeded); repeatable")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 24)
    except OSError as error:
        raise TdxError(f"{what} {path}: {error.strerror}") from None


def _time(text) -> datetime.datetime:
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TdxError(f"--now {text!r}: not an ISO 8601 time; write e.g. 2025-07-19T10:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def run_quote(args) -> int:
    from ..attest.quote import parse_quote

    quote = parse_quote(_read(args.quote, "quote"), args.quote)
    fields = quote.as_json()
    if args.json:
        print(json.dumps(fields, indent=1))
        return 0
    print(f"version {quote.version}, attestation key type {quote.att_key_type} (ECDSA P-256), TEE type "
          f"0x{quote.tee_type:x} (TDX), QE vendor {fields['qe_vendor_id']}"
          + (f", body type {quote.body_type}" if quote.body_type is not None else ""))
    for name in fields:
        if name not in ("version", "att_key_type", "tee_type", "qe_vendor_id", "body_type"):
            print(f"{name:16} {fields[name]}")
    return 0


def run_verify(args) -> int:
    from ..attest.eventlog import parse_eventlog
    from ..attest.quote import parse_quote
    from ..attest.verify import verify

    manifest = read_json_object(args.manifest, "manifest", "pass the <name>-manifest.json of a tdx-rules image")
    quote = parse_quote(_read(args.quote, "quote"), args.quote) if args.quote else None
    log = parse_eventlog(_read(args.eventlog, "event log"), args.eventlog) if args.eventlog else None
    collateral = None
    if args.collateral:
        from ..attest.collateral import load_collateral

        collateral = load_collateral(args.collateral)
    result = verify(manifest, quote, log, _time(args.now), collateral, tuple(args.accept_tcb))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for check in result["checks"]:
            print(f"{_LABELS[check['status']]:8} {check['name']:16} {check['detail']}")
        difference = result["first_difference"]
        if difference:
            print(f"first difference: {difference['register']} event {difference['index']}")
            for side in ("manifest", "eventlog"):
                print(f"  {side:9} {json.dumps(difference[side])}")
        print(f"verdict: {result['verdict']}")
    return 0 if result["verdict"] == "ok" else 1
