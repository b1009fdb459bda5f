"""dm-verity root filesystems: the hash tree against Debian's veritysetup (cryptsetup-bin), the
image rule's wiring (command line, disks, manifest, incremental contract, secure default), and
boots under QEMU in which the guest's own dm-verity refuses a tampered disk, tree or root hash."""

import json
import os
import re
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.boot import boot_image
from tdx_rules.rootfs import verity
from tests.conftest import ROOT, fuzz_examples, scons, stages_run
from tests.oci_fixtures import LAYERS, F, write_oci
from tests.test_errors import scons_error
from tests.test_rootfs import AGENT_C, debugfs

SALT = bytes(range(32))
UUID = bytes(range(16))
UUID_TEXT = "00010203-0405-0607-0809-0a0b0c0d0e0f"


def veritysetup(*args, check=True):
    return subprocess.run(["veritysetup", *args], capture_output=True, text=True, check=check)


def dump(hash_file) -> dict:
    fields = {}
    for line in veritysetup("dump", str(hash_file)).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def random_data(path, blocks, seed):
    import random

    generator = random.Random(seed)
    path.write_bytes(generator.randbytes(blocks * verity.BLOCK))


@pytest.mark.parametrize("blocks", [1, 2, 127, 128, 129, 128 * 128, 128 * 128 + 1])
def test_the_hash_file_is_the_one_veritysetup_format_writes_with_the_same_salt_and_uuid(tmp_path, blocks):
    data = tmp_path / "data"
    random_data(data, blocks, blocks)
    tree = verity.build_verity(str(data), str(tmp_path / "ours"), SALT, UUID)
    done = veritysetup("format", str(data), str(tmp_path / "theirs"), f"--salt={SALT.hex()}", f"--uuid={UUID_TEXT}")
    assert re.search(r"Root hash:\s+([0-9a-f]+)", done.stdout).group(1) == tree.root_hash
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
    assert veritysetup("verify", str(data), str(tmp_path / "ours"), tree.root_hash, check=False).returncode == 0


