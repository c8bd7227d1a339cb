"""Pictures and history on one machine (`farm run`): each segment's preview made on the node
(an image sequence's last frame, a transcode segment's poster frame), small and showing the
real picture; a preview that fails never fails its segment; a running segment's log lines
reach `farm logs --follow` as they are written; a purge shrinks the store's file.

The monitor's side of the same (the API, the page in Chromium) is in test_monitor.py,
on that module's cluster."""

from __future__ import annotations

import queue
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from farm import attemptfiles
from tests.cluster_helpers import Cluster
from tests.conftest import FARM, ROOT, write_profile

SCENE = ROOT / "examples" / "povray" / "bouncing.pov"


def mean_colour(image: Path, width: int | None = None) -> tuple[float, float, float]:
    """The mean R, G, B (0-255) of a picture, decoded by ffmpeg (scaled to ``width`` first)."""
    scale = [f"scale={width}:-2"] if width else []
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(image), "-frames:v", "1", "-vf",
                          ",".join([*scale, "format=rgb24"]), "-f", "rawvideo", "-"],
                         capture_output=True, check=True).stdout
    pixels = len(raw) // 3
    return tuple(sum(raw[channel::3]) / pixels for channel in range(3))  # type: ignore[return-value]


def previews_of(state: Path, job_id: str) -> dict[str, Path]:
    """attempt id -> its preview file, as the node kept them."""
    folder = state / "work" / attemptfiles.PREVIEWS / job_id
    return {path.stem: path for path in sorted(folder.iterdir())} if folder.is_dir() else {}


def size_of(picture: Path) -> tuple[str, int, int]:
    found = attemptfiles.image_size(picture.read_bytes())
    assert found is not None, f"{picture} is not a JPEG or PNG"
    return found


