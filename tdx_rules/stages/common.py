"""Argument and record helpers shared by the stage entry points."""

import argparse

from ..upstream.sources import Context, Resolved
from ._entry import remote_arguments


def fetching_stage_arguments(prog: str, argv, extra_outputs=(), extra_inputs=()):
    """The arguments every fetching stage takes: its config, output, info record, cache and mirror
    (and the options of ``extra_outputs`` and ``extra_inputs``, each a further required file)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", required=True)
    for option in extra_inputs:
        parser.add_argument(option, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--info", required=True)
    for option in extra_outputs:
        parser.add_argument(option, required=True)
    parser.add_argument("--cache", required=True, help="download cache directory")
    parser.add_argument("--mirror", default="", help="mirror prefix for upstream URLs")
    parser.add_argument("--keyring", default="", help="extra trusted public key files, colon-separated")
    parser.add_argument("--snapshot", default="", help="snapshot archive bases, NAME=URL,... (TDX_SNAPSHOT)")
    parser.add_argument("--refresh", action="store_true", help="fetch cached indexes and checksum files again")
    remote_arguments(parser)
    return parser.parse_args(argv)


def remote(args):
    """The stage's remote cache, or None."""
    if not args.remote_cache:
        return None
    from ..upstream.remote import Remote, credential_from_environment

    return Remote(args.remote_cache, push=args.remote_cache_push, credential=credential_from_environment())


def context(args, config=None) -> Context:
    """The download context of a stage; ``config["lock"]``, when present, pins what it resolves to."""
    return Context(cache=args.cache, mirror=args.mirror or None, log=lambda line: print(line, flush=True),
                   keyring=args.keyring or None, locked=(config or {}).get("lock"), snapshot=args.snapshot or None,
                   refresh=args.refresh, remote=remote(args))


def input_record(resolved: Resolved) -> dict:
    """How an input appears in the manifest and the lock: no local paths, only names and hashes."""
    return resolved.record()
