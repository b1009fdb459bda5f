"""Bad input stops the build with one `scons: ***` line naming the input and the fix.

No traceback, and no partial output that a later run would treat as up to date.
"""

import os
import pathlib
import socket

import pytest

from tests.conftest import DOWNLOAD_CACHE, scons, stages_run
from tests.test_incremental import set_options


def scons_error(result):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def replace_in_sconstruct(project, old, new):
    path = os.path.join(project, "SConstruct")
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_extra_file_names_the_file(fast_project):
    set_options(fast_project, extra_files={"/etc/app.toml": "no-such-file.toml"})
    error = scons_error(scons(fast_project, check=False))
    assert "no-such-file.toml" in error


def test_missing_kernel_file_names_the_path(fast_project):
    replace_in_sconstruct(fast_project, "kernel='file:", "kernel='file:/nonexistent")
    error = scons_error(scons(fast_project, check=False))
    assert "/nonexistent" in error


def test_invalid_ssh_key_is_refused_and_no_fragment_is_left(fast_project):
    set_options(fast_project, ssh_keys=["ssh-ed25519 not-base64!! me@host"])
    error = scons_error(scons(fast_project, check=False))
    assert "ssh" in error.lower() and "key" in error.lower()
    assert not os.path.exists(os.path.join(fast_project, "build", "tdx", "hello", "work", "init.frag"))


def test_invalid_env_var_name_is_refused(fast_project):
    set_options(fast_project, env_vars={"BAD-NAME": "x"})
    assert "BAD-NAME" in scons_error(scons(fast_project, check=False))


def test_unknown_explicit_module_is_an_error_naming_it(fast_project):
    replace_in_sconstruct(fast_project, "ovmf=", "kernel_modules=['no_such_module'], ovmf=")
    error = scons_error(scons(fast_project, check=False))
    assert "no_such_module" in error
    assert not os.path.exists(os.path.join(fast_project, "build", "tdx", "hello", "work", "modules.frag"))


def test_unreachable_url_names_the_url_and_the_mirror_variable(fast_project, tmp_path):
    sha = "0" * 64
    replace_in_sconstruct(fast_project, "minirootfs='debian'", f"minirootfs='https://alpine.invalid/mr.tar.gz#sha256={sha}'")
    result = scons(fast_project, "hello-minirootfs", check=False,
                   env={"TDX_RULES_MIRROR": f"http://127.0.0.1:{closed_port()}", "TDX_RULES_CACHE": str(tmp_path / "c")})
    error = scons_error(result)
    assert "alpine.invalid/mr.tar.gz" in error and "TDX_RULES_MIRROR" in error
    assert not os.path.exists(os.path.join(fast_project, "build", "tdx", "hello", "work", "minirootfs.tar.gz"))


def test_url_without_checksum_fails_before_anything_builds(fast_project):
    replace_in_sconstruct(fast_project, "minirootfs='debian'", "minirootfs='https://example.org/mr.tar.gz'")
    result = scons(fast_project, check=False)
    assert "#sha256=" in scons_error(result)
    assert stages_run(result) == set()


def test_bad_memory_size_fails_when_the_sconstruct_is_read(fast_project):
    set_options(fast_project, memory="lots")
    result = scons(fast_project, check=False)
    assert "memory" in scons_error(result) and "'4G'" in scons_error(result)
    assert stages_run(result) == set()


def test_unknown_option_fails_when_the_sconstruct_is_read(fast_project):
    replace_in_sconstruct(fast_project, "ovmf=", "colour='red', ovmf=")
    result = scons(fast_project, check=False)
    assert "unknown option" in scons_error(result)
    assert stages_run(result) == set()


def test_failed_stage_reruns_after_the_input_is_fixed(fast_project):
    set_options(fast_project, env_vars={"BAD-NAME": "x"})
    scons_error(scons(fast_project, check=False))
    set_options(fast_project, env_vars={"GOOD": "x"})
    assert "init" in stages_run(scons(fast_project))
    assert scons(fast_project, "-q", "hello", check=False).returncode == 0


def test_clean_removes_outputs_and_keeps_the_download_cache(fast_project):
    scons(fast_project)
    cache = pathlib.Path(DOWNLOAD_CACHE)
    cached = sorted(p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    assert any("busybox-static" in p.name for p in cached)
    scons(fast_project, "-c")
    out = os.path.join(fast_project, "build", "tdx", "hello")
    assert not [f for _, _, files in os.walk(out) for f in files]
    assert sorted(p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")) == cached


# A call that each builder refuses while the SConstruct is read, and a word of its message.
DECLARATION_ERRORS = {
    "TdxImage": ("env.TdxImage('img', binary='prog', memory='lots')", "memory"),
    "TdxStaticProgram": ("env.TdxStaticProgram('prog', [])", "no sources given"),
    "TdxExt4Rootfs": ("env.TdxExt4Rootfs('root.ext4', 'image/')", "agent= is required"),
    "TdxPack": ("env.TdxPack('initrd', '.', compress='brotli')", "compress='brotli'"),
}


@pytest.mark.parametrize("builder", sorted(DECLARATION_ERRORS))
def test_a_declaration_error_is_reported_at_the_users_line_not_ours(tmp_path, builder):
    call, words = DECLARATION_ERRORS[builder]
    (tmp_path / "sub").mkdir()
    (tmp_path / "SConstruct").write_text(
        "import tdx_rules\nDefaultEnvironment(tools=[])\n"
        "env = Environment(tools=['tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
        "SConscript('sub/SConscript', exports='env')\n")
    (tmp_path / "sub" / "SConscript").write_text(f"Import('env')\n\n{call}\n")
    result = scons(str(tmp_path), check=False)
    assert words in scons_error(result)
    locations = [line for line in result.stderr.splitlines() if line.startswith("File ")]
    assert locations == [f'File "{tmp_path / "sub" / "SConscript"}", line 3, in <module>'], result.stderr


def test_a_firmware_file_without_ovmf_version_is_refused_naming_the_option(fast_project):
    replace_in_sconstruct(fast_project, "ovmf_version='2022.11', ", "")
    result = scons(fast_project, check=False)
    error = scons_error(result)
    assert "ovmf_version" in error and "file:/usr/share/ovmf/OVMF.fd" in error
    assert stages_run(result) == set()
