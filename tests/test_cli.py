"""`tdx-rules measure`: what verifiers and CI run against the files they launch."""

import hashlib
import json
import os
import subprocess
import sys

from tests.conftest import ROOT, scons


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tdx_rules", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_measure_agrees_with_the_values_the_image_rule_wrote(fast_project):
    scons(fast_project)
    out = os.path.join(fast_project, "build", "tdx", "hello")
    result = cli("measure", "--ovmf", f"{out}/hello-ovmf.fd", "--kernel", f"{out}/hello-vmlinuz",
                 "--initrd", f"{out}/hello-initramfs.cpio.gz", "--cmdline", "console=ttyS0 panic=-1",
                 "--memory", "2G", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for register in ("mrtd", "rtmr1", "rtmr2"):
        assert data[register] == open(f"{out}/hello-{register}.hex").read().strip(), register
    manifest = json.load(open(f"{out}/hello-manifest.json"))["measurements"]
    assert data["events"] == manifest["events"]
    # The initrd event is the SHA-384 of the file, computed here independently.
    initrd_digest = hashlib.sha384(open(f"{out}/hello-initramfs.cpio.gz", "rb").read()).hexdigest()
    assert data["events"][-1] == {"register": 2, "description": data["events"][-1]["description"],
                                  "digest": initrd_digest}
    assert [e["register"] for e in data["events"]] == [1] * 4 + [2] * 2


def test_registers_without_inputs_are_left_out():
    result = cli("measure", "--ovmf", "/usr/share/ovmf/OVMF.fd", "--json")
    data = json.loads(result.stdout)
    assert set(data) >= {"mrtd"} and "rtmr1" not in data and "rtmr2" not in data
    plain = cli("measure", "--cmdline", "console=ttyS0")
    assert plain.stdout.startswith("RTMR[2]") and len(plain.stdout.splitlines()) == 1


def test_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "junk.fd").write_bytes(b"\0" * 4096)
    for args in (["--ovmf", str(tmp_path / "junk.fd")], ["--kernel", "/etc/passwd"],
                 ["--cmdline", "x", "--memory", "lots", "--kernel", "/etc/passwd"],
                 ["--ovmf", "/nonexistent"], ["--cmdline", "x", "--qemu-version", "banana"]):
        result = cli("measure", *args)
        assert result.returncode == 1, args
        assert result.stderr.startswith("tdx-rules: error: ") and len(result.stderr.splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_help_shows_an_example():
    assert "example:" in cli("measure", "--help").stdout


def test_pack_subcommand_writes_an_initramfs_gnu_cpio_can_list(tmp_path):
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "app").write_bytes(b"\x7fELF-not-really")
    (tree / "init").write_text("#!/bin/sh\n")
    out = tmp_path / "initrd.gz"
    result = cli("pack", str(tree), "-o", str(out), "--compress", "gzip", "--threads", "2")
    assert result.returncode == 0, result.stderr
    data = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    assert listing.split() == ["bin", "bin/app", "init"]
    bad = cli("pack", str(tmp_path / "missing"), "-o", str(out))
    assert bad.returncode == 1 and bad.stderr.startswith("tdx-rules: error:") and len(bad.stderr.splitlines()) == 1


def test_tdxpack_builder_rebuilds_when_a_file_in_the_tree_changes(tmp_path):
    from tests.conftest import stages_run

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("one\n")
    (tmp_path / "SConstruct").write_text(
        "import tdx_rules\nDefaultEnvironment(tools=[])\n"
        "env = Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
        "env.TdxPack('initrd.zst', 'tree', compress='zstd')\n")
    assert stages_run(scons(str(tmp_path))) == {"pack"}
    assert stages_run(scons(str(tmp_path))) == set()
    (tree / "etc" / "motd").write_text("two\n")
    assert stages_run(scons(str(tmp_path))) == {"pack"}
    data = subprocess.run(["zstd", "-dc", str(tmp_path / "initrd.zst")], capture_output=True, check=True).stdout
    member = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "etc/motd"], input=data, capture_output=True,
                            check=True).stdout
    assert member == b"two\n"
