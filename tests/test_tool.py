"""The SCons glue: stage code dependencies, aliases, progress lines."""

import os

from tdx_rules.scons import tool
from tests.conftest import scons, stages_run
from tests.package_graph import closure

PACKAGE = tool.PACKAGE_DIR


def test_each_stage_depends_on_all_the_code_it_imports():
    for stage, files in tool.STAGE_CODE.items():
        declared = set(tool._COMMON) | set(files)
        needed = {p for p in closure(files[0]) if not p.endswith("__init__.py")}
        assert needed <= declared, (stage, sorted(needed - declared))


def test_no_stage_declares_code_it_does_not_run():
    for stage, files in tool.STAGE_CODE.items():
        modules = {name for name in files if name.endswith(".py")}
        assert modules <= closure(files[0]), (stage, sorted(modules - closure(files[0])))


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
