"""Dynamically linked workloads: the ELF reader and the library closure against binutils' readelf
and the host's own loader, libraries from apt: packages, the manifest's records, the image's
layout, what reruns, and a glibc program booted under QEMU."""

import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

from tdx_rules import elf
from tdx_rules.boot import boot_image
from tdx_rules.errors import TdxError
from tdx_rules.initramfs import closure
from tdx_rules.stages import closure as closure_stage
from tdx_rules.upstream.sources import Context
from tests import debian
from tests.conftest import DOWNLOAD_CACHE, scons, stages_run
from tests.test_incremental import reran_for_new_initrd

GREET_C = 'const char *greeting(void) { return "%s"; }\n'
APP_C = r"""#include <math.h>
#include <stdio.h>
#include <stdlib.h>
const char *greeting(void);
int ini_parse_string(const char *text, int (*handler)(void *, const char *, const char *, const char *), void *user);
static int keep(void *user, const char *section, const char *name, const char *value) {
    (void)section; (void)name; *(int *)user = atoi(value); return 1;
}
int main(int argc, char **argv) {
    volatile double x = 26.0 + argc;    /* 27 at run time: the cube root is computed by libm */
    int value = 0;
    (void)argv;
#ifdef WITH_INIH
    ini_parse_string("[s]\nk = 42\n", keep, &value);
#else
    value = keep(&value, "s", "k", "42");
#endif
    printf("GLIBC-WORKLOAD %s cbrt=%.3f ini=%d\n", greeting(), cbrt(x), value);
    puts("GLIBC-DONE");
    return 0;
}
"""
INIH = "libinih1"


def readelf(*args) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def readelf_dynamic(path):
    """(NEEDED list, SONAME, RUNPATH list, RPATH list) as binutils' readelf prints them."""
    out = readelf("-d", path)

    def field(kind):
        return [m.group(1) for m in re.finditer(rf"\({kind}\)\s+[^[]*\[([^]]*)\]", out)]
    split = [part for value in field("RUNPATH") for part in value.split(":") if part]
    rsplit = [part for value in field("RPATH") for part in value.split(":") if part]
    soname = field("SONAME")
    return field("NEEDED"), soname[0] if soname else None, split, rsplit


def readelf_interpreter(path):
    found = re.search(r"\[Requesting program interpreter: ([^]]+)\]", readelf("-l", path))
    return found.group(1) if found else None


def gcc(*args, cwd):
    subprocess.run(["gcc", "-O0", *args], cwd=cwd, check=True, capture_output=True)


def inih_dir() -> str:
    return os.path.join(debian.package_tree(INIH), "usr", "lib", "x86_64-linux-gnu")


def build_workload(directory, greeting="hello", inih=True):
    """bin/app (RUNPATH $ORIGIN/../lib) with lib/libgreet.so.1 -> libgreet.so.1.0, libm, and
    libinih.so.1 taken from the unpacked apt package (not installed on the host)."""
    os.makedirs(os.path.join(directory, "bin"), exist_ok=True)
    os.makedirs(os.path.join(directory, "lib"), exist_ok=True)
    with open(os.path.join(directory, "greet.c"), "w") as handle:
        handle.write(GREET_C % greeting)
    with open(os.path.join(directory, "app.c"), "w") as handle:
        handle.write(APP_C)
    gcc("-shared", "-fPIC", "-Wl,-soname,libgreet.so.1", "-o", "lib/libgreet.so.1.0", "greet.c", cwd=directory)
    if not os.path.lexists(os.path.join(directory, "lib", "libgreet.so.1")):
        os.symlink("libgreet.so.1.0", os.path.join(directory, "lib", "libgreet.so.1"))
    extra = ["-DWITH_INIH", os.path.join(inih_dir(), "libinih.so.1")] if inih else []
    gcc("-o", "bin/app", "app.c", "lib/libgreet.so.1.0", *extra, "-lm", "-Wl,-rpath,$ORIGIN/../lib", cwd=directory)
    return os.path.join(directory, "bin", "app")


# --- the ELF reader and the closure, against readelf and the host's loader ---------------------------


def test_elf_reader_agrees_with_readelf_on_python3_and_every_library_it_loads():
    program = os.path.realpath("/usr/bin/python3")
    result = closure.resolve(program, "/usr/bin/python3", conf_dirs=closure.ld_so_conf_dirs())
    files = [program] + [m.host for m in result.members.values() if m.link is None]
    assert len(files) >= 4
    for path in files:
        info = elf.read_elf(path)
        needed, soname, runpath, rpath = readelf_dynamic(path)
        assert (list(info.needed), info.soname, list(info.runpath), list(info.rpath)) == \
            (needed, soname, runpath, rpath), path
        assert info.interpreter == readelf_interpreter(path), path


