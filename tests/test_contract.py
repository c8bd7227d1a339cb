"""The plugin contract, exercised by a throw-away package installed with a real
`farm` entry point, exactly as a third party would ship one."""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from pathlib import Path

import pytest

from farm import hookspecs
from tests.conftest import ROOT, write_profile

PLUGIN = '''
import json, os
from pathlib import Path
from pydantic import BaseModel, ConfigDict
from farm import hookimpl
from farm.frames import chunk_frames
from farm.model import SegmentPlan
from farm.processor import Processor


def record(name, **data):
    with open(os.environ["FARMTEST_HOOK_LOG"], "a") as log:
        log.write(json.dumps({"hook": name, **data}) + "\\n")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str


class Stamp(Processor):
    name = "stamp"
    settings_model = Settings
    frame_based = True
    inputs = "none"

    def plan(self, job):
        return [SegmentPlan(f"frames {c[0]}-{c[-1]}", c) for c in chunk_frames(job.frames, job.profile.segment.frames or 1)]

    def run(self, segment, context):
        for frame in segment.frames:
            (segment.output_dir / f"stamp_{frame:03d}.txt").write_text(segment.job.settings.word)
        context.progress(1.0, "stamped")
        return {"dir": str(segment.output_dir), "frames": segment.frames}

    def assemble(self, job, results, context):
        outputs = []
        for result in results:
            for frame in result["frames"]:
                target = job.destination / f"stamp_{frame:03d}.txt"
                target.write_text((Path(result["dir"]) / target.name).read_text())
                outputs.append(str(target))
        return outputs


@hookimpl
def farm_processors():
    return [Stamp()]


@hookimpl
def farm_node_capabilities(config):
    return {"farmtest": "1.2"}


@hookimpl
def farm_batch_submitted(batch_id, jobs):
    record("farm_batch_submitted", batch=batch_id, jobs=[job.id for job in jobs])


@hookimpl
def farm_segment_finished(job, segment_id, state, result, reason):
    record("farm_segment_finished", job=job.id, segment=segment_id, state=state, result=result)


@hookimpl
def farm_job_finished(job, outputs):
    record("farm_job_finished", job=job.id, outputs=outputs)


@hookimpl
def farm_job_failed(job, reason):
    record("farm_job_failed", job=job.id, reason=reason)


@hookimpl
def farm_batch_finished(batch_id, jobs):
    record("farm_batch_finished", batch=batch_id, jobs=jobs)


@hookimpl
def farm_configure(settings):
    mine = settings.get("farmtest_stamp", {})
    if "refuse" in mine:
        raise ValueError(f"refuse must not be set (got {mine['refuse']!r})")
    record("farm_configure", settings=mine)
'''


def install_throwaway(site: Path, name: str, module_source: str) -> None:
    """A minimal installed distribution: a module plus dist-info with an entry point."""
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{module}-0.1.dist-info"  # dist-info names use underscores
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[farm]\n{module} = {module}\n")


@pytest.fixture
def third_party(farm_env, monkeypatch):
    site = farm_env["tmp"] / "site"
    site.mkdir()
    install_throwaway(site, "farmtest-stamp", PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(site))
    log = farm_env["tmp"] / "hooks.jsonl"
    monkeypatch.setenv("FARMTEST_HOOK_LOG", str(log))
    return {"site": site, "log": log}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_entry_points_list_every_bundled_processor():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="farm")}
    bundled = {p.name for p in (ROOT / "plugins").iterdir() if p.name.startswith("farm_")}
    assert {f"farm_{name}" for name in names} >= bundled


def test_third_party_processor_runs_and_every_lifecycle_hook_fires(farm, farm_env, third_party):
    profile = write_profile(farm_env["tmp"], "stamp", {
        "processor": "stamp", "frames": "1-6", "segment": {"frames": 2}, "settings": {"word": "hello"},
        "requires": {"farmtest": ">=1.0"},
    })
    dest = farm_env["tmp"] / "dest"
    result = farm("run", profile, "-o", dest, "--json")
    assert result.returncode == 0, result.stderr
    report = result.json()
    job = report["jobs"][0]
    assert job["state"] == "done" and job["segments"] == 3
    assert sorted(p.name for p in dest.iterdir()) == [f"stamp_{i:03d}.txt" for i in range(1, 7)]
    assert (dest / "stamp_004.txt").read_text() == "hello"

    events = read_log(third_party["log"])
    kinds = [event["hook"] for event in events]
    assert kinds[0] == "farm_configure" and events[0]["settings"] == {}
    assert kinds[1] == "farm_batch_submitted" and events[1]["batch"] == report["batch"]
    finished = [e for e in events if e["hook"] == "farm_segment_finished"]
    assert len(finished) == 3 and {e["state"] for e in finished} == {"done"}
    assert sorted(f for e in finished for f in e["result"]["frames"]) == [1, 2, 3, 4, 5, 6]
    assert kinds[-2] == "farm_job_finished" and len(events[-2]["outputs"]) == 6
    assert kinds[-1] == "farm_batch_finished" and events[-1]["batch"] == report["batch"]
    assert [(j["id"], j["state"], len(j["outputs"])) for j in events[-1]["jobs"]] == [(job["id"], "done", 6)]


