"""Small crashes at the edges of the CLI: a reader that leaves early, an input that vanishes.

Before: `farm status | head -1` and `farm plan --json | head -1` ended with
"internal error: BrokenPipeError" (exit 3), and an input deleted between the check
and the submission with "internal error: FileNotFoundError ... please report it".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from farm.store import Store
from tests.conftest import FARM, Result, lavfi, write_profile
from tests.test_droplets import SETTLE, Running, drop, wait_for

SHELL_FARM = " ".join(f"'{part}'" for part in FARM)


@pytest.fixture
def reader(farm_env):
    return write_profile(farm_env["tmp"], "reader", {
        "processor": "command", "frames": "1-1", "retries": 0,
        "settings": {"command": [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", "{input}"]},
    })


@pytest.fixture
def many_jobs(farm_env):
    """A store holding 1,500 jobs, so that `farm status` writes far more than a pipe holds."""
    farm_env["state"].mkdir(parents=True, exist_ok=True)
    store = Store(farm_env["state"] / "farm.db")
    try:
        store.add_batch("b-many", "test", [
            {"id": f"j{i:05d}", "batch_id": "b-many", "seq": i, "input": f"/media/clip{i:05d}.mov",
             "profile_name": "reader", "profile": "{}", "processor": "command", "destination": "/out",
             "work_dir": f"/work/j{i:05d}", "priority": 50, "state": "cancelled"} for i in range(1500)], [])
    finally:
        store.close()


def commands(farm_env, reader) -> dict[str, list[str]]:
    source = farm_env["tmp"] / "input.bin"
    source.write_bytes(b"x")
    return {
        "status": ["status"],
        # 3,000 segments: a JSON plan of about 400 KB
        "plan --json": ["plan", "--json", str(reader), str(source), "--set", "frames=1-3000", "--set",
                        "segment.frames=1"],
        "profiles list": ["profiles", "list"],
    }


@pytest.mark.parametrize("command", ["status", "plan --json", "profiles list"])
def test_a_reader_gone_before_the_first_line_ends_the_command_quietly(farm_env, reader, many_jobs, command):
    argv = commands(farm_env, reader)[command]
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: every write fails with EPIPE
    try:
        done = subprocess.run([*FARM, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              cwd=farm_env["tmp"], timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode in (0, 141) and done.stderr == "", (done.returncode, done.stderr)


@pytest.mark.parametrize("command", ["status", "plan --json", "profiles list"])
def test_farm_piped_into_head_ends_quietly(farm_env, reader, many_jobs, command):
    argv = " ".join(f"'{part}'" for part in commands(farm_env, reader)[command])
    script = f"set -o pipefail; {SHELL_FARM} {argv} 2>farm.err | head -1; echo \"farm exit ${{PIPESTATUS[0]}}\""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=farm_env["tmp"], timeout=120)
    first, status = done.stdout.splitlines()
    assert status in ("farm exit 0", "farm exit 141"), done.stdout
    assert (farm_env["tmp"] / "farm.err").read_text() == ""
    expected = {"status": "j0", "plan --json": "{", "profiles list": ""}[command]  # status lists the most recent jobs
    assert first.startswith(expected) and first.strip(), first


@pytest.mark.slow
def test_progress_bars_into_head_stop_drawing_and_the_batch_finishes(farm_env, reader):
    """Progress bars on stderr whose reader left: rich would end the process with status 1
    (read as "a job failed"); the bars stop, the batch finishes, the status is the batch's."""
    tmp = farm_env["tmp"]
    inputs = []
    for i in range(3):
        inputs.append(tmp / f"in{i}.bin")
        inputs[-1].write_bytes(bytes([i]) * 10)
    names = " ".join(f"'{p}'" for p in inputs)
    # with the bars in the pipe, 141 once a write failed; a busy machine may draw so few
    # frames that they fit in the pipe before `head` leaves, and no write fails: then 0
    for redirect, expected in (("2>&1 >/dev/null", {"farm exit 0"}), ("2>&1", {"farm exit 0", "farm exit 141"})):
        script = (f"set -o pipefail; {SHELL_FARM} run '{reader}' {names} -o out --overwrite {redirect} | head -1; "
                  "echo \"farm exit ${PIPESTATUS[0]}\"")
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300)
        first, status = done.stdout.splitlines()
        assert status in expected and "Traceback" not in first, done.stdout
    store = Store(farm_env["state"] / "farm.db")
    try:
        jobs = store.jobs()
        assert [job["state"] for job in jobs] == ["done"] * 6, [(job["state"], job["error"]) for job in jobs]
    finally:
        store.close()


