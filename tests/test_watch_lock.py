"""One watcher per watched folder: real `farm watch` processes, real flock, real folders.

Before the lock, two `farm watch` on one folder with different state directories both
submitted every file (20 drops became 40 jobs), and each moved the files the other's
jobs were still reading ("the source was deleted", `.error.txt` for files that were
processed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from farm.droplets.config import DropletConfig
from farm.droplets.lock import LOCK_NAME, FolderLock, FolderLocked
from farm.store import Store
from tests.conftest import FARM
from tests.test_droplets import SETTLE, Running, check_profile, clips, drop, python_profile, wait_for  # noqa: F401


class Watch:
    """A real `farm watch` process with its own state directory; its output read as it comes."""

    def __init__(self, farm_env, state: Path, folder: Path, profile: Path, dest: Path, *extra: str):
        self.state = state
        env = {**os.environ, "FARM_STATE": str(state)}
        self.proc = subprocess.Popen(
            [*FARM, "watch", str(folder), "--profile", str(profile), "-o", str(dest), "--settle", str(SETTLE), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=farm_env["tmp"], env=env)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_watching(self, timeout: float = 120) -> None:
        wait_for(lambda: any(line.startswith("farm: watching") for line in self.err) or self.proc.poll() is not None,
                 timeout, 0.05, "farm watch to start")
        assert self.proc.poll() is None, "\n".join(self.err)

    def done(self) -> list[str]:
        return [line for line in self.out if line.startswith("done ")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def jobs_in(state: Path) -> list:
    path = state / "farm.db"
    if not path.exists():
        return []
    store = Store(path)
    try:
        return list(store.jobs())
    finally:
        store.close()


def record(folder: Path) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


@pytest.mark.slow
def test_two_farm_watch_on_one_folder_with_different_state_dirs(farm_env, python_profile):
    tmp = farm_env["tmp"]
    folder, dest = tmp / "in", tmp / "out"
    folder.mkdir()
    first_state, second_state = tmp / "state-first", tmp / "state-second"
    first = Watch(farm_env, first_state, folder, python_profile, dest)
    try:
        first.wait_watching()
        held = record(folder)
        assert (held["pid"], held["host"], held["state"]) == (first.proc.pid, socket.gethostname(), str(first_state))

        # A second watcher, whatever its state directory, is refused with a message naming the first.
        for state, extra in ((second_state, []), (second_state, ["--once"]), (first_state, [])):
            env = {**os.environ, "FARM_STATE": str(state)}
            second = subprocess.run([*FARM, "watch", str(folder), "--profile", str(python_profile), "-o",
                                     str(tmp / "out2"), *extra], capture_output=True, text=True, env=env, cwd=tmp,
                                    timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 2 and len(lines) == 1, second.stderr
            assert lines[0] == (f"farm: error: {folder} is already watched by pid {first.proc.pid} on "
                                f"{socket.gethostname()} (state dir {first_state}, since {held['since']}); stop that "
                                "watcher first, or watch another folder")

        sources = tmp / "sources"
        sources.mkdir()
        for i in range(20):
            (sources / f"drop{i:02d}.bin").write_bytes(os.urandom(64) + bytes([i]))
            drop(sources / f"drop{i:02d}.bin", folder)
        wait_for(lambda: len(first.done()) >= 20, 180, 0.1, "20 files processed")
    finally:
        code = first.stop()
    assert code == 0, "\n".join(first.err)
    jobs = jobs_in(first_state)
    assert len(jobs) == 20 and all(job["state"] == "done" for job in jobs), [(j["state"], j["error"]) for j in jobs]
    assert len({job["input"] for job in jobs}) == 20
    assert jobs_in(second_state) == []  # refused before it took anything
    assert sorted(p.name for p in (folder / "done").iterdir()) == [f"drop{i:02d}.bin" for i in range(20)]
    assert not (folder / "failed").exists()
    assert not list(folder.rglob("*.error.txt"))
    assert sorted(p.name for p in folder.iterdir()) == ["done"]  # the lock went with its watcher


@pytest.mark.slow
def test_the_lock_of_a_dead_watcher_is_taken_over(farm_env, python_profile):
    tmp = farm_env["tmp"]
    folder, dest = tmp / "in", tmp / "out"
    folder.mkdir()
    first = Watch(farm_env, tmp / "state-first", folder, python_profile, dest)
    try:
        first.wait_watching()
    finally:
        first.stop(signal.SIGKILL)  # no chance to clean up: its record stays, its flock dies with it
    assert record(folder)["pid"] == first.proc.pid
    second = Watch(farm_env, tmp / "state-second", folder, python_profile, dest)
    try:
        second.wait_watching()
        assert record(folder)["pid"] == second.proc.pid
        (tmp / "late.bin").write_bytes(b"dropped after the take-over")
        drop(tmp / "late.bin", folder)
        wait_for(lambda: second.done(), 120, 0.1, "the drop processed by the second watcher")
        assert (folder / LOCK_NAME).exists() and not (folder / "done" / LOCK_NAME).exists()
    finally:
        assert second.stop() == 0, "\n".join(second.err)
    assert [Path(j["input"]).name for j in jobs_in(tmp / "state-second")] == ["late.bin"]


@pytest.mark.slow
def test_a_controllers_droplet_on_a_watched_folder_is_refused_and_the_others_run(farm, farm_env, python_profile):
    """As a controller starts its droplets (start_droplets): the one whose folder `farm watch`
    holds is refused and says why; the others run; it takes the folder once the other stops."""
    tmp = farm_env["tmp"]
    taken, free = tmp / "in", tmp / "free"
    taken.mkdir()
    free.mkdir()
    watch_state = tmp / "state-watch"
    watcher = Watch(farm_env, watch_state, taken, python_profile, tmp / "out-watch")
    try:
        watcher.wait_watching()
        other = DropletConfig(name="free", folder=free, profile=str(python_profile), destination=tmp / "out-free",
                              settle=SETTLE)
        with Running(farm_env, python_profile, others=[other]) as run:
            blocked, running = (d.watch for d in run.service.droplets)
            assert blocked.state == "refused"
            assert f"already watched by pid {watcher.proc.pid} on {socket.gethostname()} (state dir {watch_state}" \
                in blocked.message
            (tmp / "a.bin").write_bytes(b"for the free droplet")
            drop(tmp / "a.bin", free)
            run.wait_kind("processed")
            assert running.state == "watching"
            listed = farm("droplets")
            assert listed.returncode == 0, listed.stderr
            line = next(line for line in listed.stdout.splitlines() if line.startswith(str(taken)))
            assert "[refused]" in line and f"already watched by pid {watcher.proc.pid}" in line
            assert any(line.startswith("free  [watching]") for line in listed.stdout.splitlines())

            # the file the other watcher takes is not taken here
            (tmp / "b.bin").write_bytes(b"for farm watch")
            drop(tmp / "b.bin", taken)
            wait_for(lambda: watcher.done(), 120, 0.1, "farm watch to process its drop")
            assert watcher.stop() == 0
            wait_for(lambda: blocked.state == "watching", 30, 0.1, "the refused droplet to take the folder over")
            assert record(taken)["pid"] == os.getpid()
            (tmp / "c.bin").write_bytes(b"after the take-over")
            drop(tmp / "c.bin", taken)
            wait_for(lambda: len(run.kinds("processed")) >= 2, 60, what="the drop after the take-over")
            assert sorted(Path(e[1]).name for e in run.kinds("processed")) == ["a.bin", "c.bin"]
    finally:
        watcher.stop()
    assert [Path(j["input"]).name for j in jobs_in(watch_state)] == ["b.bin"]
    assert not (taken / LOCK_NAME).exists()


def test_the_lock_file_is_never_a_drop_and_is_made_again_when_deleted(farm_env, python_profile):
    tmp = farm_env["tmp"]
    folder = tmp / "in"
    folder.mkdir()
    with Running(farm_env, python_profile, recursive=True) as run:
        watch = run.service.droplets[0].watch
        lock = folder / LOCK_NAME
        assert lock.exists() and watch.state == "watching"
        lock.unlink()  # a person tidying up, or a sync tool
        # made, then written: wait for its record, not for the bare file
        wait_for(lambda: lock.exists() and lock.read_text().strip(), 60, 0.05, "the lock file to be made again")
        assert record(folder)["pid"] == os.getpid()
        (tmp / "x.bin").write_bytes(b"x")
        drop(tmp / "x.bin", folder)
        run.wait_kind("processed")
        rescanned = watch.scan()
        assert rescanned == 0  # the lock (and nothing else) is left in the folder, and not taken
        assert [Path(row["path"]).name for row in run.ledger()] == ["x.bin"]
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "done"]


def test_a_link_planted_at_the_lock_name_is_not_written_through(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (folder / LOCK_NAME).symlink_to(victim)
    lock = FolderLock(folder, tmp_path / "state")
    with pytest.raises(FolderLocked, match="is not a lock file"):
        lock.acquire()
    assert victim.read_text() == "keep me"


def test_a_lock_written_on_another_machine_counts_while_it_is_renewed(tmp_path):
    """On a share whose flock does not reach other machines, the record decides: another
    host's record refuses us while its holder keeps touching it, and is taken over once
    it stops (judged on our clock only)."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": "render-07", "pid": 4242, "state": "/srv/farm", "droplet": "ingest",
                                "since": "2026-12-01T10:00:00+00:00"}) + "\n")
    alive = threading.Event()
    alive.set()

    def keep_touching():  # the holder on render-07, whose flock we cannot see
        while alive.is_set():
            os.utime(path)
            time.sleep(0.1)

    toucher = threading.Thread(target=keep_touching, daemon=True)
    toucher.start()
    # shared=True: this folder stands for a network share (on a local disk flock is the whole truth)
    lock = FolderLock(folder, tmp_path / "state", stale=1.5, heartbeat=0.2, shared=True)
    try:
        with pytest.raises(FolderLocked) as refused:
            lock.acquire(wait=3.0)
        assert str(refused.value).startswith(f"{folder} is already watched by pid 4242 on render-07 (state dir "
                                             "/srv/farm, droplet ingest, since 2026-12-01T10:00:00+00:00)")
    finally:
        alive.clear()
        toucher.join()
    lock.acquire()  # render-07 went quiet: taken over after the stale window
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid() and lock.held
        # render-07 comes back and writes over it: this holder stands down instead of going on
        path.write_text(json.dumps({"host": "render-07", "pid": 4243, "state": "/srv/farm"}) + "\n")
        refusal = lock.ensure()
        assert refusal is not None and "pid 4243 on render-07" in refusal and not lock.held
    finally:
        lock.release()
    assert path.exists()  # not ours any more: left alone


