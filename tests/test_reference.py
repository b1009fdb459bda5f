"""docs/ and `scons -h` come from the settings table and the builders' signatures, so they
cannot drift; `scons -n` and `scons -c` behave as SCons users expect."""

import inspect
import json
import os

import SCons.Environment

from tdx_rules import settings
from tdx_rules.cli import reference
from tdx_rules.scons import tool
from tests.conftest import ROOT, scons, stages_run

DOCS = os.path.join(ROOT, "docs")


def test_docs_pages_are_what_the_generator_writes():
    for name, text in reference.pages().items():
        with open(os.path.join(DOCS, name), encoding="utf-8") as handle:
            assert handle.read() == text, f"docs/{name} is stale: run `python -m tdx_rules.cli.reference docs`"
    assert sorted(os.listdir(DOCS)) == sorted(set(reference.pages()) | {"ci.md"})


def test_every_builder_keyword_is_documented_with_its_real_default():
    for doc in reference.BUILDERS:
        function = getattr(tool, doc.function)
        params = {name: p for name, p in inspect.signature(function).parameters.items()
                  if name != "env" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        assert set(doc.keywords) == set(params), doc.name
        page = reference.render(doc)
        for name, param in params.items():
            if param.default not in (inspect.Parameter.empty, None):
                assert f"| `{name}` | `{param.default!r}` |" in page, (doc.name, name)
    image = reference.render(reference.BUILDERS[0])
    for setting in settings.SETTINGS:
        assert f"| `{setting.name}` |" in image
        if setting.env:
            assert f"`{setting.env}`" in image


def test_construction_variables_are_exactly_the_table():
    env = SCons.Environment.Environment(tools=["tdx"], toolpath=[os.path.join(ROOT, "site_scons", "site_tools")])
    names = {variable.name for variable in settings.VARIABLES}
    set_by_tool = {key for key in env.Dictionary() if key.startswith("TDX_")}
    assert set_by_tool == names
    assert env["TDX_CC"] == "musl-gcc" and env["TDX_CFLAGS"] == "-Os"


def test_scons_help_lists_the_images_their_stage_aliases_and_the_options(fast_project):
    result = scons(fast_project, "-h")
    out = result.stdout
    assert "-n, --no-exec" in out  # SCons's own options stay
    assert "tdx-rules images" in out and "  hello " in out and "hello-<stage>" in out
    assert "minirootfs, busybox, kernel" in out
    for setting in settings.SETTINGS:
        assert f"  {setting.name}" in out
    assert "TDX_IMAGE_QEMU_VERSION" in out and "VERBOSE=1" in out
    assert not os.path.exists(os.path.join(fast_project, "build"))  # -h builds nothing


def test_dry_run_prints_the_stages_and_changes_nothing(fast_project):
    scons(fast_project)
    out = os.path.join(fast_project, "build", "tdx", "hello")
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name != "work"}
    with open(os.path.join(fast_project, "opts.json"), "w") as handle:
        json.dump({"memory": "1G"}, handle)
    dry = scons(fast_project, "-n")
    assert {"rtmr1", "scripts", "manifest"} <= stages_run(dry)
    after = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name != "work"}
    assert after == before
    assert {"rtmr1", "scripts", "manifest"} <= stages_run(scons(fast_project))
