"""Signature-checked upstreams: the chain InRelease -> Packages -> .deb and Alpine's .asc, checked
by gpgv against the pinned keys and TDX_RULES_KEYRING, through the loopback mirror of
tests/upstream_fixture.py signed with throwaway keys made by gpg. Every refusal is one line, and
nothing it refused stays in the download cache."""

import datetime
import hashlib
import os
import subprocess
import time

import pytest

from tdx_rules.upstream import signatures
from tdx_rules.upstream.release import parse_release
from tests.conftest import scons
from tests.test_upstream import (
    KERNEL_DEBS,
    TARBALL,
    assert_one_clean_error,
    cache_files,
    environment,
    out,
    read,
    suite_dir,
)
from tests.upstream_fixture import UBUNTU_ROOT, make_key, packages_index, release_files, upstream_mirror, upstream_tree  # noqa: F401  (fixtures)

OPTIONS = "cmdline='console=ttyS0 panic=-1'"


@pytest.fixture
def project(tmp_path):
    from tests.conftest import write_project

    return write_project(tmp_path / "proj", OPTIONS)


def build(project, mirror, cache, target="hello-kernel", **env):
    return scons(project, target, env=environment(mirror.url, cache, **env), check=False)


def nothing_cached_from(cache, *rels_or_bytes):
    """No file of the cache holds any of the given bytes."""
    wanted = [item for item in rels_or_bytes]
    for path in cache_files(cache):
        data = read(path)
        assert all(data != item for item in wanted), path


# The fingerprints as their owners publish them: https://alpinelinux.org/downloads/ ("GPG key"),
# https://wiki.ubuntu.com/SecurityTeam/FAQ (the archive's signing keys).
PUBLISHED_FINGERPRINTS = {
    "alpine": {"0482 D840 22F5 2DF1 C4E7  CD43 293A CD09 07D9 495A"},
    "ubuntu-kernel": {"790B C727 7767 219C 42C8  6F93 3B4F E6AC C0B2 1F32",
                      "F6EC B376 2474 EDA9 D21B  7022 8719 20D1 991B C93C"},
}


def test_the_pinned_fingerprints_are_the_published_ones():
    pinned = {kind: {key.fingerprint for key in keys} for kind, keys in signatures.PINNED.items() if keys}
    assert pinned == {kind: {fp.replace(" ", "") for fp in fps} for kind, fps in PUBLISHED_FINGERPRINTS.items()}


def test_shipped_keys_have_the_fingerprints_of_the_table_and_are_usable():
    for kind, keys in signatures.PINNED.items():
        for key in keys:
            assert key.file is not None, (kind, key.label)
            lines = subprocess.run(["gpg", "--batch", "--show-keys", "--with-colons",
                                    os.path.join(signatures.KEYS_DIR, key.file)],
                                   capture_output=True, text=True, check=True).stdout.splitlines()
            primaries = {line.split(":")[9]: lines[i - 1].split(":") for i, line in enumerate(lines)
                         if line.startswith("fpr") and lines[i - 1].startswith("pub")}
            assert key.fingerprint in primaries, (kind, key.label)
            pub = primaries[key.fingerprint]
            assert pub[1] not in ("e", "r") and "s" in pub[11].lower(), (kind, key.label, pub)  # not expired/revoked; signs
            assert pub[6] == "" or int(pub[6]) > time.time(), (kind, key.label, "expires")
    shipped = set(os.listdir(signatures.KEYS_DIR))
    assert shipped == {key.file for keys in signatures.PINNED.values() for key in keys if key.file}


def test_the_signed_chain_is_accepted_with_the_archive_key_and_refused_without(project, upstream_mirror, tmp_path):
    result = build(project, upstream_mirror, tmp_path / "without", TDX_RULES_KEYRING="")
    line = assert_one_clean_error(result)
    assert "InRelease" in line and "not trusted for ubuntu-kernel" in line and "TDX_RULES_KEYRING" in line
    assert "F6EC B376 2474 EDA9 D21B  7022 8719 20D1 991B C93C".replace("  ", " ") in line
    assert not [p for p in cache_files(tmp_path / "without") if p.endswith("InRelease")]
    assert all(upstream_mirror.count(deb) == 0 for deb in KERNEL_DEBS)
    assert build(project, upstream_mirror, tmp_path / "with").returncode == 0


def test_a_tampered_inrelease_is_refused_and_not_cached(project, upstream_mirror, tmp_path):
    rel = suite_dir("noble") + "InRelease"
    original = upstream_mirror.tree.read(rel)
    tampered = original.replace(b"Suite: noble", b"Suite: nobbe")
    assert tampered != original
    upstream_mirror.serve(rel, tampered)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache"))
    assert "BAD signature" in line and "noble/InRelease" in line
    nothing_cached_from(tmp_path / "cache", tampered)


def test_a_release_signed_by_another_key_is_refused(project, upstream_mirror, tmp_path):
    intruder = make_key("intruder")
    suite = "noble-updates"
    indexes = {path: upstream_mirror.tree.read(suite_dir(suite) + path)
               for path in ("main/binary-amd64/Packages.xz", "main/binary-amd64/Packages.gz")}
    for name, data in release_files(indexes, suite, key=intruder).items():
        upstream_mirror.serve(suite_dir(suite) + name, data)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache"))
    assert f"signed by key {intruder.fingerprint[-16:]}" in line and "not trusted" in line
    # A user who trusts that key says so, and then it is accepted.
    keyring = f"{intruder.public}:{environment('', '')['TDX_RULES_KEYRING']}"
    assert build(project, upstream_mirror, tmp_path / "cache", TDX_RULES_KEYRING=keyring).returncode == 0


