"""`tdx-rules pack` and the parallel gzip, checked against the real tools.

GNU gzip, zstd, xz, lz4 and cpio are the outside references: every output
must decompress with the real CLI to the exact newc archive, and GNU cpio
must list the expected tree.
"""

import gzip
import io
import os
import random
import shutil
import stat
import subprocess
import sys
import zlib

import pytest

from tdx_rules.errors import ERROR_PREFIX, TdxError
from tdx_rules.initramfs import pack, pgzip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECOMPRESS = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dc"], "xz": ["xz", "-dc"], "lz4": ["lz4", "-dc"]}


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def real_decompress(kind, data: bytes) -> bytes:
    need(DECOMPRESS[kind][0])
    result = subprocess.run(DECOMPRESS[kind], input=data, capture_output=True, check=True)
    return result.stdout


def mixed(size: int, seed: int = 1) -> bytes:
    """Alternating runs of text-like and random bytes, deterministic."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.6:
            out += b" ".join(rng.choices(words, k=rng.randint(200, 6000))) + b"\n"
        else:
            out += rng.randbytes(rng.randint(1000, 200_000))
    return bytes(out[:size])


def pgz(data: bytes, threads=1, block_size=pgzip.DEFAULT_BLOCK_SIZE, level=9) -> bytes:
    out = io.BytesIO()
    pgzip.compress_gzip(io.BytesIO(data), out, level=level, threads=threads, block_size=block_size)
    return out.getvalue()


# --- pgzip -----------------------------------------------------------------

@pytest.mark.parametrize("block_size", [1024, 32 * 1024, 128 * 1024])
def test_pgzip_bytes_do_not_depend_on_threads_at_block_boundaries(block_size):
    cases = [b"", b"x", mixed(block_size, 2), mixed(block_size + 1, 3), mixed(3 * block_size - 1, 4),
             mixed(5 * block_size, 5)]
    for data in cases:
        outputs = {threads: pgz(data, threads, block_size) for threads in (1, 2, 4)}
        assert outputs[1] == outputs[2] == outputs[4], (block_size, len(data))
        assert gzip.decompress(outputs[1]) == data
        assert real_decompress("gzip", outputs[1]) == data


def test_pgzip_few_megabytes_identical_for_threads_and_write_pattern():
    data = mixed(3_000_000, 7)
    reference = pgz(data, 1)
    assert pgz(data, 2) == reference and pgz(data, 4) == reference
    # Write sizes do not matter either: blocks are cut at fixed input offsets.
    rng = random.Random(3)
    out = io.BytesIO()
    with pgzip.GzipWriter(out, 9, threads=2) as writer:
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 110, 4096, 200_000])
            writer.write(data[pos:pos + step])
            pos += step
    assert writer.tell() == len(data)
    assert out.getvalue() == reference
    assert real_decompress("gzip", reference) == data
    assert gzip.decompress(reference) == data


def test_pgzip_header_is_gnu_gzip_n_header_and_trailer_is_standard():
    need("gzip")
    data = mixed(300_000, 8)
    ours = pgz(data)
    theirs = subprocess.run(["gzip", "-9n"], input=data, capture_output=True, check=True).stdout
    assert ours[:10] == theirs[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03"
    assert ours[-8:] == theirs[-8:]  # CRC-32 and ISIZE of the same input
    assert pgz(data, level=1)[8] == 4 and pgz(data, level=6)[8] == 0
    # One member, no trailing garbage: zlib's gzip mode consumes it exactly.
    decoder = zlib.decompressobj(31)
    assert decoder.decompress(ours) == data and decoder.eof and decoder.unused_data == b""


def stdlib_sources() -> list:
    """Paths of Python sources of the standard library, in a fixed order."""
    stdlib = os.path.dirname(os.__file__)
    paths = []
    for top in ("json", "email", "asyncio", "logging", "xml", "unittest", "http", "concurrent"):
        for base, dirs, files in sorted(os.walk(os.path.join(stdlib, top))):
            dirs.sort()
            paths += [os.path.join(base, name) for name in sorted(files) if name.endswith(".py")]
    return paths


def extension_modules() -> list:
    """Paths of this Python's extension modules (ELF shared objects), in a fixed order."""
    dynload = os.path.join(os.path.dirname(os.__file__), "lib-dynload")
    return [os.path.join(dynload, name) for name in sorted(os.listdir(dynload))] if os.path.isdir(dynload) else []


