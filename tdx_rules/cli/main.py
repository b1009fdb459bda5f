"""The ``tdx-rules`` command line.

Subcommands: ``measure`` (the MRTD, RTMR[1], RTMR[2] a TD will report), ``pack`` (a
deterministic initramfs from a directory), ``inspect`` (list an initramfs), ``diff`` (what
differs between two images or two manifests), ``fetch`` (fill the download cache),
``cache`` (list or clean it), ``doctor`` (check the host's tools), ``quote`` (what a TDX quote
says), ``verify`` (a TD's quote and event log against its manifest) and ``lock`` (write or
check tdx.lock).

Exit status: 0 on success; 1 on bad input (one ``tdx-rules: error:`` line on stderr);
2 on bad usage.  ``diff``: 0 when the inputs are the same, 1 when they differ, 2 on
bad input or usage (as diff(1)); ``verify`` likewise (1: something differs or fails).
``doctor``: 1 when a required tool is missing.
"""

import argparse
import json
import os
import sys

from ..errors import ERROR_PREFIX, TdxError

MEASURE_EXAMPLE = """example:
  tdx-rules measure --ovmf OVMF.fd --kernel vmlinuz --initrd initramfs.cpio.gz \\
      --cmdline 'console=ttyS0' --memory 4G --json
registers whose inputs are not given are left out (MRTD needs --ovmf; RTMR[1]
needs --kernel; RTMR[2] needs --cmdline or --initrd)."""


def measure(args) -> dict:
    """The registers and the events, in measurement order, for ``args``."""
    from ..measure import mrtd, profiles, rtmr

    profile = profiles.profile_for(args.qemu_version, args.ovmf_version)
    result = {}
    events = []
    if args.ovmf:
        result["mrtd"] = mrtd.compute_mrtd(args.ovmf, profile.mrtd_order).mrtd
    initrd_size = None
    if args.initrd:
        try:
            initrd_size = os.path.getsize(args.initrd)
        except OSError as error:
            raise TdxError(f"--initrd: cannot read {args.initrd}: {error.strerror}") from None
    if args.kernel:
        found = rtmr.rtmr1_events(args.kernel, initrd_size, args.memory, args.cmdline or "", profile)
        result["rtmr1"] = rtmr.replay(found)[1]
        events += found
    if args.cmdline is not None or args.initrd:
        found = rtmr.rtmr2_events(args.cmdline or "", args.initrd, profile)
        result["rtmr2"] = rtmr.replay(found)[2]
        events += found
    result["events"] = [{"register": e.register, "description": e.description, "digest": e.digest} for e in events]
    result["profile"] = {"qemu_version": profile.qemu_version, "ovmf_version": profile.ovmf_version}
    return result


INSPECT_EXAMPLE = """example:
  tdx-rules inspect build/tdx/hello/hello-initramfs.cpio.gz --hash
reads every compression the kernel reads (gzip, zstd, xz, lzma, bzip2, lz4 legacy, none)
and archives concatenated one after another, as the kernel does; --json prints a list
of objects with path, type, mode, uid, gid, size, nlink, target, rdev, sha256."""

DIFF_EXAMPLE = """examples:
  tdx-rules diff old/hello-initramfs.cpio.gz new/hello-initramfs.cpio.gz
  tdx-rules diff old/hello-manifest.json new/hello-manifest.json
two images: '+ path' added, '- path' removed, '~ path: field old -> new' changed.
two manifests: every setting, input, output and measurement value that differs; a
measurement event is named with its register and description.
exit status 0 when the same, 1 when different, 2 on bad input (as diff(1))."""

FETCH_EXAMPLE = """examples:
  tdx-rules fetch apt:linux-image-6.12-amd64 apt:ovmf alpine:3.19.1
  TDX_RULES_CACHE=/srv/tdx-cache tdx-rules fetch https://example.org/OVMF.fd#sha256=<hex>
fills the download cache the rules read, for builds without network (copy the cache
directory to the air-gapped machine); prints each file with its SHA-256."""

CACHE_EXAMPLE = """examples:
  tdx-rules cache list
  tdx-rules cache clean --older-than 30
the cache is $TDX_RULES_CACHE, else ~/.cache/tdx-rules (or --cache DIR)."""

