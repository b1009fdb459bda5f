"""Every reader of tars, .debs and OCI layers against the hostile corpus of tests/hostile_corpus.py.

Readers: ``minirootfs`` (:func:`tdx_rules.stages.busybox.extract_base`),
``deb`` (:func:`tdx_rules.upstream.debpkg.extract`, everything selected), ``deb_iter``
(:meth:`tdx_rules.upstream.debpkg.DebPackage.iter_data`, drained: what the kernel, OVMF
and minirootfs stages call) and ``oci`` (:func:`tdx_rules.open_image` +
:func:`tdx_rules.apply_layers`). For each case the reader must raise a
one-line TdxError naming its input, or give the documented safe result below;
either way nothing may appear outside the destination (the sentinel directory
around it is listed before and after), the victim file outside is untouched,
and no device node or FIFO exists anywhere under the test directory.

Limits (see the readers): the minirootfs reader refuses a kept member over
64 MiB and stops before its decompressed stream passes 256 MiB (so the 1 GiB
bomb costs nothing); the .deb and OCI readers stream in fixed chunks and stop
once the output passes 256 MiB at more than 100 bytes out per byte in
(fsutil.expansion_exceeded), which stops the 1 GiB bomb.
"""

import os
import stat
import time

import pytest

from tdx_rules.errors import TdxError
from tdx_rules.rootfs.formats import open_image
from tdx_rules.rootfs.tree import Tree, apply_layers
from tdx_rules.stages.busybox import extract_base
from tdx_rules.upstream import debpkg
from tests import hostile_corpus as corpus

MODES = {"minirootfs": "minirootfs", "deb": "deb", "deb_iter": "deb", "oci": "oci"}

DOTDOT = {"minirootfs": "unsafe member name", "deb": r"'\.\.'", "oci": r"'\.\.'"}
ABSOLUTE = {"minirootfs": "unsafe member name", "deb": "absolute path", "oci": "absolute path"}
CORRUPT = {"minirootfs": "corrupt or truncated", "deb": "not a valid .deb", "deb_iter": "not a valid .deb",
           "oci": "corrupt or truncated"}

# case -> {mode: regex of the TdxError}; a mode not listed must succeed (and pass SAFE[case], if any).
ERRORS = {
    "dotdot_name": DOTDOT,
    "absolute_name": ABSOLUTE,
    "dot_slash_dotdot": DOTDOT,
    "nested_dotdot": DOTDOT,
    "pax_path_dotdot": DOTDOT,
    "gnu_longname_dotdot": DOTDOT,
    "symlink_relative_outside": {"deb": "outside the destination"},
    "hardlink_relative_outside": {"deb": r"'\.\.'", "oci": r"hard link target .*'\.\.'"},
    "hardlink_absolute_outside": {"deb": "absolute path", "oci": "hard link target .*absolute path"},
    "hardlink_to_symlink": {"deb": "not a regular file in the package"},
    "symlink_then_write_through": {"deb": "not a real directory"},
    "relsymlink_then_write_through": {"deb": "outside the destination"},
    "duplicate_member": {"minirootfs": "appears twice"},
    "huge_declared_size": {"minirootfs": "ends past 256 MiB", "deb": "unexpected end of data",
                           "deb_iter": "unexpected end of data", "oci": "unexpected end of data"},
    "decompression_bomb": {"minirootfs": "ends past 256 MiB", "deb": "decompression bomb",
                           "deb_iter": "decompression bomb", "oci": "decompression bomb"},
    "truncated_tar": CORRUPT,
    "corrupt_gzip": {"deb": "CRC check failed", "deb_iter": "CRC check failed", "oci": "CRC check failed"},
    "corrupt_xz": CORRUPT,
    "corrupt_zstd": CORRUPT,
    "empty_archive": {"minirootfs": "no bin/busybox"},
    "zero_bytes": CORRUPT,
    "not_a_tar": CORRUPT,
    "deb_data_tar_missing": {"deb": "no data.tar member", "deb_iter": "no data.tar member"},
    "deb_ar_size_too_big": {"deb": "truncated: member 'data.tar.gz'", "deb_iter": "truncated: member 'data.tar.gz'"},
    "deb_ar_size_too_small": {"deb": "bad ar member header", "deb_iter": "bad ar member header"},
    "deb_ar_size_negative": {"deb": "bad ar member size", "deb_iter": "bad ar member size"},
    "oci_index_points_to_missing_blob": {"oci": "is missing from the image"},
    "oci_layer_blob_missing": {"oci": r"\(layer 0\) is missing from the image"},
    "oci_layer_digest_mismatch": {"oci": "not the one the manifest names"},
    "oci_whiteout_dotdot_path": {"oci": r"'\.\./\.wh\.x' contains '\.\.'"},
    "oci_whiteout_names_dotdot": {"oci": r"whiteout 'etc/\.wh\.\.\.' names '\.\.'"},
}


