"""SCons glue: ``TdxStaticProgram``, ``TdxProgram``, the ``TdxImage`` rule, aliases and progress lines.

Every stage runs as a command action ``python -m tdx_rules.stages.X`` whose
signature is its command line (without the interpreter path), its config
file, its input files and the source files of its own code. Options reach a
stage only through its config file, which holds exactly the settings that
stage reads (see :mod:`tdx_rules.settings`), so a changed option reruns
exactly the stages that read it. Nothing is read from ``os.environ`` inside
a stage: this module reads the environment when the SConstruct is read.
"""

import functools
import hashlib
import json
import os
import re
import subprocess
import sys

import SCons.Action
import SCons.Builder
import SCons.Errors
import SCons.Scanner
import SCons.Script

from .. import settings as settings_table
from ..errors import ERROR_PREFIX, TdxError
from ..upstream import sources
from ..upstream.remote import FAULT_PREFIX
from . import remote_cache, statcache
from .stage_code import COMMON as _COMMON
from .stage_code import PACKAGE_DIR, STAGE_CODE

_TRUE = ("1", "true", "yes", "on")
AGENT_PATH = "/sbin/vm-agent"
# cargo and rustup are found through the user's PATH and home (~/.cargo, ~/.rustup).
_RUST_ENV = ("PATH", "HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN")
# go is found through PATH (and GOROOT when set); the stage sets every other Go variable itself.
_GO_ENV = ("PATH", "GOROOT", "TMPDIR")
ROOTFS_DEVICE = "/dev/vda"
# ext4 needs a crc32c implementation (a soft dependency, by alias, that modinfo does not resolve).
ROOTFS_MODULES = ("virtio_blk", "crc32c_generic", "ext4")
# A dm-verity root filesystem: the hash tree on a second virtio disk, device-mapper, overlayfs
# for a writable layer on top.
VERITY_HASH_DEVICE = "/dev/vdb"
VERITY_MODULES = ("dm_mod", "dm_verity", "overlay")
# An image with an SSH server needs the network: the virtio NIC's driver, loaded when the kernel
# has it (a kernel without it is warned about, as the TDX modules are).
NETWORK_MODULES = ("virtio_net",)
SSH_PORT = 22  # where the server listens when ssh_forward is off


class _StageAction(SCons.Action.CommandAction):
    """A command action that lifts the stage's ``tdx-rules: error:`` line into the build error.

    SCons then prints ``scons: *** [target] <message>`` instead of ``Error 1``.
    """

    def execute(self, target, source, env, executor=None):
        messages = []

        def spawn(shell, escape, cmd, args, ENV):
            proc = subprocess.Popen([shell, "-c", " ".join(args)], env=remote_cache.stage_environment(args, ENV),
                                    stderr=subprocess.PIPE)
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace")
                if line.startswith(ERROR_PREFIX):
                    messages.append(line[len(ERROR_PREFIX):].strip())
                elif line.startswith(FAULT_PREFIX):  # the server of the remote cache failed in the stage
                    remote_cache.fault(line[len(FAULT_PREFIX):].strip())
                else:
                    sys.stderr.write(line)
            return proc.wait()

        if SCons.Action.execute_actions:
            remote_cache.note_build(target)
        result = super().execute(target, source, env.Override({"SPAWN": spawn}), executor)
        if isinstance(result, SCons.Errors.BuildError) and messages:
            result.errstr = messages[-1]
        return result


def _verbose(env) -> bool:
    value = SCons.Script.ARGUMENTS.get("VERBOSE", os.environ.get("VERBOSE", env.get("TDX_VERBOSE", "")))
    return str(value).lower() in _TRUE


def _stage(env, stage: str, label: str, targets, sources_, command: str, inherit=(), scanner=None):
    """Declare one stage: a command action, its code as dependencies, its progress line.

    ``inherit``: variables of the user's environment the command needs (a toolchain found
    through PATH and HOME, as cargo is); they do not enter the build signature.
    ``scanner``: a source scanner that finds further dependencies once the sources exist.
    """
    # cmdstr=None would silence the action: leave it out to print the command.
    action = _StageAction(command, **({} if _verbose(env) else {"cmdstr": f"[tdx] {stage} {label}"}))
    stage_env = dict(env["ENV"], PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(PACKAGE_DIR), env["ENV"].get("PYTHONPATH")) if p))
    stage_env.update({name: os.environ[name] for name in inherit if name in os.environ})
    nodes = env.Command(targets, sources_, action, ENV=stage_env, IMPLICIT_COMMAND_DEPENDENCIES=0,
                        **({"source_scanner": scanner} if scanner is not None else {}))
    for node in nodes:  # what the remote cache prints when it supplies the stage
        node.attributes.tdx_stage_line = f"[tdx] {stage} {label}"
    code = [os.path.join(PACKAGE_DIR, name) for name in _COMMON + STAGE_CODE[stage]]
    env.Depends(nodes, [env.File(path) for path in code])
    values = [node.attributes.tdx_config_value for node in env.Flatten([sources_])
              if hasattr(getattr(node, "attributes", None), "tdx_config_value")]
    if values:
        env.Depends(nodes, values)
    return nodes


