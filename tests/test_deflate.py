"""The initramfs gzip's deflate library: zlib-ng, pinned in pyproject.toml.

Outside references: GNU gzip (decodes, and `gzip -9n` is the size to beat),
Python's gzip module, qemu-user running our code on CPUs with other
features, a real older release of python-zlib-ng from PyPI and real scons
builds in subprocesses.
"""

import fcntl
import glob
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tdx_rules.initramfs import pgzip
from tests import debian
from tests.conftest import scons, stages_run
from tests.test_pack import concatenated, extension_modules, mixed, need, stdlib_sources

ROOT = debian.ROOT
OLDER_RELEASE = "1.0.0"  # python-zlib-ng 1.0.0 bundles zlib-ng 2.2.5
EMULATED_CPUS = {"qemu64": {"sse4_2": False, "avx2": False}, "Nehalem": {"sse4_2": True, "avx2": False},
                 "Haswell": {"sse4_2": True, "avx2": True}}

# Runs under each CPU: the CPU's features (from CPUID itself) and the SHA-256 of our gzip of a file
# at each level given.
CHILD = r"""
import ctypes, hashlib, io, json, mmap, sys
from tdx_rules.initramfs import pgzip

# push rbx; mov eax, edi; xor ecx, ecx; cpuid; shl rcx, 32; mov eax, ebx; or rax, rcx; pop rbx; ret
CODE = bytes([0x53, 0x89, 0xF8, 0x31, 0xC9, 0x0F, 0xA2, 0x48, 0xC1, 0xE1, 0x20, 0x89, 0xD8, 0x48, 0x09, 0xC8,
              0x5B, 0xC3])
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(CODE)
cpuid = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
ecx1, ebx7 = cpuid(1) >> 32, cpuid(7) & 0xFFFFFFFF
features = {"sse4_2": bool(ecx1 >> 20 & 1), "avx2": bool(ebx7 >> 5 & 1), "avx512f": bool(ebx7 >> 16 & 1)}
data = open(sys.argv[1], "rb").read()
digests = {}
for level in map(int, sys.argv[2:]):
    out = io.BytesIO()
    pgzip.compress_gzip(io.BytesIO(data), out, level=level, threads=1)
    digests[level] = hashlib.sha256(out.getvalue()).hexdigest()
print(json.dumps({"features": features, "digests": digests}))
"""


def python_files(limit: int) -> bytes:
    """Python sources of the standard library, in a fixed order."""
    return concatenated(stdlib_sources(), limit)


def shared_objects(limit: int) -> bytes:
    """ELF shared objects of this Python (its extension modules), in a fixed order."""
    out = concatenated([path for path in extension_modules() if path.endswith(".so")], limit)
    if len(out) < limit // 2:
        pytest.skip("this Python has too few extension modules in lib-dynload for an initramfs-like sample")
    return out


def initramfs_like(scale: int = 1_000_000) -> bytes:
    """What an initramfs holds, in proportion: binaries (2 parts), sources (1), mixed data (1)."""
    return shared_objects(2 * scale) + python_files(scale) + mixed(scale, 17)


def ours(data: bytes, level: int, threads=1) -> bytes:
    out = io.BytesIO()
    pgzip.compress_gzip(io.BytesIO(data), out, level=level, threads=threads)
    return out.getvalue()


def gnu_gzip_9n(data: bytes) -> bytes:
    need("gzip")
    return subprocess.run(["gzip", "-9n"], input=data, capture_output=True, check=True).stdout


def pinned_release() -> str:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    pins = [re.fullmatch(r"zlib-ng==([\w.]+)", spec.replace(" ", "")) for spec in dependencies]
    pins = [match.group(1) for match in pins if match]
    assert len(pins) == 1, f"pyproject.toml must pin zlib-ng to one exact version: {dependencies}"
    return pins[0]


# --- the bytes -----------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    return initramfs_like(750_000)


@pytest.mark.parametrize("level", sorted({1, 4, 6, pgzip.DEFAULT_LEVEL, 9}))
def test_bytes_are_the_same_for_every_thread_count(sample, level):
    reference = ours(sample, level, threads=1)
    for threads in (2, 3, "all"):
        assert ours(sample, level, threads) == reference, (level, threads)


@pytest.mark.parametrize("level", sorted({1, pgzip.DEFAULT_LEVEL}))
def test_output_decompresses_with_gnu_gzip_and_python(sample, level, tmp_path):
    need("gzip")
    data = ours(sample, level, threads="all")
    path = tmp_path / "sample.gz"
    path.write_bytes(data)
    subprocess.run(["gzip", "-t", str(path)], check=True)
    assert subprocess.run(["gzip", "-dc", str(path)], capture_output=True, check=True).stdout == sample
    assert gzip.decompress(data) == sample


def test_default_level_is_no_larger_than_gnu_gzip_9n():
    data = initramfs_like()
    mine, theirs = len(ours(data, pgzip.DEFAULT_LEVEL, threads="all")), len(gnu_gzip_9n(data))
    print(f"level {pgzip.DEFAULT_LEVEL}: {mine} bytes, gzip -9n: {theirs} bytes ({mine / theirs - 1:+.3%})")
    assert mine <= theirs


