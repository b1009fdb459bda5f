"""Go workloads: ``TdxStaticProgram(target, ['go.mod'])`` builds a static, reproducible binary
offline, tracks the module's files, and fails with one line.

Every build is a real ``go build`` (Debian's golang-go); the facts about the binaries are read
back with Go's own tools (``go tool buildid``, ``go version -m``) and readelf.
"""

import os
import shutil
import subprocess

import pytest

from tdx_rules.elf import check_static_x86_64
from tdx_rules.errors import TdxError
from tdx_rules.stages import program
from tests.conftest import FAST_SETUP, fast_options, scons, stages_run

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (apt-get install golang-go)")

MAIN = 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("GO-MARKER one")\n}\n'
# Go's own view of the environment, without the user's go env file.
GO_TOOL_ENV = dict(os.environ, GOENV="off", GOTOOLCHAIN="local")


def write_module(path, main=MAIN, go_version="1.19", image_options=None) -> str:
    """A module example.com/svc with main.go and an SConstruct declaring the program 'svc'
    (and the image 'svc' when ``image_options`` is given)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "go.mod"), "w") as handle:
        handle.write(f"module example.com/svc\n\ngo {go_version}\n")
    with open(os.path.join(path, "main.go"), "w") as handle:
        handle.write(main)
    image = f"env.TdxImage('svc', binary=app, {image_options})\n" if image_options else ""
    with open(os.path.join(path, "SConstruct"), "w") as handle:
        handle.write("import tdx_rules\n"
                     f"{FAST_SETUP}\n"
                     "DefaultEnvironment(tools=[])\n"
                     "env = Environment(tools=['tdx'], toolpath=[tdx_rules.TOOLPATH])\n"
                     "app = env.TdxStaticProgram('svc', ['go.mod'])\n" + image)
    return str(path)


def scons_errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]


def test_go_binary_is_static_without_build_id_or_build_path_and_identical_across_directories(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    binaries = []
    for project in (tmp_path / "a" / "checkout-q7x", tmp_path / "bb" / "other-checkout-z9w"):
        write_module(project)
        scons(str(project), "./svc", env={"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")})
        binaries.append(str(project / "svc"))
        # The build cache is the build's own, inside the project, never under the user's home.
        assert os.listdir(project / program.GO_WORK_DIR / "svc" / "cache")
    assert os.listdir(home) == []
    first, second = (open(path, "rb").read() for path in binaries)
    assert first == second, "two clean builds in different directories differ"
    check_static_x86_64(binaries[0], "svc")
    assert str(tmp_path).encode() not in first and b"checkout-q7x" not in first
    assert subprocess.run([binaries[0]], capture_output=True, text=True).stdout == "GO-MARKER one\n"

    # Go's tools: an empty build ID (a default build has one, so this check can fail) ...
    buildid = subprocess.run(["go", "tool", "buildid", binaries[0]], capture_output=True, text=True, check=True,
                             env=GO_TOOL_ENV)
    assert buildid.stdout.strip() == ""
    default = tmp_path / "default"
    subprocess.run(["go", "build", "-o", str(default), "."], cwd=tmp_path / "a" / "checkout-q7x", check=True,
                   env=dict(GO_TOOL_ENV, GOCACHE=str(tmp_path / "gocache"), GOPROXY="off", CGO_ENABLED="0"))
    assert subprocess.run(["go", "tool", "buildid", str(default)], capture_output=True, text=True,
                          env=GO_TOOL_ENV).stdout.strip() != ""
    notes = subprocess.run(["readelf", "-n", binaries[0]], capture_output=True, text=True).stdout
    assert "GO BUILDID" not in notes and "GNU_BUILD_ID" not in notes
    # ... and the build settings it records: trimmed paths, no cgo, no VCS stamp.
    info = subprocess.run(["go", "version", "-m", binaries[0]], capture_output=True, text=True, check=True,
                          env=GO_TOOL_ENV).stdout
    settings = {line.split("\t")[2] for line in info.splitlines() if line.startswith("\tbuild\t")}
    assert {"-trimpath=true", "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOAMD64=v1"} <= settings
    assert not any(setting.startswith("vcs") for setting in settings)


def test_vendor_directory_builds_offline_with_mod_vendor(tmp_path):
    """A module whose go.mod says `go 1.13`: Go itself would not use vendor/ (it does so on its
    own only from 1.14), so only -mod=vendor makes this build work without the dependency."""
    dep = tmp_path / "greet"
    dep.mkdir()
    (dep / "go.mod").write_text("module example.com/greet\n\ngo 1.13\n")
    (dep / "greet.go").write_text('package greet\n\nfunc Text() string { return "from the vendored module" }\n')
    app = tmp_path / "app"
    write_module(app, main='package main\n\nimport (\n\t"fmt"\n\n\t"example.com/greet"\n)\n\n'
                           'func main() { fmt.Println(greet.Text()) }\n', go_version="1.13")
    with open(app / "go.mod", "a") as handle:
        handle.write("\nrequire example.com/greet v1.0.0\n\nreplace example.com/greet => ../greet\n")
    offline = dict(GO_TOOL_ENV, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"), GOPROXY="off",
                   GOFLAGS="-modcacherw")
    subprocess.run(["go", "mod", "vendor"], cwd=app, check=True, env=offline, capture_output=True)
    shutil.rmtree(dep)  # from now on the dependency exists only in vendor/
    plain = subprocess.run(["go", "build", "-o", str(tmp_path / "plain"), "."], cwd=app, env=offline,
                           capture_output=True, text=True)
    assert plain.returncode != 0, "without -mod=vendor this module must not build; the test would prove nothing"

    result = scons(str(app), "./svc")
    assert stages_run(result) == {"program"}
    assert subprocess.run([str(app / "svc")], capture_output=True, text=True).stdout == "from the vendored module\n"
    # The vendored sources are inputs: editing one rebuilds with the edit.
    vendored = app / "vendor" / "example.com" / "greet" / "greet.go"
    vendored.write_text(vendored.read_text().replace("from the vendored module", "edited in vendor/"))
    assert stages_run(scons(str(app), "./svc")) == {"program"}
    assert subprocess.run([str(app / "svc")], capture_output=True, text=True).stdout == "edited in vendor/\n"


def test_module_inputs_are_the_files_go_list_names(tmp_path):
    module = tmp_path / "m"
    write_module(module)
    files = {
        "util/util.go": "package util\n\nfunc F() int { return 1 }\n",
        "util/util_windows.go": "package util\n\nfunc W() {}\n",       # not built here, still an input
        "util/util_test.go": "package util\n",                         # never built by go build
        "util/asm_amd64.s": "",
        "util/testdata/data.go": "package broken\n",                    # Go ignores testdata/
        "_scratch/x.go": "package x\n",                                 # and directories starting with _ or .
        ".hidden/x.go": "package x\n",
        "nested/go.mod": "module example.com/nested\n",                 # another module
        "nested/n.go": "package nested\n",
    }
    for name, text in files.items():
        (module / name).parent.mkdir(parents=True, exist_ok=True)
        (module / name).write_text(text)
    listed = subprocess.run(
        ["go", "list", "-f", '{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}\n{{end}}'
                             '{{range .IgnoredGoFiles}}{{$d}}/{{.}}\n{{end}}{{range .SFiles}}{{$d}}/{{.}}\n{{end}}',
         "./..."], cwd=module, capture_output=True, text=True, check=True,
        env=dict(GO_TOOL_ENV, GOCACHE=str(tmp_path / "gocache"), GOPROXY="off", CGO_ENABLED="0"))
    expected = {line for line in listed.stdout.splitlines() if line} | {str(module / "go.mod")}
    assert str(module / "util" / "util_windows.go") in expected  # go list sees the ignored file too
    assert set(program.go_module_inputs(str(module / "go.mod"))) == expected


def test_missing_go_toolchain_is_one_line_naming_the_fix(tmp_path):
    project = write_module(tmp_path / "p")
    bare = tmp_path / "bin"  # a PATH with a shell for the stage commands and no go
    bare.mkdir()
    os.symlink(shutil.which("sh"), bare / "sh")
    result = scons(project, "./svc", env={"PATH": str(bare)}, check=False)
    assert result.returncode != 0
    assert scons_errors(result) == ["scons: *** [svc] go.mod: go not found; install Go "
                                    "(Debian: apt-get install golang-go) or put it on PATH"], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(project, "svc"))


def test_missing_go_is_reported_by_the_stage_function(tmp_path, monkeypatch):
    write_module(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(TdxError, match=r"go not found; install Go \(Debian: apt-get install golang-go\)"):
        program.build_go(str(tmp_path / "go.mod"), str(tmp_path / "svc"))


def test_go_compile_error_is_one_line_with_the_first_error(tmp_path):
    project = write_module(tmp_path / "p", main='package main\n\nfunc main() {\n\tfirstMissing()\n'
                                               '\tsecondMissing()\n}\n')
    result = scons(project, "./svc", check=False)
    assert result.returncode != 0
    errors = scons_errors(result)
    assert errors == ["scons: *** [svc] go.mod: go build failed: ./main.go:4:2: undefined: firstMissing"], \
        result.stderr
    assert "Traceback" not in result.stderr and "secondMissing" not in result.stderr
    assert not os.path.exists(os.path.join(project, "svc"))


def test_missing_dependency_fails_offline_naming_it(tmp_path):
    project = write_module(tmp_path / "p", main='package main\n\nimport "example.com/absent"\n\n'
                                               'func main() { absent.F() }\n')
    result = scons(project, "./svc", check=False)
    errors = scons_errors(result)
    assert len(errors) == 1 and "go build failed" in errors[0] and "example.com/absent" in errors[0], result.stderr


# Incremental behaviour of a whole image around a Go program.

@pytest.fixture
def go_image(tmp_path, small_kernel):
    project = write_module(tmp_path / "proj", image_options=fast_options(small_kernel))
    first = scons(project)
    assert {"program", "cpio", "compress", "manifest"} <= stages_run(first)
    return project


def test_nothing_changed_runs_no_stage(go_image):
    assert stages_run(scons(go_image)) == set()


def test_changed_go_source_reruns_program_cpio_and_finalize(go_image):
    main = os.path.join(go_image, "main.go")
    open(main, "w").write(MAIN.replace("GO-MARKER one", "GO-MARKER two"))
    ran = stages_run(scons(go_image))
    assert {"program", "cpio", "compress", "rtmr2", "scripts", "manifest"} <= ran
    assert ran <= {"program", "cpio", "compress", "rtmr1", "rtmr2", "scripts", "manifest"}


def test_comment_only_go_change_stops_after_the_program(go_image):
    with open(os.path.join(go_image, "main.go"), "a") as handle:
        handle.write("\n// a comment changes nothing in the binary\n")
    assert stages_run(scons(go_image)) == {"program"}


def test_new_go_file_reruns_the_program_and_a_test_file_does_not(go_image):
    with open(os.path.join(go_image, "extra.go"), "w") as handle:
        handle.write('package main\n\nfunc init() { println("GO-MARKER init") }\n')
    assert {"program", "cpio"} <= stages_run(scons(go_image))
    with open(os.path.join(go_image, "main_test.go"), "w") as handle:
        handle.write("package main\n")
    assert stages_run(scons(go_image)) == set()
