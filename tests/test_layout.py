"""The package's layout: one folder per domain, imports that run downward, no cycles.

The layers, top to bottom (README, Development): the command line (cli/), the SCons
glue (scons/), the stages (stages/), the domains (upstream/, initramfs/, rootfs/,
measure/, attest/), and the shared ground at the top level of the package. A module
imports its own folder and the layers below; a domain imports no other domain.
"""

import ast
import os

from tests.package_graph import PACKAGE, imports_of, modules

DOMAINS = ("upstream", "initramfs", "rootfs", "measure", "attest")
SHARED = ("settings.py", "errors.py", "fsutil.py", "render.py", "elf.py", "boot.py")
# The public surface and the tool's entry points sit above everything they load.
ENTRY_POINTS = ("__init__.py", "__main__.py", "site_tools/tdx/__init__.py")
RANK = {"cli": 4, "scons": 3, "stages": 2, **{domain: 1 for domain in DOMAINS}}


def folder(relpath: str) -> str:
    return relpath.split(os.sep)[0] if os.sep in relpath else ""


def rank(relpath: str) -> int:
    return RANK[folder(relpath)] if folder(relpath) else 0


def test_every_module_lives_in_a_known_place():
    for relpath in modules():
        if relpath in ENTRY_POINTS:
            continue
        assert relpath in SHARED or folder(relpath) in RANK, f"{relpath}: not a domain folder nor shared ground"


def test_imports_run_downward_and_no_domain_imports_another():
    wrong = []
    for relpath in modules():
        if relpath in ENTRY_POINTS:
            continue
        for target in imports_of(relpath):
            same_folder = folder(target) == folder(relpath)
            if not same_folder and (rank(target) >= rank(relpath) or target in ENTRY_POINTS):
                wrong.append(f"{relpath} -> {target}")
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph = {relpath: imports_of(relpath) for relpath in modules()}
    state = {}  # relpath -> "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for relpath in sorted(graph):
        if relpath not in state:
            visit(relpath, [relpath])


def test_the_graph_sees_relative_and_absolute_imports():
    # An outside check of the helper the two tests above rely on: imports known from the sources.
    assert "initramfs/newc.py" in imports_of("stages/cpio.py")  # from ..initramfs import newc
    assert "measure/tdvf.py" in imports_of("measure/mrtd.py")  # from tdx_rules.measure.tdvf import ...
    assert "upstream/fetch.py" in imports_of("upstream/sources.py")  # inside a function


def test_subpackage_inits_hold_only_a_docstring():
    # The stages' code lists (scons/tool.py STAGE_CODE) leave package __init__.py files out.
    for relpath in modules():
        if relpath.endswith("__init__.py") and relpath not in ENTRY_POINTS:
            body = ast.parse(open(os.path.join(PACKAGE, relpath)).read()).body
            assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
                f"{relpath}: keep package __init__ files to a docstring"