def concatenated(paths, limit: int) -> bytes:
    """The first ``limit`` bytes of the files at ``paths``, one after another."""
    out = bytearray()
    for path in paths:
        with open(path, "rb") as handle:
            out += handle.read()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def realistic_mix(limit: int = 6_000_000) -> bytes:
    """An initramfs-like mix from this machine: the Python binary, shared objects, stdlib sources."""
    return concatenated([os.path.realpath(sys.executable)] + extension_modules() + stdlib_sources(), limit)


def test_pgzip_size_is_within_one_percent_of_gzip_9n():
    need("gzip")
    data = realistic_mix()
    ours = len(pgz(data, threads=2))
    theirs = len(subprocess.run(["gzip", "-9n"], input=data, capture_output=True, check=True).stdout)
    overhead = ours / theirs - 1
    print(f"pgzip {ours} bytes vs gzip -9n {theirs} bytes on {len(data)} bytes: {overhead:+.3%}")
    assert overhead <= 0.015


def test_pgzip_rejects_bad_level_and_block_size():
    with pytest.raises(TdxError, match="1..9"):
        pgz(b"x", level=0)
    with pytest.raises(TdxError, match="block size"):
        pgz(b"x", block_size=10)


# --- pack: formats -----------------------------------------------------------

def make_tree(base, umask=0o022, mtime=1_000_000, big: bytes = b""):
    """A small rootfs with an executable, text, a symlink, an empty dir, a sticky dir."""
    old = os.umask(umask)
    try:
        root = os.path.join(base, "rootfs")
        for sub in ("bin", "etc/init.d", "usr/lib", "empty", "tmp"):
            os.makedirs(os.path.join(root, sub))
        with open(os.path.join(root, "bin", "busybox"), "wb") as handle:
            handle.write(b"\x7fELF" + bytes(range(256)) * 40)
        os.chmod(os.path.join(root, "bin", "busybox"), 0o777 & ~umask)
        os.symlink("busybox", os.path.join(root, "bin", "sh"))
        with open(os.path.join(root, "etc", "motd"), "w") as handle:
            handle.write("welcome\n")
        with open(os.path.join(root, "etc", "init.d", "rcS"), "w") as handle:
            handle.write("#!/bin/sh\nmount -t proc proc /proc\n")
        os.chmod(os.path.join(root, "etc", "init.d", "rcS"), 0o775 & ~umask)
        with open(os.path.join(root, "usr", "lib", "big.bin"), "wb") as handle:
            handle.write(big)
        os.chmod(os.path.join(root, "tmp"), 0o1777)
    finally:
        os.umask(old)
    for base_dir, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(base_dir, name), (mtime, mtime), follow_symlinks=False)
    return root


EXPECTED_NAMES = ["bin", "bin/busybox", "bin/sh", "empty", "etc", "etc/init.d", "etc/init.d/rcS", "etc/motd",
                  "tmp", "usr", "usr/lib", "usr/lib/big.bin"]


def gnu_listing(archive: bytes):
    need("cpio")
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True).stdout
    rows = {}
    for line in out.decode().splitlines():
        parts = line.split()
        rows[parts[8]] = (parts[0], parts[2], parts[3])
    return rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    # > 8 MiB so lz4 has two legacy blocks and zstd several jobs.
    big = mixed(9 * 1024 * 1024, 11)
    return make_tree(str(tmp_path_factory.mktemp("tree")), big=big)


@pytest.fixture(scope="module")
def plain_archive(tree, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("plain")), "initramfs.cpio")
    result = pack.pack_tree(tree, out, "none")
    with open(out, "rb") as handle:
        data = handle.read()
    assert result.archive_bytes == result.output_bytes == len(data)
    assert len(data) % 512 == 0
    return data


def test_none_is_a_newc_archive_gnu_cpio_lists_sorted_and_owned_by_root(plain_archive):
    rows = gnu_listing(plain_archive)
    assert list(rows) == EXPECTED_NAMES
    assert all(owner == group == "root" for _, owner, group in rows.values())
    modes = {name: row[0] for name, row in rows.items()}
    assert modes["bin/busybox"] == "-rwxr-xr-x" and modes["etc/init.d/rcS"] == "-rwxr-xr-x"
    assert modes["etc/motd"] == "-rw-r--r--" and modes["bin/sh"] == "lrwxrwxrwx"
    assert modes["etc"] == "drwxr-xr-x" and modes["tmp"] == "drwxrwxrwt"