def _tree_inputs(env, directory: str) -> list:
    """Dependencies standing for a directory tree: its regular files by content, and one
    Value with every entry's type, mode, owner, link target and device number.

    Unlike SCons's DirScanner this never opens a FIFO or device (which would hang or
    read the host's device) and never follows a symlink out of the tree.
    """
    import stat as stat_module

    files, meta = [], []
    for top, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(dirs) + sorted(names):
            full = os.path.join(top, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            link = os.readlink(full) if stat_module.S_ISLNK(st.st_mode) else ""
            meta.append([os.path.relpath(full, directory), st.st_mode, st.st_uid, st.st_gid, st.st_rdev, link])
            if stat_module.S_ISREG(st.st_mode):
                files.append(env.File(full))
    return files + [env.Value(json.dumps(meta))]


def _python(module: str) -> str:
    # The interpreter path is left out of the signature ($( $)) so that a shared
    # CacheDir serves machines whose Python lives elsewhere.
    return f"$( $TDX_PYTHON $) -m tdx_rules.stages.{module}"


# Where downloads go and come from, and the extra trusted keys: they change no output bytes.
_CACHE_ARGS = ('$( --cache "$TDX_CACHE" --mirror "$TDX_MIRROR" --keyring "$TDX_KEYRING" '
               '--snapshot "$TDX_SNAPSHOT" $_TDX_REFRESH $_TDX_REMOTE_ARGS $)')


def _write_config(target, source, env):
    from ..fsutil import write_bytes

    write_bytes(str(target[0]), source[0].get_contents())
    return 0


_CONFIG = SCons.Builder.Builder(action=SCons.Action.Action(_write_config, strfunction=lambda *a, **k: None))


def _config(env, work, stage: str, data: dict):
    """A stage's config file: canonical JSON of exactly the settings it reads."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    value = env.Value(text)
    node = env._TdxConfig(work.File(f"{stage}.config.json"), value)[0]
    # Written in no time from its Value: no cache entry (and no request to a remote cache).
    env.NoCache(node)
    # The stage also depends on the value itself, so that `scons -n`, which writes no config
    # file, still sees a changed setting and lists the stages it would run.
    node.attributes.tdx_config_value = value
    return node


def _user_error(where: str, error: TdxError):
    raise SCons.Errors.UserError(f"{where}: {error}")


def _spec_inputs(env, spec_text: str, what: str):
    """Parse a spec now (bad specs fail before building); file: specs become dependencies."""
    try:
        spec = sources.parse(spec_text, what)
    except TdxError as error:
        _user_error(what, error)
    if spec.kind == "file":
        node = env.File(spec.path)
        return "file:" + str(node), [node]
    return spec.text, []


def tdx_static_program(env, target, source=None, bin=None):
    """Build a static x86-64 workload from C sources, a Cargo.toml, a go.mod, or a prebuilt binary."""
    target = str(target)
    srcs = env.Flatten([source])
    if not srcs:
        raise SCons.Errors.UserError(f"TdxStaticProgram('{target}'): no sources given")
    first = str(srcs[0])
    if os.path.basename(first) == "Cargo.toml":
        # The crate's sources: Cargo.toml, Cargo.lock, build.rs and everything under src/.
        # (Not the whole directory: the SConstruct, .sconsign and the outputs may live there.)
        crate = os.path.dirname(env.File(first).srcnode().abspath)
        files = [os.path.join(crate, name) for name in ("Cargo.lock", "build.rs")
                 if os.path.isfile(os.path.join(crate, name))]
        for root, dirs, names in os.walk(os.path.join(crate, "src")):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names)]
        deps = [env.File(first)] + [env.File(f) for f in files]
        from ..stages.program import rust_build_target

        # Chosen when the SConstruct is read, so that installing the musl target rebuilds.
        command = (f"{_python('program')} rust --bin {bin or os.path.basename(target)} "
                   f"--target {rust_build_target()} --out $TARGET ${{SOURCES[0]}}")
        return _stage(env, "program", os.path.basename(target), [target], deps, command, inherit=_RUST_ENV)
    elif os.path.basename(first) == "go.mod":
        from ..stages.program import go_module_inputs, go_version

        gomod = env.File(first)
        deps = [gomod] + [env.File(f) for f in go_module_inputs(gomod.srcnode().abspath)
                          if f != gomod.srcnode().abspath]
        nodes = _stage(env, "program", os.path.basename(target), [target], deps,
                       f"{_python('program')} go --out $TARGET ${{SOURCES[0]}}", inherit=_GO_ENV)
        # Another Go release builds other bytes: it reruns the build (read when the SConstruct is).
        env.Depends(nodes, env.Value("go " + go_version()))
        return nodes
    elif all(str(s).endswith((".c", ".h")) for s in srcs):
        deps = srcs
        command = (f'{_python("program")} c --cc $TDX_CC --cflags="$TDX_CFLAGS" --out $TARGET '
                   '${_tdx_c_sources(SOURCES)}')
    else:
        deps = srcs[:1]
        command = f"{_python('program')} prebuilt --out $TARGET ${{SOURCES[0]}}"
    return _stage(env, "program", os.path.basename(target), [target], deps, command)


def _closure_scanner(binary_path: str, program_path: str, conf_dirs):
    """The host files the closure of ``binary_path`` reads, as dependencies of the closure stage:
    found again on every run from the binary's ELF headers (a changed, added or moved host
    library reruns the stage; packages of ``libs`` are followed by their specs)."""
    from ..initramfs.closure import resolve

    def scan(node, env, path):
        if node.abspath != binary_path or not os.path.isfile(binary_path):
            return []
        try:
            return [env.File(p) for p in resolve(binary_path, program_path, conf_dirs=conf_dirs).host_files()]
        except TdxError:
            return []  # the stage itself names what is wrong with the binary

    return SCons.Scanner.Scanner(scan, name="TdxClosure")


def tdx_program(env, target, binary=None, libs=None):
    """A dynamically linked x86-64 program with its shared-library closure, for ``TdxImage(binary=...)``.

    ``binary``: the program (a file or a node, e.g. of ``env.Program``); ``libs``: source specs of
    packages searched before the host (``['apt:libssl3']``). The closure stage resolves the loader
    and libraries from the ELF files; its fragment joins the initramfs.
    """
    from ..initramfs.closure import LD_SO_CONF, ld_so_conf_dirs

    target = str(target)
    where = f"TdxProgram('{target}')"
    sources_ = env.Flatten([binary]) if binary is not None else []
    if len(sources_) != 1:
        raise SCons.Errors.UserError(f"{where}: binary= must name one dynamically linked executable "
                                     f"(got {len(sources_)})")
    if libs is None:
        libs = []
    if isinstance(libs, str) or not isinstance(libs, (list, tuple)) or not all(isinstance(x, str) for x in libs):
        raise SCons.Errors.UserError(f"{where}: libs={libs!r} must be a list of source specs, e.g. ['apt:libssl3']")
    specs, deps = [], []
    for text in libs:
        spec, spec_deps = _spec_inputs(env, text, f"{where} libs")
        specs.append(spec)
        deps += spec_deps
    binary_node = env.File(sources_[0])
    target_node = env.File(target)
    name = target_node.name
    if not re.match(r"^[A-Za-z0-9._+-]+$", name) or name.startswith("-"):
        raise SCons.Errors.UserError(f"{where}: the name {name!r} becomes the guest path /usr/bin/{name}; use "
                                     "letters, digits, '.', '_', '+', '-'")
    program_path = "/usr/bin/" + name
    program = _stage(env, "program", name, [target_node], [binary_node],
                     f"{_python('program')} dynamic --out $TARGET ${{SOURCES[0]}}")
    # ld.so.conf is read here, when the SConstruct is read: a changed list reruns the stage.
    conf_dirs = ld_so_conf_dirs(LD_SO_CONF)
    cfg = _config(env, target_node.dir, name + ".closure",
                  {"program_path": program_path, "libs": specs, "conf_dirs": conf_dirs})
    closure = _stage(env, "closure", name, [env.File(target_node.abspath + ".closure.frag"),
                                            env.File(target_node.abspath + ".closure.json")],
                     [cfg, binary_node] + deps,
                     f"{_python('closure')} --config ${{SOURCES[0]}} --binary ${{SOURCES[1]}} --out ${{TARGETS[0]}} "
                     f"--info ${{TARGETS[1]}} {_CACHE_ARGS}",
                     scanner=_closure_scanner(binary_node.abspath, program_path, conf_dirs))
    program[0].attributes.tdx_closure = tuple(closure)
    return program


def tdx_ext4_rootfs(env, target, source, agent=None, agent_path=AGENT_PATH, size="auto", verity=False):
    """An ext4 root filesystem from a container image with ``agent`` injected at ``agent_path``.

    ``source``: an OCI image layout directory, a ``docker save`` tarball or a
    Docker overlay2 layer directory (its lower layers are tracked too).
    ``verity``: True (SHA-256) or a hash algorithm name: also the dm-verity hash tree
    ``<target>.verity`` and root hash ``<target>.roothash``.
    """
    where = f"TdxExt4Rootfs('{target}')"
    from ..rootfs.verity import ALGORITHMS

    algorithm = "sha256" if verity is True else verity or None
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise SCons.Errors.UserError(f"{where}: verity={verity!r} is not a hash algorithm dm-verity images are built "
                                     f"with here; use verity=True (sha256) or one of {', '.join(ALGORITHMS)}")
    if agent is None:
        raise SCons.Errors.UserError(f"{where}: agent= is required (a file or the node of TdxStaticProgram)")
    if not isinstance(agent_path, str) or not agent_path.startswith("/"):
        raise SCons.Errors.UserError(f"{where}: agent_path {agent_path!r} must be an absolute path in the image")
    if not (size == "auto" or isinstance(size, int) or (isinstance(size, str) and size[:-1].isdigit()
                                                           and size[-1:].upper() in "KMGT")):
        raise SCons.Errors.UserError(f"{where}: size {size!r} is not 'auto' or a size like '512M'")
    epoch = _source_date_epoch()
    src = str(env.Flatten([source])[0])
    source_path = env.Entry(src).abspath
    is_dir = os.path.isdir(source_path)
    trees = [source_path]
    if os.path.isfile(os.path.join(source_path, "lower")):  # overlay2: lower layers are directories beside it
        from ..rootfs.formats import open_image

        try:
            trees += [layer.path for layer in open_image(source_path)[:-1]]
        except TdxError as error:
            _user_error(where, error)
    deps = [env.Dir(source_path) if is_dir else env.File(source_path)]
    if is_dir:
        for tree in trees:
            deps += _tree_inputs(env, tree)
    agent_node = env.File(env.Flatten([agent])[0])
    target_node = env.File(target)
    options = {"agent_path": agent_path, "size": size, "epoch": epoch}
    targets = [target_node]
    if algorithm is not None:
        options["verity"] = algorithm
        targets += [env.File(target_node.abspath + ".verity"), env.File(target_node.abspath + ".roothash")]
    cfg = _config(env, target_node.dir, target_node.name + ".rootfs", options)
    nodes = _stage(env, "rootfs", target_node.name, targets, [cfg, agent_node] + deps,
                   f'{_python("rootfs")} --config ${{SOURCES[0]}} --agent ${{SOURCES[1]}} '
                   f'--source ${{SOURCES[2]}} --out ${{TARGETS[0]}} {_CACHE_ARGS}')
    nodes[0].attributes.tdx_agent_path = agent_path
    nodes[0].attributes.tdx_verity = tuple(nodes[1:]) if algorithm is not None else None
    return nodes


def tdx_pack(env, target, source, compress="gzip", level=None):
    """A deterministic initramfs of the directory ``source`` (as ``tdx-rules pack``).

    Every file, symlink and directory of the tree is a dependency (never a FIFO
    or device: those are refused by pack itself).
    """
    from ..initramfs.pack import COMPRESSIONS

    where = f"TdxPack('{target}')"
    if compress not in COMPRESSIONS:
        raise SCons.Errors.UserError(f"{where}: compress={compress!r} is not one of {', '.join(COMPRESSIONS)}")
    directory = env.Dir(str(env.Flatten([source])[0]))
    if not os.path.isdir(directory.abspath):
        raise SCons.Errors.UserError(f"{where}: {directory} is not a directory")
    level_arg = f" --level {int(level)}" if level is not None else ""
    compressor = _gzip_compressor(where) if compress == "gzip" else None
    level_arg += f' --compressor "{compressor}"' if compressor else ""
    nodes = _stage(env, "pack", os.path.basename(str(target)), [env.File(target)],
                   [directory] + _tree_inputs(env, directory.abspath),
                   f"$( $TDX_PYTHON $) -m tdx_rules.initramfs.pack ${{SOURCES[0]}} -o $TARGET --compress {compress}{level_arg} "
                   f"--epoch {_source_date_epoch()}")
    if compressor:
        env.Depends(nodes, env.Value(compressor))
    return nodes


def _gzip_compressor(where: str) -> str:
    """The gzip deflate library as this process imports it (``pgzip.compressor_identity``). A stage
    that gzips gets it as a Value dependency, so a new zlib-ng reruns compression, and as
    ``--compressor`` on its command line, so the stage stops if it imports another one."""
    from ..initramfs.pgzip import compressor_identity

    try:
        return compressor_identity()  # versions only: nothing to quote inside "..."
    except TdxError as error:
        _user_error(where, error)


def _source_date_epoch() -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not epoch.isdigit():
        raise SCons.Errors.UserError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds")
    return int(epoch)


def _c_sources(nodes):
    return [n for n in nodes if str(n).endswith(".c")]


_LOCKS = {}  # lock file path -> {"mode", "lock", "sha256", "node", "infos"}


def _lock_state(env) -> dict:
    """The lock of this SConstruct: its path, what ``--tdx-lock``/``--tdx-lock-check`` ask for,
    and (when not writing one) the lock itself."""
    from ..upstream.lock import LOCK_NAME, read_lock

    path = os.path.join(env.Dir("#").abspath, LOCK_NAME)
    if path not in _LOCKS:
        mode = "check" if SCons.Script.GetOption("tdx_lock_check") else "write" if SCons.Script.GetOption(
            "tdx_lock") else None
        lock, digest = None, None
        if mode is None:
            try:
                lock = read_lock(path)
            except TdxError as error:
                raise SCons.Errors.UserError(str(error)) from None
            if lock is not None:
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
        _LOCKS[path] = {"path": path, "mode": mode, "lock": lock, "sha256": digest, "node": None, "infos": {}}
    return _LOCKS[path]


def _locking(env, spec: str, where: str) -> dict:
    """The stage config's ``lock`` entry for ``spec``: the locked files when a lock is in use."""
    from ..upstream.lock import entry

    state = _lock_state(env)
    if state["lock"] is None or spec.startswith("file:"):
        return {}
    try:
        return {"lock": entry(state["lock"], spec, state["path"], where)}
    except TdxError as error:
        raise SCons.Errors.UserError(str(error)) from None


