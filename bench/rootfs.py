"""Benchmark: container image -> ext4 against `mkfs.ext4 -d` on the extracted tree (the floor).

Makes a tree, stores it as a one-layer OCI image layout, then times in the same
run, medians over several runs:
  - tdx-rules: read the layout, apply the layer, build the ext4 with the agent;
  - floor: `mkfs.ext4 -d TREE` of the same size on the already-extracted tree.
``--gzip`` stores the layer gzip-compressed as well and times that too, against
the floor and against what a user would otherwise run on such a layer:
`tar -xzf layer.tar.gz -C DIR && mkfs.ext4 -d DIR`, timed together (DIR: ``--extract-to``).
Prints the median of the run-by-run ratios (each pair timed in the same run,
one after the other, after a `sync`) and the peak memory (max RSS) of each
child process.

Trees (``--tree``):
  - generated (default): ``--size-mb`` (200) MB in ``--files`` (5,000) files,
    half compressible text, half random bytes;
  - debootstrap: a Debian root filesystem, `debootstrap --variant=minbase
    bookworm`, made once (needs root and the network) and cached as a tar
    under ~/.cache/tdx-rules-bench/ (or $XDG_CACHE_HOME); the cached tar is the
    layer, the floor's tree is extracted from it;
  - wide: the debootstrap tree plus one directory of ``--wide-files`` (100,000)
    small files (packed by tarfile).

    .venv/bin/python bench/rootfs.py [--tree generated|debootstrap|wide] [--size-mb 200] [--files 5000]
                                     [--runs 5] [--gzip]
"""

import argparse
import dataclasses
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
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TAR = "debootstrap-bookworm-minbase.tar"
FLOOR = "mkfs.ext4 -d on the extracted tree (floor)"
PIPELINE = "tar -xzf layer.tar.gz && mkfs.ext4 -d (gzip pipeline)"
PLAIN = "tdx-rules: OCI layout (tar layer) -> ext4 + agent"
GZIP = "tdx-rules: OCI layout (tar+gzip layer) -> ext4 + agent"
SHORT = {FLOOR: "floor", PIPELINE: "gzip pipeline", PLAIN: "tar layer", GZIP: "tar+gzip layer"}


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


def make_wide_dir(directory, files):
    """``files`` small files (16 bytes to 4 KiB of text) in the one directory ``directory``."""
    rng = random.Random(7)
    text = bytes(rng.choice(b"abcdefghij klmnop\n") for _ in range(4096))
    os.makedirs(directory)
    for index in range(files):
        with open(os.path.join(directory, f"entry-{index:06d}.conf"), "wb") as out:
            out.write(text[:rng.randint(16, 4096)])


