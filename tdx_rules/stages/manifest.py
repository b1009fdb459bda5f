"""Finalize: ``<name>-manifest.json``, every input (spec, file, sha256) and every output.

Paths in the manifest are file names relative to the image directory; no
build path of this machine appears in it. ``launch`` states what the launch scripts ask
of the TD (QEMU generation, TD attributes, where XFAM comes from), for the verifier.
``initramfs`` states how the initramfs was compressed: its file, the format, the level,
the block size and the deflate library that made the bytes (RTMR[2] depends on it).
``libraries`` (a dynamically linked workload): the loader and every shared library in the
initramfs, each with its image path, SHA-256, size and origin (host path, or package, version
and member), and each symlink with its target; the packages they came from are inputs.
"""

import argparse
import json
import os

from ..fsutil import sha256_file, write_json
from ..measure.launch import launch_for, manifest_record
from ..rootfs import verity
from ._entry import load_config, run


def _measurements(transcripts) -> dict:
    """The three registers, the launch profile and every event in measurement order."""
    result = {"events": []}
    for path in transcripts:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        result[data["register"]] = data["value"]
        result["profile"] = data["profile"]
        if data["register"] == "mrtd":
            result["mrtd_sections"] = data["sections"]
            result["rtmr0_firmware"] = data.get("rtmr0_firmware", [])
        if data["register"] == "rtmr2":
            result["cmdline"] = data.get("cmdline")
        result["events"] += data.get("events", [])
    return result


def rootfs_record(image: str, hash_path: str, roothash_path: str) -> dict:
    """The verified root filesystem: its files, the tree's parameters, how to check them."""
    with open(roothash_path, encoding="ascii") as handle:
        tree = verity.read_tree(hash_path, handle.read().strip())
    names = {"data": os.path.basename(image), "hash": os.path.basename(hash_path)}
    return {
        "files": [{"path": os.path.basename(path), "sha256": sha256_file(path)}
                  for path in (image, hash_path, roothash_path)],
        "root_hash": tree.root_hash, "salt": tree.salt, "algorithm": tree.algorithm,
        "data_block_size": tree.data_block_size, "hash_block_size": tree.hash_block_size,
        "data_blocks": tree.data_blocks, "hash_blocks": tree.hash_blocks, "hash_offset": tree.hash_start_block
        * tree.hash_block_size, "kernel_argument": tree.kernel_argument(),
        "veritysetup_verify": tree.veritysetup_verify(names["data"], names["hash"]),
    }


def build_manifest(config: dict, infos, files, outputs, out: str, transcripts=(), extra_files=(),
                   verity_files=None, compression=None, closure=None, ssh=None) -> None:
    """``extra_files``: host paths in the order of the config's ``extra_files`` guest paths;
    ``verity_files``: (hash tree, root hash) of a verified root filesystem (the ``rootfs`` file);
    ``compression``: the compress stage's JSON on how the initramfs was compressed;
    ``closure``: the closure stage's JSON of a dynamically linked workload;
    ``ssh``: the ssh stage's JSON of an image with an SSH server."""
    inputs = {}
    for info_path in infos:
        stage = os.path.basename(info_path).split(".")[0]
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        # The modules stage lists what it bundled; the fetching stages list their inputs.
        inputs[stage] = info.get("inputs", info.get("bundled", []))
    files = list(files) + [("extra:" + guest.lstrip("/"), path)
                           for guest, path in zip(config.get("extra_files", []), extra_files)]
    for label, path in files:
        inputs.setdefault(label, []).append({"file": os.path.basename(path), "sha256": sha256_file(path)})
    manifest = {
        "name": config["name"],
        "settings": config["settings"],
        "inputs": inputs,
        "outputs": [{"path": os.path.basename(p), "sha256": sha256_file(p), "size": os.path.getsize(p)}
                    for p in sorted(outputs, key=os.path.basename)],
    }
    if compression:
        with open(compression, encoding="utf-8") as handle:
            manifest["initramfs"] = json.load(handle)
    if closure:
        with open(closure, encoding="utf-8") as handle:
            record = json.load(handle)
        if record["inputs"]:
            inputs["libraries"] = record["inputs"]
        manifest["libraries"] = {"interpreter": record["interpreter"], "files": record["libraries"]}
    if ssh:
        with open(ssh, encoding="utf-8") as handle:
            record = json.load(handle)
        inputs["ssh"] = record["inputs"]
        manifest["ssh"] = {key: record[key] for key in ("server", "keygen", "interpreter", "files")}
    if config.get("lock_sha256"):
        manifest["lock"] = {"file": "tdx.lock", "sha256": config["lock_sha256"]}
    if verity_files:
        image = dict(files)["rootfs"]
        manifest["rootfs"] = rootfs_record(image, *verity_files)
    if "qemu_version" in config["settings"]:
        manifest["launch"] = manifest_record(launch_for(config["settings"]["qemu_version"]))
    if transcripts:
        manifest["measurements"] = _measurements(transcripts)
    write_json(out, manifest)


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m tdx_rules.stages.manifest")
    parser.add_argument("--config", required=True)
    parser.add_argument("--info", action="append", default=[], help="a stage's info JSON")
    parser.add_argument("--file", action="append", default=[], help="LABEL=PATH of an input file")
    parser.add_argument("--output", action="append", default=[])
    parser.add_argument("--measurement", action="append", default=[], help="a measurement transcript JSON")
    parser.add_argument("--extra-file", action="append", default=[],
                        help="an extra file, in the order of the config's extra_files")
    parser.add_argument("--verity-hash", help="the root filesystem's dm-verity hash tree")
    parser.add_argument("--roothash", help="its root hash file")
    parser.add_argument("--compression", help="the compress stage's JSON: how the initramfs was compressed")
    parser.add_argument("--closure", help="the closure stage's JSON: the workload's shared libraries")
    parser.add_argument("--ssh", help="the ssh stage's JSON: the SSH server's files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    files = [tuple(item.split("=", 1)) for item in args.file]
    build_manifest(load_config(args.config), args.info, files, args.output, args.out, args.measurement,
                   args.extra_file, (args.verity_hash, args.roothash) if args.verity_hash else None,
                   args.compression, args.closure, args.ssh)


if __name__ == "__main__":
    run(main)