def _lock_source(env, spec: str, stage_nodes) -> None:
    """With ``--tdx-lock``: the fetching stage resolves afresh (its indexes fetched again) and its
    info record feeds the lock file (one target for all images)."""
    state = _lock_state(env)
    if state["mode"] is None or spec.startswith("file:"):
        return
    env.AlwaysBuild(stage_nodes)
    info_node = stage_nodes[1]
    if state["node"] is None:
        state["node"] = env.Command(env.File(state["path"]), [], SCons.Action.Action(
            _write_lock, cmdstr=None if _verbose(env) else "[tdx] lock $TARGET"))[0]
        env.AlwaysBuild(state["node"])
        env.NoClean(state["node"])
        env.Precious(state["node"])
        SCons.Script.Default(state["node"])
    state["infos"][spec] = str(info_node)
    env.Depends(state["node"], info_node)


def _write_lock(target, source, env):
    from ..upstream.lock import write_or_check

    state = _LOCKS[str(target[0].abspath)]
    try:
        problem = write_or_check(state["path"], state["infos"], state["mode"] == "check")
    except TdxError as error:
        problem = str(error)
    if problem:
        raise SCons.Errors.BuildError(target[0], errstr=problem)
    return 0


def _ssh_stage(env, name: str, work, config, values, where: str):
    """The ssh stage of image ``name``: dropbear and its libraries from the packages of
    ``ssh_server`` and ``ssh_libs``, each pinned by the lock like every fetched input."""
    specs, deps = [], []
    for option, text in [("ssh_server", values["ssh_server"])] + [("ssh_libs", t) for t in values["ssh_libs"]]:
        spec, spec_deps = _spec_inputs(env, text, f"{where} {option}")
        specs.append(spec)
        deps += spec_deps
    locked = [_locking(env, spec, where).get("lock") for spec in specs]
    lock = {}
    if any(locked):
        lock = {"lock": {"locked": next(filter(None, locked))["locked"],
                         "files": [f for entry in locked if entry for f in entry["files"]]}}
    cfg = config("ssh", ssh_server=specs[0], ssh_libs=specs[1:], **lock)
    nodes = _stage(env, "ssh", name, [work.File("ssh.frag"), work.File("ssh.info.json")], [cfg] + deps,
                   f"{_python('ssh')} --config ${{SOURCES[0]}} --out ${{TARGETS[0]}} --info ${{TARGETS[1]}} "
                   f"{_CACHE_ARGS}")
    for spec in specs:
        _lock_source(env, spec, nodes)
    return nodes


