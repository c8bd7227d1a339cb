"""What a program says of itself is asked once per installed binary (farm.requirements)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from farm.requirements import program_answer


@pytest.fixture
def fake_program(tmp_path, monkeypatch):
    """A program on PATH that counts how often it runs and prints a version."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"

    def write(version: str, status: int = 0) -> Path:
        program = bin_dir / "renderer"
        program.write_text(f"#!/bin/sh\necho run >> {runs}\necho 'Renderer {version}'\nexit {status}\n")
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
        return program

    def count() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    return write, count


def test_an_answer_is_kept_until_the_program_is_replaced(fake_program):
    write, count = fake_program
    write("1.0")
    assert program_answer(["renderer", "--version"]).stdout == "Renderer 1.0\n"
    assert program_answer(["renderer", "--version"]).stdout == "Renderer 1.0\n"
    assert count() == 1
    assert program_answer(["renderer", "--help"]).stdout == "Renderer 1.0\n"  # other arguments: asked
    assert count() == 2
    write("2.0-longer")  # an upgrade in place
    assert program_answer(["renderer", "--version"]).stdout == "Renderer 2.0-longer\n"
    assert count() == 3


def test_a_failed_answer_is_asked_again_and_a_missing_program_is_none(fake_program):
    write, count = fake_program
    write("1.0", status=3)
    assert program_answer(["renderer", "--version"]).returncode == 3
    assert program_answer(["renderer", "--version"]).returncode == 3
    assert count() == 2
    assert program_answer(["no-such-renderer-here", "--version"]) is None


def test_a_damaged_cache_is_asked_again(fake_program, tmp_path):
    write, count = fake_program
    write("1.0")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "programs.json").write_text("{not json")
    assert program_answer(["renderer", "--version"]).stdout == "Renderer 1.0\n"
    assert program_answer(["renderer", "--version"]).stdout == "Renderer 1.0\n"
    assert count() == 1


def test_answers_of_programs_since_replaced_or_removed_are_not_kept(fake_program, tmp_path):
    write, count = fake_program
    kept = tmp_path / "cache" / "programs.json"

    def answered() -> list[str]:
        return sorted(answer["stdout"] for answer in json.loads(kept.read_text()).values())

    renderer = write("1.0")
    program_answer(["renderer", "--version"])
    write("2.0-longer")  # upgraded in place: the answer of 1.0 is of a binary that is gone
    program_answer(["renderer", "--version"])
    assert answered() == ["Renderer 2.0-longer\n"]
    other = renderer.with_name("other")
    other.write_text("#!/bin/sh\necho Other 1.0\n")
    other.chmod(0o755)
    program_answer(["other", "--version"])
    assert answered() == ["Other 1.0\n", "Renderer 2.0-longer\n"]
    renderer.unlink()  # uninstalled
    program_answer(["other", "--help"])
    assert answered() == ["Other 1.0\n", "Other 1.0\n"]
    assert count() == 2
