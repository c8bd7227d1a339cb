"""The `farm` command's surface: version, help on every command, the store commands."""

from __future__ import annotations

import pytest

from farm import __version__
from farm.cli import build_parser


def command_paths(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from command_paths(sub, (*prefix, name))


def test_version(farm):
    result = farm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"farm {__version__}"


@pytest.mark.parametrize("path", [(), *command_paths(build_parser())], ids=lambda p: " ".join(p) or "farm")
def test_help_on_every_command(farm, path):
    result = farm(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: farm") and "--state" in result.stdout


def test_status_without_a_store_says_so(farm, farm_env):
    result = farm("status")
    assert result.returncode == 2 and "no store at" in result.stderr and "Traceback" not in result.stderr


def test_cancel_of_an_unknown_job(farm, farm_env):
    from farm.store import Store

    Store(farm_env["state"] / "farm.db").close()
    result = farm("cancel", "j-nope")
    assert result.returncode == 2 and "no job 'j-nope'" in result.stderr