def test_closure_of_host_programs_is_what_readelf_says_they_need_transitively_and_ldd_finds():
    for program in ("/usr/bin/python3", "/usr/bin/gpg", "/usr/bin/qemu-system-x86_64"):
        result = closure.resolve(program, program, conf_dirs=closure.ld_so_conf_dirs())
        assert result.missing == [], program
        # readelf: the names needed, followed from each resolved file's own NEEDED list.
        wanted, seen, files = set(readelf_dynamic(program)[0]), set(), {}
        for requester, name, guest in result.loaded:
            files[name] = result.members[guest].host
        todo = list(wanted)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            assert readelf_dynamic(files[name])[1] == name, (program, name)  # the file found is that soname
            todo += readelf_dynamic(files[name])[0]
        assert {name for _, name, _ in result.loaded} == seen
        interpreter = readelf_interpreter(program)
        assert result.interpreter == interpreter and interpreter.lstrip("/") in {
            g.lstrip("/") for g in result.members}
        # The host's loader (ldd, a reference outside the product) maps the same files.
        ldd = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
        mapped = {os.path.realpath(m.group(1)) for m in re.finditer(r"(?:=> )?(/\S+) \(0x", ldd)}
        ours = {os.path.realpath(m.host) for m in result.members.values() if m.link is None}
        assert ours == mapped, (program, ours ^ mapped)


def test_interpreter_goes_to_its_pt_interp_path_and_symlinks_keep_their_names():
    result = closure.resolve("/usr/bin/python3", "/usr/bin/python3", conf_dirs=closure.ld_so_conf_dirs())
    interp = result.members["/lib64/ld-linux-x86-64.so.2"]
    assert interp.link == os.readlink("/lib64/ld-linux-x86-64.so.2")  # Debian: an absolute symlink
    assert result.members[os.path.normpath(interp.link)].link is None
    for guest, member in result.members.items():
        if member.link is not None:
            assert os.readlink(member.host) == member.link
            target = os.path.normpath(os.path.join(os.path.dirname(guest), member.link))
            assert target in result.members, (guest, member.link)  # every link lands on an image entry
    entries = {e.name: e for e in result.entries()}
    assert entries[interp.link.lstrip("/")].mode & 0o111  # the kernel executes the loader


def test_origin_runpath_library_lands_beside_the_program_in_the_image(tmp_path):
    program = build_workload(str(tmp_path), inih=False)
    assert readelf_dynamic(program)[2] == ["$ORIGIN/../lib"]
    ran = subprocess.run([program], capture_output=True, text=True, check=True).stdout
    assert "GLIBC-WORKLOAD hello cbrt=3.000" in ran  # the host's loader finds it through the RUNPATH
    result = closure.resolve(program, "/usr/bin/app", conf_dirs=closure.ld_so_conf_dirs())
    assert result.missing == []
    # In the image the program is /usr/bin/app, so $ORIGIN/../lib is /usr/lib.
    assert result.members["/usr/lib/libgreet.so.1"].link == "libgreet.so.1.0"
    assert result.members["/usr/lib/libgreet.so.1.0"].host == str(tmp_path / "lib" / "libgreet.so.1.0")
    records = {r["path"]: r for r in result.records(relative_to=str(tmp_path))}
    assert records["/usr/lib/libgreet.so.1.0"]["from"] == {"host": "lib/libgreet.so.1.0"}  # no build path