DOCTOR_EXAMPLE = """example:
  tdx-rules doctor
prints one line per tool: 'ok' with where it was found, 'MISSING' (required) or
'optional' with how to install it. Exit status 1 when a required tool is missing."""


LOCK_EXAMPLE = """examples:
  tdx-rules lock            # scons --tdx-lock: resolve every upstream input, write tdx.lock
  tdx-rules lock --check    # in CI: exit 1 when tdx.lock is not what the inputs resolve to now
runs scons in the SConstruct's directory (-C DIR); a build with tdx.lock uses exactly its files."""


def _command(commands, name, help_text, epilog):
    return commands.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    from .. import settings
    from ..initramfs import pack

    parser = argparse.ArgumentParser(prog="tdx-rules", description="Tools of tdx-rules (TDX guest images for SCons).",
                                     epilog="exit status: 0 ok, 1 bad input (one error line), 2 bad usage; "
                                            "see each command's --help")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = _command(commands, "measure", "precompute MRTD, RTMR[1], RTMR[2]", MEASURE_EXAMPLE)
    sub.add_argument("--ovmf", help="firmware image (the combined OVMF.fd)")
    sub.add_argument("--kernel", help="kernel (bzImage) for direct boot")
    sub.add_argument("--initrd", help="initramfs as passed to -initrd")
    sub.add_argument("--cmdline", help="kernel command line as passed to -append")
    sub.add_argument("--memory", default="4G", help="guest memory, as -m (default 4G)")
    sub.add_argument("--qemu-version", default="8.2", help="QEMU of the launch profile (default 8.2)")
    sub.add_argument("--ovmf-version", default="2024.02-3+tdx1.0",
                     help="OVMF of the launch profile (default 2024.02-3+tdx1.0)")
    sub.add_argument("--json", action="store_true", help="print a JSON object with the registers and the events")

    sub = _command(commands, "pack", pack.PACK_HELP, pack.PACK_EPILOG)
    pack.add_arguments(sub)

    sub = _command(commands, "inspect", "list the members of an initramfs like lsinitramfs -l", INSPECT_EXAMPLE)
    sub.add_argument("image", help="initramfs file")
    sub.add_argument("--hash", action="store_true", help="add the SHA-256 of every regular file")
    sub.add_argument("--json", action="store_true", help="print a JSON list")

    sub = _command(commands, "diff", "what differs between two images or two manifests", DIFF_EXAMPLE)
    sub.add_argument("a", help="image or manifest (<name>-manifest.json)")
    sub.add_argument("b", help="image or manifest, of the same kind as A")

    sub = _command(commands, "fetch", "download sources into the cache (for air-gapped builds)", FETCH_EXAMPLE)
    sub.add_argument("specs", nargs="+", metavar="SPEC", help="a source spec as the rules take it (apt:, alpine:, "
                                                               "ubuntu-kernel:, canonical-ovmf:, https://…#sha256=)")
    sub.add_argument("--cache", default=None, help="cache directory (default $TDX_RULES_CACHE or ~/.cache/tdx-rules)")
    sub.add_argument("--mirror", default=os.environ.get("TDX_RULES_MIRROR", ""), help="mirror base URL")
    sub.add_argument("--keyring", default=os.environ.get("TDX_RULES_KEYRING", ""),
                     help="extra trusted public key files, colon-separated (default $TDX_RULES_KEYRING)")

    sub = _command(commands, "cache", "list or clean the download cache", CACHE_EXAMPLE)
    sub.add_argument("action", choices=("list", "clean"))
    sub.add_argument("--cache", default=None, help="cache directory (default $TDX_RULES_CACHE or ~/.cache/tdx-rules)")
    sub.add_argument("--older-than", type=float, default=0, metavar="DAYS",
                     help="clean: only entries not modified for DAYS days (default: all)")

    _command(commands, "doctor", "check the host for the tools the rules use", DOCTOR_EXAMPLE)

    sub = _command(commands, "lock", "write tdx.lock, or check that it is current", LOCK_EXAMPLE)
    sub.add_argument("--check", action="store_true", help="only check: exit 1 when the lock is not current")
    sub.add_argument("-C", dest="directory", default=".", help="the directory of the SConstruct (default: here)")

    from . import attest

    attest.add_quote_arguments(_command(commands, "quote", attest.QUOTE_HELP, attest.QUOTE_EPILOG))
    attest.add_verify_arguments(_command(commands, "verify", attest.VERIFY_HELP, attest.VERIFY_EPILOG))
    parser.set_defaults(cache_default=settings.default_cache_dir())
    return parser


