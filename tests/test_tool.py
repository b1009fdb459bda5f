"""The SCons glue: stage code dependencies, aliases, progress lines."""

import ast
import os

from tdx_rules.scons import tool
from tests.conftest import scons, stages_run

PACKAGE = tool.PACKAGE_DIR


def local_imports(relpath):
    """tdx_rules modules imported by a module (relative imports resolved), as package-relative paths."""
    tree = ast.parse(open(os.path.join(PACKAGE, relpath)).read())
    here = os.path.dirname(relpath)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here
            for _ in range(node.level - 1):
                base = os.path.dirname(base)
            parts = [p for p in (node.module or "").split(".") if p]
            target = os.path.join(base, *parts)
            names = [target] if parts else [os.path.join(base, alias.name) for alias in node.names]
            for name in names:
                for candidate in (name + ".py", os.path.join(name, "__init__.py")):
                    if os.path.exists(os.path.join(PACKAGE, candidate)):
                        found.add(os.path.normpath(candidate))
    return found


def closure(relpath):
    seen, todo = set(), [relpath]
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        todo.extend(local_imports(item))
    return seen


def test_each_stage_depends_on_all_the_code_it_imports():
    for stage, files in tool.STAGE_CODE.items():
        declared = set(tool._COMMON) | set(files)
        needed = {p for p in closure(files[0]) if not p.endswith("__init__.py")}
        assert needed <= declared, (stage, sorted(needed - declared))


def test_each_declared_stage_file_exists():
    for files in tool.STAGE_CODE.values():
        for name in set(files) | set(tool._COMMON):
            assert os.path.exists(os.path.join(PACKAGE, name)), name


def test_stage_alias_builds_only_that_stage_and_its_inputs(fast_project):
    result = scons(fast_project, "hello-busybox")
    assert stages_run(result) == {"minirootfs", "busybox"}
    assert stages_run(scons(fast_project, "hello-kernel")) == {"kernel"}


def test_verbose_shows_the_commands(fast_project):
    result = scons(fast_project, "hello-minirootfs", "VERBOSE=1")
    assert "-m tdx_rules.stages.minirootfs" in result.stdout and "[tdx] minirootfs hello" not in result.stdout


def test_changed_cpus_reruns_only_scripts_and_manifest(fast_project):
    scons(fast_project)
    sconstruct = os.path.join(fast_project, "SConstruct")
    text = open(sconstruct).read()
    open(sconstruct, "w").write(text.replace("cmdline=", "cpus=2, cmdline="))
    assert stages_run(scons(fast_project)) == {"scripts", "manifest"}


def test_editing_a_stage_module_reruns_that_stage_only(fast_project):
    scons(fast_project)
    module = os.path.join(PACKAGE, "stages", "compress.py")
    original = open(module).read()
    try:
        with open(module, "a") as handle:
            handle.write("\n# an edit that changes no output\n")
        result = scons(fast_project)
    finally:
        with open(module, "w") as handle:
            handle.write(original)
    assert stages_run(result) == {"compress"}