@pytest.mark.parametrize("kind,level", [("gzip", 6), ("zstd", 3), ("xz", 1), ("lz4", 9)])
def test_each_compression_decompresses_with_the_real_tool_to_the_exact_archive(kind, level, tree, plain_archive,
                                                                                  tmp_path):
    out = tmp_path / f"initramfs.{kind}"
    pack.pack_tree(tree, out, kind, level=level, threads=2)
    data = out.read_bytes()
    assert real_decompress(kind, data) == plain_archive
    if kind == "xz":
        info = subprocess.run(["xz", "--robot", "-lvv", str(out)], capture_output=True, text=True, check=True).stdout
        assert "CRC32" in info and "--x86" not in info


@pytest.mark.parametrize("kind,level", [("gzip", 6), ("zstd", 1), ("lz4", 1)])
def test_threaded_compressions_give_the_same_bytes_for_any_thread_count(kind, level, tree, tmp_path):
    outputs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"{threads}.out"
        pack.pack_tree(tree, out, kind, level=level, threads=threads)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_lz4_is_the_legacy_format_of_the_kernel(tree, plain_archive, tmp_path):
    out = tmp_path / "initramfs.lz4"
    pack.pack_tree(tree, out, "lz4")
    data = out.read_bytes()
    assert data[:4] == b"\x02\x21\x4c\x18"
    import lz4.block

    # Walk the blocks: u32 compressed length + raw block, 8 MiB of input each.
    pos, sizes, rebuilt = 4, [], bytearray()
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "little")
        block = lz4.block.decompress(data[pos + 4:pos + 4 + length], uncompressed_size=8 << 20)
        sizes.append(len(block))
        rebuilt += block
        pos += 4 + length
    assert pos == len(data) and bytes(rebuilt) == plain_archive
    assert sizes[:-1] == [8 << 20] * (len(sizes) - 1) and len(sizes) >= 2
    need("lz4")
    version = subprocess.run(["lz4", "--version"], capture_output=True, text=True, check=False).stdout
    if lz4.library_version_string() in version:  # same lz4 library: same bytes as `lz4 -l -9`
        theirs = subprocess.run(["lz4", "-l", "-9", "-c"], input=plain_archive, capture_output=True, check=True)
        assert theirs.stdout == data


def test_same_tree_elsewhere_with_other_umask_mtimes_and_owner_packs_identically(tmp_path):
    first = make_tree(str(tmp_path / "one"), umask=0o022, mtime=1_000_000, big=b"data" * 1000)
    second = make_tree(str(tmp_path / "two" / "deeper"), umask=0o077, mtime=1_700_000_000, big=b"data" * 1000)
    if os.geteuid() == 0:
        for base, dirs, files in os.walk(second):
            for name in dirs + files:
                os.lchown(os.path.join(base, name), 65534, 65534)
    assert stat.S_IMODE(os.stat(os.path.join(second, "etc", "motd")).st_mode) == 0o600
    for kind in pack.COMPRESSIONS:
        level = {"zstd": 3, "xz": 1}.get(kind)
        a, b = tmp_path / f"a.{kind}", tmp_path / f"b.{kind}"
        pack.pack_tree(first, a, kind, level=level, threads=1, epoch=1234)
        pack.pack_tree(second, b, kind, level=level, threads=2, epoch=1234)
        assert a.read_bytes() == b.read_bytes(), kind
    listing = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(tmp_path / "a.none")], capture_output=True,
                             text=True, check=True).stdout
    assert "1970" in listing  # epoch 1234 is 1970-01-01 00:20:34


# --- kernel config -----------------------------------------------------------

KCONFIG = "CONFIG_BLK_DEV_INITRD=y\nCONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\nCONFIG_RD_XZ=y\n"


