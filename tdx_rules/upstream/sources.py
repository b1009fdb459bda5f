"""Source specs: one string format for every input the rules download or read.

``file:PATH``, ``apt:PACKAGE[=VERSION]``, ``https://…#sha256=HEX``, and the
named upstreams ``alpine:3.21.0``, ``ubuntu-kernel:6.8.0-55.57``,
``canonical-ovmf:2024.02-3+tdx1.0`` that expand to the upstream addresses the
reference builder uses. ``debian`` (minirootfs only) composes a minirootfs
from Debian's busybox-static and musl.

:func:`parse` is pure and runs when the SConstruct is read (so a bad spec
fails before anything builds); :func:`materialize` runs inside a stage and
returns verified local files.
"""

import dataclasses
import os
import re
import subprocess
from typing import List, Optional

from ..errors import NotFound, TdxError

ALPINE_URL = "https://dl-cdn.alpinelinux.org/alpine/v{major}/releases/x86_64/alpine-minirootfs-{version}-x86_64.tar.gz"
UBUNTU_ARCHIVE = "https://archive.ubuntu.com/ubuntu"
UBUNTU_KERNEL_SUITES = ("noble", "noble-updates", "noble-security")
UBUNTU_KERNEL_PACKAGES = ("linux-image-unsigned-{release}", "linux-modules-{release}", "linux-modules-extra-{release}")
CANONICAL_OVMF_PPA = "https://ppa.launchpadcontent.net/kobuk-team/tdx-release/ubuntu"
CANONICAL_OVMF_SUITE = "noble"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSIONISH = re.compile(r"^[0-9A-Za-z.+~:-]+$")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A parsed spec. ``kind`` is one of file, apt, url, alpine, ubuntu-kernel, canonical-ovmf, debian."""

    kind: str
    text: str
    path: Optional[str] = None
    package: Optional[str] = None
    version: Optional[str] = None
    url: Optional[str] = None
    sha256: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A verified local file and where it came from (for the manifest and the lock file)."""

    spec: str
    path: str
    sha256: str
    origin: str
    url: Optional[str] = None        # where it was downloaded from
    package: Optional[str] = None    # apt: the package and the version resolved
    version: Optional[str] = None
    snapshot: Optional[dict] = None  # {"archive", "path"}: where a snapshot archive keeps it

    def record(self) -> dict:
        """How it appears in the manifest and the lock: no local paths, only names and hashes."""
        out = {"spec": self.spec, "file": os.path.basename(self.path), "sha256": self.sha256,
               "origin": self.origin, "size": os.path.getsize(self.path)}
        out.update({key: value for key, value in (("url", self.url), ("package", self.package),
                                                  ("version", self.version), ("snapshot", self.snapshot))
                    if value is not None})
        return out


def parse(text: str, what: str = "source") -> Spec:
    """Parse a spec string; a bare path counts as ``file:``. Errors name ``what``."""
    if not isinstance(text, str) or not text.strip():
        raise TdxError(f"{what}: empty source spec")
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if text == "debian":
        return Spec("debian", text)
    if kind == "file" and sep:
        if not rest:
            raise TdxError(f"{what}: 'file:' needs a path")
        return Spec("file", text, path=rest)
    if kind == "apt" and sep:
        package, _, version = rest.partition("=")
        if not _APT_NAME.match(package) or (version and not _VERSIONISH.match(version)):
            raise TdxError(f"{what}: {text!r} is not apt:PACKAGE[=VERSION]")
        return Spec("apt", text, package=package, version=version or None)
    if kind in ("https", "http") and sep:
        url, _, fragment = text.partition("#")
        sha = fragment[len("sha256="):].lower() if fragment.startswith("sha256=") else ""
        if not _SHA256.match(sha):
            raise TdxError(f"{what}: {text!r} has no checksum; append #sha256=<64 hex digits> so the download can be verified")
        return Spec("url", text, url=url, sha256=sha)
    if kind == "alpine" and sep:
        if not re.match(r"^\d+\.\d+\.\d+$", rest):
            raise TdxError(f"{what}: {text!r} is not alpine:MAJOR.MINOR.PATCH (e.g. alpine:3.21.0)")
        major = rest.rsplit(".", 1)[0]
        return Spec("alpine", text, version=rest, url=ALPINE_URL.format(major=major, version=rest))
    if kind == "ubuntu-kernel" and sep:
        if not re.match(r"^\d+\.\d+\.\d+-\d+\.\d+$", rest):
            raise TdxError(f"{what}: {text!r} is not ubuntu-kernel:VERSION-ABI.UPLOAD (e.g. ubuntu-kernel:6.8.0-55.57)")
        return Spec("ubuntu-kernel", text, version=rest)
    if kind == "canonical-ovmf" and sep:
        if not _VERSIONISH.match(rest):
            raise TdxError(f"{what}: {text!r} is not canonical-ovmf:VERSION")
        return Spec("canonical-ovmf", text, version=rest)
    if "://" in text or (sep and kind.isalpha() and len(kind) > 1 and not os.path.exists(text)):
        raise TdxError(f"{what}: unknown source spec {text!r}; use file:, apt:, https://…#sha256=, alpine:, "
                       "ubuntu-kernel:, canonical-ovmf: or debian")
    return Spec("file", "file:" + text, path=text)