@pytest.mark.parametrize("tags, found", [("--disable-new-dtags", True), ("--enable-new-dtags", False)])
def test_rpath_reaches_the_libraries_of_libraries_but_runpath_does_not(tmp_path, tags, found):
    """DT_RPATH of the program serves every object it loads; DT_RUNPATH only the program's own needs
    (the host's loader, running the program, is the reference)."""
    (tmp_path / "two.c").write_text("int two(void) { return 2; }\n")
    (tmp_path / "one.c").write_text("int two(void); int one(void) { return two() - 1; }\n")
    (tmp_path / "main.c").write_text('#include <stdio.h>\nint one(void);\nint main(void) { printf("%d\\n", one()); }\n')
    os.mkdir(tmp_path / "deps")
    gcc("-shared", "-fPIC", "-Wl,-soname,libtwo.so", "-o", "deps/libtwo.so", "two.c", cwd=tmp_path)
    gcc("-shared", "-fPIC", "-Wl,-soname,libone.so", "-o", "deps/libone.so", "one.c", "deps/libtwo.so",
        cwd=tmp_path)  # libone has no path of its own
    gcc("-o", "main", "main.c", "deps/libone.so", f"-Wl,{tags}", f"-Wl,-rpath,{tmp_path}/deps", cwd=tmp_path)
    host_run = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True)
    assert (host_run.returncode == 0) == found, host_run.stderr
    result = closure.resolve(str(tmp_path / "main"), "/usr/bin/main", conf_dirs=closure.ld_so_conf_dirs())
    assert f"{tmp_path}/deps/libone.so" in result.members
    if found:
        assert result.missing == [] and f"{tmp_path}/deps/libtwo.so" in result.members
    else:
        assert result.missing == [(f"{tmp_path}/deps/libone.so", "libtwo.so")]
        assert "libtwo.so (needed by " + f"{tmp_path}/deps/libone.so)" in closure.missing_line("x", result.missing)


def test_ld_so_conf_directories_come_in_the_order_ldconfig_reads_them(tmp_path):
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-c.conf").write_text(f"{tmp_path}/c\n{tmp_path}/a\n")
    (tmp_path / "conf.d" / "10-d.conf").write_text(f"# first by name\n{tmp_path}/d/\n")
    (tmp_path / "ld.so.conf").write_text(f"{tmp_path}/b\ninclude {tmp_path}/conf.d/*.conf\n"
                                         f"hwcap 0 nosegneg\n{tmp_path}/a  # again\n")
    listed = subprocess.run(["ldconfig", "-vNX", "-f", str(tmp_path / "ld.so.conf"), "-C", str(tmp_path / "cache")],
                            capture_output=True, text=True).stdout
    reference = [line.split(":", 1)[0] for line in listed.splitlines()
                 if not line.startswith(("\t", " ")) and "<builtin>" not in line]
    assert closure.ld_so_conf_dirs(str(tmp_path / "ld.so.conf")) == reference == [
        f"{tmp_path}/{n}" for n in ("b", "d", "c", "a")]


def test_static_and_foreign_binaries_are_refused_by_the_dynamic_check(tmp_path):
    (tmp_path / "s.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["musl-gcc", "-static", "-o", str(tmp_path / "s"), str(tmp_path / "s.c")], check=True)
    with pytest.raises(TdxError, match="statically linked"):
        elf.check_dynamic_x86_64(str(tmp_path / "s"))
    assert elf.read_elf(str(tmp_path / "s")).needed == ()


@pytest.mark.parametrize("damage", ["strtab", "dynamic", "interp"])
def test_damaged_dynamic_headers_are_one_line_errors(tmp_path, damage):
    import struct

    data = bytearray(open("/usr/bin/true", "rb").read())
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for index in range(phnum):
        at = phoff + index * phentsize
        p_type, = struct.unpack_from("<I", data, at)
        if damage == "interp" and p_type == elf.PT_INTERP:
            struct.pack_into("<Q", data, at + 32, 1 << 40)  # p_filesz past the end
        if p_type == elf.PT_DYNAMIC:
            offset, = struct.unpack_from("<Q", data, at + 8)
            if damage == "dynamic":
                struct.pack_into("<Q", data, at + 8, len(data) + 16)
            else:
                for entry in range(0, 4096, 16):
                    tag, = struct.unpack_from("<q", data, offset + entry)
                    if tag == elf.DT_STRTAB:
                        struct.pack_into("<Q", data, offset + entry + 8, 1 << 50)
                        break
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(TdxError) as error:
        elf.read_elf(str(tmp_path / "bad"))
    assert "corrupt ELF" in str(error.value) and "\n" not in str(error.value)


# --- apt: packages ----------------------------------------------------------------------------------


def test_library_from_an_apt_package_is_resolved_from_the_package_contents(tmp_path):
    program = build_workload(str(tmp_path))
    assert "libinih.so.1" in readelf_dynamic(program)[0]
    assert not any(os.path.exists(os.path.join(d, "libinih.so.1")) for d in closure.DEFAULT_DIRS)
    config = {"program_path": "/usr/bin/app", "libs": [f"apt:{INIH}"], "conf_dirs": closure.ld_so_conf_dirs()}
    ctx = Context(cache=DOWNLOAD_CACHE, log=lambda line: None)
    frag, info = str(tmp_path / "app.closure.frag"), str(tmp_path / "app.closure.json")
    closure_stage.build_closure(program, config, ctx, frag, info)
    record = json.load(open(info))
    by_path = {r["path"]: r for r in record["libraries"]}
    version = debian.package_version(INIH)
    assert by_path["/usr/lib/x86_64-linux-gnu/libinih.so.1"] == {
        "path": "/usr/lib/x86_64-linux-gnu/libinih.so.1", "link": "libinih.so.55"}
    lib = by_path["/usr/lib/x86_64-linux-gnu/libinih.so.55"]
    reference = os.path.join(inih_dir(), "libinih.so.55")  # unpacked by dpkg-deb, outside the product
    assert lib["sha256"] == hashlib.sha256(open(reference, "rb").read()).hexdigest()
    assert lib["from"] == {"package": INIH, "version": version, "spec": f"apt:{INIH}",
                           "member": "usr/lib/x86_64-linux-gnu/libinih.so.55"}
    assert [(r["package"], r["version"]) for r in record["inputs"]] == [(INIH, version)]
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=open(frag, "rb").read() + trailer(),
                             capture_output=True).stdout.decode()
    assert "usr/lib/x86_64-linux-gnu/libinih.so.55" in listing.split()


