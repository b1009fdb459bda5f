"""Argument and record helpers shared by the stage entry points."""

import argparse
import os

from ..upstream.sources import Context, Resolved


def fetching_stage_arguments(prog: str, argv, extra_outputs=()):
    """The arguments every fetching stage takes: its config, output, info record, cache and mirror
    (and the options of ``extra_outputs``, each a further required output file)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--info", required=True)
    for option in extra_outputs:
        parser.add_argument(option, required=True)
    parser.add_argument("--cache", required=True, help="download cache directory")
    parser.add_argument("--mirror", default="", help="mirror prefix for upstream URLs")
    parser.add_argument("--keyring", default="", help="extra trusted public key files, colon-separated")
    return parser.parse_args(argv)


def context(args) -> Context:
    return Context(cache=args.cache, mirror=args.mirror or None, log=lambda line: print(line, flush=True),
                   keyring=args.keyring or None)


def input_record(resolved: Resolved) -> dict:
    """How an input appears in the manifest: no local paths, only names and hashes."""
    return {"spec": resolved.spec, "file": os.path.basename(resolved.path), "sha256": resolved.sha256,
            "origin": resolved.origin}