def test_an_image_sequence_keeps_a_small_picture_of_each_segments_last_frame(farm, farm_env):
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = write_profile(tmp, "shot", {
        "processor": "imageseq", "frames": "1-4", "segment": {"frames": 2},
        "settings": {"renderer": "povray", "output": "shot_####.png", "width": 400, "height": 300},
    })
    ran = farm("run", profile, SCENE, "-o", tmp / "out", "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    job = ran.json()["jobs"][0]["id"]
    kept = previews_of(state, job)
    assert sorted(kept) == [f"{job}.s00000.a1", f"{job}.s00001.a1"]
    for attempt, last_frame in zip(sorted(kept), ("shot_0002.png", "shot_0004.png")):
        kind, width, height = size_of(kept[attempt])
        assert (kind, width, height) == ("jpg", 320, 240)  # 400x300 scaled to the 320 px a preview may be
        real = mean_colour(tmp / "out" / last_frame, 320)
        shown = mean_colour(kept[attempt])
        assert all(abs(a - b) < 4 for a, b in zip(real, shown)), (attempt, real, shown)
    log = farm("logs", job, "1").stdout
    assert "=== preview: 320x240 JPG" in log


def test_a_transcode_keeps_a_poster_frame_of_each_video_segment(farm, farm_env):
    tmp, state = farm_env["tmp"], farm_env["state"]
    source = tmp / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=4",
                    "-c:v", "libx264", "-g", "25", "-pix_fmt", "yuv420p", str(source)], check=True)
    profile = write_profile(tmp, "web", {
        "processor": "transcode", "segment": {"seconds": 2}, "output": "{stem}-small.mp4",
        "settings": {"container": "mp4", "video": {"codec": "libx264", "crf": 23, "preset": "ultrafast"}},
    })
    ran = farm("run", profile, source, "-o", tmp / "out", "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    job = ran.json()["jobs"][0]["id"]
    kept = previews_of(state, job)
    assert len(kept) == 2, kept
    for index, attempt in enumerate(sorted(kept)):
        kind, width, height = size_of(kept[attempt])
        assert (kind, width, height) == ("jpg", 320, 180)
        # the segment's first frame: the source at 0 s and at 2 s
        still = tmp / f"source-{index}.png"
        subprocess.run(["ffmpeg", "-v", "error", "-ss", str(2 * index), "-i", str(source), "-frames:v", "1", "-y",
                        str(still)], check=True)
        real, shown = mean_colour(still, 320), mean_colour(kept[attempt])
        assert all(abs(a - b) < 6 for a, b in zip(real, shown)), (attempt, real, shown)


def test_a_profile_with_preview_false_makes_no_picture(farm, farm_env):
    tmp, state = farm_env["tmp"], farm_env["state"]
    source = tmp / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(source)], check=True)
    profile = write_profile(tmp, "nopics", {
        "processor": "transcode", "preview": False, "output": "{stem}-small.mp4",
        "settings": {"container": "mp4", "video": {"codec": "libx264", "crf": 23, "preset": "ultrafast"}},
    })
    ran = farm("run", profile, source, "-o", tmp / "out", "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    job = ran.json()["jobs"][0]
    assert job["state"] == "done" and Path(job["outputs"][0]).is_file()
    assert previews_of(state, job["id"]) == {}
    log = farm("logs", job["id"], "0").stdout
    assert "=== finished: exit status 0" in log, log  # the segment ran and its log was kept
    assert "=== preview" not in log


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize("made, said", [
    ("too wide", "is 640 px wide; a preview is at most 320"),
    ("text", "is not a JPEG or PNG"),
    ("raises", "ProcessorError: ffmpeg is not here"),
])
def test_a_preview_that_fails_is_a_line_in_the_log_never_the_segments_failure(tmp_path, made, said):
    from farm.errors import ProcessorError
    from farm.node import _keep_preview

    wide = tmp_path / "wide.png"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=red:size=640x10", "-frames:v", "1",
                    str(wide)], check=True)
    text = tmp_path / "note.jpg"
    text.write_text("<svg onload=alert(1)>")

    class Processor:
        def preview(self, segment, result, context):
            if made == "raises":
                raise ProcessorError("ffmpeg is not here")
            return wide if made == "too wide" else text

    work = tmp_path / "work" / "j1"
    segment = type("Segment", (), {"attempt_id": "j1.s00000.a1", "job": type("Job", (), {"work_dir": work})()})()
    log = _Log()
    _keep_preview(Processor(), segment, {}, None, log)  # type: ignore[arg-type]
    assert any(line.startswith("=== preview: none") and said in line for line in log.lines), log.lines
    assert attemptfiles.read_preview(work, "j1.s00000.a1") is None


# -- a running segment's log, line by line ------------------------------------------------

# Says a line, then waits for the gate file the test creates, then says another.
GATED = ("import pathlib, sys, time\n"
         "out, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
         "print('waiting at the gate', flush=True)\n"
         "while not gate.exists():\n"
         "    time.sleep(0.05)\n"
         "print('through the gate', flush=True)\n"
         "(out / 'f_0001.txt').write_text('1')\n")


