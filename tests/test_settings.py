"""The settings table drives options, variables, defaults and the README."""

import os

import pytest

from tdx_rules import settings
from tdx_rules.errors import TdxError
from tests.debian import ROOT


def test_readme_option_table_matches_settings_table():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(settings.README_BEGIN) + len(settings.README_BEGIN)
    end = text.index(settings.README_END)
    assert text[start:end].strip() == settings.markdown_table().strip(), \
        "README option table is stale: run python -m tdx_rules.settings README.md"


def test_every_option_of_the_issue_has_its_variable_and_reference_default():
    expected = {
        "alpine_version": ("TDX_IMAGE_ALPINE_VERSION", "3.21"),
        "alpine_minor": ("TDX_IMAGE_ALPINE_MINOR", "0"),
        "kernel": ("TDX_IMAGE_KERNEL", None),
        "kernel_version": ("TDX_IMAGE_KERNEL_VERSION", "6.8.0-55"),
        "kernel_abi": ("TDX_IMAGE_KERNEL_ABI", "57"),
        "modules_dir": ("TDX_IMAGE_KERNEL_MODULES_DIR", None),
        "kernel_modules": ("TDX_IMAGE_KERNEL_MODULES", []),
        "ovmf": ("TDX_IMAGE_OVMF", None),
        "ovmf_version": ("TDX_IMAGE_OVMF_VERSION", None),
        "extra_files": ("TDX_IMAGE_EXTRA_FILES", {}),
        "cpus": (None, 4),
        "memory": (None, "4G"),
        "cmdline": (None, "console=ttyS0 ip=dhcp"),
        "bundle_runner": (None, True),
    }
    for name, (variable, default) in expected.items():
        setting = settings.BY_NAME[name]
        assert (setting.env, setting.default) == (variable, default), name


def test_variable_overrides_keyword_which_overrides_default():
    values = settings.resolve({"alpine_version": "3.20"}, {})
    assert values["alpine_version"] == "3.20"
    values = settings.resolve({"alpine_version": "3.20"}, {"TDX_IMAGE_ALPINE_VERSION": "3.19"})
    assert values["alpine_version"] == "3.19"
    assert settings.resolve({}, {})["alpine_version"] == "3.21"


def test_colon_separated_module_variable_and_host_guest_pairs():
    values = settings.resolve({}, {"TDX_IMAGE_KERNEL_MODULES": "a.ko:/x/b.ko.xz",
                                   "TDX_IMAGE_EXTRA_FILES": "conf/app.toml:/etc/app.toml,data.bin:/data.bin"})
    assert values["kernel_modules"] == ["a.ko", "/x/b.ko.xz"]
    assert values["extra_files"] == {"/etc/app.toml": "conf/app.toml", "/data.bin": "data.bin"}


@pytest.mark.parametrize("options, message", [
    ({"memory": "4 gigs"}, "memory"),
    ({"cpus": 0}, "cpus"),
    ({"colour": "red"}, "unknown option"),
    ({"ssh_forward": (2222, 70000)}, "out of range"),
    ({"env_vars": ["A=B"]}, "env_vars"),
])
def test_bad_options_are_refused_with_one_line(options, message):
    with pytest.raises(TdxError) as error:
        settings.resolve(options, {})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_each_stage_reads_only_its_settings():
    values = settings.resolve({}, {})
    assert set(settings.for_stage(values, "scripts")) == {"ssh_forward", "cpus", "memory", "cmdline", "bundle_runner",
                                                          "qemu_version"}
    # The OVMF release reaches the measurements through the ovmf stage's profile file.
    assert set(settings.for_stage(values, "ovmf")) == {"ovmf", "ovmf_version"}
    assert set(settings.for_stage(values, "mrtd")) == {"qemu_version"}
    assert set(settings.for_stage(values, "rtmr1")) == {"qemu_version", "memory"}
    assert set(settings.for_stage(values, "rtmr2")) == {"qemu_version", "cmdline"}
    # The SSH server listens on the guest port of ssh_forward.
    assert set(settings.for_stage(values, "init")) == {"args", "env_vars", "ssh_keys", "ssh_forward"}
    assert set(settings.for_stage(values, "ssh")) == {"ssh_server", "ssh_libs"}
