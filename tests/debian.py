"""Real Debian packages for the tests, fetched once with `apt-get download`.

Files land in ``~/.cache/tdx-rules-tests`` (or ``TDX_TEST_CACHE``), kept between runs and
checkouts, so a second test run needs no network at all.
"""

import fcntl
import glob
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("TDX_TEST_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tdx-rules-tests")

# The kernel with the TDX guest driver on Debian 12, and the package it depends on.
KERNEL_META = "linux-image-6.12-amd64"


def _locked(name):
    os.makedirs(CACHE, exist_ok=True)
    handle = open(os.path.join(CACHE, f".{name}.lock"), "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def package(name: str) -> str:
    """Path of the newest candidate .deb of ``name`` (downloaded on first use)."""
    with _locked("apt"):
        version = subprocess.run(["apt-cache", "policy", name], capture_output=True, text=True, check=True).stdout
        candidate = [line.split(":", 1)[1].strip() for line in version.splitlines() if "Candidate:" in line]
        if not candidate or candidate[0] == "(none)":
            raise RuntimeError(f"apt has no candidate for {name}: run apt-get update")
        pattern = os.path.join(CACHE, "debs", f"{name}_*.deb")
        # apt writes the epoch's colon as %3a in file names.
        quoted = candidate[0].replace(":", "%3a")
        for path in glob.glob(pattern):
            if f"_{quoted}_" in path:
                return path
        os.makedirs(os.path.join(CACHE, "debs"), exist_ok=True)
        subprocess.run(["apt-get", "download", "-q", f"{name}={candidate[0]}"], cwd=os.path.join(CACHE, "debs"),
                       check=True, capture_output=True)
        found = [p for p in glob.glob(pattern) if f"_{quoted}_" in p]
        if not found:
            raise RuntimeError(f"apt-get download {name} left no file")
        return found[0]


def kernel_package_name() -> str:
    """The versioned kernel package the 6.12 meta-package depends on."""
    out = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-6.12"):
            return line.split()[1]
    raise RuntimeError(f"cannot find the kernel package behind {KERNEL_META}")


def _unpacked(deb: str, target: str) -> str:
    with _locked("tree"):
        if not os.path.isdir(target):
            tmp = target + ".part"
            subprocess.run(["rm", "-rf", tmp], check=True)
            os.makedirs(tmp)
            subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
            os.rename(tmp, target)
    return target


def package_tree(name: str) -> str:
    """A directory with the candidate .deb of ``name`` unpacked by dpkg-deb (kept in the cache)."""
    deb = package(name)
    return _unpacked(deb, os.path.join(CACHE, "trees", os.path.basename(deb)[:-len(".deb")]))


def package_version(name: str) -> str:
    """The Version field of the candidate .deb of ``name``."""
    return subprocess.run(["dpkg-deb", "-f", package(name), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def kernel_tree() -> str:
    """A directory with the Debian 6.12 kernel unpacked by dpkg-deb (boot/vmlinuz-*, lib/modules/<release>)."""
    name = kernel_package_name()
    return _unpacked(package(name), os.path.join(CACHE, "trees", name))


def kernel_release() -> str:
    return os.listdir(os.path.join(kernel_tree(), "lib", "modules"))[0]


def archive_url() -> str:
    """The Debian archive the host's apt reads (the first ``URIs:`` or ``deb`` line naming /debian)."""
    candidates = sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"] + sorted(
        glob.glob("/etc/apt/sources.list.d/*.list"))
    for path in candidates:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if words[:1] == ["URIs:"]:
                urls = words[1:]
            elif words[:1] == ["deb"]:  # deb [options] URL suite components
                urls = [word for word in words[1:] if "://" in word][:1]
            else:
                urls = []
            for url in urls:
                if url.rstrip("/").endswith("/debian"):
                    return url.rstrip("/")
    raise RuntimeError("no Debian archive in the host's apt sources: cannot debootstrap unstable")


SID_PACKAGES = ("qemu-system-x86", "ovmf")


def sid_tree() -> str:
    """A Debian unstable tree (``debootstrap --variant=minbase sid``) with QEMU and OVMF, made once
    (about a minute and 450 MB here) and kept in the cache: upstream QEMU with TDX (11.x in 2026)
    and Debian's 2026 firmware packages, which Debian 12 does not have."""
    target = os.path.join(CACHE, "sid-qemu")
    with _locked("sid"):
        if not os.path.isfile(os.path.join(target, ".complete")):
            subprocess.run(["rm", "-rf", target + ".part", target], check=True)
            done = subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(SID_PACKAGES), "sid",
                                   target + ".part", archive_url()], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"debootstrap sid failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
            open(os.path.join(target + ".part", ".complete"), "w").close()
            os.rename(target + ".part", target)
    return target


def sid_qemu() -> str:
    """A command that runs the unstable tree's qemu-system-x86_64 on this host, with the tree's own
    loader, libraries, modules and data files (no chroot: it sees the host's files and /dev/kvm)."""
    tree = sid_tree()
    wrapper = os.path.join(tree, "qemu-system-x86_64-here")
    if not os.path.exists(wrapper):
        with open(wrapper + ".part", "w") as handle:
            handle.write("#!/bin/sh\n"
                         f"QEMU_MODULE_DIR='{tree}/usr/lib/x86_64-linux-gnu/qemu' exec '{tree}/usr/lib64/ld-linux-x86-64.so.2' "
                         f"--library-path '{tree}/usr/lib/x86_64-linux-gnu' '{tree}/usr/bin/qemu-system-x86_64' "
                         f"-L '{tree}/usr/share/qemu' \"$@\"\n")
        os.chmod(wrapper + ".part", 0o755)
        os.rename(wrapper + ".part", wrapper)
    return wrapper


def sid_deb(name: str) -> str:
    """The .deb of ``name`` that debootstrap installed into the unstable tree."""
    found = glob.glob(os.path.join(sid_tree(), "var", "cache", "apt", "archives", f"{name}_*.deb"))
    if len(found) != 1:
        raise RuntimeError(f"the unstable tree holds {len(found)} packages named {name}")
    return found[0]