def _verity_init() -> dict:
    """What the init needs to open a dm-verity root filesystem."""
    from ..rootfs.verity import GUEST_HELPER, KERNEL_PARAMETER

    return {"hash_device": VERITY_HASH_DEVICE, "helper": GUEST_HELPER, "parameter": KERNEL_PARAMETER}


def tdx_image(env, name, binary=None, rootfs=None, output_dir=None, unmeasured_rootfs=False, **options):
    """The rule: declare every stage of the image ``name``; return the final nodes.

    ``rootfs``: a node of ``TdxExt4Rootfs``; the init then mounts it from the
    virtio disk the scripts attach and runs its agent (``binary`` is optional).
    Built with ``verity=True``, the disk is opened through dm-verity from the root hash on
    the measured command line; without, ``unmeasured_rootfs=True`` must say that an
    unmeasured disk is meant.
    """
    where = f"TdxImage('{name}')"
    if os.environ.get(settings_table.SKIP_VARIABLE, "").lower() in _TRUE:
        print(f"[tdx] {name}: skipped ({settings_table.SKIP_VARIABLE}={os.environ[settings_table.SKIP_VARIABLE]})")
        return []
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", name):
        raise SCons.Errors.UserError(f"TdxImage({name!r}): the image name becomes file names and aliases; "
                                     "use letters, digits, '.', '_', '+', '-'")
    if binary is None and rootfs is None:
        raise SCons.Errors.UserError(f"{where}: binary= is required (a file or the node of TdxStaticProgram), "
                                     "or rootfs= (the node of TdxExt4Rootfs)")
    try:
        values = settings_table.resolve(options, os.environ)
    except TdxError as error:
        _user_error(where, error)
    out = env.Dir(output_dir or f"#build/tdx/{name}")
    work = out.Dir("work")
    stage_targets = {}

    def config(stage, **data):
        return _config(env, work, stage, dict(settings_table.for_stage(values, stage), **data))

    rootfs_node = env.File(env.Flatten([rootfs])[0]) if rootfs is not None else None
    binary_node = env.File(env.Flatten([binary])[0]) if binary is not None else None
    closure = getattr(binary_node.attributes, "tdx_closure", None) if binary_node is not None else None
    verity_nodes = None
    if closure is not None and rootfs_node is not None:
        raise SCons.Errors.UserError(f"{where}: binary {binary_node.name} is a TdxProgram, whose libraries go "
                                     "into the initramfs, but with rootfs= the workload runs from the root "
                                     "filesystem; put the program and its libraries into the container image")
    if rootfs_node is not None:
        if not hasattr(rootfs_node.attributes, "tdx_agent_path"):
            raise SCons.Errors.UserError(f"{where}: rootfs={str(rootfs_node)!r} is not a root filesystem of "
                                         "TdxExt4Rootfs; pass the node env.TdxExt4Rootfs(...) returns")
        verity_nodes = rootfs_node.attributes.tdx_verity
        if verity_nodes is None and not unmeasured_rootfs:
            raise SCons.Errors.UserError(
                f"{where}: rootfs {rootfs_node.name} has no dm-verity hash tree, so no measurement would cover the "
                "disk the workload runs from; build it with TdxExt4Rootfs(..., verity=True), or pass "
                "unmeasured_rootfs=True to accept an unmeasured disk")
        program_path = rootfs_node.attributes.tdx_agent_path
    else:
        program_name = os.path.basename(binary_node.path)
        if not re.match(r"^[A-Za-z0-9._+-]+$", program_name) or program_name.startswith("-"):
            raise SCons.Errors.UserError(f"{where}: binary name {program_name!r} has characters a guest path "
                                         "should not have; name the program with letters, digits, '.', '_', '+', '-'")
        program_path = "/usr/bin/" + program_name

    # minirootfs -> busybox
    spec, deps = _spec_inputs(env, values["minirootfs"] or sources.alpine_spec(values["alpine_version"], values["alpine_minor"]),
                              "minirootfs")
    cfg = _config(env, work, "minirootfs", dict({"spec": spec}, **_locking(env, spec, where)))
    minirootfs = _stage(env, "minirootfs", name, [work.File("minirootfs.tar.gz"), work.File("minirootfs.info.json")],
                        [cfg] + deps, f"{_python('minirootfs')} --config ${{SOURCES[0]}} --out ${{TARGETS[0]}} "
                        f"--info ${{TARGETS[1]}} {_CACHE_ARGS}")
    stage_targets["minirootfs"] = minirootfs
    _lock_source(env, spec, minirootfs)
    base = _stage(env, "busybox", name, [work.File("base.frag")], [minirootfs[0]],
                  f"{_python('busybox')} --minirootfs ${{SOURCES[0]}} --out $TARGET")
    stage_targets["busybox"] = base

    # kernel -> modules
    spec, deps = _spec_inputs(env, values["kernel"] or sources.ubuntu_kernel_spec(values["kernel_version"], values["kernel_abi"]),
                              "kernel")
    modules_dir = None
    if values["modules_dir"]:
        modules_node = env.Dir(values["modules_dir"])
        modules_dir = str(modules_node)
        deps += _tree_inputs(env, modules_node.abspath)
    cfg = _config(env, work, "kernel", dict({"spec": spec, "modules_dir": modules_dir}, **_locking(env, spec, where)))
    kernel = _stage(env, "kernel", name, [out.File(f"{name}-vmlinuz"), work.File("kernel.info.json")], [cfg] + deps,
                    f"{_python('kernel')} --config ${{SOURCES[0]}} --out ${{TARGETS[0]}} --info ${{TARGETS[1]}} {_CACHE_ARGS}")
    stage_targets["kernel"] = kernel
    _lock_source(env, spec, kernel)
    user_modules, user_module_files = [], []
    # A root filesystem needs the virtio disk driver and ext4 (modules or built in).
    for item in (values["kernel_modules"] + (list(ROOTFS_MODULES) if rootfs_node is not None else [])
                 + (list(VERITY_MODULES) if verity_nodes else [])):
        if "/" in item or ".ko" in item:
            node = env.File(item)
            user_module_files.append(node)
            item = str(node)
        user_modules.append(item)
    # An initramfs image with keys runs an SSH server (with rootfs=, the root filesystem brings its own).
    with_server = bool(values["ssh_keys"]) and rootfs_node is None
    cfg = config("modules", kernel_modules=user_modules,
                 **({"network_modules": list(NETWORK_MODULES)} if with_server else {}))
    modules = _stage(env, "modules", name, [work.File("modules.frag"), work.File("modules.info.json")],
                     [cfg, kernel[1]] + user_module_files,
                     f"{_python('modules')} --config ${{SOURCES[0]}} --kernel-info ${{SOURCES[1]}} "
                     f"--out ${{TARGETS[0]}} --info ${{TARGETS[1]}} {_CACHE_ARGS}")
    stage_targets["modules"] = modules

    # init
    from ..stages.ssh import KEYGEN, SERVER

    ssh_port = (values["ssh_forward"] or [None, SSH_PORT])[1]
    cfg = config("init", name=name, program=program_path,
                 rootfs_device=ROOTFS_DEVICE if rootfs_node is not None else None,
                 **({"ssh_daemon": {"server": SERVER, "keygen": KEYGEN, "port": ssh_port}} if with_server else {}),
                 **({"verity": _verity_init()} if verity_nodes else {}))
    init = _stage(env, "init", name, [work.File("init.frag")], [cfg],
                  f"{_python('init')} --config ${{SOURCES[0]}} --out $TARGET")
    stage_targets["init"] = init

    # ssh
    ssh = _ssh_stage(env, name, work, config, values, where) if with_server else None
    if ssh is not None:
        stage_targets["ssh"] = ssh

    # cpio
    extra = {}
    extra_nodes = []
    for guest, host in sorted(values["extra_files"].items()):
        node = env.File(host)
        extra[guest] = str(node)
        extra_nodes.append(node)
    if verity_nodes:
        # The helper that opens the dm-verity device, a static C program built as workloads are.
        helper = tdx_static_program(env, work.File("tdx-verity-open"),
                                    [env.File(os.path.join(PACKAGE_DIR, "templates", "tdx-verity-open.c"))])[0]
        from ..rootfs.verity import GUEST_HELPER

        extra[GUEST_HELPER] = str(helper)
        extra_nodes.append(helper)
    cfg = config("cpio", program_path=program_path, extra_files=extra, epoch=_source_date_epoch())
    program_args = f" --program ${{SOURCES[{4 + len(extra_nodes)}]}}" if binary_node is not None else ""
    if closure is not None:
        program_args += f" --closure ${{SOURCES[{5 + len(extra_nodes)}]}}"
        stage_targets["closure"] = list(closure)
    cpio_sources = ([cfg, base[0], modules[0], init[0]] + extra_nodes + ([binary_node] if binary_node else [])
                    + ([closure[0]] if closure is not None else []))
    if ssh is not None:
        program_args += f" --ssh ${{SOURCES[{len(cpio_sources)}]}}"
        cpio_sources.append(ssh[0])
    cpio = _stage(env, "cpio", name, [work.File(f"{name}-initramfs.cpio")], cpio_sources,
                  f"{_python('cpio')} --config ${{SOURCES[0]}} --fragment ${{SOURCES[1]}} "
                  f"--fragment ${{SOURCES[2]}} --fragment ${{SOURCES[3]}}{program_args} --out $TARGET")
    stage_targets["cpio"] = cpio
    compressor = _gzip_compressor(where)
    initrd = _stage(env, "compress", name, [out.File(f"{name}-initramfs.cpio.gz"), work.File("initramfs.size"),
                                            work.File("initramfs.compression.json")], cpio,
                    f'{_python("compress")} --compressor "{compressor}" --size-file ${{TARGETS[1]}} '
                    f"--info ${{TARGETS[2]}} $SOURCE ${{TARGETS[0]}}")
    env.Depends(initrd, env.Value(compressor))

    # firmware
    from ..measure.kernel_patch import vga_word
    from ..measure.profiles import DEFAULT_OVMF_VERSION, parse_ovmf_version, parse_qemu_version

    try:
        parse_qemu_version(values["qemu_version"])
        if values["ovmf_version"] is not None:
            parse_ovmf_version(values["ovmf_version"])
    except TdxError as error:
        _user_error(where, error)
    spec, deps = _spec_inputs(env, values["ovmf"] or sources.canonical_ovmf_spec(values["ovmf_version"]
                                                                                 or DEFAULT_OVMF_VERSION), "ovmf")
    if spec.startswith("file:") and not spec.endswith(".deb") and values["ovmf_version"] is None:
        _user_error(where, TdxError(f"ovmf {spec}: a firmware file carries no package version, so the launch "
                                    "profile cannot follow it; set ovmf_version (or TDX_IMAGE_OVMF_VERSION) to the "
                                    "edk2 release it is built from, e.g. '2024.02'"))
    cfg = config("ovmf", spec=spec, **_locking(env, spec, where))
    ovmf = _stage(env, "ovmf", name, [out.File(f"{name}-ovmf.fd"), work.File("ovmf.info.json"),
                                      work.File("ovmf.profile.json")], [cfg] + deps,
                  f"{_python('ovmf')} --config ${{SOURCES[0]}} --out ${{TARGETS[0]}} --info ${{TARGETS[1]}} "
                  f"--profile ${{TARGETS[2]}} {_CACHE_ARGS}")
    stage_targets["ovmf"] = ovmf[:2]
    _lock_source(env, spec, ovmf)
    ovmf_profile = ovmf[2]

    # measurements: the OVMF release of the profile comes from the firmware actually used
    measured = {}
    for register, source, computed in (("mrtd", ovmf[0], {}),
                                       ("rtmr1", kernel[0], {"vga": vga_word(values["cmdline"])}),
                                       ("rtmr2", initrd[0], {})):
        cfg = config(register, **computed)
        extra_sources, extra_args = [], ""
        if register == "rtmr1":
            extra_sources, extra_args = [initrd[1]], " --initrd-size-file ${SOURCES[3]}"
        elif register == "rtmr2" and verity_nodes:  # the dm-verity parameters join the command line
            extra_sources, extra_args = list(verity_nodes), " --verity-hash ${SOURCES[3]} --roothash ${SOURCES[4]}"
        measured[register] = _stage(
            env, register, name, [out.File(f"{name}-{register}.hex"), work.File(f"{register}.json")],
            [cfg, source, ovmf_profile] + extra_sources,
            f"{_python('measure')} {register} --config ${{SOURCES[0]}} --input ${{SOURCES[1]}} "
            f"--ovmf-profile ${{SOURCES[2]}}{extra_args} --out ${{TARGETS[0]}} --transcript ${{TARGETS[1]}}")
    stage_targets["measure"] = [measured[r][0] for r in ("mrtd", "rtmr1", "rtmr2")]

    # scripts
    cfg = config("scripts", name=name)
    script_targets = [out.File(f"{name}-launch-tdx.sh")]
    runner = ""
    if values["bundle_runner"]:
        script_targets.append(out.File(f"{name}-run-qemu.sh"))
        runner = " --runner ${TARGETS[1]}"
    rootfs_arg = " --rootfs ${SOURCES[5]}" if rootfs_node is not None else ""
    if verity_nodes:
        rootfs_arg += " --verity-hash ${SOURCES[6]} --roothash ${SOURCES[7]}"
    scripts = _stage(env, "scripts", name, script_targets,
                     [cfg, ovmf[0], kernel[0], initrd[0], ovmf_profile]
                     + ([rootfs_node] if rootfs_node is not None else []) + list(verity_nodes or ()),
                     f"{_python('scripts')} --config ${{SOURCES[0]}} --ovmf ${{SOURCES[1]}} --kernel ${{SOURCES[2]}} "
                     f"--initrd ${{SOURCES[3]}} --ovmf-profile ${{SOURCES[4]}}{rootfs_arg} "
                     f"--launch ${{TARGETS[0]}}{runner}")

    # manifest
    finals = [initrd[0], kernel[0], ovmf[0]] + list(scripts) + [measured[r][0] for r in ("mrtd", "rtmr1", "rtmr2")]
    transcripts = [measured[r][1] for r in ("mrtd", "rtmr1", "rtmr2")]
    # User strings (guest paths) travel in the config, never in the command line.
    lock = _lock_state(env)
    cfg = _config(env, work, "manifest", dict({"name": name, "settings": values, "extra_files": list(extra)},
                                               **({"lock_sha256": lock["sha256"]} if lock["lock"] else {})))
    manifest_sources, manifest_args = [cfg], []
    for template, node in ([("--info {}", info) for info in (minirootfs[1], kernel[1], modules[1], ovmf[1])]
                           + [("--compression {}", initrd[2])]
                           + [("--closure {}", closure[1]) for _ in [closure] if closure is not None]
                           + [("--ssh {}", ssh[1]) for _ in [ssh] if ssh is not None]
                           + [("--file program={}", node) for node in [binary_node] if node is not None]
                           + [("--file rootfs={}", node) for node in [rootfs_node] if node is not None]
                           + [(option, node) for option, node in zip(("--verity-hash {}", "--roothash {}"),
                                                                     verity_nodes or ())]
                           + [("--extra-file {}", node) for node in extra_nodes]
                           + [("--output {}", node) for node in finals]
                           + [("--measurement {}", node) for node in transcripts]):
        manifest_args.append(template.format(f"${{SOURCES[{len(manifest_sources)}]}}"))
        manifest_sources.append(node)
    manifest = _stage(env, "manifest", name, [out.File(f"{name}-manifest.json")], manifest_sources,
                      f"{_python('manifest')} --config ${{SOURCES[0]}} {' '.join(manifest_args)} --out $TARGET")
    finals.append(manifest[0])
    stage_targets["finalize"] = [initrd[0]] + list(scripts) + stage_targets["measure"] + [manifest[0]]

    env.Alias(name, finals)
    for stage, nodes in stage_targets.items():
        env.Alias(f"{name}-{stage}", nodes)
    _IMAGES[name] = tuple(stage_targets)
    _update_help()
    return finals


