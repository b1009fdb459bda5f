"""The shared ``python -m tdx_rules.stages.X`` entry point.

A stage's ``main(argv)`` parses its arguments and calls its pure function.
:func:`run` turns a :class:`TdxError` into one ``tdx-rules: error:`` line on
stderr and exit status 1; the SCons glue lifts that line into
``scons: *** [target] message``.
"""

import json
import sys

from ..errors import ERROR_PREFIX, TdxError


def load_config(path) -> dict:
    """Read a stage config written by the rule (canonical JSON)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def remote_arguments(parser, used: bool = True) -> None:
    """``--remote-cache URL`` and ``--remote-cache-push``: the remote cache downloads are shared
    through (its credential comes from the environment, never the command line)."""
    note = "" if used else "unused here; accepted like every fetching stage: "
    parser.add_argument("--remote-cache", default="", help=note + "base URL of the remote cache")
    parser.add_argument("--remote-cache-push", action="store_true", help=note + "upload downloads to it")


def run(main) -> None:
    try:
        main(sys.argv[1:])
    except TdxError as error:
        print(ERROR_PREFIX + str(error), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