def _print_measure(args) -> int:
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        for key, label in (("mrtd", "MRTD"), ("rtmr1", "RTMR[1]"), ("rtmr2", "RTMR[2]")):
            if key in result:
                print(f"{label:8} {result[key]}")
    return 0


def _pack(args) -> int:
    from ..initramfs import pack

    pack.run(args)
    return 0


def _inspect(args) -> int:
    from ..initramfs import archive

    found = archive.members(args.image, with_hash=args.hash)
    if args.json:
        print(json.dumps([member.as_dict() for member in found], indent=1))
        return 0
    for member in found:
        line = f"{member.mode_string()} {member.uid:>5}/{member.gid:<5} {member.size:>10} {member.path}"
        if member.target is not None:
            line += f" -> {member.target}"
        if member.sha256:
            line += f"  sha256:{member.sha256}"
        print(line)
    return 0


def _diff(args) -> int:
    from . import diff

    manifests = diff.is_manifest(args.a), diff.is_manifest(args.b)
    if manifests[0] != manifests[1]:
        raise TdxError(f"compare an image with an image or a manifest with a manifest: {args.a} is "
                       f"{'a manifest' if manifests[0] else 'an image'}, {args.b} is not")
    lines = diff.diff_manifests(args.a, args.b) if manifests[0] else diff.diff_images(args.a, args.b)
    for line in lines:
        print(line)
    return 1 if lines else 0


def _fetch(args) -> int:
    from ..upstream import sources

    cache_dir = args.cache or args.cache_default
    ctx = sources.Context(cache=cache_dir, mirror=args.mirror or None, keyring=args.keyring or None,
                          log=lambda line: print(line, file=sys.stderr))
    for text in args.specs:
        spec = sources.parse(text, "fetch")
        if spec.kind in ("file", "debian"):
            raise TdxError(f"fetch: {text!r} needs no download ({spec.kind} sources are read at build time); "
                           "for 'debian' fetch its packages: apt:busybox-static apt:musl")
        for resolved in sources.materialize(spec, ctx, "fetch"):
            print(f"{resolved.sha256}  {resolved.path}")
    return 0


def _cache(args) -> int:
    from ..upstream import cache

    cache_dir = args.cache or args.cache_default
    if args.older_than < 0:
        raise TdxError(f"--older-than {args.older_than:g}: give a number of days, 0 or more")
    if args.action == "list":
        total = 0
        for relative, size, _ in cache.entries(cache_dir):
            print(f"{size:>12}  {relative}")
            total += size
        print(f"{total:>12}  total in {cache_dir}")
        return 0
    removed, freed = cache.clean(cache_dir, args.older_than)
    print(f"removed {removed} entries ({freed} bytes) from {cache_dir}")
    return 0


def _doctor(args) -> int:
    from . import doctor

    results = doctor.run_checks()
    for line in doctor.report(results):
        print(line)
    return 1 if doctor.missing_required(results) else 0


def _lock(args) -> int:
    """``scons --tdx-lock`` (or ``--tdx-lock-check``) in the SConstruct's directory."""
    import subprocess

    if not os.path.isfile(os.path.join(args.directory, "SConstruct")):
        raise TdxError(f"lock: no SConstruct in {args.directory}; run it where the SConstruct is, or pass -C DIR")
    option = "--tdx-lock-check" if args.check else "--tdx-lock"
    done = subprocess.run([sys.executable, "-m", "SCons", "-Q", "-C", args.directory, option])
    return 0 if done.returncode == 0 else 1


def _quote(args) -> int:
    from . import attest

    return attest.run_quote(args)


def _verify(args) -> int:
    from . import attest

    return attest.run_verify(args)


COMMANDS = {"measure": _print_measure, "pack": _pack, "inspect": _inspect, "diff": _diff, "fetch": _fetch,
            "cache": _cache, "doctor": _doctor, "quote": _quote, "verify": _verify, "lock": _lock}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TdxError as error:
        print(ERROR_PREFIX + str(error), file=sys.stderr)
        return 2 if args.command in ("diff", "verify") else 1
    except BrokenPipeError:  # `tdx-rules inspect x | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