_IMAGES = {}
_HELP_SHOWN = []


def _update_help() -> None:
    """``scons -h``: SCons's own options, then the images and the options (one block, replaced
    as each image is declared)."""
    text = settings_table.help_text(_IMAGES)
    current = SCons.Script.help_text
    if _HELP_SHOWN and current is not None and current.endswith(_HELP_SHOWN[-1]):
        SCons.Script.help_text = current[:-len(_HELP_SHOWN[-1])]
    _HELP_SHOWN[:] = [text]
    SCons.Script.Help(text, append=True)


def _reported_at_the_callers_line(method):
    """``method`` as an environment method whose ``UserError`` names the SConstruct's line.

    SCons reports a ``UserError`` at the deepest frame of its traceback outside SCons's own
    package, which would be a line of ours. The error leaves here with its traceback cleared
    and re-raised bare, which (Python 3.11+) adds no frame, so the deepest frame left is the
    call in the user's SConstruct or SConscript. ``--debug=stacktrace`` keeps every frame.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except SCons.Errors.UserError as error:
            if not getattr(SCons.Script.Main, "print_stacktrace", False):
                error.__traceback__ = None
            raise

    return wrapper


def _add_options() -> None:
    """``scons --tdx-lock`` (write or refresh tdx.lock) and ``--tdx-lock-check`` (is it current?)."""
    try:
        SCons.Script.GetOption("tdx_lock")
        return  # added by an earlier Environment
    except AttributeError:
        pass
    SCons.Script.AddOption("--tdx-lock", dest="tdx_lock", action="store_true", default=False,
                           help="tdx-rules: resolve every upstream input and write tdx.lock beside the SConstruct")
    SCons.Script.AddOption("--tdx-lock-check", dest="tdx_lock_check", action="store_true", default=False,
                           help="tdx-rules: fail when tdx.lock is not what the inputs resolve to now")


def tdx_remote_cache(env, url, push=False):
    """Share stage outputs and downloads through the HTTP cache at ``url``, above the local
    CacheDir (:mod:`tdx_rules.scons.remote_cache`); ``push`` also uploads what this build makes.

    ``$TDX_RULES_REMOTE_CACHE`` and ``$TDX_RULES_REMOTE_CACHE_PUSH``, when set, win over the
    arguments, so CI chooses per job whether to push without editing the SConstruct.
    """
    from ..upstream.remote import PUSH_VARIABLE, URL_VARIABLE

    env["TDX_REMOTE_CACHE"] = os.environ.get(URL_VARIABLE) or url
    pushed = os.environ.get(PUSH_VARIABLE, "")
    env["TDX_REMOTE_CACHE_PUSH"] = pushed if pushed.strip() else push
    env["CACHEDIR_CLASS"] = remote_cache.RemoteCacheDir
    remote_cache.settings(env)  # a bad URL or flag stops here, at the SConstruct's line


def generate(env):
    """Add the builders and the rule to ``env``; set every variable they read."""
    _add_options()
    env.SetDefault(**settings_table.construction_defaults())
    # SCons's CacheDir, with the remote layer of TDX_REMOTE_CACHE above it when one is set.
    env.SetDefault(CACHEDIR_CLASS=remote_cache.RemoteCacheDir)
    env["_TDX_REMOTE_ARGS"] = remote_cache.stage_arguments
    try:
        remote_cache.settings(env)  # a bad $TDX_RULES_REMOTE_CACHE stops at the SConstruct's Environment line
    except SCons.Errors.UserError as error:
        if not getattr(SCons.Script.Main, "print_stacktrace", False):
            error.__traceback__ = None
        raise
    env["_tdx_c_sources"] = _c_sources
    # scons --tdx-lock / --tdx-lock-check resolve afresh: cached indexes and checksum files are fetched again.
    env["_TDX_REFRESH"] = "--refresh" if (SCons.Script.GetOption("tdx_lock")
                                          or SCons.Script.GetOption("tdx_lock_check")) else ""
    # Content decisions as SCons makes them, without re-hashing unchanged files every run.
    env.Decider(statcache.decider)
    env.Append(BUILDERS={"_TdxConfig": _CONFIG})
    for method, name in ((tdx_static_program, "TdxStaticProgram"), (tdx_program, "TdxProgram"),
                         (tdx_image, "TdxImage"), (tdx_ext4_rootfs, "TdxExt4Rootfs"), (tdx_pack, "TdxPack"),
                         (tdx_remote_cache, "TdxRemoteCache")):
        env.AddMethod(_reported_at_the_callers_line(method), name)


def exists(env):
    return True
