"""Benchmark: container image -> ext4 against `mkfs.ext4 -d` on the extracted tree (the floor).

Generates a tree (default 200 MB in about 5,000 files, half compressible text,
half random bytes), stores it as a one-layer OCI image layout, then times in
the same run, medians over several runs:
  - tdx-rules: read the layout, apply the layer, build the ext4 with the agent;
  - floor: `mkfs.ext4 -d TREE` of the same size on the already-extracted tree.
Prints the median of the run-by-run ratios and the peak memory (max RSS) of
each child process. ``--gzip`` stores the layer gzip-compressed as well and
times that too (the bodies then go through the tree's store: informational,
not what the floor measures).

    .venv/bin/python bench/rootfs.py [--size-mb 200] [--files 5000] [--runs 5] [--gzip]
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

from child import timed

CHILD = """import sys
from tdx_rules.rootfs import ext4
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.tree import apply_layers
with apply_layers(open_image(sys.argv[1]), defer_checks=True) as tree:  # as the rootfs stage does
    ext4.build_ext4(tree, sys.argv[2], out=sys.argv[3], size=sys.argv[4])
"""


def make_tree(root, size_mb, files):
    rng = random.Random(42)
    words = [bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(4096)) for _ in range(64)]
    per_file = size_mb * 1024 * 1024 // files
    for index in range(files):
        directory = os.path.join(root, f"d{index % 50:02d}", f"s{index % 7}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{index:05d}"), "wb") as out:
            if index % 2:
                out.write(rng.randbytes(per_file))
            else:
                out.write(b"".join(words[(index + i) % 64] for i in range(per_file // 4096 + 1))[:per_file])


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_layout(tree, layout, compress=False):
    os.makedirs(os.path.join(layout, "blobs", "sha256"))

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as out:
            out.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_path = os.path.join(layout, "layer.tar")
    with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".")
    diff_id = "sha256:" + file_sha256(layer_path)
    if compress:
        subprocess.run(["gzip", "-1n", layer_path], check=True)
        os.rename(layer_path + ".gz", layer_path)
    digest = file_sha256(layer_path)
    size = os.path.getsize(layer_path)
    os.rename(layer_path, os.path.join(layout, "blobs", "sha256", digest))
    media_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
    layer = {"mediaType": media_type, "digest": f"sha256:{digest}",
             "size": size}
    config = blob(json.dumps({"architecture": "amd64", "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode())
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                                "layers": [layer]}).encode())
    with open(os.path.join(layout, "index.json"), "w") as out:
        json.dump({"schemaVersion": 2, "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
                                                           platform={"architecture": "amd64", "os": "linux"})]}, out)
    with open(os.path.join(layout, "oci-layout"), "w") as out:
        json.dump({"imageLayoutVersion": "1.0.0"}, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gzip", action="store_true", help="also time a gzip-compressed layer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        make_tree(tree, args.size_mb, args.files)
        layouts = {"tdx-rules: OCI layout (tar layer) -> ext4 + agent": os.path.join(tmp, "layout")}
        write_layout(tree, layouts["tdx-rules: OCI layout (tar layer) -> ext4 + agent"])
        if args.gzip:
            layouts["tdx-rules: OCI layout (tar+gzip layer) -> ext4 + agent"] = os.path.join(tmp, "layout-gz")
            write_layout(tree, layouts["tdx-rules: OCI layout (tar+gzip layer) -> ext4 + agent"], compress=True)
        agent = shutil.which("true")
        size = f"{args.size_mb * 3 // 2 + 64}M"
        floor, times, ratios, peaks = [], {}, {}, {}
        for run in range(args.runs):
            image = os.path.join(tmp, f"floor{run}.ext4")
            seconds, floor_peak = timed(["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-I", "256", "-d",
                                         tree, image, size], sync=True)
            floor.append(seconds)
            os.remove(image)
            for name, layout in layouts.items():
                image = os.path.join(tmp, f"ours{run}.ext4")
                seconds, rss = timed([sys.executable, "-c", CHILD, layout, agent, image, size], sync=True)
                times.setdefault(name, []).append(seconds)
                ratios.setdefault(name, []).append(seconds / floor[-1])
                peaks[name] = max(peaks.get(name, 0.0), rss)
                os.remove(image)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; tree {args.size_mb} MB in {args.files} "
          f"files; {args.runs} runs, each timing the floor and then ours")
    print(f"{'build':<56}{'median s':>10}{'vs floor':>10}{'peak MiB':>10}")
    print(f"{'mkfs.ext4 -d on the extracted tree (floor)':<56}{statistics.median(floor):>10.2f}{1.0:>10.2f}"
          f"{floor_peak:>10.1f}")
    for name in layouts:
        print(f"{name:<56}{statistics.median(times[name]):>10.2f}{statistics.median(ratios[name]):>10.2f}"
              f"{peaks[name]:>10.1f}")
    print("vs floor: median of the run-by-run ratios; run by run: "
          + "; ".join(f"{name.split('(')[1].split(')')[0]}: " + " ".join(f"{r:.2f}" for r in ratios[name])
                      for name in layouts))


if __name__ == "__main__":
    main()
