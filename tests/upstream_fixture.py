"""Offline stand-ins for the real upstreams, served by a loopback HTTP server.

The files are laid out exactly as on the real hosts (``<host>/<path>``) and
built in the test session from real Debian parts with the real tools:

* ``dl-cdn.alpinelinux.org``: Alpine minirootfs tarballs 3.21.0 and 3.20.3
  (``./bin/busybox`` from Debian's busybox-static, ``./lib/ld-musl-x86_64.so.1``
  from Debian's musl, the ``libc.musl`` symlink, ``etc/alpine-release`` and a
  few unrelated members), each with its ``.sha256`` written by ``sha256sum`` and its detached
  ``.asc`` signature by gpg;
* ``archive.ubuntu.com``: the three ``.debs`` of ``ubuntu-kernel:6.8.0-55.57``
  (Debian's 6.12 vmlinuz; the TDX modules recompressed ``.ko.xz`` -> ``.ko.zst``
  by ``zstd``), built by ``dpkg-deb -Zzstd``, listed by ``dpkg-scanpackages``
  in ``noble-updates``; ``noble`` lists an older kernel (6.8.0-31.31) and
  ``noble-security`` has only a ``Packages.gz`` (its ``.xz`` is a 404);
* ``ppa.launchpadcontent.net``: Canonical's TDX ``ovmf`` .deb with Debian's
  ``OVMF.fd`` and its ``noble`` index.

Every suite has a ``Release`` listing its indexes' SHA-256, signed by gpg as ``InRelease``
(clearsigned) and ``Release.gpg`` (detached), as the real archives are. The signing key is a
throwaway key made once per test session (:func:`signing_key`); builds trust it through
``TDX_RULES_KEYRING``, as a user adds a key of their own archive.

``upstream_tree`` (session) builds all of it once into a temporary directory;
``upstream_mirror`` (per test) starts :class:`tests.httpserver.HttpServer`
serving it under ``/mirror`` and yields :class:`Mirror`, whose ``url`` is the
``TDX_RULES_MIRROR`` value.
"""

import dataclasses
import datetime
import email.utils
import functools
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile

import pytest

from tests import debian
from tests.httpserver import HttpServer

ALPINE_HOST = "dl-cdn.alpinelinux.org"
UBUNTU_HOST = "archive.ubuntu.com"
PPA_HOST = "ppa.launchpadcontent.net"

ALPINE_VERSIONS = ("3.21.0", "3.20.3")
KERNEL = "6.8.0-55.57"         # the default of the rule (kernel_version 6.8.0-55, kernel_abi 57)
OLD_KERNEL = "6.8.0-31.31"     # what the release pocket (noble) lists
OVMF_VERSION = "2024.02-3+tdx1.0"

UBUNTU_ROOT = f"{UBUNTU_HOST}/ubuntu"
PPA_ROOT = f"{PPA_HOST}/kobuk-team/tdx-release/ubuntu"
KERNEL_POOL = "pool/main/l/linux"
OVMF_POOL = "pool/main/e/edk2"
MIRROR_PREFIX = "/mirror"

# Module files of the Debian kernel (relative to kernel/) that go into each package.
MODULES = ("fs/configfs/configfs", "drivers/virt/coco/tsm", "drivers/virt/coco/tdx-guest/tdx-guest",
           "net/vmw_vsock/vsock", "net/vmw_vsock/vmw_vsock_virtio_transport",
           "net/vmw_vsock/vmw_vsock_virtio_transport_common")
EXTRA_MODULES = ("drivers/virt/coco/sev-guest/sev-guest", "net/vmw_vsock/vsock_loopback",
                 "net/vmw_vsock/vsock_diag")


def alpine_tarball(version: str) -> str:
    """Path (host/path) of Alpine's minirootfs tarball for ``version``."""
    major = version.rsplit(".", 1)[0]
    return f"{ALPINE_HOST}/alpine/v{major}/releases/x86_64/alpine-minirootfs-{version}-x86_64.tar.gz"


def kernel_packages(version: str) -> list[tuple[str, str]]:
    """(package, host/path of its .deb) of the three packages of ``ubuntu-kernel:<version>``."""
    base = version.rsplit(".", 1)[0]
    release = f"{base}-generic"
    names = (f"linux-image-unsigned-{release}", f"linux-modules-{release}", f"linux-modules-extra-{release}")
    return [(name, f"{UBUNTU_ROOT}/{KERNEL_POOL}/{name}_{version}_amd64.deb") for name in names]