def test_farm_logs_follow_prints_a_running_segments_lines_as_it_writes_them(farm, farm_env):
    tmp = farm_env["tmp"]
    gates = tmp / "gates"
    gates.mkdir()
    gate = gates / "open"
    script = tmp / "gated.py"
    script.write_text(GATED)
    profile = write_profile(tmp, "gated", {
        "processor": "command", "frames": "1", "segment": {"frames": 1}, "retries": 0,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", str(gate)], "expect": ["f_0001.txt"]},
        "sandbox": {"read": [str(gates)]},
    })
    runner = subprocess.Popen([*FARM, "run", str(profile), "-o", str(tmp / "out"), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    follower = None
    try:
        job = Cluster.wait_until(lambda: (r := farm("status", "--json")).returncode == 0 and r.json()
                                 and r.json()[0]["id"], 120, "the job in the store")
        so_far = Cluster.wait_until(lambda: "waiting at the gate" in (r := farm("logs", job, "0")).stdout and r,
                                    120, "the first line in `farm logs` while the segment runs")
        assert "through the gate" not in so_far.stdout and "still running" in so_far.stderr

        follower = subprocess.Popen([*FARM, "logs", job, "0", "--follow"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
        seen = []
        while "waiting at the gate" not in "".join(seen):
            seen.append(lines.get(timeout=120))
        assert not gate.exists() and "through the gate" not in "".join(seen)  # shown before the segment ended
        gate.touch()
        assert follower.wait(timeout=120) == 0, follower.stderr.read()
        while True:
            try:
                seen.append(lines.get(timeout=10))
            except queue.Empty:
                break
            if seen[-1].startswith("==> ended:"):
                break
        text = "".join(seen)
        assert text.count("waiting at the gate") == 1 and "through the gate" in text
        assert "=== finished: exit status 0" in text and seen[-1].startswith(f"==> ended: segment 0 (frames 1)")
        assert runner.wait(timeout=120) == 0, runner.stderr.read()
    finally:
        gate.touch()
        runner.wait(timeout=120)
        if follower is not None and follower.poll() is None:
            follower.kill()


# -- a purge shrinks the store ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("older_store", [False, True], ids=["store", "store-made-before-incremental-vacuum"])
def test_a_purge_shrinks_the_store_file(farm, farm_env, older_store):
    tmp, state = farm_env["tmp"], farm_env["state"]
    script = tmp / "talk.py"
    script.write_text("import pathlib, sys\nprint('x' * 3000, flush=True)\n"
                      "pathlib.Path(sys.argv[1], 'f_%04d.txt' % int(sys.argv[2])).write_text('x')\n")
    profile = write_profile(tmp, "talk", {
        "processor": "command", "frames": "1-2", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}"], "expect": ["f_{frame:04d}.txt"]},
    })
    ran = farm("run", profile, "-o", tmp / "out", "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    job = ran.json()["jobs"][0]["id"]
    store = state / "farm.db"
    db = sqlite3.connect(store)
    try:
        if older_store:
            db.execute("PRAGMA auto_vacuum=NONE")
            db.execute("VACUUM")
        # six hundred more finished jobs like it, with their segments' logs, forty days old
        with db:
            for n in range(600):
                copy = f"{job}x{n}"
                db.execute("INSERT INTO jobs SELECT ?" + _all_but(db, "jobs", 1) + " FROM jobs WHERE id = ?",
                           (copy, job))
                db.execute("INSERT INTO segments SELECT id || ?, ?" + _all_but(db, "segments", 2) +
                           " FROM segments WHERE job_id = ?", (f"x{n}", copy, job))
                db.execute("INSERT INTO attempts SELECT id || ?, segment_id || ?, ?" + _all_but(db, "attempts", 3) +
                           " FROM attempts WHERE job_id = ?", (f"x{n}", f"x{n}", copy, job))
            db.execute("UPDATE jobs SET updated = updated - 40 * 86400")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    before = store.stat().st_size
    assert before > 3_000_000  # 1200 logs of 3 KB

    purged = farm("purge", "--older-than", "30d", "--json")
    assert purged.returncode == 0, purged.stderr
    assert len(purged.json()["jobs"]) == 601
    after = store.stat().st_size
    assert after < before / 5, (before, after)
    wal = store.with_name("farm.db-wal")
    assert not wal.exists() or wal.stat().st_size < before / 5
    assert farm("status", "--all", "--json").json() == []
    again = farm("run", profile, "-o", tmp / "out2", "--json", "--quiet")  # the store works as before
    assert again.returncode == 0, again.stderr
    assert _pragma(store, "auto_vacuum") == 2  # incremental from now on


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _all_but(db: sqlite3.Connection, table: str, skip: int) -> str:
    """``, col, col...`` of a table's columns after the first ``skip`` (a copy's new ids come first)."""
    return "".join(f", {name}" for name in _columns(db, table)[skip:])


def _pragma(store: Path, name: str) -> int:
    db = sqlite3.connect(store)
    try:
        return db.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        db.close()