def trailer() -> bytes:
    """The newc trailer a fragment leaves out (so that cpio reads a fragment as an archive)."""
    name = b"TRAILER!!!\0"
    head = b"070701" + b"".join(b"%08X" % v for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(name), 0)) + name
    return head + b"\0" * (-len(head) % 4)


# --- through scons: the image, the manifest, what reruns ----------------------------------------------


def write_sconstruct(project, small_kernel, libs):
    options = (f"minirootfs='debian', kernel='file:{small_kernel['vmlinuz']}', "
               f"modules_dir={small_kernel['modules_dir']!r}, ovmf='file:/usr/share/ovmf/OVMF.fd', "
               "ovmf_version='2022.11', memory='1G', cmdline='console=ttyS0 panic=-1'")
    with open(os.path.join(project, "SConstruct"), "w") as handle:
        handle.write("import tdx_rules\n"
                     "DefaultEnvironment(tools=[])\n"
                     "env = Environment(tools=['tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
                     f"app = env.TdxProgram('app', 'bin/app', libs={libs!r})\n"
                     f"env.TdxImage('app', binary=app, {options})\n")


@pytest.fixture
def glibc_project(tmp_path, small_kernel):
    project = str(tmp_path / "proj")
    build_workload(project)
    write_sconstruct(project, small_kernel, [f"apt:{INIH}"])
    return project


def test_missing_library_stops_the_build_with_one_line_naming_binary_soname_and_fix(glibc_project, small_kernel):
    write_sconstruct(glibc_project, small_kernel, [])
    result = scons(glibc_project, "app", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr
    assert "libinih.so.1 (needed by app)" in errors[0] and "libs=['apt:PACKAGE']" in errors[0]
    assert "install them on the host" in errors[0] and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(glibc_project, "app.closure.frag"))


def test_image_holds_the_closure_and_the_manifest_records_each_library_sha256(glibc_project):
    result = scons(glibc_project)
    assert {"program", "closure", "cpio", "manifest"} <= stages_run(result)
    out = os.path.join(glibc_project, "build", "tdx", "app")
    manifest = json.load(open(os.path.join(out, "app-manifest.json")))
    libraries = manifest["libraries"]
    assert libraries["interpreter"] == "/lib64/ld-linux-x86-64.so.2"
    files = [r for r in libraries["files"] if "link" not in r]
    host = {r["path"]: r["from"]["host"] for r in files if "host" in r["from"]}
    assert host["/lib/x86_64-linux-gnu/libc.so.6"] == "/lib/x86_64-linux-gnu/libc.so.6"
    assert host["/lib/x86_64-linux-gnu/libm.so.6"] == "/lib/x86_64-linux-gnu/libm.so.6"
    assert host["/usr/lib/libgreet.so.1.0"] == "lib/libgreet.so.1.0"
    for record in files:
        if "host" in record["from"]:
            path = os.path.join(glibc_project, record["from"]["host"])
            assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest(), record
    assert manifest["inputs"]["libraries"][0]["package"] == INIH
    assert [r["path"] for r in libraries["files"]] == sorted(r["path"] for r in libraries["files"])
    # cpio (GNU cpio, outside the product) lists glibc's loader beside musl's, each at its own path.
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=open(os.path.join(out, "work", "app-initramfs.cpio"),
                                                                     "rb").read(), capture_output=True).stdout.decode()
    names = {line.split()[8]: line for line in listing.splitlines() if len(line.split()) > 8}
    for name in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib/ld-musl-x86_64.so.1",
                 "lib/x86_64-linux-gnu/libc.so.6", "usr/lib/libgreet.so.1", "usr/bin/app",
                 "usr/lib/x86_64-linux-gnu/libinih.so.55"):
        assert name in names, name
    assert names["lib64/ld-linux-x86-64.so.2"].startswith("lrwxrwxrwx")
    assert names["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"].startswith("-rwxr-xr-x")
    assert all(" root " in line or " 0 " in line for line in names.values())
    assert stages_run(scons(glibc_project)) == set()  # the library scan finds the same files again