@settings(max_examples=fuzz_examples(12), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.integers(1, 3000), salt=st.binary(min_size=1, max_size=256), seed=st.integers(0, 2 ** 32))
def test_veritysetup_verifies_random_data_and_dumps_what_the_tree_says(tmp_path_factory, blocks, salt, seed):
    work = tmp_path_factory.mktemp("verity")
    data = work / "data"
    random_data(data, blocks, seed)
    tree = verity.build_verity(str(data), str(work / "hash"), salt, UUID)
    assert veritysetup("verify", str(data), str(work / "hash"), tree.root_hash, check=False).returncode == 0
    fields = dump(work / "hash")
    assert fields["Salt"] == salt.hex() == tree.salt
    assert int(fields["Data blocks"]) == blocks == tree.data_blocks
    assert int(fields["Hash blocks"]) == tree.hash_blocks
    assert int(fields["Data block size"]) == int(fields["Hash block size"]) == 4096
    assert fields["Hash algorithm"] == "sha256" and fields["Hash type"] == "1"
    # The command the manifest states checks the files without the superblock.
    done = subprocess.run(tree.veritysetup_verify(str(data), str(work / "hash")).split(), capture_output=True)
    assert done.returncode == 0
    with open(data, "r+b") as handle:  # and it can fail: one flipped bit of the data
        handle.seek(blocks * verity.BLOCK // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 1]))
    assert veritysetup("verify", str(data), str(work / "hash"), tree.root_hash, check=False).returncode != 0


def test_sha512_trees_verify_too(tmp_path):
    data = tmp_path / "data"
    random_data(data, 300, 7)
    tree = verity.build_verity(str(data), str(tmp_path / "hash"), SALT, UUID, "sha512")
    assert veritysetup("verify", "--hash=sha512", str(data), str(tmp_path / "hash"), tree.root_hash,
                       check=False).returncode == 0


def test_an_unknown_hash_algorithm_or_a_partial_block_is_refused(tmp_path):
    data = tmp_path / "data"
    data.write_bytes(bytes(5000))
    with pytest.raises(Exception, match="not a whole number of 4096-byte blocks"):
        verity.build_verity(str(data), str(tmp_path / "hash"), SALT, UUID)
    with pytest.raises(Exception, match="'md5' is not supported"):
        verity.build_verity(str(data), str(tmp_path / "hash"), SALT, UUID, "md5")
    assert not (tmp_path / "hash").exists()


IMAGE_SCONSTRUCT = """import tdx_rules
DefaultEnvironment(tools=[])
env = Environment(tools=['tdx'], toolpath=[tdx_rules.TOOLPATH])
agent = env.TdxStaticProgram('agent', ['agent.c'])
disk = env.TdxExt4Rootfs('rootfs.ext4', 'image', agent=agent, {rootfs_options})
env.TdxImage('svc', rootfs=disk, minirootfs='debian', kernel='file:{vmlinuz}', modules_dir={modules!r},
             ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', memory='1G', cpus=1,
             cmdline='console=ttyS0 panic=-1'{image_options})
"""


def image_project(path, small_kernel, rootfs_options="verity=True", image_options="", layers=None):
    os.makedirs(path)
    write_oci(os.path.join(path, "image"), layers=layers)
    (path / "agent.c").write_text(AGENT_C)
    (path / "SConstruct").write_text(IMAGE_SCONSTRUCT.format(
        rootfs_options=rootfs_options, image_options=image_options, vmlinuz=small_kernel["vmlinuz"],
        modules=small_kernel["modules_dir"]))
    return str(path)


def test_a_verity_rootfs_writes_the_tree_that_veritysetup_verifies_and_the_manifest_states(tmp_path, small_kernel):
    project = image_project(tmp_path / "p", small_kernel)
    scons(project, env={"TDX_RULES_CACHE": str(tmp_path / "cache")})
    image = os.path.join(project, "rootfs.ext4")
    root = open(image + ".roothash").read()
    assert re.fullmatch(r"[0-9a-f]{64}\n", root)
    assert veritysetup("verify", image, image + ".verity", root.strip(), check=False).returncode == 0
    manifest = json.load(open(os.path.join(project, "build", "tdx", "svc", "svc-manifest.json")))
    record, fields = manifest["rootfs"], dump(image + ".verity")
    assert record["root_hash"] == root.strip() and record["salt"] == fields["Salt"]
    assert record["data_blocks"] == int(fields["Data blocks"]) == os.path.getsize(image) // 4096
    assert record["hash_blocks"] == int(fields["Hash blocks"])
    assert (record["data_block_size"], record["hash_block_size"], record["algorithm"]) == (4096, 4096, "sha256")
    done = subprocess.run(record["veritysetup_verify"].split(), cwd=project, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The parameters are one word of the measured command line, and the manifest shows it.
    argument = record["kernel_argument"]
    assert manifest["measurements"]["cmdline"] == "console=ttyS0 panic=-1 " + argument
    assert argument.startswith(f"tdx.verity={root.strip()},{record['salt']},{record['data_blocks']},sha256,")
    launch = open(os.path.join(project, "build", "tdx", "svc", "svc-launch-tdx.sh")).read()
    assert argument in launch and "rootfs.ext4.verity" in launch and launch.count("virtio-blk-pci") == 2
    # The modules the init needs join the bundle.
    bundled = {m["name"] for m in manifest["inputs"]["modules"]}
    assert {"dm_mod", "dm_verity", "overlay"} <= bundled


def test_a_changed_container_image_reruns_only_rootfs_rtmr2_scripts_and_manifest(tmp_path, small_kernel):
    cache = {"TDX_RULES_CACHE": str(tmp_path / "cache")}
    project = image_project(tmp_path / "p", small_kernel)
    scons(project, env=cache)
    before = json.load(open(os.path.join(project, "build", "tdx", "svc", "svc-manifest.json")))["rootfs"]
    shutil.rmtree(os.path.join(project, "image"))
    write_oci(os.path.join(project, "image"), layers=LAYERS + [[F("etc/added", b"new\n")]], compressions=("gzip",) * 4)
    assert stages_run(scons(project, env=cache)) == {"rootfs", "rtmr2", "scripts", "manifest"}
    manifest = os.path.join(project, "build", "tdx", "svc", "svc-manifest.json")
    assert json.load(open(manifest))["rootfs"]["root_hash"] != before["root_hash"]
    assert stages_run(scons(project, env=cache)) == set()
    # tdx-rules diff names the changed root hash.
    old = tmp_path / "old-manifest.json"
    old.write_text(json.dumps(dict(json.load(open(manifest)), rootfs=before)))
    done = subprocess.run([os.sys.executable, "-m", "tdx_rules", "diff", str(old), manifest], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 1 and f"~ rootfs.root_hash: \"{before['root_hash']}\"" in done.stdout


def test_two_clean_builds_in_different_directories_give_the_same_disk_tree_and_manifest(tmp_path, small_kernel):
    first = image_project(tmp_path / "a", small_kernel)
    second = image_project(tmp_path / "b" / "deeper", small_kernel)
    scons(first, env={"TDX_RULES_CACHE": str(tmp_path / "cache-a")})
    scons(second, env={"TDX_RULES_CACHE": str(tmp_path / "cache-b")})
    for name in ("rootfs.ext4", "rootfs.ext4.verity", "rootfs.ext4.roothash",
                 os.path.join("build", "tdx", "svc", "svc-manifest.json")):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read(), name


def test_a_rootfs_without_verity_is_refused_unless_the_image_says_unmeasured(tmp_path, small_kernel):
    project = image_project(tmp_path / "p", small_kernel, rootfs_options="size='auto'")
    error = scons_error(scons(project, check=False))
    assert "no dm-verity hash tree" in error and "verity=True" in error and "unmeasured_rootfs=True" in error
    project = image_project(tmp_path / "q", small_kernel, rootfs_options="size='auto'",
                            image_options=", unmeasured_rootfs=True")
    scons(project, "-n")


@pytest.mark.parametrize("rootfs_options, image_change, needle", [
    ("verity='md5'", None, "verity='md5' is not a hash algorithm"),
    ("verity=True", ("rootfs=disk", "rootfs='rootfs.img'"), "is not a root filesystem of TdxExt4Rootfs"),
])
def test_bad_verity_declarations_are_one_line(tmp_path, small_kernel, rootfs_options, image_change, needle):
    project = image_project(tmp_path / "p", small_kernel, rootfs_options=rootfs_options)
    if image_change:
        path = os.path.join(project, "SConstruct")
        text = open(path).read()
        open(path, "w").write(text.replace(*image_change))
    assert needle in scons_error(scons(project, check=False))


def test_a_tree_too_large_for_its_size_leaves_no_partial_outputs(tmp_path, small_kernel):
    project = image_project(tmp_path / "p", small_kernel, rootfs_options="verity=True, size='1M'",
                            layers=[[F("big", os.urandom(3 << 20))]])
    assert "needs at least" in scons_error(scons(project, "rootfs.ext4", check=False,
                                                 env={"TDX_RULES_CACHE": str(tmp_path / "cache")}))
    outputs = {"rootfs.ext4", "rootfs.ext4.verity", "rootfs.ext4.roothash"}
    assert not [name for name in os.listdir(project) if name in outputs or name.startswith(".rootfs.ext4")]


# --- boots -------------------------------------------------------------------------------------------------------

def flip(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    """examples/container (verity=True), built once."""
    project = tmp_path_factory.mktemp("container") / "container"
    shutil.copytree(os.path.join(ROOT, "examples", "container"), project,
                    ignore=shutil.ignore_patterns("build", ".sconsign.dblite", ".tdx-csig.json"))
    scons(str(project), env={"SOURCE_DATE_EPOCH": "1700000000"})
    return project


def boot(container, **env):
    return boot_image(str(container / "build" / "tdx" / "container" / "container-launch-tdx.sh"), until="AGENT-DONE",
                      env=env, timeout=300)


@pytest.mark.slow
def test_the_agent_runs_from_the_verified_root_and_writes_to_the_overlay(container):
    console = boot(container)
    assert "mounted through dm-verity, writable through a tmpfs overlay" in console
    assert "AGENT-FROM-CONTAINER-ROOTFS" in console and "agent wrote: written in the guest" in console


@pytest.mark.slow
def test_a_flipped_byte_in_the_agent_stops_the_guest_before_it_runs(container, tmp_path):
    disk = tmp_path / "rootfs.ext4"
    shutil.copy(container / "build" / "rootfs.ext4", disk)
    block = int(debugfs(str(disk), "blocks /sbin/vm-agent").split()[1])  # a block of the agent's data
    flip(disk, block * 4096 + 100)
    console = boot(container, ROOTFS=str(disk))
    assert f"data block {block} is corrupted" in console
    assert "cannot read /sbin/vm-agent from the verified root filesystem; powering off" in console
    assert "AGENT-FROM-CONTAINER-ROOTFS" not in console and "reboot: Power down" in console


@pytest.mark.slow
def test_a_flipped_byte_in_the_hash_tree_stops_the_guest(container, tmp_path):
    tree = tmp_path / "rootfs.ext4.verity"
    shutil.copy(container / "build" / "rootfs.ext4.verity", tree)
    flip(tree, 4096 + 10)  # the top of the tree, right after the superblock
    console = boot(container, ROOTFS_HASH=str(tree))
    assert "is corrupted" in console and "cannot mount the verified root filesystem" in console
    assert "AGENT-FROM-CONTAINER-ROOTFS" not in console and "reboot: Power down" in console


@pytest.mark.slow
def test_another_root_hash_on_the_command_line_stops_the_guest(container):
    script = container / "build" / "tdx" / "container" / "container-launch-tdx.sh"
    cmdline = re.search(r"^default_cmdline='([^']*)'$", script.read_text(), re.M).group(1)
    root = (container / "build" / "rootfs.ext4.roothash").read_text().strip()
    other = ("0" if root[0] != "0" else "1") + root[1:]
    console = boot(container, CMDLINE=cmdline.replace(root, other))
    assert "cannot mount the verified root filesystem" in console
    assert "AGENT-FROM-CONTAINER-ROOTFS" not in console
    console = boot(container, CMDLINE="console=ttyS0 panic=-1")  # no parameters at all
    assert "no tdx.verity= on the kernel command line" in console and "AGENT-FROM" not in console
