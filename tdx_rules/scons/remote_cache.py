"""A remote cache above SCons's local CacheDir, shared by a CI fleet over plain HTTP.

SCons asks the CacheDir class of a target's environment (``CACHEDIR_CLASS``) to retrieve
each target before building it and to push it after. :class:`RemoteCacheDir` does what SCons's
own class does with the local directory (when ``CacheDir(path)`` is set), and adds the server
of ``TDX_REMOTE_CACHE`` (from ``$TDX_RULES_REMOTE_CACHE`` or ``env.TdxRemoteCache(url)``):

* a local miss asks the server for the entry of the target's SCons cache key (the same key the
  local CacheDir files it under, which covers the command, its inputs' contents and the stage
  code); a verified entry becomes the target and enters the local CacheDir too;
* a built target is uploaded when ``TDX_REMOTE_CACHE_PUSH`` is on (off by default: a writer
  can poison the cache for every reader, so only trusted builds should push);
* fetching stages get the server on their command line (outside the signature) and share
  the download cache through it, by SHA-256 (:mod:`tdx_rules.upstream.fetch`).

Faults of the server never fail a build: the first one prints one warning line and the rest of
the build runs without the server (later stages do not get it either). A damaged entry is
discarded with a line naming it, and the target is built (and replaced on the server when
pushing). A stage retrieved from the server prints ``[tdx] <stage> <name> (remote)``; at the
end of a build with a remote cache one ``[tdx] cache:`` line counts the stages taken from the
local cache, from the server, and built. The credential (``TDX_RULES_REMOTE_CACHE_AUTH``) is
read from the environment when a request is made and reaches a stage only through its process
environment: it enters no construction variable, command line, signature or file.
"""

import atexit
import os
import stat
import sys
import threading

import SCons.Action
import SCons.CacheDir
import SCons.Errors

from ..errors import TdxError
from ..upstream import remote as client

URL = "TDX_REMOTE_CACHE"
PUSH = "TDX_REMOTE_CACHE_PUSH"


class _State:
    """What one scons run has seen: counts, the fault (if any), the servers it talks to."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"local": 0, "remote": 0, "built": 0}
        self.used = False
        self.fault = None
        self.remotes = {}
        self.present = set()     # keys the server is known to hold (retrieved in this run)
        self.retrieved = {}      # id(executor) -> where its targets came from so far


_STATE = _State()


def _warn(message: str) -> None:
    sys.stdout.flush()
    print(f"tdx-rules: warning: {message}", file=sys.stderr, flush=True)


def fault(message: str) -> None:
    """The server failed (here or in a stage): one warning per build, then no more requests."""
    with _STATE.lock:
        first = _STATE.fault is None
        if first:
            _STATE.fault = message
        for remote in _STATE.remotes.values():
            remote.failed = remote.failed or message
    if first:
        _warn(f"remote cache: {message}; building locally without it for the rest of this build")


def settings(env):
    """(base URL, push) of ``env``'s remote cache, or None; UserError for a bad value."""
    url = env.get(URL) or ""
    if not url:
        return None
    try:
        return (client.parse_url(url, f"{URL} (${client.URL_VARIABLE})"),
                client.parse_flag(env.get(PUSH, ""), f"{PUSH} (${client.PUSH_VARIABLE})"))
    except TdxError as error:
        raise SCons.Errors.UserError(str(error)) from None


def _remote(env):
    """The client for ``env``'s server, or None (none configured, or the run already faulted)."""
    if not SCons.Action.execute_actions or not SCons.CacheDir.cache_enabled:
        return None
    found = settings(env)
    if found is None:
        return None
    with _STATE.lock:
        if found not in _STATE.remotes:
            _STATE.remotes[found] = client.Remote(found[0], push=found[1],
                                                  credential=client.credential_from_environment())
            _STATE.remotes[found].failed = _STATE.fault
        if not _STATE.used:
            _STATE.used = True
            atexit.register(_summary)
        remote = _STATE.remotes[found]
    return None if remote.failed else remote