def test_packages_that_do_not_match_the_signed_release_are_refused(project, upstream_mirror, tmp_path):
    plain = upstream_mirror.tree.plain_indexes[packages_index(UBUNTU_ROOT, "noble-updates")]
    from tests.upstream_fixture import gz, xz

    forged = plain.replace(b"Priority: optional", b"Priority: extra")
    for suffix, data in ((".xz", xz(forged)), (".gz", gz(forged))):
        upstream_mirror.serve(packages_index(UBUNTU_ROOT, "noble-updates", suffix), data)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache"))
    assert "Packages.xz" in line and "checksum mismatch" in line
    nothing_cached_from(tmp_path / "cache", xz(forged))


def test_a_deb_that_does_not_match_packages_is_refused(project, upstream_mirror, tmp_path):
    upstream_mirror.serve(KERNEL_DEBS[0], b"!<arch>\nnot the kernel package\n")
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache"))
    assert "linux-image-unsigned" in line and "checksum mismatch" in line
    assert not os.path.exists(out(project, "hello-vmlinuz"))


def test_an_expired_release_is_refused(project, upstream_mirror, tmp_path):
    past = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    suite = "noble"
    upstream_mirror.publish(UBUNTU_ROOT, suite, upstream_mirror.tree.plain_indexes[packages_index(UBUNTU_ROOT, suite)],
                            valid_until=past)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache"))
    assert "expired (Valid-Until Wed, 01 Jan 2025" in line and "noble/InRelease" in line
    assert not [p for p in cache_files(tmp_path / "cache") if p.endswith("InRelease")]


def test_release_and_release_gpg_serve_when_there_is_no_inrelease(project, upstream_mirror, tmp_path):
    for suite in ("noble", "noble-updates", "noble-security"):
        upstream_mirror.serve(suite_dir(suite) + "InRelease", b"", status=404)
    assert build(project, upstream_mirror, tmp_path / "cache").returncode == 0
    assert upstream_mirror.count(suite_dir("noble-updates") + "Release.gpg") == 1
    # ...and the detached signature is checked too.
    upstream_mirror.serve(suite_dir("noble") + "Release", upstream_mirror.tree.read(suite_dir("noble") + "Release") +
                          b"Extra: field\n")
    from tests.conftest import write_project

    other = write_project(tmp_path / "other", OPTIONS)
    line = assert_one_clean_error(build(other, upstream_mirror, tmp_path / "other-cache"))
    assert "BAD signature" in line and "noble/Release" in line


def test_the_minirootfs_is_checked_against_its_asc(project, upstream_mirror, tmp_path):
    intruder = make_key("intruder")
    tarball = upstream_mirror.tree.read(TARBALL)
    upstream_mirror.serve(TARBALL + ".asc", intruder.gpg("--armor", "--detach-sign", data=tarball))
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache", target="hello-minirootfs"))
    assert "alpine-minirootfs-3.21.0-x86_64.tar.gz" in line and "not trusted for alpine" in line
    nothing_cached_from(tmp_path / "cache", tarball)
    upstream_mirror.serve(TARBALL + ".asc", b"", status=404)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache", target="hello-minirootfs"))
    assert "signature alpine-minirootfs-3.21.0-x86_64.tar.gz.asc is missing upstream" in line
    nothing_cached_from(tmp_path / "cache", tarball)


def test_by_default_only_alpines_own_key_may_sign_the_minirootfs(project, upstream_mirror, tmp_path):
    tarball = upstream_mirror.tree.read(TARBALL)
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache", target="hello-minirootfs",
                                        TDX_RULES_KEYRING=""))
    assert "alpine-minirootfs-3.21.0-x86_64.tar.gz" in line and "not trusted for alpine" in line
    assert "0482 D840 22F5 2DF1 C4E7 CD43 293A CD09 07D9 495A" in line and "TDX_RULES_KEYRING" in line
    nothing_cached_from(tmp_path / "cache", tarball)


def test_a_missing_keyring_file_is_named(project, upstream_mirror, tmp_path):
    line = assert_one_clean_error(build(project, upstream_mirror, tmp_path / "cache", target="hello-minirootfs",
                                        TDX_RULES_KEYRING=str(tmp_path / "nope.asc")))
    assert "TDX_RULES_KEYRING" in line and "nope.asc is not a file" in line


def test_release_files_are_parsed_as_debian_writes_them():
    text = (b"Origin: Ubuntu\nSuite: noble\nDate: Thu, 25 Apr 2024 15:10:33 UTC\n"
            b"Valid-Until: Sat, 01 Jun 2030 00:00:00 UTC\nSHA256:\n"
            b" " + hashlib.sha256(b"x").hexdigest().encode() + b"        1 main/binary-amd64/Packages.xz\n")
    release = parse_release(text, "Release")
    assert release.fields["Suite"] == "noble" and release.valid_until.year == 2030
    assert release.sha256 == {"main/binary-amd64/Packages.xz": (hashlib.sha256(b"x").hexdigest(), 1)}
    for bad in (b"no colon here\n", b"SHA256:\n  nothex 12 x\n", b"Valid-Until: someday\n", b"\xff\xfe"):
        with pytest.raises(Exception) as info:
            parse_release(bad, "Release")
        assert type(info.value).__name__ == "TdxError"
