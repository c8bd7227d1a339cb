"""`farm doctor` and `farm plugins` on this machine, healthy and not."""

from __future__ import annotations


from tests.conftest import write_config
from tests.test_contract import install_throwaway


def test_doctor_on_a_healthy_machine(farm, farm_env):
    result = farm("doctor", "--json")
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in result.json()["checks"]}
    assert checks["ffmpeg"]["ok"] and checks["ffmpeg encoder libx264"]["ok"]
    assert checks["state directory"]["ok"] and str(farm_env["state"]) in checks["state directory"]["found"]
    assert "command" in checks["processors"]["found"]


def test_doctor_says_what_to_do_about_each_problem(farm, farm_env, monkeypatch):
    blocker = farm_env["tmp"] / "blocker"
    blocker.write_text("x")
    write_config(farm_env, allow_commands=["ffmpeg", "no-such-renderer"])
    result = farm("doctor", "--state", blocker / "state")
    assert result.returncode == 1
    assert "FAIL  state directory" in result.stdout and "--state DIR or FARM_STATE" in result.stdout
    assert "warn  allowed command no-such-renderer: not on PATH" in result.stdout
    assert "1 problem(s)" in result.stdout


def test_plugins_lists_processors_hooks_and_failures(farm, farm_env, monkeypatch):
    site = farm_env["tmp"] / "site"
    site.mkdir()
    install_throwaway(site, "farmtest-broken", "raise ImportError('needs libfoo')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    result = farm("plugins", "--json")
    assert result.returncode == 0
    listing = result.json()
    names = {p["name"]: p for p in listing["plugins"]}
    assert names["command"]["processors"] == ["command"] and "farm_processors" in names["command"]["hooks"]
    assert names["transcode"]["distribution"] == "farm"
    assert [f["name"] for f in listing["failures"]] == ["farmtest_broken"]
    assert "needs libfoo" in listing["failures"][0]["reason"]
    doctor = farm("doctor")
    assert "FAIL  plugin farmtest_broken" in doctor.stdout and doctor.returncode == 1