def stage_arguments(target, source, env, for_signature):
    """``--remote-cache URL [--remote-cache-push]`` for a fetching stage's command (inside
    ``$( $)``: not part of its signature); nothing once the server has failed."""
    remote = _remote(env)
    if remote is None:
        return ""
    return ["--remote-cache", remote.url] + (["--remote-cache-push"] if remote.push else [])


def stage_environment(command_args, environ: dict) -> dict:
    """The process environment of a stage command: the credential joins it only when the
    command talks to the server."""
    credential = client.credential_from_environment()
    if credential and any(str(arg) == "--remote-cache" for arg in command_args):
        return dict(environ, **{client.AUTH_VARIABLE: credential})
    return environ


def note_build(targets) -> None:
    """A stage ran (counted for the summary)."""
    with _STATE.lock:
        _STATE.counts["built"] += 1


def _stage_line(node):
    return getattr(node.attributes, "tdx_stage_line", None)


def _retrieved(node, where: str) -> None:
    """Count a retrieved target; print the stage's line once its last target is in place."""
    targets = node.get_executor().get_all_targets()
    line = _stage_line(targets[0])
    with _STATE.lock:
        sources = _STATE.retrieved.setdefault(id(node.get_executor()), set())
        sources.add(where)
        last = node is targets[-1]
        if last:
            del _STATE.retrieved[id(node.get_executor())]
            if line is not None:
                _STATE.counts["remote" if "remote" in sources else "local"] += 1
    if where == "remote" and line is None and not getattr(node.attributes, "tdx_quiet", False):
        print(f"Retrieved `{node}' from remote cache", flush=True)
    elif last and line is not None and "remote" in sources:
        print(f"{line} (remote)", flush=True)


def _summary() -> None:
    counts = _STATE.counts
    if not any(counts.values()):
        return
    print(f"[tdx] cache: {counts['local']} local, {counts['remote']} remote, {counts['built']} built",
          flush=True)


class RemoteCacheDir(SCons.CacheDir.CacheDir):
    """SCons's CacheDir with a remote layer above it (the class ``env['CACHEDIR_CLASS']`` names).

    Without a remote cache in the target's environment it is SCons's CacheDir unchanged; a
    ``path`` of None (no ``CacheDir()`` call) means a remote layer only.
    """

    def retrieve(self, node) -> bool:
        if super().retrieve(node):
            _retrieved(node, "local")
            return True
        env = node.get_build_env()
        remote = _remote(env)
        if remote is None or node.islink():
            return False
        key = node.get_cachedir_bsig()
        path = node.get_internal_path()
        try:
            mode = remote.get_entry(key, path)
        except client.RemoteFault as error:
            fault(str(error))
            return False
        except client.DamagedEntry as damage:
            _warn(f"remote cache: the entry {remote.url}{client.entry_path(key)} of {node} is damaged ({damage}); "
                  "building it instead" + (" and replacing the entry" if remote.push else ""))
            return False
        except OSError as error:
            _warn(f"remote cache: cannot write {path} ({error.strerror or error}); building it instead")
            return False
        if mode is None:
            return False
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IWRITE)
        with _STATE.lock:
            _STATE.present.add(key)
        if self.is_enabled() and not self.is_readonly():
            super().push(node)  # the local CacheDir keeps it too
        _retrieved(node, "remote")
        return True

    def push(self, node):
        result = super().push(node)
        self._upload(node)
        return result

    def push_if_forced(self, node):
        if SCons.CacheDir.cache_force:
            super().push(node)
            self._upload(node)

    def _upload(self, node) -> None:
        if self.is_readonly():
            return
        remote = _remote(node.get_build_env())
        if remote is None or not remote.push or node.islink():
            return
        key = node.get_cachedir_bsig()
        with _STATE.lock:
            if key in _STATE.present:
                return
        path = node.get_internal_path()
        try:
            remote.put_entry(key, path, stat.S_IMODE(os.stat(path).st_mode))
        except client.RemoteFault as error:
            fault(str(error))
            return
        except OSError:
            return
        with _STATE.lock:
            _STATE.present.add(key)