def test_kernel_config_check():
    pack.check_kernel_supports("gzip", KCONFIG)
    pack.check_kernel_supports("xz", KCONFIG)
    pack.check_kernel_supports("none", KCONFIG)
    pack.check_kernel_supports("zstd", None)  # unknown config: nothing to check
    with pytest.raises(TdxError) as error:
        pack.check_kernel_supports("zstd", KCONFIG)
    assert str(error.value) == ("kernel config has no CONFIG_RD_ZSTD=y: pick gzip, xz or none "
                                "or rebuild the kernel with CONFIG_RD_ZSTD=y")
    with pytest.raises(TdxError, match="CONFIG_RD_LZ4=y"):
        pack.check_kernel_supports("lz4", KCONFIG)
    with pytest.raises(TdxError, match="CONFIG_BLK_DEV_INITRD"):
        pack.check_kernel_supports("none", "# CONFIG_BLK_DEV_INITRD is not set\n")
    with pytest.raises(TdxError, match="unknown compression"):
        pack.check_kernel_supports("bzip2", KCONFIG)


# --- command line ------------------------------------------------------------

def run_pack(capsys, *argv):
    code = pack.main_pack([str(arg) for arg in argv])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    return lines[0]


def test_main_pack_writes_the_output_and_honours_the_kernel_config(capsys, tmp_path):
    tree = make_tree(str(tmp_path / "t"))
    out = tmp_path / "out" / "initramfs.cpio.gz"
    config = tmp_path / "config"
    config.write_text(KCONFIG)
    code, err = run_pack(capsys, tree, "-o", out, "--kernel-config", config, "--threads", "2")
    assert code == 0 and err == ""
    assert list(gnu_listing(gzip.decompress(out.read_bytes()))) == EXPECTED_NAMES
    zst = tmp_path / "initramfs.cpio.zst"
    code, err = run_pack(capsys, tree, "-o", zst, "--compress", "zstd", "--kernel-config", config)
    assert code == 1 and "CONFIG_RD_ZSTD=y" in one_error_line(err)
    assert not zst.exists()
    gz_config = tmp_path / "config.gz"
    gz_config.write_bytes(gzip.compress(KCONFIG.encode()))
    code, err = run_pack(capsys, tree, "-o", zst, "--compress", "zstd", "--kernel-config", gz_config)
    assert code == 1 and "CONFIG_RD_ZSTD=y" in one_error_line(err)


def test_main_pack_bad_inputs_give_one_line_errors(capsys, tmp_path):
    tree = make_tree(str(tmp_path / "t"))
    out = tmp_path / "o.gz"
    code, err = run_pack(capsys, tmp_path / "missing", "-o", out)
    assert code == 1 and "missing does not exist" in one_error_line(err)
    code, err = run_pack(capsys, tree, "-o", out, "--compress", "bzip2")
    assert code == 1 and "unknown compression 'bzip2'" in one_error_line(err)
    code, err = run_pack(capsys, tree, "-o", out, "--compress", "gzip", "--level", "12")
    assert code == 1 and "1..9" in one_error_line(err)
    code, err = run_pack(capsys, tree, "-o", out, "--kernel-config", tmp_path / "nope")
    assert code == 1 and "--kernel-config" in one_error_line(err)
    code, err = run_pack(capsys, tree, "-o", os.path.join(tree, "etc", "initramfs.gz"))
    assert code == 1 and "inside the tree" in one_error_line(err)
    os.mkfifo(os.path.join(tree, "etc", "fifo"))
    code, err = run_pack(capsys, tree, "-o", out)
    assert code == 1 and "fifo is a FIFO" in one_error_line(err)
    os.unlink(os.path.join(tree, "etc", "fifo"))
    code, err = run_pack(capsys, tree)  # no -o: usage error
    assert code == 2 and "-o" in err
    assert not out.exists() and not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_main_pack_unreadable_file_is_named(tmp_path):
    tree = make_tree(str(tmp_path / "t"))
    secret = os.path.join(tree, "etc", "shadow")
    with open(secret, "w") as handle:
        handle.write("root:*:\n")
    os.chmod(secret, 0)
    child = "import sys; from tdx_rules.initramfs.pack import main_pack; sys.exit(main_pack(sys.argv[1:]))"
    command = [sys.executable, "-c", child, tree, "-o", str(tmp_path / "o.gz")]
    if os.geteuid() == 0:
        # root reads anything: drop the capabilities that bypass file permissions.
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if shutil.which("setpriv") is None or subprocess.run(drop + ["true"], check=False).returncode:
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE with setpriv")
        command = drop + command
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                            check=False)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"{secret}: cannot read the file (Permission denied)" in line
    assert not (tmp_path / "o.gz").exists()
