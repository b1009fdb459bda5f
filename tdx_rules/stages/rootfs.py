"""Container image -> ext4 root filesystem with the agent injected (``TdxExt4Rootfs``).

The source is an OCI image layout directory, a ``docker save`` tarball or a
Docker overlay2 layer directory. Results are cached by content: the key is
the SHA-256 of the layers' digests (layers without a content digest, such as
overlay2 directories, are hashed member by member), the agent's bytes, the
options and the ext4 writer's format version. A cached image is reused only after its
ext4 magic and a read-only ``e2fsck -fn`` pass; every write goes to a temp
file that is renamed into place.

With ``verity`` (a hash algorithm) the stage also writes the dm-verity hash tree
``<out>.verity`` and its root hash ``<out>.roothash`` (one hex line), computed from the
image (:mod:`tdx_rules.rootfs.verity`). The salt and the hash file's UUID are derived from
the ext4 UUID (itself derived from the content) and the image size: never random.
"""

import argparse
import hashlib
import json
import os

import filelock

from ..fsutil import CHUNK, atomic_output, copy_file, sha256_file
from ..rootfs import ext4, verity
from ..rootfs.formats import open_image
from ..rootfs.tree import apply_layers
from ._entry import load_config, remote_arguments, run

KEY_VERSION = "tdx-rules-rootfs-2"


def _layer_key(layer) -> str:
    """A content digest of one layer: its own sha256 digest, or a hash of its members."""
    if layer.digest.startswith("sha256:") and len(layer.digest) == 71:
        return layer.digest
    digest = hashlib.sha256()
    for member, reader in layer.members():
        meta = [member.name, member.type, member.mode, member.uid, member.gid, list(member.rdev), member.linkname,
                member.size, sorted((k, v.hex()) for k, v in member.xattrs.items())]
        digest.update(json.dumps(meta).encode() + b"\n")
        if reader is not None:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                digest.update(chunk)
    return "content:" + digest.hexdigest()


def cache_key(layers, agent: str, config: dict) -> str:
    parts = {"version": KEY_VERSION, "format": ext4.FORMAT, "layers": [_layer_key(layer) for layer in layers],
             "agent": sha256_file(agent), "options": config}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def build_rootfs(source: str, agent: str, config: dict, out: str, cache: str, log=print) -> None:
    layers = open_image(source)
    key = cache_key(layers, agent, {name: value for name, value in config.items() if name != "verity"})
    cached = os.path.join(cache, "rootfs", key + ".ext4")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with filelock.FileLock(cached + ".lock"):
        if os.path.isfile(cached) and ext4.is_valid_image(cached):
            log(f"[tdx] rootfs from cache {key[:16]}")
            copy_file(cached, out)
            return
        with apply_layers(open_image(source), defer_checks=True) as tree:
            ext4.build_ext4(tree, agent, config["agent_path"], out=out, size=config["size"], epoch=config["epoch"])
        copy_file(out, cached)


def verity_salt_and_uuid(image: str):
    """The salt and hash-device UUID of an image: from its ext4 UUID and size (never random)."""
    with open(image, "rb") as handle:
        handle.seek(1024 + 0x68)
        ext4_uuid = handle.read(16)
    seed = ext4_uuid + os.path.getsize(image).to_bytes(8, "little")
    return (hashlib.sha256(b"tdx-rules dm-verity salt\0" + seed).digest(),
            hashlib.sha256(b"tdx-rules dm-verity uuid\0" + seed).digest()[:16])


def write_verity(image: str, algorithm: str) -> verity.VerityTree:
    """``<image>.verity`` and ``<image>.roothash`` for an ext4 image."""
    salt, uuid = verity_salt_and_uuid(image)
    tree = verity.build_verity(image, image + ".verity", salt, uuid, algorithm)
    with atomic_output(image + ".roothash", "w") as handle:
        handle.write(tree.root_hash + "\n")
    return tree


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.rootfs")
    parser.add_argument("--config", required=True)
    parser.add_argument("--source", required=True, help="OCI layout directory, docker save tarball or overlay2 layer")
    parser.add_argument("--agent", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--mirror", default="", help="unused; accepted like every fetching stage")
    parser.add_argument("--keyring", default="", help="unused; accepted like every fetching stage")
    parser.add_argument("--snapshot", default="", help="unused here; accepted like every fetching stage")
    parser.add_argument("--refresh", action="store_true", help="unused here; accepted like every fetching stage")
    remote_arguments(parser, used=False)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    build_rootfs(args.source, args.agent, config, args.out, args.cache, log=lambda line: print(line, flush=True))
    if config.get("verity"):
        write_verity(args.out, config["verity"])


if __name__ == "__main__":
    run(main)
