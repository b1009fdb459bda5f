"""The kernel-module bundle stage, checked against kmod's own modinfo and depmod.

Synthetic modules (a minimal ELF64 with a .modinfo section) cover the error
paths quickly; the real Debian 6.12 kernel tree covers the rest.
"""

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdx_rules.errors import TdxError
from tdx_rules.initramfs import newc
from tdx_rules.stages import modules as mod

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import debian  # noqa: E402

from tests.conftest import fuzz_examples

ROOT = debian.ROOT


# --- synthetic modules -------------------------------------------------------

def make_elf(pairs, shstrndx=None, modinfo_type=1, elf_class=2) -> bytes:
    """A minimal ELF64 LE file: null section, .modinfo (key=value\\0...), .shstrtab."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    modinfo_off = 64
    shstr_off = modinfo_off + len(modinfo)
    shoff = shstr_off + len(shstrtab)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + b"\0" * 9
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3,
                         2 if shstrndx is None else shstrndx)
    body = header + modinfo + shstrtab
    body += b"\0" * (shoff - len(body))
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, modinfo_type, 2, 0, modinfo_off, len(modinfo), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".ko.xz":
        return lzma.compress(data, check=lzma.CHECK_CRC32)
    if suffix == ".ko.gz":
        return gzip.compress(data, mtime=0)
    if suffix == ".ko.zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_module(root, rel, name, depends="", release="9.9.9-test", extra=()):
    suffix = mod.module_suffix(os.path.basename(rel))
    pairs = [("license", "GPL"), ("depends", depends), ("name", name), ("vermagic", f"{release} SMP mod_unload")]
    data = make_elf(pairs + list(extra))
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        out.write(compress(data, suffix))
    return path, data


@pytest.fixture
def fake_tree(tmp_path):
    """lib/modules/9.9.9-test with a small dependency graph in every compression format."""
    root = tmp_path / "lib" / "modules" / "9.9.9-test"
    write_module(root, "kernel/fs/configfs/configfs.ko.xz", "configfs")
    write_module(root, "kernel/drivers/virt/coco/tsm.ko.zst", "tsm", "configfs")
    write_module(root, "kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko.gz", "tdx_guest", "tsm")
    write_module(root, "kernel/net/vmw_vsock/vsock.ko", "vsock")
    write_module(root, "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
                 "vmw_vsock_virtio_transport_common", "vsock")
    write_module(root, "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz",
                 "vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common,vsock")
    write_module(root, "kernel/lib/a-b.ko.xz", "a_b", "zz_leaf")
    write_module(root, "kernel/lib/zz_leaf.ko.xz", "zz_leaf")
    write_module(root, "kernel/lib/broken.ko.xz", "broken", "not_there")
    (root / "modules.builtin").write_text("kernel/lib/crc32c_generic.ko\nkernel/fs/ext4/ext4.ko\n")
    (root / "build").symlink_to("/nonexistent/headers")  # a dangling build link, as in real packages
    return str(root)


def fragment_files(path) -> dict:
    return {entry.name: (entry.mode, newc.read_body(entry)) for entry in newc.read_entries(path)}


def assert_depmod_order(dep: dict) -> None:
    """Each modules.dep line lists nearest first, deepest last: a module's own chain comes after it."""
    for chain in dep.values():
        for i, item in enumerate(chain):
            assert set(dep[item]) <= set(chain[i + 1:]), (item, chain)


def parse_dep(text: str) -> dict:
    deps = {}
    for line in text.splitlines():
        if line.strip():
            head, _, rest = line.partition(":")
            deps[head] = rest.split()
    return deps


# --- the ELF parser ----------------------------------------------------------

def test_parse_modinfo_synthetic():
    data = make_elf([("alias", "a1"), ("depends", "x,y-z"), ("alias", "a2"), ("name", "m")])
    info = mod.parse_modinfo_bytes(data)
    assert info == {"alias": ["a1", "a2"], "depends": ["x,y-z"], "name": ["m"]}
    assert mod.depends(info) == ["x", "y_z"]
    assert mod.depends({"depends": [""]}) == []


