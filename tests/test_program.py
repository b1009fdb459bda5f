"""Stage 1: static workloads, built and checked."""

import os
import shutil
import subprocess

import pytest

from tdx_rules.elf import check_static_x86_64
from tdx_rules.errors import TdxError
from tdx_rules.stages import program
from tests.conftest import scons, stages_run, write_project

HELLO = '#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n'


def test_musl_build_is_static_stripped_without_build_id_and_reproducible(tmp_path):
    for name in ("a", "b"):
        src = tmp_path / name / "hello.c"
        src.parent.mkdir()
        src.write_text(HELLO)
        cwd = os.getcwd()
        os.chdir(src.parent)
        try:
            program.compile_c("musl-gcc", ["-Os"], ["hello.c"], str(tmp_path / name / "hello"))
        finally:
            os.chdir(cwd)
    first, second = (tmp_path / "a" / "hello").read_bytes(), (tmp_path / "b" / "hello").read_bytes()
    assert first == second, "two builds in different directories differ"
    assert str(tmp_path).encode() not in first
    readelf = subprocess.run(["readelf", "-lSn", str(tmp_path / "a" / "hello")], capture_output=True, text=True).stdout
    assert "INTERP" not in readelf and ".symtab" not in readelf and "GNU_BUILD_ID" not in readelf
    assert subprocess.run([str(tmp_path / "a" / "hello")], capture_output=True, text=True).stdout == "hi\n"


def test_dynamic_binary_is_refused_naming_its_interpreter(tmp_path):
    (tmp_path / "d.c").write_text(HELLO)
    subprocess.run(["gcc", "-o", str(tmp_path / "d"), str(tmp_path / "d.c")], check=True)
    with pytest.raises(TdxError, match=r"dynamically linked \(interpreter /lib64/ld-linux-x86-64.so.2\)"):
        check_static_x86_64(str(tmp_path / "d"))


@pytest.mark.parametrize("data", [b"", b"#!/bin/sh\necho\n", b"\x7fELF" + b"\x02\x01" + b"\0" * 10, b"\x7fELF\x01\x01" + b"\0" * 60])
def test_non_elf_and_truncated_elf_are_refused_cleanly(tmp_path, data):
    (tmp_path / "x").write_bytes(data)
    with pytest.raises(TdxError):
        check_static_x86_64(str(tmp_path / "x"))


def test_missing_rust_musl_target_is_named(tmp_path):
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed")
    if program.rust_target_installed():
        pytest.skip("the musl target is installed here")
    (tmp_path / "Cargo.toml").write_text('[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.rs").write_text('fn main() { println!("hi"); }\n')
    with pytest.raises(TdxError, match="rustup target add x86_64-unknown-linux-musl"):
        program.build_rust(str(tmp_path / "Cargo.toml"), "app", str(tmp_path / "out"))


def test_compile_error_is_one_scons_line_without_traceback(tmp_path):
    project = write_project(tmp_path / "p", "minirootfs='debian'")
    with open(os.path.join(project, "hello.c"), "a") as handle:
        handle.write("this is not C;\n")
    result = scons(project, "./hello", check=False)  # the program file, not the image alias of the same name
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]
    assert len(errors) == 1 and "musl-gcc failed" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(project, "hello"))


def test_prebuilt_dynamic_binary_stops_the_image_with_one_line(tmp_path, fast_project):
    subprocess.run(["gcc", "-o", os.path.join(fast_project, "dyn"), os.path.join(fast_project, "hello.c")], check=True)
    sconstruct = os.path.join(fast_project, "SConstruct")
    text = open(sconstruct).read().replace("binary=app", "binary='dyn'")
    open(sconstruct, "w").write(text)
    result = scons(fast_project, "hello", check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("scons: ***")]
    assert result.returncode != 0 and len(errors) == 1 and "dynamically linked" in errors[0], result.stderr
    assert "cpio" in stages_run(result)
    assert not os.path.exists(os.path.join(fast_project, "build", "tdx", "hello", "work", "hello-initramfs.cpio"))