@pytest.mark.slow
def test_plugins_get_their_settings_from_farm_yaml_and_may_refuse_them(farm, farm_env, third_party):
    profile = write_profile(farm_env["tmp"], "stamp", {"processor": "stamp", "frames": "1", "settings": {"word": "x"}})
    config = farm_env["tmp"] / "farm.yaml"
    config.write_text("plugins:\n  farmtest_stamp: {greeting: hi}\n  someone_else: {x: 1}\n")
    result = farm("--config", config, "run", profile, "-o", farm_env["tmp"] / "dest")
    assert result.returncode == 0, result.stderr
    configured = [e for e in read_log(third_party["log"]) if e["hook"] == "farm_configure"]
    assert [e["settings"] for e in configured] == [{"greeting": "hi"}]

    config.write_text("plugins:\n  farmtest_stamp: {refuse: 3}\n")
    result = farm("--config", config, "run", profile, "-o", farm_env["tmp"] / "dest2")
    assert result.returncode == 2
    assert "plugins.farmtest_stamp: refuse must not be set (got 3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_job_failed_hook_fires_with_the_reason(farm, farm_env, third_party):
    profile = write_profile(farm_env["tmp"], "stamp", {
        "processor": "stamp", "frames": "1-2", "settings": {"word": "x"}, "retries": 0,
    })
    dest = farm_env["tmp"] / "dest"
    dest.mkdir()
    (dest / "stamp_001.txt").mkdir()  # the assemble step cannot write over a folder
    result = farm("run", profile, "-o", dest, "--json")
    assert result.returncode == 1
    failed = [e for e in read_log(third_party["log"]) if e["hook"] == "farm_job_failed"]
    assert len(failed) == 1 and "assembly failed" in failed[0]["reason"]
    [batch] = [e for e in read_log(third_party["log"]) if e["hook"] == "farm_batch_finished"]
    assert batch["jobs"][0]["state"] == "failed" and batch["jobs"][0]["error"] == failed[0]["reason"]
    assert result.json()["jobs"][0]["error"] == failed[0]["reason"]


def test_node_capabilities_decide_what_can_run(farm, farm_env, third_party):
    profile = write_profile(farm_env["tmp"], "stamp", {
        "processor": "stamp", "frames": "1", "settings": {"word": "x"}, "requires": {"farmtest": ">=2"},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "dest")
    assert result.returncode == 2
    assert "needs farmtest >=2" in result.stderr and "farmtest" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_plugin_is_a_warning_not_a_crash(farm, farm_env, third_party):
    install_throwaway(third_party["site"], "farmtest-broken", "raise ImportError('missing libfoo')\n")
    profile = write_profile(farm_env["tmp"], "stamp", {"processor": "stamp", "frames": "1-2", "settings": {"word": "x"}})
    result = farm("run", profile, "-o", farm_env["tmp"] / "dest", "--json")
    assert result.returncode == 0, result.stderr
    assert "farm: warning: farm plugin 'farmtest_broken'" in result.stderr
    assert "missing libfoo" in result.stderr and "pip uninstall farmtest-broken" in result.stderr
    assert result.json()["jobs"][0]["state"] == "done"


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("farm_")]


def test_every_hook_is_farm_prefixed_typed_and_documented_in_its_docstring():
    assert hook_names(), "no hooks found"
    for name in hook_names():
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, f"{name} has no docstring"
        assert "return" in fn.__annotations__, f"{name} has no return annotation"


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_in_docs(name):
    docs = (ROOT / "docs" / "hooks.md").read_text()
    assert re.search(rf"^### `{name}\(", docs, re.M), f"{name} is not documented in docs/hooks.md"


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_has_a_test(name):
    # The throw-away plugin above implements every hook, and its tests check each fires.
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_contract.py")
    implemented = f"def {name}(" in PLUGIN
    assert implemented or f"{name}" in tests, f"{name} has no test"