def packages_index(root: str, suite: str, suffix: str = ".xz") -> str:
    """Path (host/path) of a suite's Packages index below ``root`` (UBUNTU_ROOT or PPA_ROOT)."""
    return f"{root}/dists/{suite}/main/binary-amd64/Packages{suffix}"


OVMF_DEB = f"{PPA_ROOT}/{OVMF_POOL}/ovmf_{OVMF_VERSION}_all.deb"


def _run(args, **kw):
    return subprocess.run(args, check=True, capture_output=True, **kw)


@dataclasses.dataclass(frozen=True)
class SigningKey:
    home: str          # GNUPGHOME holding the secret key
    public: str        # the armored public key: the TDX_RULES_KEYRING value
    fingerprint: str

    def gpg(self, *args, data: bytes = None) -> bytes:
        return _run(["gpg", "--homedir", self.home, "--batch", "--yes", "--pinentry-mode", "loopback",
                     "--passphrase", "", *args], input=data).stdout


def make_key(name: str) -> SigningKey:
    """A new throwaway OpenPGP signing key (ed25519), made by gpg."""
    home = tempfile.mkdtemp(prefix="tdx-test-gpg-")
    os.chmod(home, 0o700)
    key = SigningKey(home, os.path.join(home, "public.asc"), "")
    key.gpg("--quick-generate-key", f"{name} <{name.replace(' ', '-').lower()}@example.org>", "ed25519", "sign",
            "never")
    with open(key.public, "wb") as handle:
        handle.write(key.gpg("--armor", "--export"))
    listing = key.gpg("--with-colons", "--list-keys").decode()
    fingerprint = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr")][0]
    return SigningKey(home, key.public, fingerprint)


@functools.lru_cache(maxsize=None)
def signing_key() -> SigningKey:
    """The test session's archive key: it signs every Release and .asc of the upstream tree."""
    return make_key("tdx-rules test archive")


def detached_signature(data: bytes, key: SigningKey = None) -> bytes:
    return (key or signing_key()).gpg("--armor", "--detach-sign", data=data)


def release_files(suite_dir_files: dict, suite: str, key: SigningKey = None, valid_until=None,
                  date=None) -> dict:
    """{name: bytes} of ``Release``, ``InRelease`` and ``Release.gpg`` for a suite whose index files
    are ``suite_dir_files`` ({path below the suite: bytes}), signed by ``key``."""
    date = date or datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    lines = ["Origin: tdx-rules test", "Label: tdx-rules test", f"Suite: {suite}", f"Codename: {suite}",
             f"Date: {email.utils.format_datetime(date, usegmt=True)}"]
    if valid_until is not None:
        lines.append(f"Valid-Until: {email.utils.format_datetime(valid_until, usegmt=True)}")
    lines += ["Architectures: amd64", "Components: main", "SHA256:"]
    lines += [f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {path}"
              for path, data in sorted(suite_dir_files.items())]
    release = ("\n".join(lines) + "\n").encode()
    key = key or signing_key()
    return {"Release": release, "InRelease": key.gpg("--clearsign", data=release),
            "Release.gpg": key.gpg("--armor", "--detach-sign", data=release)}


def _deb_member(deb: str, member: str) -> bytes:
    """Bytes of ``member`` of a .deb, read from ``dpkg-deb --fsys-tarfile``."""
    data = _run(["dpkg-deb", "--fsys-tarfile", deb]).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            if info.name.lstrip("./") == member.lstrip("/") and info.isfile():
                return tar.extractfile(info).read()
    raise RuntimeError(f"{deb} has no {member}")


def xz(data: bytes) -> bytes:
    """``data`` compressed by the real xz tool."""
    return _run(["xz", "-c", "-6"], input=data).stdout


def gz(data: bytes) -> bytes:
    """``data`` compressed by the real gzip tool (no name, no time stamp)."""
    return _run(["gzip", "-n", "-9", "-c"], input=data).stdout


def drop_stanza(index: bytes, package: str) -> bytes:
    """A plain Packages index without ``package``'s stanza."""
    stanzas = [s for s in index.decode().split("\n\n") if s.strip()]
    kept = [s for s in stanzas if f"Package: {package}\n" not in s + "\n"]
    assert len(kept) == len(stanzas) - 1, f"{package} is not listed exactly once"
    return ("\n\n".join(kept) + "\n\n").encode()