def test_farm_status_watch_into_head_ends_without_waiting_for_a_change(farm_env):
    """Its one line fits in the pipe, so no write fails: it must notice the reader has gone
    by itself (before: it waited for the next change, for ever on an idle farm)."""
    farm_env["state"].mkdir(parents=True, exist_ok=True)
    store = Store(farm_env["state"] / "farm.db")
    try:
        store.add_batch("b-one", "test", [
            {"id": "j00000", "batch_id": "b-one", "seq": 0, "input": "/media/clip.mov", "profile_name": "reader",
             "profile": "{}", "processor": "command", "destination": "/out", "work_dir": "/work/j00000",
             "priority": 50, "state": "cancelled"}], [])
    finally:
        store.close()
    script = f"set -o pipefail; {SHELL_FARM} status --watch 2>err | head -1; echo \"farm exit ${{PIPESTATUS[0]}}\""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=farm_env["tmp"], timeout=120)
    first, status = done.stdout.splitlines()
    assert first.startswith("j00000  cancelled") and status == "farm exit 141", done.stdout
    assert (farm_env["tmp"] / "err").read_text() == ""


@pytest.mark.slow
def test_farm_watch_piped_into_head_stops_as_after_ctrl_c(farm_env, reader):
    tmp = farm_env["tmp"]
    folder = tmp / "in"
    folder.mkdir()
    for i in range(3):
        (tmp / f"f{i}.bin").write_bytes(bytes([i]) * 10)
        drop(tmp / f"f{i}.bin", folder)
    script = (f"set -o pipefail; {SHELL_FARM} watch in --profile '{reader}' -o out --settle {SETTLE} 2>watch.err "
              "| head -1; echo \"farm exit ${PIPESTATUS[0]}\"")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300)
    first, status = done.stdout.splitlines()
    err = (tmp / "watch.err").read_text()
    assert first.startswith("queued     f") and status == "farm exit 141", (done.stdout, err)
    assert "Traceback" not in err and "error" not in err.lower(), err
    # the jobs in flight when the reader left were finished and their files moved
    assert sorted(p.name for p in (folder / "done").iterdir()) == ["f0.bin", "f1.bin", "f2.bin"]


# -- an input deleted at every moment between the arguments and the store -------------------------


def classify(done: Result, source: Path) -> str:
    """One run's outcome, checked: a one-line error, a job failed with its reason, or done."""
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    if done.returncode == 2:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("farm: error: input ") and "does not exist" in lines[0], \
            done.stderr
        return "refused"
    assert done.returncode in (0, 1), (done.returncode, done.stderr)
    job = json.loads(done.stdout)["jobs"][0]
    if done.returncode == 0:
        assert job["state"] == "done"
        return "done"
    assert job["state"] == "failed", job
    assert f"the source {source} was deleted" in job["error"], job["error"]
    return "failed"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["command", "transcode"])
def test_an_input_deleted_at_any_moment_is_a_one_line_error_or_a_failed_job(farm, farm_env, reader, kind):
    """`farm run` as a process of its own; the input is deleted after d seconds, for delays spread
    over a whole run (measured first), then between the last refusal and the first success
    until a run lands in between. Every run ends in one line or a job failed with its reason."""
    tmp = farm_env["tmp"]
    if kind == "transcode":  # planning probes the source with ffprobe: another window
        original = lavfi(tmp / "original.mp4", seconds=0.4, size="96x64")
        profile = "h264-web-720p"
    else:
        original = tmp / "original.bin"
        original.write_bytes(b"data" * 1000)
        profile = str(reader)
    runs = 0

    def run(delay: float | None) -> tuple[str, float]:
        nonlocal runs
        runs += 1
        source = tmp / f"input{runs:03d}{original.suffix}"
        shutil.copyfile(original, source)
        started = time.monotonic()
        timer = threading.Timer(delay, source.unlink) if delay is not None else None
        if timer is not None:
            timer.start()
        done = farm("run", profile, source, "-o", tmp / f"out{runs:03d}", "--json", "--quiet", cwd=tmp)
        if timer is not None:
            timer.join()
        return classify(done, source), time.monotonic() - started

    outcome, whole = run(None)
    assert outcome == "done"
    seen: dict[float, str] = {}
    for step in range(9):
        delay = whole * step / 8
        seen[delay] = run(delay)[0]
    # Narrow in on the moments between the last refusal and the first run that finished.
    for _ in range(8):
        if "failed" in seen.values():
            break
        refused = max((d for d, o in seen.items() if o == "refused"), default=0.0)
        finished = min((d for d, o in seen.items() if o == "done" and d > refused), default=whole)
        delay = (refused + finished) / 2
        seen[delay] = run(delay)[0]
    print(f"\n{kind}: whole run {whole:.2f} s; outcomes by delay:",
          ", ".join(f"{d:.2f}s {o}" for d, o in sorted(seen.items())))
    assert seen[0.0] == "refused"
    assert "failed" in seen.values(), seen