# --------------------------------------------------------------------------- safe results

def _entries(result):
    return {entry.path: entry for entry in result.entries()}


def _safe_symlink_absolute(mode, dest, result, outside):
    if mode == "deb":  # kept verbatim: an absolute target counts from the image root (documented)
        assert os.readlink(os.path.join(dest, "lib")) == outside
    if mode == "oci":
        assert _entries(result)["/lib"].target == outside


def _safe_symlink_dir(mode, dest, result, outside):
    if mode == "deb":  # the directory replaces the symlink; the file lands inside dest
        assert not os.path.islink(os.path.join(dest, "lib"))
        assert open(os.path.join(dest, "lib", "ld-musl-x86_64.so.1"), "rb").read() == b"loader"
    if mode == "oci":
        assert _entries(result)["/lib"].type == "dir"


def _safe_devices(mode, dest, result, outside):
    if mode == "deb":
        specials = ("dev/null", "dev/sda", "run/fifo", "etc/alpine-release", "lib/ld-musl-x86_64.so.1")
        assert not any(name in result or os.path.lexists(os.path.join(dest, name)) for name in specials)
    if mode == "oci":  # device nodes and FIFOs exist only in the model
        kinds = {e.type for e in result.entries()}
        assert kinds & {"char", "block", "fifo"}


def _safe_setuid(mode, dest, result, outside):
    if mode == "deb":  # setuid/setgid and group/other write bits are dropped on disk
        assert stat.S_IMODE(os.lstat(os.path.join(dest, "bin", "busybox")).st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(os.path.join(dest, "etc")).st_mode) == 0o755
    if mode == "oci":  # kept in the model (the ext4 must carry them); the staging body is 0600
        entry = _entries(result)["/bin/busybox"]
        assert entry.mode == 0o6755
        assert stat.S_IMODE(os.stat(entry.body).st_mode) == 0o600


def _safe_duplicate(mode, dest, result, outside):
    if mode == "deb":  # the later member wins, as with tar and dpkg
        assert open(os.path.join(dest, "etc", "alpine-release"), "rb").read() == b"second\n"
    if mode == "oci":
        entry = _entries(result)["/etc/alpine-release"]
        with open(entry.body, "rb") as handle:  # the tree keeps bodies as slices of one file
            handle.seek(entry.offset or 0)
            assert handle.read(entry.size) == b"second\n"


def _safe_corrupt_gzip(mode, dest, result, outside):
    # tarfile's gzip stream reader does not check the CRC: the damage sits in a member the
    # minirootfs reader skips, and the fragment holds only the intact busybox (the download
    # itself is checked against its SHA-256 before this stage runs).
    assert mode == "minirootfs" and os.path.getsize(os.path.join(dest, "base.frag")) > 0


def _safe_empty(mode, dest, result, outside):
    if mode == "deb":
        assert result == []
    if mode == "oci":
        assert [e.path for e in result.entries()] == ["/"]


def _safe_names(mode, dest, result, outside):
    if mode == "deb":
        assert all(os.path.dirname(name) == "etc" for name in result if name.startswith("etc/"))


