"""Source specs: one format, parsed before anything builds."""

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.upstream import sources


def test_named_upstreams_expand_to_the_reference_addresses():
    alpine = sources.parse("alpine:3.21.0")
    assert alpine.url == ("https://dl-cdn.alpinelinux.org/alpine/v3.21/releases/x86_64/"
                          "alpine-minirootfs-3.21.0-x86_64.tar.gz")
    debs = sources.ubuntu_kernel_debs(sources.parse("ubuntu-kernel:6.8.0-55.57").version)
    assert [d[2].rsplit("/", 1)[1] for d in debs] == [
        "linux-image-unsigned-6.8.0-55-generic_6.8.0-55.57_amd64.deb",
        "linux-modules-6.8.0-55-generic_6.8.0-55.57_amd64.deb",
        "linux-modules-extra-6.8.0-55-generic_6.8.0-55.57_amd64.deb",
    ]
    assert sources.canonical_ovmf_deb("2024.02-3+tdx1.0")[2].endswith("/pool/main/e/edk2/ovmf_2024.02-3+tdx1.0_all.deb")


def test_defaults_compose_the_reference_specs():
    assert sources.alpine_spec("3.21", "0") == "alpine:3.21.0"
    assert sources.ubuntu_kernel_spec("6.8.0-55", "57") == "ubuntu-kernel:6.8.0-55.57"


@pytest.mark.parametrize("text, kind", [
    ("file:vmlinuz", "file"), ("vmlinuz", "file"), ("/boot/vmlinuz-6.1", "file"),
    ("apt:ovmf", "apt"), ("apt:linux-image-6.12-amd64=6.12.117-1~deb12u1", "apt"),
    ("https://example.org/x.tar.gz#sha256=" + "a" * 64, "url"), ("debian", "debian"),
])
def test_spec_kinds(text, kind):
    assert sources.parse(text).kind == kind


@pytest.mark.parametrize("text, message", [
    ("https://example.org/x.tar.gz", "#sha256="),
    ("https://example.org/x#sha256=1234", "#sha256="),
    ("alpine:3.21", "MAJOR.MINOR.PATCH"),
    ("ubuntu-kernel:6.8.0-55", "VERSION-ABI"),
    ("apt:Bad Name", "apt:PACKAGE"),
    ("ftp://example.org/x", "unknown source spec"),
    ("", "empty"),
])
def test_bad_specs_name_the_fix(text, message):
    with pytest.raises(TdxError, match=message):
        sources.parse(text, "kernel")
