"""The launch scripts start a TD in the syntax of each QEMU generation, and an ordinary VM with TDX=0.

Outside references: the option parser of a real TDX-capable QEMU (Debian unstable's QEMU 11,
run from a debootstrap tree the suite builds once, tests/debian.py ``sid_qemu``), the command
line Canonical documents for its TDX build of QEMU 8.2, and Debian's 2026 firmware package with
its dedicated TDX build (``dpkg-deb`` reads its version).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tdx_rules.boot import boot_image
from tdx_rules.measure import launch as launch_module
from tdx_rules.stages import scripts as scripts_stage
from tests import debian
from tests.conftest import scons
from tests.test_errors import replace_in_sconstruct
from tests.test_scripts import RECORDER, config, run_script

# Canonical's documented TD command line (canonical/tdx, guest-tools/direct-boot/boot_direct.sh at
# commit 9480a3d7cce2, the direct kernel boot of its QEMU 8.2 TDX build): the TD options, verbatim.
CANONICAL_DOCUMENTED = {
    "-accel": "kvm",
    "-cpu": "host",
    "-object": {"qom-type": "tdx-guest", "id": "tdx",
                "quote-generation-socket": {"type": "vsock", "cid": "2", "port": "4050"}},
    "-machine": "q35,kernel_irqchip=split,confidential-guest-support=tdx,hpet=off",
}
# What QEMU says when it got past its options and only KVM or TDX support is missing on the host.
KVM_UNAVAILABLE = re.compile(r"vm-type TDX not supported by KVM|Could not access KVM kernel module|"
                             r"failed to initialize kvm")


@pytest.fixture
def parts(tmp_path):
    """Firmware, kernel and initramfs stand-ins (QEMU refuses a TD before it reads them)."""
    files = {}
    for role, name in (("ovmf", "OVMF.fd"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
        path = tmp_path / "parts" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(8192))
        files[role] = str(path)
    return files


@pytest.fixture
def recorder(tmp_path):
    program = tmp_path / "record-qemu"
    program.write_text(RECORDER.format(python=sys.executable))
    program.chmod(0o755)
    return str(program)


def scripts_for(tmp_path, parts, qemu_version, tdx_only_firmware=False):
    """The launch script and the runner of an image launched with ``qemu_version``."""
    out = tmp_path / f"qemu-{qemu_version}"
    launch, runner = out / "img-launch-tdx.sh", out / "img-run-qemu.sh"
    scripts_stage.build_scripts(config(name="img", qemu_version=qemu_version, memory="1G", cpus=2), parts["ovmf"],
                                parts["kernel"], parts["initrd"], str(launch), str(runner),
                                tdx_only_firmware=tdx_only_firmware)
    for path in parts.values():
        os.link(path, out / os.path.basename(path))
    return str(launch), str(runner)


def option(argv, name):
    values = [argv[i + 1] for i, word in enumerate(argv) if word == name]
    assert len(values) == 1, (name, argv)
    return values[0]


def qemu_errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("qemu-system-x86_64:")]


@pytest.mark.parametrize("qemu_version", ["8.2", "10.1", "11.1"])
@pytest.mark.parametrize("script", ["launch", "runner"])
@pytest.mark.parametrize("qgs", ["default", "none"])
def test_td_command_line_gets_past_the_option_parser_of_qemu_11(tmp_path, parts, qemu_version, script, qgs):
    launch, runner = scripts_for(tmp_path, parts, qemu_version)
    env = dict(os.environ, QEMU=debian.sid_qemu(), VSOCK_CID="", TMPDIR=str(tmp_path))
    if qgs == "none":
        env["QGS_CID"] = ""
    done = subprocess.run([launch if script == "launch" else runner], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    errors = qemu_errors(done.stderr)
    assert done.returncode != 0 and errors, done.stderr
    assert all(KVM_UNAVAILABLE.search(line) for line in errors), done.stderr


def test_qemu_11_checks_the_td_object_before_it_needs_kvm(tmp_path, parts):
    # The test above can fail: the same parser refuses a property the tdx-guest object does not have.
    launch, _ = scripts_for(tmp_path, parts, "11.1")
    text = open(launch).read().replace('"sept-ve-disable":true', '"sept-ve-disable":true,"no-such-property":1')
    broken = tmp_path / "broken-launch-tdx.sh"
    broken.write_text(text)
    broken.chmod(0o755)
    os.link(parts["ovmf"], tmp_path / "OVMF.fd")
    os.link(parts["kernel"], tmp_path / "vmlinuz")
    os.link(parts["initrd"], tmp_path / "initrd.img")
    done = subprocess.run([str(broken)], env=dict(os.environ, QEMU=debian.sid_qemu(), VSOCK_CID=""),
                          capture_output=True, text=True, timeout=120)
    assert "Parameter 'no-such-property' is unexpected" in done.stderr, done.stderr


@pytest.mark.parametrize("qemu_version", ["8.2", "11.1"])
def test_td_cpu_options_are_known_to_qemu_11(tmp_path, parts, recorder, qemu_version):
    launch, _ = scripts_for(tmp_path, parts, qemu_version)
    _, argv = run_script([launch], recorder, tmp_path)
    cpu = option(argv, "-cpu")
    assert cpu.startswith("host,")
    # "-cpu host" needs KVM; the same options on the "max" model under TCG are checked at start-up.
    for model, accepted in ((cpu.replace("host", "max", 1), True), ("max,-no-such-feature", False)):
        try:
            done = subprocess.run([debian.sid_qemu(), "-accel", "tcg", "-cpu", model, "-machine", "q35",
                                   "-nodefaults", "-display", "none", "-S"], capture_output=True, text=True, timeout=5)
            running = False
        except subprocess.TimeoutExpired:
            running = True
        assert running == accepted, (model, None if running else done.stderr)


def test_the_canonical_generation_is_canonicals_documented_command_line(tmp_path, parts, recorder):
    launch, _ = scripts_for(tmp_path, parts, "8.2")
    done, argv = run_script([launch], recorder, tmp_path)
    assert done.returncode == 0, done.stderr
    assert option(argv, "-accel") == CANONICAL_DOCUMENTED["-accel"]
    assert option(argv, "-machine") == CANONICAL_DOCUMENTED["-machine"]
    # Ours adds sept-ve-disable (Linux guests need it) and pins PKS and the PMU off (the TD attributes).
    assert json.loads(option(argv, "-object")) == dict(CANONICAL_DOCUMENTED["-object"], **{"sept-ve-disable": True})
    assert option(argv, "-cpu") == CANONICAL_DOCUMENTED["-cpu"] + ",-pks,pmu=off"
    assert option(argv, "-bios").endswith("/OVMF.fd")


def test_the_upstream_generation_names_its_object_in_the_machine_options(tmp_path, parts, recorder):
    launch, _ = scripts_for(tmp_path, parts, "10.1")
    _, argv = run_script([launch], recorder, tmp_path)
    td = json.loads(option(argv, "-object"))
    assert td["qom-type"] == "tdx-guest" and td["sept-ve-disable"] is True
    assert f"confidential-guest-support={td['id']}" in option(argv, "-machine").split(",")
    assert "kernel-irqchip=split" in option(argv, "-machine").split(",")


def test_quote_generation_socket_knobs(tmp_path, parts, recorder):
    launch, _ = scripts_for(tmp_path, parts, "11.1")
    _, argv = run_script([launch], recorder, tmp_path, env={"QGS_PORT": "5000", "QGS_CID": "7"})
    assert json.loads(option(argv, "-object"))["quote-generation-socket"] == {"type": "vsock", "cid": "7",
                                                                              "port": "5000"}
    for empty in ("QGS_CID", "QGS_PORT"):
        _, argv = run_script([launch], recorder, tmp_path, env={empty: ""})
        assert "quote-generation-socket" not in json.loads(option(argv, "-object"))
    done, argv = run_script([launch], recorder, tmp_path, env={"QGS_CID": '2","type":"unix'})
    assert done.returncode == 2 and argv is None
    assert "QGS_CID" in done.stderr and "as numbers" in done.stderr


def test_local_mode_starts_an_ordinary_vm_and_says_the_measurements_do_not_apply(tmp_path, parts, recorder):
    launch, _ = scripts_for(tmp_path, parts, "11.1")
    done, argv = run_script([launch], recorder, tmp_path, env={"TDX": "0", "ACCEL": "tcg"})
    assert done.returncode == 0, done.stderr
    assert option(argv, "-accel") == "tcg" and option(argv, "-cpu") == "max"
    assert option(argv, "-machine") == "q35,hpet=off" and option(argv, "-bios").endswith("/OVMF.fd")
    assert "-object" not in argv and "tdx" not in " ".join(argv)
    assert "TDX=0: image img starts as an ordinary VM under tcg; its measurements do not apply" in done.stderr
    done, argv = run_script([launch], recorder, tmp_path, env={"TDX": "0", "ACCEL": "kvm"})
    assert option(argv, "-accel") == "kvm" and option(argv, "-cpu") == "host"
    done, argv = run_script([launch], recorder, tmp_path, env={"TDX": "0"})
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert option(argv, "-accel") == ("kvm" if usable else "tcg")


@pytest.mark.parametrize("env, needle", [({"TDX": "yes"}, "TDX=yes"), ({"TDX": "0", "ACCEL": "xen"}, "ACCEL=xen"),
                                         ({"ACCEL": "tcg"}, "needs KVM")])
def test_bad_launch_settings_are_refused_before_qemu_starts(tmp_path, parts, recorder, env, needle):
    launch, _ = scripts_for(tmp_path, parts, "8.2")
    done, argv = run_script([launch], recorder, tmp_path, env=env)
    assert done.returncode == 2 and argv is None
    assert needle in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_tdx_only_firmware_is_left_out_in_local_mode(tmp_path, parts, recorder):
    launch, _ = scripts_for(tmp_path, parts, "11.1", tdx_only_firmware=True)
    done, argv = run_script([launch], recorder, tmp_path, env={"TDX": "0", "ACCEL": "tcg"})
    assert "-bios" not in argv and "starts only inside a trust domain" in done.stderr
    _, argv = run_script([launch], recorder, tmp_path)
    assert option(argv, "-bios").endswith("/OVMF.fd")


def test_the_manifest_states_the_td_attributes_the_command_line_asks_for():
    # MEASUREMENT-FACTS, TD attributes: quote bytes 0000001000000000 = SEPT_VE_DISABLE only.
    for version in ("8.2", "11.1"):
        record = launch_module.manifest_record(launch_module.launch_for(version))
        assert record["td_attributes"] == "0000001000000000"
        assert record["td_attributes_bits"] == ["SEPT_VE_DISABLE"]


@pytest.mark.slow
def test_debians_tdx_firmware_package_sets_the_profile_and_boots_in_local_mode(fast_project):
    """Debian unstable's ovmf-inteltdx: its OVMF.inteltdx.ms.fd is taken, its version (2026.08) sets
    the profile, and TDX=0 boots the kernel without it (the IntelTdx build starts only in a TD)."""
    deb = debian.sid_deb("ovmf-inteltdx")
    replace_in_sconstruct(fast_project, "ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', ",
                          f"ovmf='file:{deb}', qemu_version='11.1', ")
    scons(fast_project)
    out = os.path.join(fast_project, "build", "tdx", "hello")
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    manifest = json.load(open(os.path.join(out, "hello-manifest.json")))
    assert manifest["inputs"]["ovmf"][0]["member"] == "usr/share/ovmf/OVMF.inteltdx.ms.fd"
    profile = manifest["measurements"]["profile"]
    assert profile["ovmf_version"] == version and version.startswith("2026.")
    assert profile["separator_in_rtmr1"] and profile["initrd_arg_prefix"] and not profile["patch_kernel"]
    listed = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    assert open(os.path.join(out, "hello-ovmf.fd"), "rb").read() in listed
    console = boot_image(os.path.join(out, "hello-launch-tdx.sh"), until="HELLO-DONE")
    assert "starts only inside a trust domain" in console and "HELLO-DONE" in console


def private_apt(tmp_path, debs) -> str:
    """An APT_CONFIG for a flat repository of ``debs`` on disk, with its own lists and caches: the
    host's apt itself, pointed away from the host's sources (whose state it leaves alone)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for deb in debs:
        os.link(deb, repo / os.path.basename(deb))
    index = subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    (repo / "Packages").write_text(index)
    state = tmp_path / "apt-state"
    for sub in ("lists/partial", "cache/archives/partial", "parts"):
        (state / sub).mkdir(parents=True)
    (state / "sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    config = tmp_path / "apt.conf"
    config.write_text(f'Dir::Etc::SourceList "{state}/sources.list";\nDir::Etc::SourceParts "{state}/parts";\n'
                      f'Dir::State::Lists "{state}/lists";\nDir::Cache "{state}/cache";\n')
    subprocess.run(["apt-get", "update", "-q"], env=dict(os.environ, APT_CONFIG=str(config)), check=True,
                   capture_output=True)
    return str(config)


@pytest.mark.slow
def test_an_apt_firmware_metapackage_is_followed_to_its_inteltdx_package(fast_project, tmp_path):
    # Debian unstable's ovmf holds no firmware and depends on ovmf-inteltdx (and ovmf-generic).
    meta = debian.sid_deb("ovmf")
    depends = subprocess.run(["dpkg-deb", "-f", meta, "Depends"], capture_output=True, text=True).stdout
    assert "ovmf-inteltdx" in depends
    apt_config = private_apt(tmp_path, [meta, debian.sid_deb("ovmf-inteltdx")])
    replace_in_sconstruct(fast_project, "toolpath=[tdx_rules.TOOLPATH])\n",
                          f"toolpath=[tdx_rules.TOOLPATH])\nenv['ENV']['APT_CONFIG'] = {apt_config!r}\n")
    replace_in_sconstruct(fast_project, "ovmf='file:/usr/share/ovmf/OVMF.fd', ovmf_version='2022.11', ",
                          "ovmf='apt:ovmf', ")
    scons(fast_project, "hello-ovmf", env={"TDX_RULES_CACHE": str(tmp_path / "cache")})
    work = os.path.join(fast_project, "build", "tdx", "hello", "work")
    info = json.load(open(os.path.join(work, "ovmf.info.json")))
    assert [record["spec"] for record in info["inputs"]] == ["apt:ovmf", "apt:ovmf-inteltdx"]
    assert info["inputs"][1]["member"] == "usr/share/ovmf/OVMF.inteltdx.ms.fd"
    profile = json.load(open(os.path.join(work, "ovmf.profile.json")))
    assert profile == {"firmware": "OVMF.inteltdx.ms.fd", "tdx_only": True,
                       "ovmf_version": subprocess.run(["dpkg-deb", "-f", meta, "Version"], capture_output=True,
                                                      text=True).stdout.strip()}