def test_changed_library_reruns_the_closure_and_the_initramfs_only(glibc_project):
    scons(glibc_project)
    before = open(os.path.join(glibc_project, "app.closure.frag"), "rb").read()
    with open(os.path.join(glibc_project, "greet.c"), "w") as handle:
        handle.write(GREET_C % "changed")
    gcc("-shared", "-fPIC", "-Wl,-soname,libgreet.so.1", "-o", "lib/libgreet.so.1.0", "greet.c", cwd=glibc_project)
    assert reran_for_new_initrd(stages_run(scons(glibc_project)), {"closure", "cpio"})
    assert open(os.path.join(glibc_project, "app.closure.frag"), "rb").read() != before
    assert stages_run(scons(glibc_project)) == set()


def test_two_builds_of_a_glibc_image_are_byte_identical(glibc_project, tmp_path, small_kernel):
    scons(glibc_project)
    other = str(tmp_path / "again")
    shutil.copytree(glibc_project, other, symlinks=True)
    for name in os.listdir(other):  # keep the sources and bin/, lib/; drop every output
        if name in ("build", "app") or name.startswith((".sconsign", "app.closure.", ".tdx")):
            subprocess.run(["rm", "-rf", os.path.join(other, name)], check=True)
    scons(other)
    for name in ("app-initramfs.cpio.gz", "app-rtmr2.hex"):
        assert open(os.path.join(glibc_project, "build", "tdx", "app", name), "rb").read() == \
            open(os.path.join(other, "build", "tdx", "app", name), "rb").read(), name


@pytest.mark.slow
def test_gcc_built_glibc_program_boots_and_prints_its_marker(glibc_project):
    scons(glibc_project)
    console = boot_image(os.path.join(glibc_project, "build", "tdx", "app", "app-launch-tdx.sh"), until="GLIBC-DONE")
    assert "[tdx-init] starting /usr/bin/app" in console
    assert "GLIBC-WORKLOAD hello cbrt=3.000 ini=42" in console, console[-3000:]
    assert "GLIBC-DONE" in console


def test_library_found_through_ld_so_conf_gets_a_name_where_the_image_loader_looks(tmp_path):
    """The image has no ld.so.cache: a library of an ld.so.conf directory outside the default
    ones is kept where it was found and named in the first default directory too."""
    (tmp_path / "two.c").write_text("int two(void) { return 2; }\n")
    (tmp_path / "main.c").write_text("int two(void);\nint main(void) { return two() - 2; }\n")
    os.mkdir(tmp_path / "extra")
    gcc("-shared", "-fPIC", "-Wl,-soname,libtwo.so.2", "-o", "extra/libtwo.so.2", "two.c", cwd=tmp_path)
    gcc("-o", "main", "main.c", "extra/libtwo.so.2", cwd=tmp_path)
    assert readelf_dynamic(str(tmp_path / "main"))[2:] == ([], [])  # no path of its own
    assert closure.resolve(str(tmp_path / "main"), "/usr/bin/main").missing == [("main", "libtwo.so.2")]
    result = closure.resolve(str(tmp_path / "main"), "/usr/bin/main", conf_dirs=[str(tmp_path / "extra")])
    assert result.missing == []
    assert result.members[f"{tmp_path}/extra/libtwo.so.2"].link is None
    alias = result.members["/lib/x86_64-linux-gnu/libtwo.so.2"]
    assert alias.link == f"{tmp_path}/extra/libtwo.so.2" and alias.host == ""
    assert str(tmp_path / "extra" / "libtwo.so.2") in result.host_files()
    assert all(os.path.lexists(path) for path in result.host_files())
    # The host's loader, told about the directory, runs it: the library is the one it needs.
    assert subprocess.run([str(tmp_path / "main")], env={"LD_LIBRARY_PATH": str(tmp_path / "extra")}).returncode == 0