TRY_AS_NOBODY = """
import os, sys
from farm.droplets.lock import FolderLock, FolderLocked  # imported first: the worktree is root's
os.setgid(65534); os.setuid(65534)
lock = FolderLock(sys.argv[1], "/nonexistent/state-of-nobody")
try:
    lock.acquire(wait=0)
except FolderLocked as exc:
    print("refused:", exc)
else:
    print("held" if lock.held else "unlocked: " + lock.unlocked_reason)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a second user")
def test_another_users_lock_file_is_respected_and_its_dead_holders_taken_over():
    import stat
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="farm-lock-"))  # outside pytest's root-only folders
    try:
        folder.chmod(0o777)
        mine = FolderLock(folder, "/var/lib/farm-root", "root's droplet")
        umask = os.umask(0o077)  # a private umask: still readable by others, never writable
        try:
            mine.acquire()
        finally:
            os.umask(umask)
        assert stat.S_IMODE((folder / LOCK_NAME).stat().st_mode) == 0o644
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

        def as_nobody() -> str:
            done = subprocess.run([*FARM[:1], "-c", TRY_AS_NOBODY, str(folder)], capture_output=True, text=True,
                                  env=env, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert as_nobody().startswith(f"refused: {folder} is already watched by pid {os.getpid()} on ")
        os.close(mine.fd)  # root's watcher dies: its flock goes, its file (unreadable to others) stays
        mine.fd = None
        assert as_nobody() == "held"
        assert (folder / LOCK_NAME).stat().st_uid == 65534
        os.chown(folder / LOCK_NAME, 0, 0)
        (folder / LOCK_NAME).chmod(0o600)  # unreadable to others: whose it is cannot be known, so never taken
        assert as_nobody().startswith(f"refused: {folder / LOCK_NAME} belongs to another user and cannot be read")
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_real_controller_with_a_droplet_on_a_watched_folder_runs_on(tmp_path, python_profile):
    """`farm controller` with two droplets in farm.yaml, one on a folder a `farm watch` holds:
    the controller starts and serves, the free droplet runs on a node, `farm droplets`
    says who holds the other, which takes its folder once that `farm watch` stops."""
    import yaml

    from tests.cluster_helpers import Cluster

    c = Cluster(tmp_path / "cluster")
    try:
        taken, free = c.root / "taken", c.root / "free"
        taken.mkdir()
        free.mkdir()
        data = yaml.safe_load(c.config.read_text())
        data["droplets"] = [
            {"name": "taken", "folder": str(taken), "profile": str(python_profile), "destination": str(c.root / "o1"),
             "settle": SETTLE},
            {"name": "free", "folder": str(free), "profile": str(python_profile), "destination": str(c.root / "o2"),
             "settle": SETTLE}]
        c.config.write_text(yaml.safe_dump(data))
        watch_state = tmp_path / "state-watch"
        watcher = Watch({"tmp": tmp_path}, watch_state, taken, python_profile, tmp_path / "out-watch")
        try:
            watcher.wait_watching()
            c.start_controller()
            c.start_node("n1")
            c.wait_for_nodes("n1")

            def droplets() -> dict:
                listed = c.farm("droplets", "--json")
                assert listed.returncode == 0, listed.stderr
                return {doc["name"]: doc for doc in listed.json()}

            docs = c.wait_until(lambda: (d := droplets()) and d["taken"]["state"] != "not running" and d, 60,
                                "the droplets to report")
            assert docs["taken"]["state"] == "refused", docs["taken"]
            assert f"already watched by pid {watcher.proc.pid} on {socket.gethostname()} (state dir {watch_state}" \
                in docs["taken"]["message"]
            assert docs["free"]["state"] == "watching"
            (tmp_path / "a.bin").write_bytes(b"for the controller")
            drop(tmp_path / "a.bin", free)
            c.wait_until(lambda: (free / "done" / "a.bin").exists(), 120, "the free droplet's drop to be processed")
            (tmp_path / "b.bin").write_bytes(b"for farm watch")
            drop(tmp_path / "b.bin", taken)
            wait_for(lambda: watcher.done(), 120, 0.1, "farm watch to process its drop")
        finally:
            assert watcher.stop() == 0, "\n".join(watcher.err)
        c.wait_until(lambda: droplets()["taken"]["state"] == "watching", 60, "the controller to take the folder")
        (tmp_path / "c.bin").write_bytes(b"after farm watch stopped")
        drop(tmp_path / "c.bin", taken)
        c.wait_until(lambda: (taken / "done" / "c.bin").exists(), 120, "the drop after the take-over")
        jobs = json.loads(c.farm("status", "--json").stdout)
        assert sorted(Path(j["input"]).name for j in jobs) == ["a.bin", "c.bin"]
        assert all(j["state"] == "done" for j in jobs)
        assert [Path(j["input"]).name for j in jobs_in(watch_state)] == ["b.bin"]
        assert record(taken)["state"] == str(c.root / "state")
    finally:
        c.stop()
