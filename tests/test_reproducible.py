"""Two clean builds of one image in different directories, with different umask,
TZ, LANG, source file modes and mtimes, produce byte-identical artifacts."""

import json
import os
import pathlib
import shutil

from tests.conftest import scons


def build_copy(project, where, umask, tz, lang, mtime):
    """Copy the project as a user with ``umask`` would have it, build it, return the artifacts."""
    shutil.copytree(project, where, ignore=shutil.ignore_patterns("build", ".sconsign.dblite", "hello"))
    for path in where.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
            os.utime(path, (mtime, mtime))
    old = os.umask(umask)
    try:
        scons(str(where), env={"TZ": tz, "LANG": lang, "LC_ALL": lang})
    finally:
        os.umask(old)
    out = where / "build" / "tdx" / "hello"
    return {path.name: path.read_bytes() for path in sorted(out.iterdir()) if path.is_file()}


def test_clean_builds_in_different_directories_and_environments_are_byte_identical(fast_project, tmp_path):
    project = pathlib.Path(fast_project)
    (project / "motd").write_text("hello\n")
    (project / "opts.json").write_text(json.dumps({"extra_files": {"/etc/motd": "motd"}, "env_vars": {"A": "b"}}))
    first = build_copy(project, tmp_path / "a", 0o022, "UTC", "C.UTF-8", 1_000_000_000)
    second = build_copy(project, tmp_path / "deeper" / "b", 0o077, "Asia/Kolkata", "C", 1_700_000_000)
    assert set(first) == set(second) and len(first) >= 9
    for name in first:
        assert first[name] == second[name], f"{name} differs between the two builds"
        assert str(tmp_path).encode() not in first[name], f"{name} contains the build directory"