SAFE = {
    "symlink_absolute_outside": _safe_symlink_absolute,
    "symlink_then_dir_same_name": _safe_symlink_dir,
    "char_device": _safe_devices,
    "block_device": _safe_devices,
    "fifo": _safe_devices,
    "setuid_setgid": _safe_setuid,
    "duplicate_member": _safe_duplicate,
    "corrupt_gzip": _safe_corrupt_gzip,
    "empty_archive": _safe_empty,
    "newline_in_name": _safe_names,
    "invalid_utf8_name": _safe_names,
}


# --------------------------------------------------------------------------- harness

def _params():
    for case in corpus.CASES:
        for mode, reader in MODES.items():
            if reader in case.readers:
                yield pytest.param(case.name, mode, id=f"{case.name}-{mode}")


def _listing(root):
    """{relative path: (type bits, size, mtime_ns)} of everything below root, symlinks not followed."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            result[os.path.relpath(full, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return result


def _no_special_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)), \
                os.path.join(dirpath, name)


def _run(mode, path, dest):
    if mode == "minirootfs":
        extract_base(path, os.path.join(dest, "base.frag"))
        return None
    if mode == "deb":
        return debpkg.extract(path, dest)
    if mode == "deb_iter":
        names = []
        for info, fileobj in debpkg.DebPackage(path).iter_data():
            names.append(info.name)
            if fileobj is not None:
                fileobj.read(4096)  # consumers read some bodies and skip the rest
        return names
    return apply_layers(open_image(path), os.path.join(dest, "staging"))


@pytest.mark.parametrize("case_name,mode", list(_params()))
def test_hostile(case_name, mode, tmp_path):
    case = corpus.BY_NAME[case_name]
    sentinel = tmp_path / "sentinel"
    outside = sentinel / "outside"
    dest = sentinel / "dest"
    outside.mkdir(parents=True)
    dest.mkdir()
    (outside / "victim").write_bytes(b"victim\n")
    path = corpus.write_input(case, MODES[mode], str(tmp_path / "input"), str(outside))
    before = _listing(sentinel)
    expected_error = ERRORS.get(case_name, {}).get(mode)

    started = time.monotonic()
    result = None
    try:
        if expected_error:
            with pytest.raises(TdxError, match=expected_error) as caught:
                _run(mode, path, str(dest))
            message = str(caught.value)
            assert "\n" not in message and "Traceback" not in message
            assert path in message or "sha256:" in message, message  # names the input
        else:
            result = _run(mode, path, str(dest))
            check = SAFE.get(case_name)
            if check is not None:
                check(mode, str(dest), result, str(outside))
        assert time.monotonic() - started < 20, "the reader's work is not bounded"

        after = _listing(sentinel)
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        escaped = sorted(p for p in changed if p != "dest" and not p.startswith("dest" + os.sep))
        assert escaped == [], f"written outside the destination: {escaped}"
        assert (outside / "victim").read_bytes() == b"victim\n"
        _no_special_files(tmp_path)
    finally:
        if isinstance(result, Tree):
            result.cleanup()


def test_kernel_package_whose_vmlinuz_is_a_symlink_is_refused(tmp_path):
    """A symlinked kernel image would make the kernel stage copy a host file into the image."""
    import subprocess

    from tdx_rules.errors import TdxError
    from tdx_rules.stages import kernel
    from tdx_rules.upstream.sources import Resolved

    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: evil-kernel\nVersion: 1\nArchitecture: amd64\n"
                                            "Maintainer: nobody <n@example.org>\nDescription: x\n")
    (pkg / "boot").mkdir()
    os.symlink("/etc/hostname", pkg / "boot" / "vmlinuz-6.0.0-evil")
    deb = tmp_path / "evil.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(pkg), str(deb)], check=True, capture_output=True)
    with pytest.raises(TdxError, match="symlink"):
        kernel.unpack_packages([Resolved("file:evil.deb", str(deb), "0" * 64, "file")], str(tmp_path / "cache"))
    left = [p.name for p in (tmp_path / "cache" / "kernels").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no unpacked tree, not even a partial one
