"""Droplets: real watchdog observers on real folders, real ffmpeg, the real store.

Most tests run a droplet in this process next to the embedded default (a LocalFarm
driven by a thread, as `farm watch` and the controller drive it); a few run the real
`farm watch` and `farm droplets` commands.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from farm.droplets.config import DropletConfig, is_partial_name
from farm.droplets.watch import choose_observer, filesystem_type, fingerprint, is_network_filesystem
from farm.errors import UsageError
from tests.conftest import FARM, lavfi, write_profile

SETTLE = 0.3


# -- helpers ----------------------------------------------------------------------------------


# deadlines: generous, since a loaded machine (both cores busy) is slow to get there; a
# deadline costs nothing when the state comes
def wait_for(predicate, timeout=120.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Small movies made by ffmpeg's lavfi sources: a few with different content."""
    folder = tmp_path_factory.mktemp("clips")
    return [lavfi(folder / f"clip{i}.mp4", seconds=0.4 + 0.2 * i, size="96x64") for i in range(4)]


@pytest.fixture
def check_profile(farm_env):
    """Decodes the dropped file with ffmpeg: media passes, anything else fails with ffmpeg's reason."""
    return write_profile(farm_env["tmp"], "decode-check", {
        "processor": "command", "frames": "1-1", "retries": 0,
        "settings": {"command": ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "{input}", "-f", "null", "-"]},
    })