@pytest.mark.parametrize("data, words", [
    (b"", "not a 64-bit"),
    (b"\x7fELF" + b"\0" * 100, "not a 64-bit"),
    (make_elf([("name", "m")], elf_class=1), "not a 64-bit"),
    (make_elf([("name", "m")])[:-10], "past the end"),
    (make_elf([("name", "m")], shstrndx=7), "out of range"),
    (make_elf([("name", "m")], modinfo_type=8), "outside the file"),
    (make_elf([("name", "m")]).replace(b".modinfo", b".modinfX"), "no .modinfo"),
    (make_elf([("name", "m")]).replace(b"name=m", b"namexm"), "malformed .modinfo"),
])
def test_parse_modinfo_malformed(data, words):
    with pytest.raises(TdxError, match=words):
        mod.parse_modinfo_bytes(data, "bad.ko")


@settings(max_examples=fuzz_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(data):
    for blob in (data, b"\x7fELF\x02\x01\x01" + data):
        try:
            assert isinstance(mod.parse_modinfo_bytes(blob), dict)
        except TdxError as error:
            assert "\n" not in str(error)


VALID = make_elf([("license", "GPL"), ("depends", "a,b"), ("name", "fuzzed"), ("alias", "x")])


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_fuzz_mutated_elf(edits, cut):
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    for blob in (bytes(data), bytes(data[:cut])):
        try:
            info = mod.parse_modinfo_bytes(blob)
        except TdxError as error:
            assert "\n" not in str(error)
        else:
            assert all(isinstance(v, list) for v in info.values())


@pytest.mark.parametrize("suffix", [".ko", ".ko.xz", ".ko.gz", ".ko.zst"])
def test_read_modinfo_every_format(tmp_path, suffix):
    path, _ = write_module(tmp_path, "m" + suffix, "m", "dep-one,dep_two")
    info = mod.read_modinfo(path)
    assert info["name"] == ["m"]
    assert mod.depends(info) == ["dep_one", "dep_two"]


@pytest.mark.parametrize("suffix", [".ko.xz", ".ko.gz", ".ko.zst"])
def test_corrupt_compressed_module(tmp_path, suffix):
    path = tmp_path / ("bad" + suffix)
    path.write_bytes(compress(VALID, suffix)[:-20] + b"garbage garbage garbage")
    with pytest.raises(TdxError, match="bad" + suffix.replace(".", r"\.")):
        mod.read_modinfo(path)


def test_decompression_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(mod, "MAX_MODULE_SIZE", 1000)
    path = tmp_path / "big.ko.xz"
    path.write_bytes(lzma.compress(b"\0" * 5000))
    with pytest.raises(TdxError, match="more than"):
        mod.read_modinfo(path)


# --- tree index and closure --------------------------------------------------

def test_index_tree(fake_tree):
    index = mod.index_tree(fake_tree)
    assert index["tdx_guest"] == "kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko.gz"
    assert index["a_b"] == "kernel/lib/a-b.ko.xz"
    assert index["crc32c_generic"] is None and index["ext4"] is None
    assert "build" not in index
    with pytest.raises(TdxError, match="does not exist"):
        mod.index_tree(os.path.join(fake_tree, "nope"))


def test_index_prefers_updates(tmp_path):
    write_module(tmp_path, "kernel/x/foo.ko.xz", "foo")
    write_module(tmp_path, "updates/dkms/foo.ko", "foo")
    write_module(tmp_path, "a/bar.ko", "bar")
    write_module(tmp_path, "b/bar.ko", "bar")
    index = mod.index_tree(tmp_path)
    assert index == {"foo": "updates/dkms/foo.ko", "bar": "a/bar.ko"}


def _reader(root, index):
    return lambda name: mod.read_modinfo(os.path.join(root, index[name]))


def test_closure_order(fake_tree):
    index = mod.index_tree(fake_tree)
    got = mod.closure(mod.TDX_MODULES + ["a-b", "ext4"], index, _reader(fake_tree, index))
    # dependencies first, ties by name: exact order
    assert got == ["configfs", "tsm", "tdx_guest", "vsock", "vmw_vsock_virtio_transport_common",
                   "vmw_vsock_virtio_transport", "zz_leaf", "a_b"]
    assert mod.closure(["ext4"], index, _reader(fake_tree, index)) == []


def test_closure_errors(fake_tree):
    index = mod.index_tree(fake_tree)
    with pytest.raises(TdxError, match="module broken .* depends on module not_there"):
        mod.closure(["broken"], index, _reader(fake_tree, index))
    with pytest.raises(TdxError, match="nope"):
        mod.closure(["nope"], index, _reader(fake_tree, index))
    cyclic = {"a": "a", "b": "b", "c": "c"}
    infos = {"a": {"depends": ["b"]}, "b": {"depends": ["c"]}, "c": {"depends": ["a"]}}
    with pytest.raises(TdxError, match="cycle"):
        mod.closure(["a"], cyclic, infos.__getitem__)


def test_dependency_chains():
    order = ["d", "c", "b", "a"]
    deps = {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": ["builtin_one"]}
    chains = mod.dependency_chains(order, deps)
    assert chains == {"d": [], "c": ["d"], "b": ["d"], "a": ["b", "c", "d"]}


# --- bundle on the synthetic tree ---------------------------------------------

def test_bundle_fake_tree(fake_tree, tmp_path, capsys):
    out, info_path = tmp_path / "out" / "mods.cpio", tmp_path / "out" / "mods.json"
    info = mod.bundle(fake_tree, "9.9.9-test", mod.TDX_MODULES + ["missing_one", "ext4"], ["a-b"], out, info_path)
    assert "[tdx] warning: module missing_one not found in 9.9.9-test" in capsys.readouterr().err
    assert json.loads(info_path.read_text()) == info
    assert info["missing_defaults"] == ["missing_one"] and info["builtin"] == ["ext4"]
    files = fragment_files(out)
    prefix = "lib/modules/9.9.9-test/"
    assert list(files) == sorted(files)
    load = files[prefix + "tdx-rules.load"][1].decode().split()
    assert load == [b["name"] for b in info["bundled"]]
    dep = parse_dep(files[prefix + "modules.dep"][1].decode())
    assert dep["kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko"] == [
        "kernel/drivers/virt/coco/tsm.ko", "kernel/fs/configfs/configfs.ko"]
    assert dep["kernel/lib/a-b.ko"] == ["kernel/lib/zz_leaf.ko"]
    for rel in dep:
        mode, body = files[prefix + rel]
        assert mode == 0o100644 and body.startswith(b"\x7fELF")
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # temp dir cleaned up
    # deterministic: a second run writes the same bytes
    again = tmp_path / "again.cpio"
    mod.bundle(fake_tree, "9.9.9-test", mod.TDX_MODULES + ["missing_one", "ext4"], ["a-b"], again, info_path)
    assert again.read_bytes() == out.read_bytes()


def test_bundle_errors(fake_tree, tmp_path):
    out, info = tmp_path / "f", tmp_path / "i.json"
    with pytest.raises(TdxError, match="module nosuch not found in kernel 9.9.9-test: check the name or add its "
                                       ".ko file to kernel_modules"):
        mod.bundle(fake_tree, "9.9.9-test", mod.TDX_MODULES, ["nosuch"], out, info)
    with pytest.raises(TdxError, match="gone.ko does not exist"):
        mod.bundle(fake_tree, "9.9.9-test", mod.TDX_MODULES, [str(tmp_path / "gone.ko")], out, info)
    with pytest.raises(TdxError, match="depends on module not_there"):
        mod.bundle(fake_tree, "9.9.9-test", [], ["broken"], out, info)
    wrong, _ = write_module(tmp_path / "user", "old.ko", "old", release="1.0.0")
    with pytest.raises(TdxError, match="built for kernel 1.0.0, not 9.9.9-test"):
        mod.bundle(fake_tree, "9.9.9-test", [], [wrong], out, info)
    builtin, _ = write_module(tmp_path / "user", "ext4.ko", "ext4", release="9.9.9-test")
    with pytest.raises(TdxError, match="built into kernel"):
        mod.bundle(fake_tree, "9.9.9-test", [], [builtin], out, info)
    corrupt = os.path.join(fake_tree, "kernel/fs/configfs/configfs.ko.xz")
    with open(corrupt, "wb") as handle:
        handle.write(b"\xfd7zXZ\0 this is not xz")
    with pytest.raises(TdxError, match="configfs.ko.xz is not valid compressed data"):
        mod.bundle(fake_tree, "9.9.9-test", mod.TDX_MODULES, [], out, info)
    assert not out.exists() and not info.exists()


def test_bundle_user_file(fake_tree, tmp_path):
    path, data = write_module(tmp_path / "user", "my-drv.ko.zst", "my_drv", "vmw_vsock_virtio_transport",
                              release="9.9.9-test")
    out, info_path = tmp_path / "f", tmp_path / "i.json"
    info = mod.bundle(fake_tree, "9.9.9-test", [], [path], out, info_path)
    files = fragment_files(out)
    prefix = "lib/modules/9.9.9-test/"
    assert files[prefix + "extra/my-drv.ko"][1] == data
    dep = parse_dep(files[prefix + "modules.dep"][1].decode())
    assert dep["extra/my-drv.ko"] == ["kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                                      "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                                      "kernel/net/vmw_vsock/vsock.ko"]
    assert [b["name"] for b in info["bundled"]][-1] == "my_drv"


def test_no_modules_root(tmp_path):
    out, info = tmp_path / "f", tmp_path / "i.json"
    mod.bundle(None, "6.1.0-static", mod.TDX_MODULES, [], out, info)
    assert out.read_bytes() == b""
    assert json.loads(info.read_text())["bundled"] == []
    with pytest.raises(TdxError, match="has no loadable modules"):
        mod.bundle(None, "6.1.0-static", mod.TDX_MODULES, ["vsock"], out, info)


def _cli(tmp_path, kernel, modules):
    (tmp_path / "config.json").write_text(json.dumps({"kernel_modules": modules}))
    (tmp_path / "kernel.json").write_text(json.dumps(kernel))
    return subprocess.run([sys.executable, "-m", "tdx_rules.stages.modules", "--config", str(tmp_path / "config.json"),
                           "--kernel-info", str(tmp_path / "kernel.json"), "--out", str(tmp_path / "frag"),
                           "--info", str(tmp_path / "info.json")], cwd=ROOT, capture_output=True, text=True)


def test_cli(fake_tree, tmp_path):
    done = _cli(tmp_path, {"release": "9.9.9-test", "modules_root": fake_tree}, ["a_b"])
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "info.json").read_text())["bundled"][-1]["name"] == "a_b"
    done = _cli(tmp_path, {"release": "9.9.9-test", "modules_root": fake_tree}, ["nosuch"])
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "tdx-rules: error: module nosuch not found in kernel 9.9.9-test: check the name or add its .ko file "
        "to kernel_modules"]
    done = _cli(tmp_path, {"release": "9.9.9-test", "modules_root": None}, [])
    assert done.returncode == 0 and (tmp_path / "frag").read_bytes() == b""
    (tmp_path / "kernel.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "tdx_rules.stages.modules", "--config", str(tmp_path / "config.json"),
                           "--kernel-info", str(tmp_path / "kernel.json"), "--out", str(tmp_path / "frag"),
                           "--info", str(tmp_path / "info.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1


# --- the real Debian kernel, against kmod --------------------------------------

@pytest.fixture(scope="session")
def kernel():
    tree = debian.kernel_tree()
    release = os.listdir(os.path.join(tree, "lib", "modules"))[0]
    return os.path.join(tree, "lib", "modules", release), release


@pytest.fixture(scope="session")
def real_depmod(kernel, tmp_path_factory):
    """modules.dep written by kmod's depmod for the whole tree (symlinked into a temp root)."""
    modules_root, release = kernel
    base = tmp_path_factory.mktemp("depmod")
    target = base / "lib" / "modules" / release
    target.mkdir(parents=True)
    os.symlink(os.path.join(modules_root, "kernel"), target / "kernel")
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if os.path.exists(os.path.join(modules_root, name)):
            shutil.copy(os.path.join(modules_root, name), target / name)
    subprocess.run(["depmod", "-b", str(base), release], check=True, capture_output=True)
    return parse_dep((target / "modules.dep").read_text())


SAMPLE = ["kernel/fs/configfs/configfs.ko.xz", "kernel/drivers/virt/coco/tsm.ko.xz",
          "kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko.xz", "kernel/net/vmw_vsock/vsock.ko.xz",
          "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz", "kernel/drivers/nvme/host/nvme-rdma.ko.xz",
          "kernel/drivers/target/iscsi/cxgbit/cxgbit.ko.xz", "kernel/drivers/usb/gadget/function/usb_f_uvc.ko.xz"]


@pytest.mark.parametrize("rel", SAMPLE)
def test_modinfo_matches_kmod(kernel, rel):
    path = os.path.join(kernel[0], rel)
    info = mod.read_modinfo(path)
    for field in ("depends", "name", "vermagic", "license"):
        want = subprocess.run(["modinfo", "-F", field, path], capture_output=True, text=True, check=True).stdout
        assert "\n".join(info.get(field, [])).strip() == want.strip(), field
    assert info["vermagic"][0].split()[0] == kernel[1]


def test_modinfo_plain_ko_matches_kmod(kernel, tmp_path):
    plain = tmp_path / "tdx-guest.ko"
    with open(plain, "wb") as out:
        subprocess.run(["xz", "-dc", os.path.join(kernel[0], SAMPLE[2])], stdout=out, check=True)
    info = mod.read_modinfo(plain)
    aliases = subprocess.run(["modinfo", "-F", "alias", str(plain)], capture_output=True, text=True).stdout.split()
    assert info.get("alias", []) == aliases
    assert info["depends"] == ["tsm"] and info["name"] == ["tdx_guest"]


def test_closure_matches_depmod(kernel, real_depmod):
    modules_root, _ = kernel
    index = mod.index_tree(modules_root)
    reader = _reader(modules_root, index)
    for rel in SAMPLE + ["kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz"]:
        name = mod.canonical(os.path.basename(rel).split(".ko")[0])
        order = mod.closure([name], index, reader)
        assert order[-1] == name
        assert {index[n] for n in order[:-1]} == set(real_depmod[rel]), rel
        # every module comes after all of its own dependencies
        for i, n in enumerate(order):
            assert set(real_depmod[index[n]]) <= {index[m] for m in order[:i]}
        deps = {n: mod.depends(reader(n)) for n in order}
        chain = [index[n] for n in mod.dependency_chains(order, deps)[name]]
        assert set(chain) == set(real_depmod[rel])
        if rel in SAMPLE[:5]:
            assert chain == real_depmod[rel]  # the exact depmod line for the TDX set


@pytest.fixture(scope="session")
def real_bundle(kernel, tmp_path_factory):
    modules_root, release = kernel
    out = tmp_path_factory.mktemp("bundle")
    info = mod.bundle(modules_root, release, mod.TDX_MODULES, ["nvme-rdma"], out / "modules.cpio", out / "info.json")
    return out, info


def test_real_bundle_bytes(kernel, real_bundle):
    modules_root, release = kernel
    out, info = real_bundle
    files = fragment_files(out / "modules.cpio")
    prefix = f"lib/modules/{release}/"
    assert {b["name"] for b in info["bundled"]} >= {"configfs", "tsm", "tdx_guest", "vsock", "nvme_rdma",
                                                    "vmw_vsock_virtio_transport", "vmw_vsock_virtio_transport_common"}
    assert info["missing_defaults"] == [] and info["builtin"] == []
    for bundled in info["bundled"]:
        rel = bundled["path"][len(prefix):]
        want = subprocess.run(["xz", "-dc", os.path.join(modules_root, rel + ".xz")], capture_output=True,
                              check=True).stdout
        mode, body = files[bundled["path"]]
        assert body == want and mode == 0o100644
        assert bundled["sha256"] == hashlib.sha256(want).hexdigest()


def test_real_modules_dep_matches_depmod(kernel, real_bundle, real_depmod):
    modules_root, release = kernel
    out, info = real_bundle
    files = fragment_files(out / "modules.cpio")
    prefix = f"lib/modules/{release}/"
    ours = parse_dep(files[prefix + "modules.dep"][1].decode())
    strip = {k[:-3]: [d[:-3] for d in v] for k, v in real_depmod.items()}
    assert set(ours) == {b["path"][len(prefix):] for b in info["bundled"]}
    for rel, deps in ours.items():
        assert set(deps) == set(strip[rel]), rel
    load = files[prefix + "tdx-rules.load"][1].decode().split()
    where = {b["name"]: b["path"][len(prefix):] for b in info["bundled"]}
    seen = set()
    for name in load:  # the load file puts each module after its whole chain
        assert set(ours[where[name]]) <= seen
        seen.add(where[name])
    # depmod run on the extracted bundle itself writes the same lines
    root = out / "root"
    for name, (mode, body) in files.items():
        if mode & 0o170000 == 0o100000 and name.endswith(".ko"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(body)
    subprocess.run(["depmod", "-b", str(root), release], check=True, capture_output=True)
    again = parse_dep((root / prefix / "modules.dep").read_text())
    assert {k: set(v) for k, v in again.items()} == {k: set(v) for k, v in ours.items()}
    assert_depmod_order(ours)
    assert_depmod_order(again)
    for rel in ("kernel/drivers/virt/coco/tdx-guest/tdx-guest.ko", "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"):
        assert ours[rel] == again[rel]  # chains without ties: the exact depmod line


def test_real_missing_default_and_unknown(kernel, tmp_path, capsys):
    modules_root, release = kernel
    info = mod.bundle(modules_root, release, mod.TDX_MODULES + ["no_such_tdx_module"], [], tmp_path / "f",
                      tmp_path / "i.json")
    assert info["missing_defaults"] == ["no_such_tdx_module"]
    assert f"[tdx] warning: module no_such_tdx_module not found in {release}" in capsys.readouterr().err
    with pytest.raises(TdxError, match=re.escape(f"module typo_mod not found in kernel {release}: check the name")):
        mod.bundle(modules_root, release, mod.TDX_MODULES, ["typo_mod"], tmp_path / "f", tmp_path / "i.json")


def test_real_user_files(kernel, tmp_path):
    modules_root, release = kernel
    plain = tmp_path / "vsock_loopback.ko"
    with open(plain, "wb") as out:
        subprocess.run(["xz", "-dc", os.path.join(modules_root, "kernel/net/vmw_vsock/vsock_loopback.ko.xz")],
                       stdout=out, check=True)
    hello, data = write_module(tmp_path, "hello.ko.xz", "hello", "tls,vsock_loopback", release=release)
    info = mod.bundle(modules_root, release, mod.TDX_MODULES, [str(plain), hello], tmp_path / "f", tmp_path / "i.json")
    prefix = f"lib/modules/{release}/"
    files = fragment_files(tmp_path / "f")
    dep = parse_dep(files[prefix + "modules.dep"][1].decode())
    assert set(dep["extra/hello.ko"]) == {"extra/vsock_loopback.ko", "kernel/net/tls/tls.ko",
                                          "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                                          "kernel/net/vmw_vsock/vsock.ko"}
    assert_depmod_order(dep)
    assert dep["extra/vsock_loopback.ko"] == ["kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                                              "kernel/net/vmw_vsock/vsock.ko"]
    assert files[prefix + "extra/hello.ko"][1] == data
    assert files[prefix + "extra/vsock_loopback.ko"][1] == plain.read_bytes()
    assert not any(n.endswith("kernel/net/vmw_vsock/vsock_loopback.ko") for n in files)
    assert [b["name"] for b in info["bundled"]][-1] == "hello"


def test_user_file_with_unknown_suffix(fake_tree, tmp_path):
    odd = tmp_path / "drv.ko.bak"
    odd.write_bytes(VALID)
    with pytest.raises(TdxError, match="drv.ko.bak does not exist or is not a .ko"):
        mod.bundle(fake_tree, "9.9.9-test", [], [str(odd)], tmp_path / "f", tmp_path / "i.json")


def run_modules_stage(tmp_path, kernel_info, cache):
    config = tmp_path / "modules.config.json"
    config.write_text(json.dumps({"kernel_modules": []}))
    info = tmp_path / "kernel.info.json"
    info.write_text(json.dumps(kernel_info))
    command = [sys.executable, "-m", "tdx_rules.stages.modules", "--config", str(config), "--kernel-info", str(info),
               "--out", str(tmp_path / "modules.frag"), "--info", str(tmp_path / "modules.info.json"),
               "--cache", str(cache)]
    return subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_kernel_tree_recorded_relative_to_the_cache_is_found_in_another_cache(tmp_path, small_kernel):
    """A kernel info retrieved from a shared CacheDir names its tree inside the download
    cache; the modules stage finds it in this machine's cache, wherever that lives."""
    from tdx_rules.fsutil import cache_relative

    release = debian.kernel_release()
    source = os.path.join(small_kernel["modules_dir"], "lib", "modules", release)
    first = tmp_path / "cache-on-machine-a"
    shutil.copytree(source, first / "kernels" / "k1" / "lib" / "modules" / release)
    recorded = cache_relative(str(first / "kernels" / "k1" / "lib" / "modules" / release), str(first))
    assert recorded == f"cache:kernels/k1/lib/modules/{release}"
    second = tmp_path / "elsewhere" / "cache-on-machine-b"
    shutil.copytree(first, second)
    shutil.rmtree(first)
    result = run_modules_stage(tmp_path, {"release": release, "modules_root": recorded}, second)
    assert result.returncode == 0, result.stderr
    bundled = json.loads((tmp_path / "modules.info.json").read_text())["bundled"]
    assert "tdx_guest" in {module["name"] for module in bundled}
    missing = run_modules_stage(tmp_path, {"release": release, "modules_root": recorded}, tmp_path / "empty-cache")
    assert missing.returncode == 1
    assert "is not in the download cache" in missing.stderr and "--cache-disable" in missing.stderr
    escape = run_modules_stage(tmp_path, {"release": release, "modules_root": "cache:../outside"}, second)
    assert escape.returncode == 1 and "not inside the download cache" in escape.stderr