@dataclasses.dataclass
class UpstreamTree:
    """The built upstream files below ``root`` as ``<host>/<path>``."""

    root: str
    vmlinuz: bytes
    ovmf_fd: bytes
    plain_indexes: dict[str, bytes]  # host/path of Packages.xz -> its uncompressed text
    key: SigningKey = dataclasses.field(default_factory=signing_key)

    def files(self) -> list[str]:
        out = []
        for top, _, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(top, n), self.root) for n in names]
        return sorted(out)

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as handle:
            return handle.read()

    @staticmethod
    def url(rel: str) -> str:
        """The real upstream URL of ``rel``."""
        return "https://" + rel


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


# --- Alpine -------------------------------------------------------------------

def _build_alpine(root: str, version: str, busybox: bytes, musl: bytes) -> None:
    rel = alpine_tarball(version)
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    passwd = (b"root:x:0:0:root:/root:/bin/sh\nbin:x:1:1:bin:/bin:/sbin/nologin\n"
              b"nobody:x:65534:65534:nobody:/:/sbin/nologin\n")
    os_release = (f'NAME="Alpine Linux"\nID=alpine\nVERSION_ID={version}\n'
                  f'PRETTY_NAME="Alpine Linux v{version.rsplit(".", 1)[0]}"\n').encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gzfile, \
            tarfile.open(fileobj=gzfile, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind=tarfile.REGTYPE, mode=0o644, data=b"", linkname=""):
            info = tarfile.TarInfo("./" + name if name else ".")
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), linkname
            info.mtime, info.uname, info.gname = 1733000000, "root", "root"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("", tarfile.DIRTYPE, 0o755)
        for directory in ("bin", "dev", "etc", "etc/apk", "home", "lib", "media", "mnt", "opt", "proc", "root",
                          "run", "sbin", "srv", "sys", "tmp", "usr", "usr/bin", "usr/lib", "usr/sbin",
                          "usr/share", "var", "var/cache", "var/log"):
            add(directory + "/", tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755)
        add("bin/busybox", mode=0o755, data=busybox)
        for applet in ("sh", "ls", "cat", "mount"):  # real Alpine links applets with absolute symlinks
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox")
        add("etc/alpine-release", data=f"{version}\n".encode())
        add("etc/os-release", data=os_release)
        add("etc/passwd", data=passwd)
        add("etc/hostname", data=b"localhost\n")
        add("etc/apk/world", data=b"alpine-baselayout\nalpine-keys\napk-tools\nbusybox\nmusl-utils\n")
        add("lib/ld-musl-x86_64.so.1", mode=0o755, data=musl)
        add("lib/libc.musl-x86_64.so.1", tarfile.SYMTYPE, 0o777, linkname="ld-musl-x86_64.so.1")
        add("sbin/init", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox")
        add("usr/bin/env", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox")
    # Alpine's checksum file is sha256sum's own output: "<hex>  <file name>\n".
    line = _run(["sha256sum", os.path.basename(path)], cwd=os.path.dirname(path)).stdout
    _write(path + ".sha256", line)
    with open(path, "rb") as handle:
        _write(path + ".asc", detached_signature(handle.read()))


# --- Ubuntu kernel --------------------------------------------------------------

def _control(fields: list[tuple[str, str]]) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in fields).encode()


def _build_deb(work: str, name: str, control: list[tuple[str, str]], files: dict[str, tuple[bytes, int]],
               symlinks: dict[str, str], out: str) -> None:
    """``dpkg-deb --build -Zzstd`` of a tree with ``files`` {path: (bytes, mode)} and ``symlinks``."""
    stage = os.path.join(work, name)
    shutil.rmtree(stage, ignore_errors=True)
    for rel, (data, mode) in files.items():
        _write(os.path.join(stage, rel), data, mode)
    for rel, target in symlinks.items():
        os.makedirs(os.path.dirname(os.path.join(stage, rel)), exist_ok=True)
        os.symlink(target, os.path.join(stage, rel))
    size_kb = sum(len(d) for d, _ in files.values()) // 1024 + 1
    _write(os.path.join(stage, "DEBIAN", "control"), _control(control + [("Installed-Size", str(size_kb))]))
    for top, dirs, _ in os.walk(stage):
        for d in dirs:
            os.chmod(os.path.join(top, d), 0o755)
    os.chmod(stage, 0o755)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _run(["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", stage, out])
    shutil.rmtree(stage)


def _zstd_module(path_xz: str) -> bytes:
    """A Debian ``.ko.xz`` recompressed as Ubuntu ships modules: ``.ko.zst`` by the zstd tool."""
    plain = _run(["xz", "-dc", path_xz]).stdout
    return _run(["zstd", "-q", "-c", "-19"], input=plain).stdout


def _build_kernel(root: str, work: str, version: str, vmlinuz: bytes, modules: dict[str, bytes],
                  extra: dict[str, bytes], builtin: bytes, order: bytes, config: bytes) -> None:
    base, _ = version.rsplit(".", 1)
    release = f"{base}-generic"
    (image, image_deb), (mods, mods_deb), (extra_name, extra_deb) = kernel_packages(version)
    moddir = f"lib/modules/{release}"
    common = [("Source", "linux"), ("Version", version), ("Architecture", "amd64"),
              ("Maintainer", "Ubuntu Kernel Team <kernel-team@lists.ubuntu.com>")]
    _build_deb(work, image, [("Package", image)] + common + [
        ("Depends", f"{mods}"), ("Section", "kernel"), ("Priority", "optional"),
        ("Provides", "linux-image, fuse-module, kvm-api-4, virtualbox-guest-modules"),
        ("Description", (f"Linux kernel image for version {base} on 64 bit x86 SMP\n"
                         " This package contains the unsigned Linux kernel image for version 6.8.0."))],
        {f"boot/vmlinuz-{release}": (vmlinuz, 0o600)}, {}, os.path.join(root, image_deb))
    files = {f"{moddir}/kernel/{rel}.ko.zst": (data, 0o644) for rel, data in modules.items()}
    files.update({f"{moddir}/modules.builtin": (builtin, 0o644), f"{moddir}/modules.order": (order, 0o644),
                  f"boot/config-{release}": (config, 0o644)})
    _build_deb(work, mods, [("Package", mods)] + common + [
        ("Section", "kernel"), ("Priority", "optional"),
        ("Description", f"Linux kernel modules for version {base} on 64 bit x86 SMP")],
        files, {}, os.path.join(root, mods_deb))
    _build_deb(work, extra_name, [("Package", extra_name)] + common + [
        ("Depends", f"{image} | linux-image-{release}, {mods}"), ("Section", "kernel"), ("Priority", "optional"),
        ("Description", f"Linux kernel extra modules for version {base} on 64 bit x86 SMP")],
        {f"{moddir}/kernel/{rel}.ko.zst": (data, 0o644) for rel, data in extra.items()}, {},
        os.path.join(root, extra_deb))


def _scan(files: str, work: str, pool: str, debs) -> bytes:
    """The Packages stanzas dpkg-scanpackages writes for ``debs`` (host/paths below ``files``)."""
    scan_dir = tempfile.mkdtemp(prefix="scan-", dir=work)
    try:
        # Scan a directory holding only the wanted .debs, then point Filename back into the pool.
        for rel in debs:
            os.link(os.path.join(files, rel), os.path.join(scan_dir, os.path.basename(rel)))
        name = os.path.basename(scan_dir)
        out = _run(["dpkg-scanpackages", "--multiversion", name, "/dev/null"], cwd=work).stdout
    finally:
        shutil.rmtree(scan_dir)
    return out.replace(f"Filename: {name}/".encode(), f"Filename: {pool}/".encode())


def suite_files(index_root: str, suite: str, plain: bytes, suffixes=(".xz", ".gz"), **release_options) -> dict:
    """{host/path: bytes} of a suite's compressed Packages indexes and its signed Release files."""
    indexes = {f"main/binary-amd64/Packages{suffix}": xz(plain) if suffix == ".xz" else gz(plain)
               for suffix in suffixes}
    out = {f"{index_root}/dists/{suite}/{path}": data for path, data in indexes.items()}
    out.update({f"{index_root}/dists/{suite}/{name}": data
                for name, data in release_files(indexes, suite, **release_options).items()})
    return out


def _publish(root: str, index_root: str, suite: str, plain: bytes, suffixes=(".xz", ".gz")) -> None:
    for rel, data in suite_files(index_root, suite, plain, suffixes).items():
        _write(os.path.join(root, rel), data)


# --- the whole tree -------------------------------------------------------------

def build_tree(root: str) -> UpstreamTree:
    """Build every upstream file below ``root``; return the description of the tree."""
    work = os.path.join(root, ".work")
    files = os.path.join(root, "files")
    os.makedirs(work)
    busybox = _deb_member(debian.package("busybox-static"), "bin/busybox")
    musl = _deb_member(debian.package("musl"), "lib/x86_64-linux-musl/libc.so")
    for version in ALPINE_VERSIONS:
        _build_alpine(files, version, busybox, musl)

    tree = debian.kernel_tree()
    release = debian.kernel_release()
    moddir = os.path.join(tree, "lib", "modules", release)
    with open(os.path.join(tree, "boot", f"vmlinuz-{release}"), "rb") as handle:
        vmlinuz = handle.read()
    with open(os.path.join(tree, "boot", f"config-{release}"), "rb") as handle:
        config = handle.read()
    with open(os.path.join(moddir, "modules.builtin"), "rb") as handle:
        builtin = handle.read()
    with open(os.path.join(moddir, "modules.order"), "rb") as handle:
        order = handle.read()
    modules = {rel: _zstd_module(os.path.join(moddir, "kernel", rel + ".ko.xz")) for rel in MODULES}
    extra = {rel: _zstd_module(os.path.join(moddir, "kernel", rel + ".ko.xz")) for rel in EXTRA_MODULES}
    for version in (KERNEL, OLD_KERNEL):
        _build_kernel(files, work, version, vmlinuz, modules, extra, builtin, order, config)

    plain_indexes = {}
    for suite, version, suffixes in (("noble", OLD_KERNEL, (".xz", ".gz")),
                                     ("noble-updates", KERNEL, (".xz", ".gz")),
                                     ("noble-security", OLD_KERNEL, (".gz",))):
        debs = [rel for _, rel in kernel_packages(version)]
        if suite == "noble-security":
            debs = debs[:1]  # only one of them had a security upload
        plain = _scan(files, work, KERNEL_POOL, debs)
        plain_indexes[packages_index(UBUNTU_ROOT, suite)] = plain
        _publish(files, UBUNTU_ROOT, suite, plain, suffixes)

    ovmf_fd = _deb_member(debian.package("ovmf"), "usr/share/ovmf/OVMF.fd")
    _build_deb(work, "ovmf", [("Package", "ovmf"), ("Source", "edk2"), ("Version", OVMF_VERSION),
                              ("Architecture", "all"),
                              ("Maintainer", "Ubuntu Developers <ubuntu-devel-discuss@lists.ubuntu.com>"),
                              ("Section", "misc"), ("Priority", "optional"), ("Multi-Arch", "foreign"),
                              ("Description", ("UEFI firmware for 64-bit x86 virtual machines\n"
                                               " Open Virtual Machine Firmware, built with Intel TDX support."))],
               {"usr/share/ovmf/OVMF.fd": (ovmf_fd, 0o644),
                "usr/share/doc/ovmf/README.Debian": (b"OVMF for TDX guests.\n", 0o644)},
               {"usr/share/qemu/OVMF.fd": "../ovmf/OVMF.fd"}, os.path.join(files, OVMF_DEB))
    plain = _scan(files, work, OVMF_POOL, [OVMF_DEB])
    plain_indexes[packages_index(PPA_ROOT, "noble")] = plain
    _publish(files, PPA_ROOT, "noble", plain)
    shutil.rmtree(work)
    return UpstreamTree(root=files, vmlinuz=vmlinuz, ovmf_fd=ovmf_fd, plain_indexes=plain_indexes)


@pytest.fixture(scope="session")
def upstream_tree(tmp_path_factory) -> UpstreamTree:
    """The upstream files, built once per test session."""
    return build_tree(str(tmp_path_factory.mktemp("upstream")))


@dataclasses.dataclass
class Mirror:
    """A running server that mirrors the upstreams: ``url`` is the TDX_RULES_MIRROR value."""

    url: str
    server: HttpServer
    tree: UpstreamTree

    @staticmethod
    def path(rel: str) -> str:
        """The server path of ``rel`` (host/path), as the server counts requests."""
        return f"{MIRROR_PREFIX}/{rel}"

    def count(self, rel: str) -> int:
        return self.server.count(self.path(rel))

    def total(self) -> int:
        with self.server.lock:
            return sum(self.server.requests.values())

    def serve(self, rel: str, body: bytes, **options) -> None:
        """Serve ``body`` at ``rel`` instead (fault injection); options as for HttpServer.add."""
        self.server.add(self.path(rel), body, **options)

    def publish(self, index_root: str, suite: str, plain: bytes, suffixes=(".xz", ".gz"), **release_options) -> None:
        """Serve a suite's new Packages indexes with a newly signed Release (as an archive update does)."""
        for rel, data in suite_files(index_root, suite, plain, suffixes, **release_options).items():
            self.serve(rel, data)


@pytest.fixture
def upstream_mirror(upstream_tree):
    """A fresh loopback server serving the upstream tree under /mirror, stopped after the test."""
    with HttpServer() as server:
        for rel in upstream_tree.files():
            server.add(f"{MIRROR_PREFIX}/{rel}", upstream_tree.read(rel))
        yield Mirror(url=server.base + MIRROR_PREFIX, server=server, tree=upstream_tree)