@pytest.fixture
def python_profile(farm_env):
    """Reads the dropped file with Python (cheap: for the many-files test)."""
    return write_profile(farm_env["tmp"], "read-it", {
        "processor": "command", "frames": "1-1", "retries": 0,
        "settings": {"command": [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", "{input}"]},
    })


class Running:
    """A droplet in this process, next to a LocalFarm whose scheduler a thread drives."""

    def __init__(self, farm_env, profile, recover=False, others=(), **droplet):
        self.tmp = farm_env["tmp"]
        self.others = list(others)
        self.folder = Path(droplet.pop("folder", self.tmp / "in"))
        self.dest = Path(droplet.pop("destination", self.tmp / "out"))
        self.config = DropletConfig(folder=self.folder, destination=self.dest, profile=str(profile),
                                    settle=droplet.pop("settle", SETTLE), **droplet)
        self.recover = recover
        self.events: list[tuple[str, str, str | None, str]] = []

    def __enter__(self) -> Running:
        from farm.config import load_config
        from farm.droplets.service import start_droplets
        from farm.local import LocalFarm
        from farm.node import install_runtime
        from farm.plugins import load_plugins

        config = load_config()
        plugins = load_plugins()
        node = install_runtime(config.node)
        self.farm = LocalFarm.start(config, plugins, None, node)
        if self.recover:
            self.farm.scheduler.recover()
        # as a controller starts them: after recover(), before the scheduler steps
        self.service = start_droplets(
            self.farm.scheduler, [self.config, *self.others], plugins,
            on_event=lambda kind, name, path, job, detail: self.events.append((kind, path, job, detail)))
        self._stop = threading.Event()
        self._driver = threading.Thread(target=self._drive, daemon=True)
        self._driver.start()
        return self

    def _drive(self) -> None:
        while not self._stop.is_set():
            self.service.pump()
            self.farm.scheduler.step(wait=0.05)

    def __exit__(self, *exc) -> None:
        try:
            self.service.close()
        finally:
            self._stop.set()
            self._driver.join(timeout=30)
            self.farm.close()

    @property
    def store(self):
        return self.farm.store

    def jobs_for(self, name: str) -> list:
        return [row for row in self.store.jobs() if row["input"] and Path(row["input"]).name == name]

    def ledger(self) -> list:
        return list(reversed(self.store.droplet_files(self.config.key, limit=10_000)))

    def kinds(self, kind: str) -> list:
        return [event for event in self.events if event[0] == kind]

    def wait_kind(self, kind: str, count: int = 1, timeout: float = 120.0) -> list:
        return wait_for(lambda: len(self.kinds(kind)) >= count and self.kinds(kind), timeout, what=f"{count} {kind}")


@pytest.fixture
def folders(farm_env):
    (farm_env["tmp"] / "in").mkdir()
    return farm_env["tmp"] / "in", farm_env["tmp"] / "out"


def drop(source: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a file in the way a person does: under a temporary name, then renamed (atomic)."""
    target = folder / (name or source.name)
    shutil.copyfile(source, folder / f".{target.name}.part")
    os.replace(folder / f".{target.name}.part", target)
    return target


# -- dropping files ---------------------------------------------------------------------------


def test_a_dropped_file_becomes_one_job_and_moves_to_done(farm_env, folders, clips, check_profile):
    folder, dest = folders
    with Running(farm_env, check_profile) as run:
        assert run.service.droplets[0].watch.kind == "native"
        shutil.copyfile(clips[0], folder / "a.mp4")  # written in place, not renamed
        kind, path, job_id, moved = run.wait_kind("processed")[0]
        assert path == str(folder / "a.mp4") and moved == str(folder / "done" / "a.mp4")
        assert (folder / "done" / "a.mp4").read_bytes() == clips[0].read_bytes()
        assert not (folder / "a.mp4").exists()
        jobs = run.jobs_for("a.mp4")
        assert [(j["id"], j["state"]) for j in jobs] == [(job_id, "done")]
        rows = run.ledger()
        assert [(r["state"], r["job_id"], r["size"]) for r in rows] == [("processed", job_id, clips[0].stat().st_size)]
        assert rows[0]["digest"] == fingerprint(clips[0], clips[0].stat().st_size)
        batch = run.store._execute("SELECT origin FROM batches WHERE id = ?", (jobs[0]["batch_id"],)).fetchone()
        assert batch["origin"] == f"droplet:{folder}"


def test_a_dropped_image_sequence_is_one_job_fingerprinted_by_its_first_frame(farm_env, folders):
    """Ten PNG frames dropped one by one: one job from the first frame, the other nine go
    with it (in the ledger, and into done/), and the digest reads the first frame only."""
    import hashlib

    folder, dest = folders
    frames = farm_env["tmp"] / "frames"
    frames.mkdir()
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=96x64:rate=25:duration=0.4", "-start_number", "1", str(frames / "shot_%04d.png")],
                   check=True)
    names = sorted(p.name for p in frames.iterdir())
    assert len(names) == 10
    profile = write_profile(farm_env["tmp"], "seq", {
        "processor": "transcode", "retries": 0, "output": "{stem}.{ext}",
        "settings": {"container": "mp4", "audio": None,
                     "video": {"codec": "libx264", "preset": "ultrafast", "crf": 30, "fps": "25"}}})
    with Running(farm_env, profile) as run:
        for name in names:
            drop(frames / name, folder)
        kind, path, job_id, moved = run.wait_kind("processed", timeout=120)[0]
        assert path == str(folder / "shot_0001.png")
        assert [(j["id"], j["state"]) for j in run.store.jobs()] == [(job_id, "done")]
        out = dest / "shot_0001.mp4"
        counted = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=nb_read_packets",
                                  "-of", "csv=p=0", str(out)], capture_output=True, text=True, check=True).stdout
        assert counted.strip() == "10"
        wait_for(lambda: sorted(p.name for p in (folder / "done").iterdir()) == names, what="the frames in done/")
        rows = {Path(r["path"]).name: r for r in run.ledger()}
        assert sorted(rows) == names
        assert (rows["shot_0001.png"]["state"], rows["shot_0001.png"]["job_id"]) == ("processed", job_id)
        assert all((rows[n]["state"], rows[n]["job_id"], rows[n]["reason"]) ==
                   ("skipped", job_id, "goes with shot_0001.png (one job)") for n in names[1:])
        first = frames / names[0]
        alone = fingerprint(first, first.stat().st_size)
        assert rows["shot_0001.png"]["digest"] == hashlib.sha256(f"{alone}+9".encode()).hexdigest()
        assert not run.kinds("failed") and not run.kinds("skipped")


@pytest.mark.slow
def test_a_slow_chunked_copy_is_taken_only_once_settled(farm_env, folders, clips, check_profile):
    folder, _ = folders
    settle = 2.0
    data = clips[2].read_bytes()
    with Running(farm_env, check_profile, settle=settle) as run:
        chunks = [data[i:i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
        with open(folder / "slow.mp4", "wb") as handle:
            # an uploader that pauses between chunks, for far less than `settle` (a busy
            # machine may stretch a pause: it must stay shorter than `settle` all the same)
            for chunk in chunks:
                handle.write(chunk)
                handle.flush()
                last_write = time.time()
                time.sleep(settle * 0.15)
                assert not run.kinds("queued"), "submitted while it was still being written"
        run.wait_kind("processed")
        job = run.jobs_for("slow.mp4")[0]
        assert len(run.jobs_for("slow.mp4")) == 1
        assert job["created"] - last_write >= settle * 0.95, "taken before it had settled"


def test_partial_names_are_ignored_until_renamed(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile) as run:
        for name in ("b.mp4.part", "b.mp4.crdownload", "b.tmp", ".b.mp4", "~$b.mp4"):
            shutil.copyfile(clips[1], folder / name)
        time.sleep(SETTLE * 4)
        assert not run.events
        os.rename(folder / "b.mp4.part", folder / "b.mp4")
        run.wait_kind("processed")
        time.sleep(SETTLE * 3)
        assert [e[1] for e in run.kinds("queued")] == [str(folder / "b.mp4")]
        assert len(run.store.jobs()) == 1


def test_partial_names():
    assert all(is_partial_name(n) for n in ("a.part", "a.mov.crdownload", "a.tmp", ".a.mov", "~$a.doc", "A.PART"))
    assert not any(is_partial_name(n) for n in ("a.mov", "part.mov", "a.partition", "tmp.mp4"))


@pytest.mark.slow
def test_files_dropped_while_down_are_submitted_once_at_start(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile, after="leave") as run:
        drop(clips[3], folder, "first.mp4")
        run.wait_kind("processed")
    for i, clip in enumerate(clips[:3]):  # nobody watching
        drop(clip, folder, f"while-down-{i}.mp4")
    with Running(farm_env, check_profile, after="leave") as run:
        run.wait_kind("processed", 3)
        time.sleep(SETTLE * 3)
        assert sorted(Path(e[1]).name for e in run.kinds("queued")) == [f"while-down-{i}.mp4" for i in range(3)]
    with Running(farm_env, check_profile, after="leave") as run:  # and a third start takes nothing
        time.sleep(SETTLE * 4)
        assert run.service.droplets[0].watch.settling == 0
        assert not run.events
        names = [Path(row["input"]).name for row in run.store.jobs()]
        assert sorted(names) == ["first.mp4", "while-down-0.mp4", "while-down-1.mp4", "while-down-2.mp4"]
        assert [r["state"] for r in run.ledger()] == ["processed"] * 4


def slow_profile(farm_env):
    return write_profile(farm_env["tmp"], "slow-read", {
        "processor": "command", "frames": "1-1", "retries": 0,
        "settings": {"command": [sys.executable, "-c", "import sys, time; open(sys.argv[1], 'rb').read(); "
                                 "time.sleep(float(sys.argv[2]))", "{input}", "1.5"]},
    })


@pytest.mark.slow
@pytest.mark.parametrize("resumed", [True, False], ids=["controller-resumed-it", "droplet-resumes-it"])
def test_an_accepted_job_is_not_submitted_again_after_a_restart(farm_env, folders, clips, resumed):
    folder, _ = folders
    profile = slow_profile(farm_env)
    with Running(farm_env, profile) as run:
        drop(clips[0], folder, "accepted.mp4")
        job_id = run.wait_kind("queued")[0][2]
        # stopped (as by SIGKILL) while the job runs: the store has it unfinished
    with Running(farm_env, profile, recover=resumed) as run:
        assert run.store.job(job_id)["state"] in ("done", "failed", "running", "queued")
        kind, path, finished, _ = run.wait_kind("processed")[0]
        assert (folder / "done" / "accepted.mp4").exists()
        assert finished == job_id
        time.sleep(SETTLE * 3)
        assert [j["id"] for j in run.jobs_for("accepted.mp4")] == [job_id]
        assert not run.kinds("queued")


def test_the_same_file_dropped_twice_is_one_job(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile) as run:
        drop(clips[0], folder, "twice.mp4")
        run.wait_kind("processed")
        drop(clips[0], folder, "twice.mp4")  # again, same content
        drop(clips[0], folder, "renamed-copy.mp4")  # same content, another name
        run.wait_kind("skipped", 2)
        assert len(run.store.jobs()) == 1
        assert sorted(p.name for p in (folder / "done").iterdir()) == ["renamed-copy.mp4", "twice (2).mp4", "twice.mp4"]
        drop(clips[1], folder, "twice.mp4")  # new content under the same name: a new job
        run.wait_kind("processed", 2)
        assert len(run.jobs_for("twice.mp4")) == 2
        assert [r["state"] for r in run.ledger()] == ["processed", "skipped", "skipped", "processed"]


def test_touching_or_renaming_a_processed_file_does_not_submit_it_again(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile, after="leave") as run:
        path = drop(clips[0], folder, "touched.mp4")
        run.wait_kind("processed")
        os.utime(path)  # touch
        with open(path, "ab"):  # opened for writing, nothing written
            pass
        time.sleep(SETTLE * 4)
        os.rename(path, folder / "renamed.mp4")
        run.wait_kind("skipped", 2)
        time.sleep(SETTLE * 3)
        assert len(run.store.jobs()) == 1 and len(run.kinds("queued")) == 1
        assert (folder / "renamed.mp4").exists()


@pytest.mark.slow
def test_two_hundred_files_at_once_are_all_submitted_once(farm_env, folders, python_profile):
    folder, _ = folders
    staging = farm_env["tmp"] / "staging"
    staging.mkdir()
    for i in range(200):
        (staging / f"file{i:03d}.dat").write_bytes(f"file {i}\n".encode() * 100)
    with Running(farm_env, python_profile) as run:
        for path in staging.iterdir():
            os.rename(path, folder / path.name)
        run.wait_kind("queued", 200, timeout=120)
        run.wait_kind("processed", 200, timeout=240)
        time.sleep(SETTLE * 2)
        assert len(run.kinds("queued")) == 200 and not run.kinds("failed")
        jobs = run.store.jobs()
        assert len(jobs) == 200 and len({j["input"] for j in jobs}) == 200
        assert all(j["state"] == "done" for j in jobs)
        assert len(list((folder / "done").iterdir())) == 200
        rows = run.ledger()
        assert len(rows) == 200 and len({r["job_id"] for r in rows}) == 200
        batches = run.store._execute("SELECT COUNT(*) AS n FROM batches").fetchone()["n"]
        assert batches < 200  # files that settle together go in one batch


@pytest.mark.slow
def test_a_folder_that_disappears_and_comes_back(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile) as run:
        drop(clips[0], folder, "before.mp4")
        run.wait_kind("processed")
        away = folder.with_name("in-away")
        os.rename(folder, away)  # the share goes away
        watch = run.service.droplets[0].watch
        wait_for(lambda: watch.state == "unavailable", 60, what="the outage to be noticed")
        assert "missing" in watch.message
        report = wait_for(lambda: {r["folder"]: r for r in run.store.droplet_states()}.get(str(folder)), 60)
        wait_for(lambda: run.store.droplet_states()[0]["state"] == "unavailable", 60, what="the outage reported")
        os.rename(away, folder)  # it comes back, with a file dropped while it was away
        drop(clips[1], folder, "during.mp4")
        wait_for(lambda: watch.state == "watching", 60, what="the folder to be watched again")
        run.wait_kind("processed", 2)
        drop(clips[2], folder, "after.mp4")  # and the new observer sees new drops
        run.wait_kind("processed", 3)
        assert sorted(Path(e[1]).name for e in run.kinds("processed")) == ["after.mp4", "before.mp4", "during.mp4"]
        assert watch.outages == 1 and report is not None
        # deleted and made anew (another inode) works the same
        shutil.rmtree(folder)
        wait_for(lambda: watch.state == "unavailable", 60, what="the second outage")
        folder.mkdir()
        wait_for(lambda: watch.state == "watching", 60, what="the new folder to be watched")
        drop(clips[0], folder, "new-folder.mp4")  # content processed before: skipped, not lost
        run.wait_kind("skipped")


def test_one_droplet_down_leaves_the_others_running(farm_env, folders, clips, check_profile):
    folder, _ = folders
    other = farm_env["tmp"] / "other"
    other.mkdir()
    second = DropletConfig(name="second", folder=other, profile=str(check_profile),
                           destination=farm_env["tmp"] / "out2", settle=SETTLE)
    with Running(farm_env, check_profile, others=[second]) as run:
        first, other_watch = (d.watch for d in run.service.droplets)
        shutil.rmtree(folder)
        wait_for(lambda: first.state == "unavailable", 60, what="the outage")
        drop(clips[0], other, "still-running.mp4")
        kind, path, job_id, _ = run.wait_kind("processed")[0]
        assert path == str(other / "still-running.mp4") and other_watch.state == "watching"
        states = {row["name"]: row["state"] for row in run.store.droplet_states()}
        assert states == {str(folder): "unavailable", "second": "watching"}


def test_include_and_exclude_patterns(tmp_path):
    from farm.droplets.watch import FolderWatch

    config = DropletConfig(folder=tmp_path / "in", profile="p", destination=tmp_path / "out",
                           include=["*.mov", "*.mp4"], exclude=["*proxy*"])
    watch = FolderWatch(config, threading.Event())
    taken = [name for name in ("a.mov", "B.MP4", "a-proxy.mov", "a.txt", "a.mov.part", ".a.mov", "sub/a.mov")
             if watch.wanted(str(tmp_path / "in" / name))]
    assert taken == ["a.mov", "B.MP4"]
    assert not watch.wanted(str(tmp_path / "elsewhere.mov"))


def test_a_non_media_file_goes_to_failed_with_the_reason(farm_env, folders, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile) as run:
        (folder / "notes.mov").write_text("this is not a movie\n")
        kind, path, job_id, reason = run.wait_kind("failed")[0]
        assert "Invalid data found when processing input" in reason
        assert (folder / "failed" / "notes.mov").read_text() == "this is not a movie\n"
        note = (folder / "failed" / "notes.mov.error.txt").read_text()
        assert "Invalid data found" in note and job_id in note and "decode-check" in note
        assert not (folder / "notes.mov").exists()
        assert run.store.job(job_id)["state"] == "failed"
        assert [(r["state"], r["moved_to"]) for r in run.ledger()] == [("failed", str(folder / "failed" / "notes.mov"))]
        # dropped again after a fix: a new job, and the new reason sits beside the new copy
        (folder / "notes.mov").write_text("still not a movie\n")
        run.wait_kind("failed", 2)
        assert (folder / "failed" / "notes (2).mov.error.txt").exists()


@pytest.mark.slow
def test_the_polling_observer(farm_env, folders, clips, check_profile):
    folder, _ = folders
    # settle longer than the pause between the two writes below, as a user would set it
    with Running(farm_env, check_profile, observer="polling", poll_interval=0.2, settle=1.5) as run:
        watch = run.service.droplets[0].watch
        assert watch.kind == "polling" and type(watch.observer).__name__ == "PollingObserverVFS"
        drop(clips[0], folder, "polled.mp4")
        run.wait_kind("processed")
        (folder / "slowly.mp4").write_bytes(clips[1].read_bytes()[:1000])
        time.sleep(0.5)
        with open(folder / "slowly.mp4", "ab") as handle:
            handle.write(clips[1].read_bytes()[1000:])
        run.wait_kind("processed", 2)
        assert sorted(Path(j["input"]).name for j in run.store.jobs()) == ["polled.mp4", "slowly.mp4"]


def test_after_delete_and_recursive_folders(farm_env, folders, clips, check_profile):
    folder, _ = folders
    (folder / "sub").mkdir()
    with Running(farm_env, check_profile, after="delete", recursive=True) as run:
        drop(clips[0], folder / "sub", "deep.mp4")
        (folder / "fresh").mkdir()
        drop(clips[1], folder / "fresh", "new-dir.mp4")
        run.wait_kind("processed", 2)
        assert not (folder / "sub" / "deep.mp4").exists() and not (folder / "fresh" / "new-dir.mp4").exists()
        (folder / "failed").mkdir()
        (folder / "failed" / "ignored.mp4").write_bytes(clips[2].read_bytes())  # our own folders are not watched
        time.sleep(SETTLE * 4)
        assert len(run.store.jobs()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["native", "polling"])
def test_links_out_of_the_folder_are_never_followed(farm_env, folders, clips, check_profile, observer):
    folder, _ = folders
    elsewhere = farm_env["tmp"] / "elsewhere"
    (elsewhere / "footage").mkdir(parents=True)
    secret = drop(clips[0], elsewhere, "secret.mp4")
    drop(clips[1], elsewhere / "footage", "deep.mp4")
    (folder / "early.mp4").symlink_to(secret)  # found by the scan at start
    with Running(farm_env, check_profile, recursive=True, observer=observer, poll_interval=0.2) as run:
        (folder / "late.mp4").symlink_to(secret)  # seen as an event
        (folder / "footage").symlink_to(elsewhere / "footage", target_is_directory=True)
        (folder / "sub").mkdir()
        drop(clips[2], folder / "sub", "real.mp4")  # an ordinary drop beside them goes on as usual
        run.wait_kind("failed", 2)
        run.wait_kind("skipped")
        run.wait_kind("processed")
        time.sleep(SETTLE * 4)
        assert [Path(j["input"]).name for j in run.store.jobs()] == ["real.mp4"]  # nothing outside was read
        rows = {Path(r["path"]).name: (r["state"], r["reason"]) for r in run.ledger()}
        assert rows.keys() == {"early.mp4", "late.mp4", "footage", "real.mp4"}
        for name in ("early.mp4", "late.mp4"):
            assert rows[name] == ("failed", f"{name} is a symbolic link to {secret}, outside the watched folder "
                                            f"{folder}; it was not read")
            assert (folder / "failed" / name).is_symlink()  # the link was moved, never its target
            assert f"reason: {name} is a symbolic link to {secret}" in (folder / "failed" / f"{name}.error.txt").read_text()
        assert rows["footage"] == ("skipped", f"footage is a link to the folder {elsewhere / 'footage'}; "
                                              "a droplet never follows links to folders")
        assert (folder / "footage").is_symlink()  # left where it is, noted once
        assert sorted(p.name for p in elsewhere.rglob("*")) == ["deep.mp4", "footage", "secret.mp4"]
        assert secret.read_bytes() == clips[0].read_bytes()
        # however a path through the linked folder came to be offered, its file is neither read nor moved
        from farm.droplets.watch import Settled

        run.service.stop_intake()
        through = folder / "footage" / "deep.mp4"
        info = through.stat()
        run.service._take(run.service.droplets[0], [Settled(str(through), info.st_size, info.st_mtime_ns)])
        assert run.ledger()[-1]["state"] == "failed" and "is reached through a symbolic link" in run.ledger()[-1]["reason"]
        assert (elsewhere / "footage" / "deep.mp4").exists() and not run.jobs_for("deep.mp4")


def test_a_name_with_a_newline_is_one_file_taken_once(farm_env, folders, clips, check_profile):
    folder, _ = folders
    with Running(farm_env, check_profile) as run:
        drop(clips[0], folder, "two\nlines.mp4")
        kind, path, job_id, moved = run.wait_kind("processed")[0]
        assert path == str(folder / "two\nlines.mp4") and moved == str(folder / "done" / "two\nlines.mp4")
        assert run.store.job(job_id)["input"] == str(folder / "two\nlines.mp4")
        time.sleep(SETTLE * 3)
        assert len(run.store.jobs()) == 1 and [r["state"] for r in run.ledger()] == ["processed"]


# -- choosing the observer, and refusing bad configurations ---------------------------------------

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/nfs nfs4 rw,relatime 0 0
//nas/share /mnt/smb\\040share cifs rw 0 0
me@host:/data /mnt/ssh fuse.sshfs rw 0 0
/dev/sdb1 /mnt/usb fuseblk rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


def test_auto_chooses_polling_on_network_file_systems(tmp_path):
    assert filesystem_type("/mnt/nfs/drop", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/smb share/in", MOUNTS) == "cifs"
    assert filesystem_type("/mnt/nfsother", MOUNTS) == "ext4"
    assert [is_network_filesystem(filesystem_type(p, MOUNTS)) for p in
            ("/mnt/nfs/a", "/mnt/smb share", "/mnt/ssh/x", "/mnt/usb/x", "/tmp/x", "/home")] == \
        [True, True, True, False, False, False]

    def config(folder, **extra):
        return DropletConfig(folder=folder, profile="p", destination="/elsewhere", **extra)

    assert choose_observer(config("/mnt/nfs/drop"), MOUNTS)[0] == "polling"
    assert choose_observer(config("/mnt/ssh/drop"), MOUNTS)[0] == "polling"
    assert choose_observer(config("/tmp/drop"), MOUNTS)[0] == "native"
    assert choose_observer(config("/mnt/nfs/drop", observer="native"), MOUNTS)[0] == "native"
    assert choose_observer(config(tmp_path))[0] in ("native", "polling")  # this machine's real /proc/mounts


def test_farm_yaml_refuses_outputs_inside_a_watched_folder(farm_env):
    from farm.config import load_config

    base = yaml.safe_load(farm_env["config"].read_text())
    cases = [
        ([{"folder": "/drop", "profile": "p", "destination": "/drop/out"}], "inside the watched folder /drop"),
        ([{"folder": "/drop", "profile": "p", "destination": "/drop"}], "inside the watched folder /drop"),
        ([{"folder": "/a", "profile": "p", "destination": "/b/out"},
          {"folder": "/b", "profile": "p", "destination": "/out2"}], "inside the folder watched by droplet"),
        ([{"folder": "/a", "profile": "p", "destination": "/o1"},
          {"folder": "/a", "profile": "p", "destination": "/o2"}], "watch the same folder"),
        ([{"folder": "/a", "profile": "p", "destination": "/o1", "recursive": True},
          {"folder": "/a/b", "profile": "p", "destination": "/o2"}], "inside the folder of recursive droplet"),
        ([{"folder": "/a", "profile": "p", "destination": "/o", "after": "shred"}], "droplets.0.after"),
    ]
    for droplets, message in cases:
        farm_env["config"].write_text(yaml.safe_dump({**base, "droplets": droplets}))
        with pytest.raises(UsageError) as error:
            load_config()
        assert message in str(error.value) and str(farm_env["config"]) in str(error.value)
    farm_env["config"].write_text(yaml.safe_dump({**base, "droplets": [
        {"name": "proxies", "folder": "/drop", "profile": "p", "destination": "/out", "set": {"frames": "1-2"},
         "settle": "500ms"}]}))
    droplet = load_config().droplets[0]
    assert (droplet.overrides, droplet.settle, droplet.after, droplet.done_folder) == (
        ["frames=1-2"], 0.5, "move", Path("/drop/done"))


# -- the commands ------------------------------------------------------------------------------


def start_watch(farm_env, *args):
    return subprocess.Popen([*FARM, "watch", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=farm_env["tmp"], env=os.environ.copy())


@pytest.mark.slow
def test_farm_watch_runs_until_sigterm_and_farm_droplets_lists_it(farm, farm_env, folders, clips, check_profile):
    folder, dest = folders
    proc = start_watch(farm_env, folder, "--profile", check_profile, "-o", dest, "--settle", SETTLE)
    try:
        lines = []
        wait_for(lambda: farm("droplets", "--json").json()[:1] and
                 farm("droplets", "--json").json()[0]["state"] == "watching", 60, 0.2, "farm watch to start")
        second = farm("watch", folder, "--profile", check_profile, "-o", dest)
        assert second.returncode == 2 and "already watched by pid" in second.stderr
        drop(clips[0], folder, "cli.mp4")
        (folder / "junk.mov").write_text("junk")
        while len([line for line in lines if line.startswith(("done", "failed"))]) < 2:
            lines.append(proc.stdout.readline())
            assert lines[-1], proc.stderr.read()
        assert any(line.startswith("done       cli.mp4") for line in lines)
        assert any(line.startswith("failed     junk.mov") and "Invalid data" in line for line in lines)
        listed = farm("droplets")
        assert listed.returncode == 0 and "[watching]" in listed.stdout and "processed  cli.mp4" in listed.stdout
        assert "failed     junk.mov" in listed.stdout
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "1 processed, 1 failed" in err and "Traceback" not in err
    doc = farm("droplets", "--json").json()[0]
    assert doc["state"] == "not running" and doc["folder"] == str(folder)
    assert [item["state"] for item in doc["recent"]] == ["failed", "processed"] or \
        [item["state"] for item in doc["recent"]] == ["processed", "failed"]


@pytest.mark.slow
def test_farm_watch_once(farm, farm_env, folders, clips, check_profile):
    folder, dest = folders
    drop(clips[0], folder, "one.mp4")
    drop(clips[1], folder, "two.mp4")
    result = farm("watch", folder, "--profile", check_profile, "-o", dest, "--once", "--settle", "0.2",
                  "--after", "leave", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 queued, 2 processed, 0 failed" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["one.mp4", "two.mp4"]
    again = farm("watch", folder, "--profile", check_profile, "-o", dest, "--once", "--settle", "0.2", timeout=120)
    assert again.returncode == 0 and "0 queued" in again.stderr
    (folder / "bad.mp4").write_text("no")
    failed = farm("watch", folder, "--profile", check_profile, "-o", dest, "--once", "--settle", "0.2", timeout=120)
    assert failed.returncode == 1 and "1 failed" in failed.stderr
    assert (folder / "failed" / "bad.mp4.error.txt").exists()


def test_farm_watch_refuses_bad_arguments(farm, farm_env, folders, check_profile):
    folder, _ = folders
    inside = farm("watch", folder, "--profile", check_profile, "-o", folder / "out")
    assert inside.returncode == 2 and "inside the watched folder" in inside.stderr
    missing = farm("watch", farm_env["tmp"] / "nope", "--profile", check_profile, "-o", farm_env["tmp"] / "o")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_input = farm("watch", folder, "--profile", Path(__file__).parent.parent / "examples" / "testsrc-frames.yaml",
                    "-o", farm_env["tmp"] / "o")
    assert no_input.returncode == 2 and "takes no input file" in no_input.stderr
    settle = farm("watch", folder, "--profile", check_profile, "-o", farm_env["tmp"] / "o", "--settle", "soon")
    assert settle.returncode == 2 and "settle" in settle.stderr
    for result in (inside, missing, no_input, settle):
        assert "Traceback" not in result.stderr
