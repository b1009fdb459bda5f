"""tdx_rules.upstream.debpkg against the real dpkg-deb: packages built by `dpkg-deb --build`
(and by hand with `ar`), the real Debian busybox-static, and hostile archives."""

import functools
import glob
import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tracemalloc
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.upstream.debpkg import DebPackage, extract
from tests import debian
from tests.conftest import fuzz_examples

CONTROL = """Package: tdx-test
Version: 1:2.0-3
Architecture: all
Maintainer: Test <test@example.org>
Depends: libc6 (>= 2.36),
 busybox-static
Description: a package for the tests
 Second line of the description.
 .
   indented verbatim line
"""

BIG = os.urandom(3 * 1024 * 1024 // 2 + 17)  # more than one read chunk


def _run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def _make_tree(root):
    """A package tree with every member type dpkg-deb puts in a data.tar."""
    os.makedirs(os.path.join(root, "DEBIAN"))
    os.chmod(os.path.join(root, "DEBIAN"), 0o755)
    with open(os.path.join(root, "DEBIAN", "control"), "w") as out:
        out.write(CONTROL)

    def put(rel, data=b"", mode=0o644):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(data)
        os.chmod(path, mode)

    put("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
    put("usr/bin/suid", b"setuid", 0o4755)
    put("etc/tool.conf", b"key=value\n", 0o600)
    put("usr/share/tool/empty")
    put("usr/share/tool/big.bin", BIG)
    put("usr/share/with space/file name.txt", b"spaces\n")
    put("usr/share/" + "long-directory-name/" * 6 + "deep-file-with-a-long-name.txt", b"long\n")
    os.makedirs(os.path.join(root, "var/private"))
    os.chmod(os.path.join(root, "var/private"), 0o750)
    os.symlink("tool", os.path.join(root, "usr/bin/alias"))
    os.symlink("/usr/bin/tool", os.path.join(root, "usr/bin/absolute"))
    os.symlink("../share/tool", os.path.join(root, "usr/bin/dirlink"))
    os.link(os.path.join(root, "usr/bin/tool"), os.path.join(root, "usr/bin/tool-hard"))
    os.mkfifo(os.path.join(root, "var/fifo"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{compression: path} of the same tree built with dpkg-deb -Z..., plus bz2 assembled with ar."""
    base = tmp_path_factory.mktemp("debs")
    tree = str(base / "tree")
    _make_tree(tree)
    debs = {}
    for comp in ("xz", "gzip", "zstd", "none"):
        debs[comp] = str(base / f"tdx-test-{comp}.deb")
        _run("dpkg-deb", "--root-owner-group", f"-Z{comp}", "--build", tree, debs[comp])
    # data.tar.bz2 cannot be built by this dpkg-deb: reassemble the uncompressed one with ar + bzip2.
    work = base / "bz2"
    work.mkdir()
    _run("ar", "x", debs["none"], cwd=work)
    _run("bzip2", "data.tar", cwd=work)
    debs["bz2"] = str(base / "tdx-test-bz2.deb")
    _run("ar", "rcD", debs["bz2"], "debian-binary", "control.tar", "data.tar.bz2", cwd=work)
    return debs


def _ar(out, members, work):
    """Assemble a .deb with the real `ar` from (name, bytes) members, in order."""
    os.makedirs(work, exist_ok=True)
    for name, data in members:
        with open(os.path.join(work, name), "wb") as handle:
            handle.write(data)
    _run("ar", "rcD", out, *[name for name, _ in members], cwd=work)
    return out


def _control_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = CONTROL.encode()
        info = tarfile.TarInfo("./control")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _hostile_deb(tmp_path, entries, name="hostile.deb"):
    """A .deb whose data.tar.gz holds ``entries``: (TarInfo, bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar()),
               ("data.tar.gz", gzip.compress(buf.getvalue()))]
    return _ar(str(tmp_path / name), members, str(tmp_path / (name + ".work")))


def _entry(name, kind=tarfile.REGTYPE, data=None, linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    return info, data


def _norm(name):
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


def _dpkg_listing(deb):
    """(mode string, size, name, link) per member from `dpkg-deb -c`."""
    out = _run("dpkg-deb", "-c", deb, text=True).stdout
    rows = []
    for line in out.splitlines():
        perms, _owner, size, _date, _time, rest = line.split(None, 5)
        link = ""
        if perms[0] == "l":
            rest, link = rest.split(" -> ", 1)
        elif perms[0] == "h":
            rest, link = rest.split(" link to ", 1)
            link = _norm(link)
        rows.append((perms, int(size), _norm(rest), link))
    return rows


_TYPE_BITS = {tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
              tarfile.SYMTYPE: stat.S_IFLNK, tarfile.FIFOTYPE: stat.S_IFIFO, tarfile.CHRTYPE: stat.S_IFCHR,
              tarfile.BLKTYPE: stat.S_IFBLK}


def _our_listing(deb):
    rows = []
    for info, fileobj in DebPackage(deb).iter_data():
        if info.islnk():
            perms = "h" + stat.filemode(stat.S_IFREG | info.mode)[1:]
        else:
            perms = stat.filemode(_TYPE_BITS[info.type] | info.mode)
        rows.append((perms, info.size, info.name, info.linkname))
    return rows


def _snapshot(root):
    """{relative path: (kind, payload, mode)} of a tree, never following links."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                found[rel] = ("link", os.readlink(path), None)
            elif stat.S_ISDIR(st_.st_mode):
                found[rel] = ("dir", None, stat.S_IMODE(st_.st_mode))
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as handle:
                    found[rel] = ("file", handle.read(), stat.S_IMODE(st_.st_mode))
            else:
                found[rel] = ("special", None, stat.S_IMODE(st_.st_mode))
    return found


def _compare_with_dpkg_x(deb, tmp_path):
    """extract() must give dpkg-deb -x's tree, minus specials, with sanitised modes."""
    ref, ours = str(tmp_path / "ref"), str(tmp_path / "ours")
    _run("dpkg-deb", "-x", deb, ref)
    names = extract(deb, ours)
    expected, got = _snapshot(ref), _snapshot(ours)
    for rel, (kind, payload, mode) in expected.items():
        if kind == "special":
            assert rel not in got
            continue
        assert got[rel][0] == kind, rel
        assert got[rel][1] == payload, rel
        if kind == "file":
            assert got[rel][2] == mode & 0o755, rel
        elif kind == "dir":
            assert got[rel][2] == (mode & 0o755) | 0o700, rel
    assert set(got) == {rel for rel, row in expected.items() if row[0] != "special"}
    assert set(names) == set(got)
    return names


@pytest.mark.parametrize("comp", ["xz", "gzip", "zstd", "none", "bz2"])
def test_listing_matches_dpkg_deb(built, comp):
    assert _our_listing(built[comp]) == _dpkg_listing(built[comp])


@pytest.mark.parametrize("comp", ["xz", "zstd", "bz2"])
def test_extract_matches_dpkg_deb(built, comp, tmp_path):
    names = _compare_with_dpkg_x(built[comp], tmp_path)
    ours = tmp_path / "ours"
    assert names.index("usr/bin/tool") < names.index("usr/bin/tool-hard")
    assert os.stat(ours / "usr/bin/tool").st_ino != os.stat(ours / "usr/bin/tool-hard").st_ino
    assert stat.S_IMODE(os.stat(ours / "usr/bin/suid").st_mode) == 0o755  # setuid dropped
    assert not os.path.lexists(ours / "var/fifo")


def test_control_matches_dpkg_deb_f(built):
    control = DebPackage(built["xz"]).control
    assert list(control) == ["Package", "Version", "Architecture", "Maintainer", "Depends", "Description"]
    for field, value in control.items():
        assert value == _run("dpkg-deb", "-f", built["xz"], field, text=True).stdout.rstrip("\n")
    assert control["Description"].splitlines()[0] == "a package for the tests"


def test_file_contents_stream(built):
    for info, fileobj in DebPackage(built["gzip"]).iter_data():
        if info.name == "usr/share/tool/big.bin":
            assert fileobj.read(10) == BIG[:10]
            assert fileobj.read() == BIG[10:]
            break
    else:
        pytest.fail("big.bin not found")


def test_iter_data_does_not_hold_members_in_memory(tmp_path):
    tree = tmp_path / "tree"
    _make_tree(str(tree))
    with open(tree / "usr/share/tool/zeros", "wb") as out:
        out.truncate(96 * 1024 * 1024)
    deb = str(tmp_path / "zeros.deb")
    _run("dpkg-deb", "--root-owner-group", "-Zzstd", "--build", str(tree), deb)
    assert os.path.getsize(deb) < 8 * 1024 * 1024
    tracemalloc.start()
    try:
        total = 0
        for info, fileobj in DebPackage(deb).iter_data():
            if fileobj is not None:
                for chunk in iter(lambda: fileobj.read(1 << 20), b""):
                    total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total >= 96 * 1024 * 1024
    assert peak < 16 * 1024 * 1024


def test_select_and_hard_link_to_unselected_target(built, tmp_path):
    dest = tmp_path / "sel"
    names = extract(built["xz"], dest, select=lambda name: name in ("usr/bin/tool-hard", "etc/tool.conf"))
    assert sorted(names) == ["etc/tool.conf", "usr/bin/tool-hard"]
    assert (dest / "usr/bin/tool-hard").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert not (dest / "usr/bin/tool").exists()
    assert stat.S_IMODE(os.stat(dest / "etc/tool.conf").st_mode) == 0o600


@functools.lru_cache(maxsize=None)
def _busybox():
    """The real busybox-static .deb of apt's candidate version, from tests/debian.py's cache."""
    show = subprocess.run(["apt-cache", "show", "--no-all-versions", "busybox-static"], capture_output=True,
                          text=True, check=True).stdout
    version = [line.split(":", 1)[1].strip() for line in show.splitlines() if line.startswith("Version:")][0]
    for path in glob.glob(os.path.join(debian.CACHE, "debs", "busybox-static_*.deb")):
        if unquote(os.path.basename(path).split("_")[1]) == version:
            return path  # debian.package() does not recognise the %3a-quoted epoch in this name
    return debian.package("busybox-static")


def test_real_busybox_static(tmp_path):
    deb = _busybox()
    package = DebPackage(deb)
    for field in ("Package", "Version", "Architecture", "Depends", "Description", "Installed-Size"):
        reference = subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True).stdout
        assert package.control.get(field, "") == reference.rstrip("\n")
    assert package.control["Package"] == "busybox-static"
    assert _our_listing(deb) == _dpkg_listing(deb)
    _compare_with_dpkg_x(deb, tmp_path)
    assert os.access(tmp_path / "ours/bin/busybox", os.X_OK)


# --- hostile and damaged input -------------------------------------------------------------


def _nothing_outside(tmp_path, allowed):
    """Every path under tmp_path is one of the fixture's own or inside an allowed dir."""
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), tmp_path)
            assert any(rel == a or rel.startswith(a + os.sep) for a in allowed), rel


def test_dotdot_member_is_refused(tmp_path):
    deb = _hostile_deb(tmp_path, [_entry("./ok", data=b"ok"), _entry("./../escaped", data=b"x")])
    dest = tmp_path / "dest"
    with pytest.raises(TdxError, match=r"hostile\.deb.*'\.\.'"):
        extract(deb, dest)
    assert not (tmp_path / "escaped").exists()
    _nothing_outside(tmp_path, ["dest", "hostile.deb", "hostile.deb.work"])


def test_absolute_member_is_refused(tmp_path):
    target = tmp_path / "abs-escaped"
    deb = _hostile_deb(tmp_path, [_entry(str(target), data=b"x")])
    with pytest.raises(TdxError, match="absolute"):
        extract(deb, tmp_path / "dest")
    assert not target.exists()


def test_escaping_symlink_is_refused(tmp_path):
    deb = _hostile_deb(tmp_path, [_entry("./link", tarfile.SYMTYPE, linkname="../outside"),
                                  _entry("./link/pwned", data=b"x")])
    (tmp_path / "outside").mkdir()
    with pytest.raises(TdxError, match="outside the destination"):
        extract(deb, tmp_path / "dest")
    assert os.listdir(tmp_path / "outside") == []
    assert not os.path.lexists(tmp_path / "dest/link")


def test_escape_through_symlink_chain_is_refused(tmp_path):
    deb = _hostile_deb(tmp_path, [_entry("./a/b", tarfile.DIRTYPE, mode=0o755),
                                  _entry("./up", tarfile.SYMTYPE, linkname="a/b/../.."),  # = dest itself
                                  _entry("./escape", tarfile.SYMTYPE, linkname="up/..")])
    (tmp_path / "dest").mkdir()
    with pytest.raises(TdxError, match="escape.*outside the destination"):
        extract(deb, tmp_path / "dest")
    assert os.readlink(tmp_path / "dest/up") == "a/b/../.."


def test_write_through_extracted_symlink_is_impossible(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    # An absolute target counts from the image root, so the link itself is kept...
    deb = _hostile_deb(tmp_path, [_entry("./link", tarfile.SYMTYPE, linkname=str(outside)),
                                  _entry("./link/pwned", data=b"x")])
    with pytest.raises(TdxError, match="not a real directory"):
        extract(deb, tmp_path / "dest")
    # ...but nothing is ever written through it.
    assert os.listdir(outside) == []
    assert os.readlink(tmp_path / "dest/link") == str(outside)


def test_member_replacing_a_symlink_does_not_follow_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    deb = _hostile_deb(tmp_path, [_entry("./f", tarfile.SYMTYPE, linkname=str(victim)), _entry("./f", data=b"new")])
    assert extract(deb, tmp_path / "dest") == ["f", "f"]
    assert victim.read_bytes() == b"original"
    assert (tmp_path / "dest/f").read_bytes() == b"new" and not os.path.islink(tmp_path / "dest/f")


def test_devices_and_fifos_are_skipped(tmp_path):
    deb = _hostile_deb(tmp_path, [_entry("./dev/null", tarfile.CHRTYPE, mode=0o666),
                                  _entry("./dev/sda", tarfile.BLKTYPE, mode=0o660),
                                  _entry("./fifo", tarfile.FIFOTYPE), _entry("./ok", data=b"ok")])
    assert extract(deb, tmp_path / "dest") == ["ok"]
    assert sorted(os.listdir(tmp_path / "dest")) == ["ok"]


def test_hard_link_out_of_tree_is_refused(tmp_path):
    deb = _hostile_deb(tmp_path, [_entry("./h", tarfile.LNKTYPE, linkname="../../etc/passwd")])
    with pytest.raises(TdxError, match=r"'\.\.'"):
        extract(deb, tmp_path / "dest")


def test_truncated_deb(built, tmp_path):
    data = open(built["xz"], "rb").read()
    for cut in (0, 7, 30, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.deb"
        path.write_bytes(data[:cut])
        with pytest.raises(TdxError, match=rf"cut{cut}\.deb: not a valid \.deb"):
            extract(str(path), tmp_path / f"dest{cut}")


@pytest.mark.parametrize("comp", ["gzip", "xz", "zstd", "bz2", "none"])
def test_truncated_data_member(built, tmp_path, comp):
    """A well-formed ar whose data.tar.* is cut short: the compressor or the tar end check notices."""
    work = tmp_path / "work"
    work.mkdir()
    _run("ar", "x", built[comp], cwd=work)
    data_name = [n for n in os.listdir(work) if n.startswith("data.tar")][0]
    control_name = [n for n in os.listdir(work) if n.startswith("control.tar")][0]
    raw = (work / data_name).read_bytes()
    for fraction in (0.3, 0.9):
        members = [("debian-binary", b"2.0\n"), (control_name, (work / control_name).read_bytes()),
                   (data_name, raw[:int(len(raw) * fraction)])]
        deb = _ar(str(tmp_path / f"cut-{fraction}.deb"), members, str(tmp_path / f"w{fraction}"))
        with pytest.raises(TdxError, match="not a valid .deb"):
            for _info, fileobj in DebPackage(deb).iter_data():
                if fileobj is not None:
                    fileobj.read()


def test_not_a_deb(tmp_path):
    (tmp_path / "text.deb").write_text("hello\n")
    with pytest.raises(TdxError, match=r"text\.deb: not a valid \.deb \(no '!<arch>' header\)"):
        DebPackage(tmp_path / "text.deb")
    with pytest.raises(TdxError, match="no such .deb"):
        DebPackage(tmp_path / "missing.deb")
    no_data = _ar(str(tmp_path / "nodata.deb"), [("debian-binary", b"2.0\n"), ("control.tar.gz", _control_tar())],
                  str(tmp_path / "w"))
    with pytest.raises(TdxError, match="no data.tar member"):
        DebPackage(no_data)


@pytest.fixture(scope="module")
def small_deb(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    deb = _hostile_deb(base, [_entry("./d", tarfile.DIRTYPE, mode=0o755), _entry("./d/f", data=b"hello" * 50),
                              _entry("./d/l", tarfile.SYMTYPE, linkname="f")], name="small.deb")
    return open(deb, "rb").read()


@settings(max_examples=fuzz_examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_bytes_only_raise_tdxerror(small_deb, tmp_path_factory, data):
    blob = bytearray(small_deb)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    base = tmp_path_factory.mktemp("fuzz")
    path = base / "fuzz.deb"
    path.write_bytes(bytes(blob))
    try:
        DebPackage(path).control
        extract(path, base / "dest")
    except TdxError as exc:
        assert "\n" not in str(exc)
    shutil.rmtree(base)