def test_an_input_gone_before_its_job_is_stored_fails_that_job_and_the_batch_goes_on(farm_env, reader):
    """The scheduler's own look at the input (its size and mtime, kept to notice a change
    later) finds it gone: that job fails with the reason, the others run."""
    from farm.config import load_config
    from farm.local import LocalFarm, check_inputs
    from farm.node import install_runtime
    from farm.plugins import load_plugins
    from farm.profiles import load_profile

    tmp = farm_env["tmp"]
    kept, gone = tmp / "kept.bin", tmp / "gone.bin"
    kept.write_bytes(b"kept")
    gone.write_bytes(b"gone")
    config, plugins = load_config(), load_plugins()
    loaded = load_profile(str(reader), plugins)
    inputs = check_inputs(loaded, plugins, [str(gone), str(kept)])
    gone.unlink()  # after the check, before the submission
    with LocalFarm.start(config, plugins, None, install_runtime(config.node)) as local:
        _, job_ids = local.scheduler.submit(loaded, inputs, tmp / "out")
        local.scheduler.run_until_done(job_ids)
        first, second = (local.scheduler.jobs[job_id] for job_id in job_ids)
        assert (first.state, first.error) == ("failed", f"the source {gone} was deleted before the job was accepted")
        assert second.state == "done"
        assert local.store.job(job_ids[0])["error"] == first.error


def test_files_deleted_while_a_droplet_takes_them_end_with_a_reason(farm_env, reader):
    """Drops deleted after d seconds, for delays around the settle time: each is either
    never taken, processed, or failed with the reason; never an internal error."""
    tmp = farm_env["tmp"]
    folder = tmp / "in"
    folder.mkdir()
    delays = [SETTLE * i / 4 for i in range(13)]  # 0 .. 3x the settle time
    with Running(farm_env, reader) as run:
        timers = []
        for i, delay in enumerate(delays):
            (tmp / f"d{i:02d}.bin").write_bytes(bytes([i]) * 100)
            path = drop(tmp / f"d{i:02d}.bin", folder)
            timers.append(threading.Timer(delay, lambda p=path: p.unlink(missing_ok=True)))
            timers[-1].start()
        for timer in timers:
            timer.join()
        wait_for(lambda: run.service.idle and not run.service.pending, 60, what="the droplet to be idle")
        rows = run.ledger()
        assert run.service.errors == []
        for row in rows:
            assert row["state"] in ("processed", "failed"), dict(row)
            if row["state"] == "failed":
                assert "was deleted" in row["reason"] and "internal error" not in row["reason"], dict(row)
        print(f"\n{len(delays)} drops deleted after 0-{delays[-1]:.2f} s: {len(rows)} taken, "
              f"{sum(r['state'] == 'failed' for r in rows)} failed with the reason")


@pytest.mark.slow
def test_an_input_deleted_while_farm_plan_runs_is_a_one_line_error(farm, farm_env):
    """`farm plan` with a transcode profile (it probes the source with ffprobe twice); the
    input deleted after d seconds, for delays spread over a whole run measured first."""
    tmp = farm_env["tmp"]
    original = lavfi(tmp / "original.mp4", seconds=0.4, size="96x64")
    runs = 0

    def plan(delay: float | None) -> tuple[str, float]:
        nonlocal runs
        runs += 1
        source = tmp / f"plan{runs:03d}.mp4"
        shutil.copyfile(original, source)
        started = time.monotonic()
        timer = threading.Timer(delay, source.unlink) if delay is not None else None
        if timer is not None:
            timer.start()
        proc = farm("plan", "h264-web-720p", source, "--json", timeout=120, cwd=tmp)
        out, err = proc.stdout, proc.stderr
        if timer is not None:
            timer.join()
        assert "Traceback" not in err and "internal error" not in err, err
        if proc.returncode == 0:
            assert json.loads(out)["jobs"][0]["segments"], out
            return "planned", time.monotonic() - started
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, err
        assert lines[0] in (f"farm: error: input {str(source)!r} does not exist",
                            f"farm: error: input {str(source)!r} was deleted while it was being planned"), lines[0]
        return "refused", time.monotonic() - started

    outcome, whole = plan(None)
    assert outcome == "planned"
    outcomes = [plan(whole * step / 10)[0] for step in range(12)]
    print(f"\nfarm plan: whole run {whole:.2f} s; outcomes: {outcomes}")
    assert outcomes[0] == "refused"
