"""The incremental contract: each change reruns exactly the stages that read it.

Real scons runs in subprocesses on a temporary project; the progress lines
(`[tdx] <stage> <image>`) tell which stages ran.
"""

import base64
import hashlib
import json
import os

import pytest

from tests.conftest import scons, stages_run

FINALIZE = {"compress", "scripts", "manifest"}
# A new initramfs is measured into RTMR[2]; RTMR[1] reads only its size, which may or may not change.
NEW_INITRD = FINALIZE | {"rtmr2"}


def reran_for_new_initrd(ran, before):
    """The stages a changed initramfs reruns: ``before``, finalize, RTMR[2], and RTMR[1] at most."""
    return before | NEW_INITRD <= ran <= before | NEW_INITRD | {"rtmr1"}


def ed25519_key(seed: int, comment: str) -> str:
    """A well-formed OpenSSH ed25519 public key line (type string, then 32 key bytes)."""
    blob = b"\0\0\0\x0bssh-ed25519" + b"\0\0\0\x20" + bytes([seed]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


KEY_A = ed25519_key(1, "a@host")
KEY_B = ed25519_key(2, "b@host")


def set_options(project, **options):
    path = os.path.join(project, "opts.json")
    current = json.load(open(path)) if os.path.exists(path) else {}
    current.update(options)
    with open(path, "w") as handle:
        json.dump(current, handle)


@pytest.fixture
def built(fast_project):
    set_options(fast_project, ssh_keys=[KEY_A], env_vars={"RUST_LOG": "info"})
    first = scons(fast_project)
    assert {"program", "minirootfs", "busybox", "kernel", "modules", "init", "cpio", "ovmf"} | FINALIZE <= stages_run(first)
    return fast_project


def test_nothing_changed_runs_no_stage_and_scons_q_says_up_to_date(built):
    assert stages_run(scons(built)) == set()
    assert scons(built, "-q", "hello", check=False).returncode == 0


def test_changed_program_source_reruns_program_cpio_finalize(built):
    with open(os.path.join(built, "hello.c"), "a") as handle:
        handle.write('\nint unused_marker(void) { return puts("changed"); }\n')
    assert reran_for_new_initrd(stages_run(scons(built)), {"program", "cpio"})


def test_comment_only_change_stops_after_the_program(built):
    with open(os.path.join(built, "hello.c"), "a") as handle:
        handle.write("\n/* a comment changes nothing in the binary */\n")
    assert stages_run(scons(built)) == {"program"}


def test_changed_ssh_key_reruns_init_cpio_finalize(built):
    set_options(built, ssh_keys=[KEY_B])
    assert reran_for_new_initrd(stages_run(scons(built)), {"init", "cpio"})


def test_changed_env_var_reruns_init_cpio_finalize(built):
    set_options(built, env_vars={"RUST_LOG": "debug"})
    assert reran_for_new_initrd(stages_run(scons(built)), {"init", "cpio"})


def test_changed_memory_reruns_only_rtmr1_scripts_and_manifest(built):
    set_options(built, memory="3G")
    assert stages_run(scons(built)) == {"rtmr1", "scripts", "manifest"}


def test_extra_file_content_change_reruns_cpio_finalize(built):
    data = os.path.join(built, "motd")
    with open(data, "w") as handle:
        handle.write("one\n")
    set_options(built, extra_files={"/etc/motd": "motd"})
    assert reran_for_new_initrd(stages_run(scons(built)), {"cpio"})
    with open(data, "w") as handle:
        handle.write("two\n")
    assert reran_for_new_initrd(stages_run(scons(built)), {"cpio"})
    assert stages_run(scons(built)) == set()
    manifest = json.load(open(os.path.join(built, "build", "tdx", "hello", "hello-manifest.json")))
    assert manifest["inputs"]["extra:etc/motd"] == [{"file": "motd", "sha256": hashlib.sha256(b"two\n").hexdigest()}]


def test_skip_variable_skips_the_image_and_says_so(built):
    result = scons(built, env={"TDX_IMAGE_SKIP": "1"})
    assert "skipped" in result.stdout and stages_run(result) == set()


def test_manifest_lists_every_output_with_its_hash_and_the_bundled_modules(built):
    out = os.path.join(built, "build", "tdx", "hello")
    manifest = json.load(open(os.path.join(out, "hello-manifest.json")))
    listed = {entry["path"]: entry for entry in manifest["outputs"]}
    assert set(listed) == {"hello-initramfs.cpio.gz", "hello-vmlinuz", "hello-ovmf.fd", "hello-launch-tdx.sh",
                           "hello-run-qemu.sh", "hello-mrtd.hex", "hello-rtmr1.hex", "hello-rtmr2.hex"}
    for name, entry in listed.items():
        data = open(os.path.join(out, name), "rb").read()
        assert entry == {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert {"tdx_guest", "vsock", "tsm"} <= {m["name"] for m in manifest["inputs"]["modules"]}
    assert manifest["inputs"]["program"][0]["sha256"] == hashlib.sha256(open(os.path.join(built, "hello"), "rb").read()).hexdigest()
    assert built not in json.dumps(manifest)


def test_changed_cmdline_reruns_only_rtmr2_scripts_and_manifest(built):
    sconstruct = os.path.join(built, "SConstruct")
    text = open(sconstruct).read()
    open(sconstruct, "w").write(text.replace("cmdline='console=ttyS0 panic=-1'", "cmdline='console=ttyS0 panic=-1 quiet'"))
    assert stages_run(scons(built)) == {"rtmr2", "scripts", "manifest"}


def test_changed_qemu_version_reruns_only_the_measurements_scripts_and_manifest(built):
    result = scons(built, env={"TDX_IMAGE_QEMU_VERSION": "9.2"})
    assert stages_run(result) == {"mrtd", "rtmr1", "rtmr2", "scripts", "manifest"}
    out = os.path.join(built, "build", "tdx", "hello")
    manifest = json.load(open(os.path.join(out, "hello-manifest.json")))
    assert manifest["measurements"]["profile"]["mrtd_order"] == "interleaved"
    assert open(os.path.join(out, "hello-mrtd.hex")).read().strip() == manifest["measurements"]["mrtd"]


def test_changed_ovmf_version_reruns_the_firmware_stage_and_what_reads_its_profile(built):
    # The firmware bytes stay the same: only the release the profile names changes.
    result = scons(built, env={"TDX_IMAGE_OVMF_VERSION": "2025.02"})
    assert stages_run(result) == {"ovmf", "mrtd", "rtmr1", "rtmr2", "scripts", "manifest"}
    manifest = json.load(open(os.path.join(built, "build", "tdx", "hello", "hello-manifest.json")))
    assert manifest["measurements"]["profile"]["ovmf_version"] == "2025.02"
    assert manifest["measurements"]["profile"]["separator_in_rtmr1"] is True