def test_same_bytes_on_cpus_with_other_features(tmp_path):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (Debian package qemu-user): cannot emulate other CPUs")
    data = tmp_path / "input"
    data.write_bytes(shared_objects(600_000) + python_files(300_000) + mixed(600_000, 23))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [sys.executable, str(script), str(data)] + [str(level) for level in range(1, 10)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    runs = {"native": subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)}
    for cpu in EMULATED_CPUS:
        runs[cpu] = subprocess.Popen([qemu, "-cpu", cpu] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
    results = {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {err.decode(errors='replace')}"
        results[name] = json.loads(out)
    for cpu, expected in EMULATED_CPUS.items():
        features = results[cpu]["features"]
        assert {key: features[key] for key in expected} == expected, (cpu, features)
        assert not features["avx512f"], cpu
    for cpu in EMULATED_CPUS:
        assert results[cpu]["digests"] == results["native"]["digests"], (cpu, results["native"]["features"])


# --- the build reruns compression when the library changes ---------------------

def older_zlib_ng() -> str:
    """A directory with a real older release of python-zlib-ng, for PYTHONPATH (downloaded once)."""
    target = os.path.join(debian.CACHE, f"python-zlib-ng-{OLDER_RELEASE}")
    os.makedirs(debian.CACHE, exist_ok=True)
    with open(os.path.join(debian.CACHE, ".python-zlib-ng.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(target):
            part = target + ".part"
            shutil.rmtree(part, ignore_errors=True)
            os.makedirs(part)
            download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                       "--no-deps", "--only-binary=:all:", f"zlib-ng=={OLDER_RELEASE}", "-d", part],
                                      capture_output=True, text=True)
            wheels = glob.glob(os.path.join(part, "*.whl"))
            if download.returncode or len(wheels) != 1:
                raise RuntimeError(f"pip download zlib-ng=={OLDER_RELEASE} failed:\n{download.stderr}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(os.path.join(part, "site"))
            os.rename(os.path.join(part, "site"), target)
            shutil.rmtree(part)
    return target


def library_version(pythonpath: str) -> str:
    """ZLIBNG_VERSION of the zlib_ng that a fresh interpreter imports with this PYTHONPATH."""
    child = "import zlib_ng.zlib_ng as z; print(z.ZLIBNG_VERSION)"
    return subprocess.run([sys.executable, "-c", child], env=dict(os.environ, PYTHONPATH=pythonpath),
                          capture_output=True, text=True, check=True).stdout.strip()


# The SConstruct hands PYTHONPATH (or STAGE_PYTHONPATH, to give the stages another one) to the stages.
FORWARD_PYTHONPATH = ("env['ENV']['PYTHONPATH'] = os.environ.get('STAGE_PYTHONPATH', "
                      "os.environ.get('PYTHONPATH', ''))\n")


def read_manifest(project) -> dict:
    with open(os.path.join(project, "build", "tdx", "hello", "hello-manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_a_new_compressor_version_recompresses_the_image(fast_project):
    older = older_zlib_ng()
    pinned, older_library, pinned_library = pinned_release(), library_version(older), library_version(ROOT)
    assert (OLDER_RELEASE, older_library) != (pinned, pinned_library)
    with_older = {"PYTHONPATH": older + os.pathsep + ROOT}
    sconstruct = os.path.join(fast_project, "SConstruct")
    text = open(sconstruct).read()
    open(sconstruct, "w").write(text.replace("\napp = ", "\n" + FORWARD_PYTHONPATH + "app = ", 1))

    assert "compress" in stages_run(scons(fast_project))
    record = read_manifest(fast_project)["initramfs"]
    assert record["file"] == "hello-initramfs.cpio.gz" and record["compression"] == "gzip"
    assert record["compressor"] == f"zlib-ng {pinned_library} (python zlib-ng {pinned})", record

    # SCons declares the older library, the stage imports the pinned one: one clear line, no output.
    mismatch = scons(fast_project, env=dict(with_older, STAGE_PYTHONPATH=ROOT), check=False)
    assert mismatch.returncode != 0
    declared = f"zlib-ng {older_library} (python zlib-ng {OLDER_RELEASE})"
    assert re.search(rf"scons: \*\*\* \[\S+\] the gzip compressor here is {re.escape(record['compressor'])}, "
                     rf"but the build declared {re.escape(declared)}", mismatch.stderr), mismatch.stderr

    assert "compress" in stages_run(scons(fast_project, env=with_older))
    assert read_manifest(fast_project)["initramfs"]["compressor"] == declared
    assert stages_run(scons(fast_project, env=with_older)) == set()

    assert "compress" in stages_run(scons(fast_project))
    assert read_manifest(fast_project)["initramfs"] == record
    assert stages_run(scons(fast_project)) == set()


def test_tdx_pack_reruns_when_the_compressor_version_changes(tmp_path):
    older = older_zlib_ng()
    with_older = {"PYTHONPATH": older + os.pathsep + ROOT}
    project = tmp_path / "pack"
    (project / "rootdir" / "etc").mkdir(parents=True)
    (project / "rootdir" / "etc" / "motd").write_bytes(mixed(400_000, 29))
    (project / "SConstruct").write_text(
        "import os, tdx_rules\n"
        "DefaultEnvironment(tools=[])\n"
        "env = Environment(tools=['default', 'tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
        + FORWARD_PYTHONPATH +
        "env.TdxPack('initrd.gz', 'rootdir')\n")
    assert stages_run(scons(project)) == {"pack"}
    mismatch = scons(project, env=dict(with_older, STAGE_PYTHONPATH=ROOT), check=False)
    assert mismatch.returncode != 0 and "the gzip compressor here is zlib-ng" in mismatch.stderr, mismatch.stderr
    assert stages_run(scons(project, env=with_older)) == {"pack"}
    assert stages_run(scons(project, env=with_older)) == set()
    assert stages_run(scons(project)) == {"pack"}
    assert gzip.decompress((project / "initrd.gz").read_bytes()).startswith(b"070701")
