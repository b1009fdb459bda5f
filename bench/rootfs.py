"""Benchmark: container image -> ext4 against `mkfs.ext4 -d` on the extracted tree (the floor).

Generates a tree (default 200 MB in about 5,000 files, half compressible text,
half random bytes), stores it as a one-layer OCI image layout, then times in
the same run, medians over several runs:
  - tdx-rules: read the layout, apply the layer, build the ext4 with the agent;
  - floor: `mkfs.ext4 -d TREE` of the same size on the already-extracted tree.
Prints the ratio and the peak memory (max RSS) of each child process.

    .venv/bin/python bench/rootfs.py [--size-mb 200] [--files 5000] [--runs 3]
"""

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

CHILD = """import sys
from tdx_rules import ext4, oci
with oci.apply_layers(oci.open_image(sys.argv[1])) as tree:
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


def write_layout(tree, layout):
    os.makedirs(os.path.join(layout, "blobs", "sha256"))

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as out:
            out.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_path = os.path.join(layout, "layer.tar")
    with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tree, arcname=".")
    digest = hashlib.sha256()
    with open(layer_path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    size = os.path.getsize(layer_path)
    os.rename(layer_path, os.path.join(layout, "blobs", "sha256", digest.hexdigest()))
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{digest.hexdigest()}",
             "size": size}
    config = blob(json.dumps({"architecture": "amd64", "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                                "layers": [layer]}).encode())
    with open(os.path.join(layout, "index.json"), "w") as out:
        json.dump({"schemaVersion": 2, "manifests": [dict(manifest, mediaType="application/vnd.oci.image.manifest.v1+json",
                                                           platform={"architecture": "amd64", "os": "linux"})]}, out)
    with open(os.path.join(layout, "oci-layout"), "w") as out:
        json.dump({"imageLayoutVersion": "1.0.0"}, out)


def timed(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree, layout = os.path.join(tmp, "tree"), os.path.join(tmp, "layout")
        make_tree(tree, args.size_mb, args.files)
        write_layout(tree, layout)
        agent = shutil.which("true")
        ours, floor, peak = [], [], 0.0
        size = f"{args.size_mb * 3 // 2 + 64}M"
        for run in range(args.runs):
            image = os.path.join(tmp, f"ours{run}.ext4")
            seconds, rss = timed([sys.executable, "-c", CHILD, layout, agent, image, size])
            ours.append(seconds)
            peak = max(peak, rss)
            os.remove(image)
            image = os.path.join(tmp, f"floor{run}.ext4")
            floor.append(timed(["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-I", "256", "-d", tree,
                                image, size])[0])
            os.remove(image)
    ours_t, floor_t = statistics.median(ours), statistics.median(floor)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; tree {args.size_mb} MB in {args.files} files")
    print(f"{'build':<44}{'median s':>10}{'vs floor':>10}{'peak MiB':>10}")
    print(f"{'mkfs.ext4 -d on the extracted tree (floor)':<44}{floor_t:>10.2f}{1.0:>10.2f}")
    print(f"{'tdx-rules: OCI layout -> ext4 + agent':<44}{ours_t:>10.2f}{ours_t / floor_t:>10.2f}{peak:>10.1f}")


if __name__ == "__main__":
    main()