def alpine_spec(version: str, minor: str) -> str:
    return f"alpine:{version}.{minor}"


def ubuntu_kernel_spec(version: str, abi: str) -> str:
    return f"ubuntu-kernel:{version}.{abi}"


def canonical_ovmf_spec(version: str) -> str:
    return f"canonical-ovmf:{version}"


def ubuntu_kernel_debs(version: str):
    """(package, version, url) of the three .debs of ``ubuntu-kernel:<version>``."""
    base, upload = version.rsplit(".", 1)
    release = f"{base}-generic"
    full = f"{base}.{upload}"
    return [(name.format(release=release), full,
             f"{UBUNTU_ARCHIVE}/pool/main/l/linux/{name.format(release=release)}_{full}_amd64.deb")
            for name in UBUNTU_KERNEL_PACKAGES]


def canonical_ovmf_deb(version: str):
    return ("ovmf", version, f"{CANONICAL_OVMF_PPA}/pool/main/e/edk2/ovmf_{version}_all.deb")


def apt_candidate(package: str) -> Optional[str]:
    """The version apt would install (from the host's package lists; no network), or None."""
    try:
        out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    return None


@dataclasses.dataclass
class Context:
    """Where a stage puts downloads: the shared cache, an optional mirror, a log function, and the
    extra trusted keys (a ``TDX_RULES_KEYRING`` value: public key files, colon-separated)."""

    cache: str
    mirror: Optional[str] = None
    log: object = print
    keyring: Optional[str] = None
    locked: Optional[dict] = None    # the lock file's entry of the stage's spec: {"locked", "files"}
    snapshot: Optional[str] = None   # a TDX_SNAPSHOT value (snapshot archive bases)
    refresh: bool = False            # fetch cached indexes and checksum files again (writing a lock)
    remote: object = None            # a remote cache (upstream.remote.Remote) shared by a CI fleet

    def trust(self, kind: str):
        from .signatures import trust_for

        return trust_for(kind, self.keyring)


def _verified_text(ctx: Context, urls, check):
    """``check(*raw texts)`` of small files fetched by URL; a cached copy that fails the check is
    fetched once more, and a fresh one that fails is dropped from the cache (NotFound propagates)."""
    from . import fetch

    for refresh in (False, True):
        texts = [fetch.fetch_text(url, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, refresh=refresh)
                 for url in urls]
        try:
            return check(*texts)
        except TdxError:
            if refresh:
                for url in urls:
                    fetch.forget_text(url, cache=ctx.cache)
                raise


def _signed_release(ctx: Context, base: str, suite: str, kind: str, what: str, refresh: bool = False):
    """The suite's Release, from ``InRelease`` or from ``Release`` + ``Release.gpg``, its signature
    checked against the keys trusted for ``kind`` and its Valid-Until honoured."""
    from . import fetch
    from .release import check_current, parse_release

    trust = ctx.trust(kind)
    inrelease = f"{base}/dists/{suite}/InRelease"

    def from_inrelease(raw):
        release = parse_release(trust.verify(f"{what}: {inrelease}", raw).content, inrelease)
        check_current(release, f"{what}: {inrelease}")
        return release

    def from_release(raw, signature):
        trust.verify(f"{what}: {base}/dists/{suite}/Release", raw, signature)
        release = parse_release(raw, f"{base}/dists/{suite}/Release")
        check_current(release, f"{what}: {base}/dists/{suite}/Release")
        return release

    if refresh:
        for url in (inrelease, f"{base}/dists/{suite}/Release", f"{base}/dists/{suite}/Release.gpg"):
            fetch.forget_text(url, cache=ctx.cache)
    try:
        return _verified_text(ctx, [inrelease], from_inrelease)
    except NotFound:
        pass
    return _verified_text(ctx, [f"{base}/dists/{suite}/Release", f"{base}/dists/{suite}/Release.gpg"], from_release)


