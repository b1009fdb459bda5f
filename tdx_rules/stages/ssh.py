"""Stage: the SSH server of an image with ``ssh_keys`` (``ssh.frag``), dropbear and its libraries.

``ssh_server`` names the Debian package that holds ``usr/sbin/dropbear`` and
``usr/bin/dropbearkey`` (default ``apt:dropbear-bin``, fetched and verified like every
``apt:`` spec, pinned by ``tdx.lock``); ``ssh_libs`` names the packages of its libraries
(glibc's loader and libc among them). The closure is resolved as ``TdxProgram``'s
(:mod:`tdx_rules.initramfs.closure`, from the ELF files; nothing is executed), but in these
packages only, never on the host: every file of the server comes from a verified package,
and the fragment does not depend on what the build machine has installed. glibc's files live
under ``/lib64`` and ``/lib/x86_64-linux-gnu``, apart from the base's musl.

The fragment holds both programs, their closure, an empty ``/etc/dropbear`` (0700: the
host key is made there at first boot, so no private key ships in the image) and an
``/etc/passwd`` naming root (dropbear looks the user up by name). ``ssh.info.json`` lists
the packages used (the manifest's and the lock's inputs) and each file's SHA-256, size and
package.
"""

import os

from ..errors import TdxError
from ..fsutil import write_json
from ..initramfs import closure, newc
from ._entry import load_config, run
from .closure import package_trees
from .common import context, fetching_stage_arguments

SERVER = "/usr/sbin/dropbear"
KEYGEN = "/usr/bin/dropbearkey"
HOST_KEY_DIR = "etc/dropbear"
# root's entry: dropbear refuses a user getpwnam() does not know; /bin/sh is busybox's.
PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
GROUP = b"root:x:0:\n"


def _program(trees, guest: str, spec: str) -> str:
    """The host path of ``guest`` in the first package tree that holds it."""
    for tree in trees:
        path = tree.host_path(guest)
        if os.path.isfile(path):
            return path
    raise TdxError(f"ssh_server {spec!r}: the package holds no {guest}; name a package of dropbear "
                   "(e.g. apt:dropbear-bin) in ssh_server")


def build_ssh(config: dict, ctx, out: str, info_out: str) -> None:
    """Fetch the server package and ``ssh_libs``, resolve the closures of dropbear and dropbearkey,
    and write the fragment and its record."""
    spec = config["ssh_server"]
    server_trees, records = package_trees([spec], ctx, "ssh_server")
    lib_trees, lib_records = package_trees(config.get("ssh_libs", []), ctx, "ssh_libs")
    trees = server_trees + lib_trees
    members, interpreter, programs = {}, None, []
    for guest in (SERVER, KEYGEN):
        path = _program(server_trees, guest, spec)
        programs.append((guest, path))
        result = closure.resolve(path, guest, trees)
        if result.interpreter is None:
            raise TdxError(f"ssh_server {spec!r}: {guest} is statically linked; ssh_server takes a package whose "
                           "dropbear is dynamically linked (Debian's dropbear-bin)")
        if result.missing:
            raise TdxError(f"ssh_server {spec}: shared libraries not found in its packages: "
                           f"{closure.missing_list(result.missing)}; add the "
                           "package that holds each to ssh_libs (e.g. 'apt:PACKAGE')")
        interpreter = result.interpreter
        members.update(result.members)
    # The programs join their closures' members as files of the server's package.
    for guest, path in programs:
        members[guest] = closure.Member(guest, server_trees[0], path)
    both = closure.Closure(result.program, interpreter, members, [], [])
    entries = [entry if entry.name not in (SERVER[1:], KEYGEN[1:]) else newc.disk_file(entry.name, entry.path, 0o755)
               for entry in both.entries()]
    entries += [newc.directory(HOST_KEY_DIR, 0o700), newc.blob("etc/passwd", PASSWD, 0o644),
                newc.blob("etc/group", GROUP, 0o644)]
    records_of_files = both.records()
    newc.write_fragment(out, newc.merge([entries]))
    write_json(info_out, {
        "inputs": records + lib_records,
        "inputs_by_spec": True,
        "server": SERVER,
        "keygen": KEYGEN,
        "interpreter": interpreter,
        "files": records_of_files,
    })


def main(argv):
    args = fetching_stage_arguments("python -m tdx_rules.stages.ssh", argv)
    config = load_config(args.config)
    build_ssh(config, context(args, config), args.out, args.info)


if __name__ == "__main__":
    run(main)
