"""The tool's content decider: unchanged inputs are not re-read on a no-op build, and every
edit is still seen, also one that keeps the size and the whole-second mtime."""

import json
import os
import sys
import time

import SCons.Node.FS

from tdx_rules.scons import statcache
from tests.conftest import ROOT

BIG = 64 << 20

# Run scons and report the bytes this process read (rchar of /proc/self/io) on stderr.
SCONS_COUNTING_READS = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('RCHAR ' + [l for l in open('/proc/self/io')"
    " if l.startswith('rchar')][0].split()[1] + '\\n'))\n"
    "sys.argv = ['scons', '-Q']\n"
    "import SCons.Script\n"
    "SCons.Script.main()\n")


def project(tmp_path):
    with open(tmp_path / "SConstruct", "w") as handle:
        handle.write("DefaultEnvironment(tools=[])\n"
                     "env = Environment(tools=['tdx'], toolpath=[%r])\n"
                     "env.Command('copy.bin', 'big.bin', Copy('$TARGET', '$SOURCE'))\n"
                     % os.path.join(ROOT, "site_scons", "site_tools"))
    return tmp_path


def run(path):
    import subprocess
    result = subprocess.run([sys.executable, "-c", SCONS_COUNTING_READS], cwd=path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    read = int(result.stderr.rsplit("RCHAR ", 1)[1].split()[0])
    return result.stdout, read


def test_noop_build_does_not_reread_a_large_unchanged_input(tmp_path):
    path = project(tmp_path)
    with open(path / "big.bin", "wb") as handle:
        handle.truncate(BIG)
    time.sleep(statcache.COARSE_RACY_MARGIN_NS / 1e9 + 0.2)
    out, read = run(path)
    assert "Copy" in out and read > BIG
    out, read = run(path)
    assert "up to date" in out and read < BIG // 4, f"a no-op build read {read} bytes"
    with open(path / statcache.CACHE_NAME) as handle:
        assert str(path / "big.bin") in json.load(handle)["files"]


def test_same_size_edit_with_the_same_mtime_is_seen(tmp_path):
    path = project(tmp_path)
    with open(path / "big.bin", "wb") as handle:
        handle.write(b"A" * 4096)
    time.sleep(statcache.COARSE_RACY_MARGIN_NS / 1e9 + 0.2)
    run(path)
    run(path)  # the signature is now served from the cache
    before = os.stat(path / "big.bin")
    with open(path / "big.bin", "r+b") as handle:
        handle.write(b"B")
    os.utime(path / "big.bin", ns=(before.st_atime_ns, before.st_mtime_ns))
    out, _ = run(path)
    assert "Copy" in out
    with open(path / "copy.bin", "rb") as handle:
        assert handle.read(1) == b"B"


def test_entry_hashed_within_the_racy_margin_is_not_trusted(tmp_path):
    fs = SCons.Node.FS.FS(str(tmp_path))
    target = tmp_path / "input.txt"
    target.write_text("one")
    cache = statcache.StatCache(str(tmp_path / statcache.CACHE_NAME))
    st = os.stat(target)
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    # Claimed hashed just after the last change, with a signature that is not the file's.
    cache.entries[str(target)] = [key, max(st.st_mtime_ns, st.st_ctime_ns) + 1, "0" * 32]
    node = fs.File(str(target))
    cache.prime(node)
    assert node.get_ninfo().csig != "0" * 32
    # Hashed well after the last change: the remembered signature is used as it is.
    cache.entries[str(target)] = [key, max(st.st_mtime_ns, st.st_ctime_ns) + statcache.RACY_MARGIN_NS, "1" * 32]
    node = SCons.Node.FS.FS(str(tmp_path)).File(str(target))
    cache.prime(node)
    assert node.get_ninfo().csig == "1" * 32


def test_unreadable_cache_file_is_ignored_and_rewritten(tmp_path):
    path = project(tmp_path)
    with open(path / "big.bin", "wb") as handle:
        handle.write(b"data")
    (path / statcache.CACHE_NAME).write_text("{not json")
    out, _ = run(path)
    assert "Copy" in out
    with open(path / statcache.CACHE_NAME) as handle:
        assert json.load(handle)["version"] == statcache.VERSION