def _index_sha256(ctx: Context, base: str, suites, package: str, version: str, what: str, kind: str) -> str:
    """SHA-256 of package=version from the suites' Packages indexes, as apt finds it: each suite's
    Release signed by a key trusted for ``kind``, each index fetched by the SHA-256 the signed
    Release gives it.

    Cached Release files are used first (offline builds work from a filled cache); when no suite
    lists the package, the Release files are fetched once more, because suites change upstream.
    Only a missing index (404) is skipped; any other failure stops with its own message.
    """
    from . import fetch

    for refresh in ((True,) if ctx.refresh else (False, True)):
        for suite in suites:
            release = _signed_release(ctx, base, suite, kind, what, refresh)
            listed = [name for name in ("Packages.xz", "Packages.gz")
                      if f"main/binary-amd64/{name}" in release.sha256]
            if not listed:
                continue
            for index_name in listed:
                sha, _ = release.sha256[f"main/binary-amd64/{index_name}"]
                url = f"{base}/dists/{suite}/main/binary-amd64/{index_name}"
                try:
                    path = fetch.fetch(url, sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote)
                except NotFound:
                    continue
                with open(path, "rb") as handle:
                    found = fetch.packages_index_sha256(handle.read(), index_name, package, version)
                if found:
                    return found
                break  # this suite's index was read and does not list the package
    raise TdxError(f"{what}: {package} {version} is not listed in the signed Packages indexes of {base} "
                   f"({', '.join(suites)}), so its checksum cannot be verified; pin it as https://…#sha256=HEX")


def _alpine(spec: Spec, ctx: Context) -> "Resolved":
    """The minirootfs: its detached ``.asc`` signature by Alpine's release key (checked on the
    downloaded bytes before they enter the cache, and again on a cached file), then the SHA-256 of
    Alpine's ``.sha256`` file. Stale cached ``.sha256``/``.asc`` files are fetched again once."""
    from . import fetch

    filename = spec.url.rsplit("/", 1)[1]
    trust = ctx.trust("alpine")

    def signed(signature):
        def check(path):
            with open(path, "rb") as handle:
                trust.verify(f"minirootfs {filename}", handle.read(), signature)
        return check

    for refresh in ((True,) if ctx.refresh else (False, True)):
        text = fetch.fetch_text(spec.url + ".sha256", cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, refresh=refresh)
        try:
            signature = fetch.fetch_text(spec.url + ".asc", cache=ctx.cache, mirror=ctx.mirror, log=ctx.log,
                                         refresh=refresh)
        except NotFound:
            raise TdxError(f"minirootfs {filename}: its signature {filename}.asc is missing upstream, so the "
                           "tarball cannot be verified; use a release that Alpine signed") from None
        try:
            sha = fetch.alpine_sha256(text.decode("utf-8", "replace"), filename)
            path = fetch.fetch(spec.url, sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote,
                               verify=signed(signature))
        except TdxError:  # a stale .sha256 or .asc in the cache is fetched again once
            if refresh:
                fetch.forget_text(spec.url + ".sha256", cache=ctx.cache)
                fetch.forget_text(spec.url + ".asc", cache=ctx.cache)
                raise
            continue
        return Resolved(spec.text, path, sha, spec.url, url=spec.url)


def apt_origin(package: str, version: str):
    """(archive name, pool path) of package=version as the host's apt knows it, for the lock's
    snapshot fallback; None when apt does not say."""
    try:
        show = subprocess.run(["apt-cache", "show", f"{package}={version}"], capture_output=True, text=True).stdout
        policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    except OSError:
        return None
    filename = next((line.split(":", 1)[1].strip() for line in show.splitlines() if line.startswith("Filename:")), None)
    lines, archive = policy.splitlines(), None
    for index, line in enumerate(lines):
        if line.strip().lstrip("*").split()[:1] == [version]:
            for source in lines[index + 1:]:
                words = source.split()
                if len(words) >= 2 and re.match(r"^[a-z+]+:", words[1]):  # "500 http://host/debian suite/..."
                    archive = words[1].rstrip("/").rsplit("/", 1)[-1]
                    break
                if len(words) >= 2 and not words[0].isdigit():
                    break
            break
    return (archive, filename) if archive and filename else None