def bench_cache():
    """Where the benchmark keeps what it made once (the debootstrap tar)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tdx-rules-bench")


def debootstrap_tar(mirror):
    """The cached tar of a minbase bookworm root filesystem; made by debootstrap the first time."""
    cache = bench_cache()
    path = os.path.join(cache, DEBOOTSTRAP_TAR)
    if os.path.isfile(path):
        return path
    if os.geteuid() != 0:
        raise SystemExit(f"--tree debootstrap: {path} is not cached yet and debootstrap needs root; run once as root")
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix="debootstrap-", dir=cache)
    try:
        root = os.path.join(work, "root")
        print(f"[bench] debootstrap --variant=minbase bookworm from {mirror} (once; cached as {path})", flush=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", root, mirror], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", root, "-cf", path + ".tmp", "."],
                       check=True)
        os.replace(path + ".tmp", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def file_sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_layout(layout, tree=None, layer_tar=None, compress=False):
    """A one-layer OCI layout of ``tree`` (packed by tarfile) or of the tar ``layer_tar`` as it is;
    ``compress``: the layer gzip-compressed (`gzip -1n`). Returns the path of the gzip layer, if any."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as out:
            out.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer_path = os.path.join(layout, "layer.tar")
    if layer_tar is None:
        with tarfile.open(layer_path, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(tree, arcname=".")
    else:
        shutil.copyfile(layer_tar, layer_path)
    diff_id = "sha256:" + file_sha256(layer_path)
    if compress:
        subprocess.run(["gzip", "-1n", layer_path], check=True)
        os.rename(layer_path + ".gz", layer_path)
    digest = file_sha256(layer_path)
    size = os.path.getsize(layer_path)
    blob_path = os.path.join(layout, "blobs", "sha256", digest)
    os.rename(layer_path, blob_path)
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
    return blob_path if compress else None


def ratio_text(ratio):
    """Two decimals, three for ratios below 0.1 (the wide tree's)."""
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def tree_footprint(tree):
    """(4 KiB blocks the tree's files and directories take, entries)."""
    blocks = entries = 0
    for directory, dirs, files in os.walk(tree):
        entries += 1 + len(files)
        blocks += 1 + len(files) // 100
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            blocks += -(-st.st_size // 4096)
    return blocks, entries


@dataclasses.dataclass
class Setup:
    """What one benchmark times: the extracted tree, the OCI layouts of ours by row, the gzip
    layer of the pipeline (None without --gzip), the image size and mkfs's command."""

    tree: str
    layouts: dict
    gzip_blob: "str | None"
    description: str
    size: str
    mkfs: list


def prepare(args, tmp):
    """The tree of ``args.tree`` below ``tmp``, its layouts and the image geometry (a :class:`Setup`)."""
    tree = os.path.join(tmp, "tree")
    if args.tree in ("debootstrap", "wide"):
        layer_tar = debootstrap_tar(args.mirror)
        os.makedirs(tree)
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-xpf", layer_tar, "-C", tree], check=True)
        source = {"layer_tar": layer_tar}
        what = "debootstrap --variant=minbase bookworm"
        if args.tree == "wide":
            make_wide_dir(os.path.join(tree, "etc", "wide.d"), args.wide_files)
            what += f", plus {args.wide_files} small files in one directory"
            source = {"tree": tree}
    else:
        make_tree(tree, args.size_mb, args.files)
        what = f"generated, {args.size_mb} MB in {args.files} files"
        source = {"tree": tree}
    layouts = {PLAIN: os.path.join(tmp, "layout")}
    write_layout(layouts[PLAIN], **source)
    gzip_blob = None
    if args.gzip:
        layouts[GZIP] = os.path.join(tmp, "layout-gz")
        gzip_blob = write_layout(layouts[GZIP], compress=True, **source)
    blocks, entries = tree_footprint(tree)
    if args.tree == "generated":
        size_mb = args.size_mb * 3 // 2 + 64
    else:  # room for the tree, its inode tables and the journal, as for the generated tree
        size_mb = blocks * 4096 * 3 // 2 // (1 << 20) + entries * 256 * 2 // (1 << 20) + 64
    # Enough inodes for the tree in mkfs's image too (ours sizes its inode tables to the tree).
    inodes = ["-N", str(entries * 5 // 4 + 1024)] if entries * 16384 > size_mb << 20 else []
    return Setup(tree, layouts, gzip_blob, f"tree {what} ({entries} entries, {blocks * 4096 / 1e6:.0f} MB in 4 KiB "
                 "blocks)", f"{size_mb}M", ["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-I", "256", *inodes])


def time_runs(setup, runs, extract_to, tmp):
    """Per row: the seconds of every run, the peak RSS, and the run-by-run ratios keyed by
    (row, reference row); each run times the floor, the gzip pipeline, then ours, after a sync."""
    times, ratios, peaks = {}, {}, {}

    def record(name, seconds, rss, against=()):
        times.setdefault(name, []).append(seconds)
        peaks[name] = max(peaks.get(name, 0.0), rss)
        for reference in against:
            ratios.setdefault((name, reference), []).append(seconds / times[reference][-1])

    agent = shutil.which("true")
    image = os.path.join(tmp, "image.ext4")
    for _ in range(runs):
        record(FLOOR, *timed([*setup.mkfs, "-d", setup.tree, image, setup.size], sync=True))
        os.remove(image)
        if setup.gzip_blob is not None:
            extracted = tempfile.mkdtemp(prefix="extracted-", dir=extract_to or tmp)
            record(PIPELINE, *timed(["sh", "-c", 'tar -xzf "$1" -C "$2" && shift 2 && exec "$@"', "sh",
                                     setup.gzip_blob, extracted, *setup.mkfs, "-d", extracted, image, setup.size],
                                    sync=True), against=[FLOOR])
            shutil.rmtree(extracted)
            os.remove(image)
        for name, layout in setup.layouts.items():
            record(name, *timed([sys.executable, "-c", CHILD, layout, agent, image, setup.size], sync=True),
                   against=[FLOOR] + ([PIPELINE] if name == GZIP else []))
            os.remove(image)
    return times, ratios, peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", choices=("generated", "debootstrap", "wide"), default="generated")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--wide-files", type=int, default=100000, help="files in the wide tree's one directory")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gzip", action="store_true", help="also time a gzip-compressed layer")
    parser.add_argument("--mirror", default=DEBIAN_MIRROR, help="Debian mirror for --tree debootstrap")
    parser.add_argument("--extract-to", help="directory the gzip pipeline extracts into (default: beside the "
                        "layouts; a tmpfs such as /dev/shm leaves out the disk's cost of creating files)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare(args, tmp)
        times, ratios, peaks = time_runs(setup, args.runs, args.extract_to, tmp)
    gzip_rows = GZIP in setup.layouts
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; {setup.description}; {args.runs} runs, "
          "each timing the floor" + (", the gzip pipeline" if gzip_rows else "") + " and then ours")
    print(f"{'build':<56}{'median s':>10}{'vs floor':>10}" + (f"{'vs gzip pipeline':>18}" if gzip_rows else "")
          + f"{'peak MiB':>10}")
    for name in [FLOOR] + ([PIPELINE] if gzip_rows else []) + list(setup.layouts):
        floor_ratio = ratio_text(statistics.median(ratios[(name, FLOOR)]) if name != FLOOR else 1.0)
        pipeline_ratio = ratio_text(statistics.median(ratios[(name, PIPELINE)])) if name == GZIP else ""
        print(f"{name:<56}{statistics.median(times[name]):>10.2f}{floor_ratio:>10}"
              + (f"{pipeline_ratio:>18}" if gzip_rows else "") + f"{peaks[name]:>10.1f}")
    print("ratios: median of the run-by-run ratios; run by run: "
          + "; ".join(f"{SHORT[name]} vs {SHORT[reference]}: " + " ".join(ratio_text(r) for r in values)
                      for (name, reference), values in ratios.items()))


if __name__ == "__main__":
    main()