def _locked(spec: Spec, ctx: Context, what: str) -> List[Resolved]:
    """The lock's files of ``spec``: each verified by its SHA-256, from where it was found, else from
    the snapshot archive of its distribution; no index is fetched."""
    from ..fsutil import sha256_file
    from . import fetch
    from .lock import snapshot_bases

    files = [f for f in ctx.locked["files"] if f.get("spec") == spec.text]
    if not files:
        raise TdxError(f"{what}: {spec.text} resolved to something tdx.lock does not hold; run scons --tdx-lock "
                       "to refresh the lock")
    out = []
    for item in files:
        sha, path = item["sha256"], None
        if item.get("url"):  # a named upstream or a URL: from where it was found
            try:
                path = fetch.fetch(item["url"], sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote,
                                   name=item.get("file"))
            except NotFound:
                path = None
        elif item.get("package"):  # apt: the host's apt, at the locked version
            try:
                path = fetch.apt_download(item["package"], item["version"], cache=ctx.cache, log=ctx.log)
            except TdxError:
                path = None  # the host's apt no longer offers it: the snapshot archive below
            if path is not None and sha256_file(path) != sha:
                raise TdxError(f"{what}: apt:{item['package']}={item['version']} is not the file tdx.lock pins "
                               f"({sha}); the archive rebuilt it: run scons --tdx-lock to lock the new one")
        if path is None:
            snapshot = item.get("snapshot")
            if not snapshot:
                raise TdxError(f"{what}: {item.get('file')} of {spec.text} (locked) is no longer offered and has "
                               "no snapshot archive; pin another version and run scons --tdx-lock")
            bases = snapshot_bases(ctx.snapshot)
            base = bases.get(snapshot.get("archive"))
            if base is None:
                raise TdxError(f"{what}: no snapshot archive is known for {snapshot.get('archive')!r}; "
                               "name one in TDX_SNAPSHOT (NAME=URL)")
            url = f"{base}/{ctx.locked['locked']}/{snapshot['path'].lstrip('./')}"
            path = fetch.fetch(url, sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote, name=item.get("file"))
        out.append(Resolved(spec.text, path, sha, item.get("url") or "apt", url=item.get("url"),
                            package=item.get("package"), version=item.get("version"), snapshot=item.get("snapshot")))
    return out


def materialize(spec: Spec, ctx: Context, what: str = "source") -> List[Resolved]:
    """Fetch and verify the files of ``spec``; return them in a fixed order. With a lock
    (``ctx.locked``), exactly the locked files."""
    from ..fsutil import sha256_file
    from . import fetch

    if spec.kind == "file":
        if not os.path.isfile(spec.path):
            raise TdxError(f"{what}: {spec.path} does not exist or is not a file; fix the path in {spec.text!r}")
        return [Resolved(spec.text, spec.path, sha256_file(spec.path), "file")]
    if ctx.locked is not None:
        return _locked(spec, ctx, what)
    if spec.kind == "apt":
        # Pin the candidate version first: a cached .deb of it is then used without network.
        version = spec.version or apt_candidate(spec.package)
        path = fetch.apt_download(spec.package, version, cache=ctx.cache, log=ctx.log)
        origin = apt_origin(spec.package, version) if version else None
        return [Resolved(spec.text, path, sha256_file(path), "apt", package=spec.package,
                         version=version or _deb_version(path),
                         snapshot={"archive": origin[0], "path": origin[1]} if origin else None)]
    if spec.kind == "url":
        path = fetch.fetch(spec.url, spec.sha256, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote)
        return [Resolved(spec.text, path, spec.sha256, spec.url, url=spec.url)]
    if spec.kind == "alpine":
        return [_alpine(spec, ctx)]
    if spec.kind == "ubuntu-kernel":
        out = []
        for package, version, url in ubuntu_kernel_debs(spec.version):
            sha = _index_sha256(ctx, UBUNTU_ARCHIVE, UBUNTU_KERNEL_SUITES, package, version, what, "ubuntu-kernel")
            path = fetch.fetch(url, sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote)
            out.append(Resolved(spec.text, path, sha, url, url=url, package=package, version=version,
                                snapshot={"archive": "ubuntu", "path": url[len(UBUNTU_ARCHIVE) + 1:]}))
        return out
    if spec.kind == "canonical-ovmf":
        package, version, url = canonical_ovmf_deb(spec.version)
        sha = _index_sha256(ctx, CANONICAL_OVMF_PPA, (CANONICAL_OVMF_SUITE,), package, version, what,
                            "canonical-ovmf")
        path = fetch.fetch(url, sha, cache=ctx.cache, mirror=ctx.mirror, log=ctx.log, remote=ctx.remote)
        return [Resolved(spec.text, path, sha, url, url=url, package=package, version=version)]
    raise TdxError(f"{what}: a {spec.kind!r} spec cannot be used here")


def _deb_version(path: str) -> Optional[str]:
    from .debpkg import DebPackage

    return DebPackage(path).control.get("Version")
