"""Segmented transcode against one plain ffmpeg process, on the same source in the same run.

(a) one plain ffmpeg process encoding the source with a shipped profile's settings;
(b) ``farm run`` with that profile on the embedded default (everything included:
    start-up, probing, segments, audio, joining, verification): b/a, target <= 1.05;
    Beside b/a, the quality at the joins: the mean PSNR (against the source) of the
    frames either side of Farm's cuts, Farm's output against the plain encode's same frames;
(c) parallel efficiency: the same batch on 1 slot and on 2 slots, each segment encoder
    limited to one thread: speedup, target >= 1.8 on 2 cores;
(d) a job's fixed cost: ``farm run`` of a one-frame source minus one plain ffmpeg
    process encoding it, and the same for 10 s of sound (``aac-audio``): target <= 1 s of
    wall time. With ``--repeat N`` each is run N times, taking turns, and the medians are
    compared (a shared machine's load comes and goes; the load average is printed beside).
    CPU seconds (user + system, the processes' children included) are printed beside.
    ``--tree /work/main`` measures another checkout's ``farm run``; ``--before TREE`` also
    runs that checkout's ``farm run`` in each turn (plain, farm, before), for a before/after
    in one run: the machine's speed drifts by a third from hour to hour here.
(e) with ``--controller-cost N``: a controller and one node as real processes; N
    one-frame jobs submitted at once through the API; the controller process's own CPU
    seconds per job, less what it spends idle in the same time (target <= 0.2 s).

    .venv/bin/python benchmarks/transcode.py [--seconds 60] [--size 1280x720] [--profile h264-web-720p]
    .venv/bin/python benchmarks/transcode.py --fixed-only --repeat 7 [--controller-cost 20] [--tree /work/main]
    .venv/bin/python benchmarks/transcode.py --fixed-only --repeat 11 --before /tmp/before  # a worktree of the old commit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
FARM = [sys.executable, "-m", "farm.cli"]
TREE = ROOT  # the Farm whose ``farm run`` is measured (--tree: another checkout, e.g. main, in the same run)


def make_source(path: Path, seconds: int, size: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-b:a", "192k", str(path)], check=True)


def plain_ffmpeg_argv(settings: dict, source: Path, out: Path, threads: int | None = None) -> list[str]:
    """The profile's settings as one ffmpeg command, written out by hand (not by Farm's code)."""
    video, audio = settings.get("video") or {}, settings.get("audio") or {}
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(source)]
    argv += ["-c:v", video["codec"]] if video else ["-vn"]
    for key, option in (("crf", "-crf"), ("preset", "-preset"), ("profile", "-profile:v"), ("pix_fmt", "-pix_fmt")):
        if key in video:
            argv += [option, str(video[key])]
    if video and "height" in video:
        argv += ["-vf", f"scale=-2:{video['height']}"]
    gop = video.get("gop")
    if gop:
        argv += ["-g", str(round(float(str(gop).rstrip("s")) * 25) if str(gop).endswith("s") else gop)]
    if threads:
        argv += ["-threads", str(threads)]
    if audio:
        argv += ["-c:a", audio["codec"]] + (["-b:a", audio["bitrate"]] if audio.get("bitrate") else [])
    return argv + (["-movflags", "+faststart"] if video else []) + [str(out)]


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def farm_argv(tree: Path) -> list[str]:
    """``farm`` as run from ``tree``: its own ``farm`` package, imported from the folder it
    runs in, by its .venv's Python, or by this one if it has none (a ``git worktree``)."""
    python = tree / ".venv" / "bin" / "python"
    return [str(python) if tree != ROOT and python.exists() else sys.executable, "-m", "farm.cli"]


def farm_run(work: Path, name: str, profile: str, source: Path, slots: int | None, extra: list[str],
             tree: Path | None = None) -> tuple[float, dict]:
    home = work / name
    home.mkdir()
    node = {"kill_grace": 1.0}
    if slots:
        node["slots"] = slots
    (home / "farm.yaml").write_text(yaml.safe_dump({"node": node}))
    env = {**os.environ, "FARM_STATE": str(home / "state"), "FARM_CONFIG": str(home / "farm.yaml")}
    tree = tree or TREE
    argv = [*farm_argv(tree), "run", profile, str(source), "-o", str(home / "out"), "--json", "--quiet", *extra]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"farm run failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    return elapsed, json.loads(proc.stdout)


def frames(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_packets", "-of", "csv=p=0", str(path)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def psnr(path: Path, source: Path, rate: str = "25") -> list[float]:
    """Per-frame PSNR against the source, both on the source's grid (FACTS: psnr pairs by timestamp)."""
    grid = f"setpts=PTS-STARTPTS,fps={rate}"
    stats = path.with_suffix(".psnr")
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path), "-i", str(source),
                    "-lavfi", f"[0:v]{grid}[a];[1:v]{grid}[b];[a][b]psnr=stats_file={stats}", "-f", "null", "-"],
                   check=True)
    return [100.0 if m.group(1) == "inf" else float(m.group(1))
            for m in re.finditer(r"psnr_avg:(\S+)", stats.read_text())]


def cut_frames(profile: str, source: Path, extra: list[str]) -> list[int]:
    """The first frame (from 0) of every video segment after the first, from ``farm plan``."""
    proc = subprocess.run([*FARM, "plan", profile, str(source), "--json", *extra], capture_output=True, text=True,
                          cwd=TREE, check=True)
    segments = json.loads(proc.stdout)["jobs"][0]["segments"]
    return [s["params"]["first"] for s in segments if s["params"].get("kind") == "video" and s["params"]["first"]]


def joins_quality(farm_out: Path, plain_out: Path, source: Path, cuts: list[int]) -> str:
    ours, theirs = psnr(farm_out, source), psnr(plain_out, source)
    near = sorted({i for c in cuts for i in (c - 1, c) if i < min(len(ours), len(theirs))})
    if not near:
        return "no joins"
    farm_mean = statistics.mean(ours[i] for i in near)
    plain_mean = statistics.mean(theirs[i] for i in near)
    return (f"joins ({len(cuts)} cuts, {len(near)} frames): farm {farm_mean:.2f} dB, single {plain_mean:.2f} dB, "
            f"{farm_mean - plain_mean:+.2f} dB; all frames {statistics.mean(ours):.2f} "
            f"vs {statistics.mean(theirs):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--profile", default="h264-web-720p")
    parser.add_argument("--segment-seconds", type=float, default=None, help="override segment.seconds")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--skip-fixed", action="store_true", help="skip (d), the fixed cost of a job")
    parser.add_argument("--fixed-only", action="store_true", help="only (d), the fixed cost of a job")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side of (d); medians compared")
    parser.add_argument("--tree", help="measure the farm run of this checkout (its .venv), e.g. /work/main")
    parser.add_argument("--before", type=Path, help="(d): also this checkout's farm run, in the same turns")
    parser.add_argument("--farm-set", action="append", default=[], type=lambda text: f"--set={text}",
                        metavar="KEY=VALUE", help="(d): a --set for farm run, e.g. preview=false")
    parser.add_argument("--controller-cost", type=int, default=0, metavar="N",
                        help="(e): N one-frame jobs through a running controller")
    args = parser.parse_args()
    if args.tree:
        global TREE
        TREE = Path(args.tree).resolve()
        FARM[:] = farm_argv(TREE)
    console = Console(width=150)
    settings = yaml.safe_load((ROOT / "profiles" / f"{args.profile}.yaml").read_text())["settings"]
    segment = ["--set", f"segment.seconds={args.segment_seconds}"] if args.segment_seconds else []
    with tempfile.TemporaryDirectory(prefix="farm-bench-transcode-") as tmp:
        work = Path(tmp)
        source = work / "source.mp4"
        rows: list[tuple[str, ...]] = []
        if args.fixed_only:
            rows += fixed_cost(work, args.profile, settings, args.size, args.repeat, args.farm_set, args.before)
            if args.controller_cost:
                rows += controller_cost(work, args.profile, args.controller_cost)
            return print_table(console, args, rows, "fixed cost")
        console.print(f"making a {args.seconds} s {args.size} source ...")
        make_source(source, args.seconds, args.size)
        plain = timed(plain_ffmpeg_argv(settings, source, work / "plain.mp4"))
        rows.append(("(a) one plain ffmpeg process", f"{plain:.2f}", "1.00", str(frames(work / "plain.mp4")), ""))
        farm, report = farm_run(work, "farm", args.profile, source, None, segment)
        outputs = report["jobs"][0]["outputs"]
        rows.append(("(b) farm run, embedded default", f"{farm:.2f}", f"{farm / plain:.2f}",
                     str(frames(Path(outputs[0]))), f"{report['jobs'][0]['segments']} segments; target b/a <= 1.05"))
        cuts = cut_frames(args.profile, source, segment)
        rows.append(("(b) quality at the joins", "", "", "", joins_quality(Path(outputs[0]), work / "plain.mp4", source, cuts)))
        if not args.skip_efficiency:
            one_thread = ["--set", "settings.video.threads=1", *segment]
            t1, r1 = farm_run(work, "slots1", args.profile, source, 1, one_thread)
            t2, r2 = farm_run(work, "slots2", args.profile, source, 2, one_thread)
            rows.append(("(c1) farm run, 1 slot, 1 thread/encoder", f"{t1:.2f}", f"{t1 / plain:.2f}",
                         str(frames(Path(r1["jobs"][0]["outputs"][0]))), ""))
            rows.append(("(c2) farm run, 2 slots, 1 thread/encoder", f"{t2:.2f}", f"{t2 / plain:.2f}",
                         str(frames(Path(r2["jobs"][0]["outputs"][0]))),
                         f"speedup c1/c2 = {t1 / t2:.2f}; target >= 1.8"))
        if not args.skip_fixed:
            rows += fixed_cost(work, args.profile, settings, args.size, args.repeat, before=args.before)
    print_table(console, args, rows, f"{args.seconds} s {args.size}")


def fixed_cost(work: Path, profile: str, settings: dict, size: str, repeat: int,
               extra: list[str] | None = None, before: Path | None = None) -> list[tuple[str, ...]]:
    """(d): ``farm run`` against one plain ffmpeg doing the same encode, each ``repeat``
    times in turn (plain, farm, plain, farm, ...), wall time by the clock on the wall: the
    medians, their difference and the load average while they ran. Two sources: a one-frame
    movie with the given profile, and 10 s of sound with ``aac-audio``."""
    tiny = work / "tiny.mp4"
    make_source(tiny, 1, size)
    one = work / "one.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(tiny), "-frames:v", "1",
                    "-c:v", "libx264", "-c:a", "aac", "-t", "0.04", str(one)], check=True)
    sound = work / "sound.mp4"
    make_source(sound, 10, "320x240")
    audio_settings = yaml.safe_load((ROOT / "profiles" / "aac-audio.yaml").read_text())["settings"]
    rows: list[tuple[str, ...]] = []
    for label, source, name, how in (("one-frame movie", one, profile, settings),
                                     ("10 s of sound", sound, "aac-audio", audio_settings)):
        rows += _fixed_case(work, label, source, name, how, repeat, extra or [], before)
    return rows


def _fixed_case(work: Path, label: str, source: Path, profile: str, settings: dict, repeat: int,
                extra: list[str], before: Path | None = None) -> list[tuple[str, ...]]:
    trees = {"farm": TREE, **({"before": before.resolve()} if before else {})}
    plains, plain_cpu = [], []
    walls: dict[str, list[float]] = {name: [] for name in trees}
    cpus: dict[str, list[float]] = {name: [] for name in trees}
    load_before = os.getloadavg()[0]
    ext = "m4a" if settings.get("video") is None else "mp4"
    for turn in range(max(1, repeat)):
        started = children_cpu()
        plains.append(timed(plain_ffmpeg_argv(settings, source, work / f"plain-{profile}.{ext}")))
        plain_cpu.append(children_cpu() - started)
        for name, tree in trees.items():
            started = children_cpu()
            walls[name].append(farm_run(work, f"{profile}-{name}-{turn}", profile, source, None, extra, tree)[0])
            cpus[name].append(children_cpu() - started)
    load = f"load {load_before:.1f}-{os.getloadavg()[0]:.1f}"
    plain, cpu_plain = statistics.median(plains), statistics.median(plain_cpu)
    rows = [(f"(d) {label}, one plain ffmpeg", f"{plain:.2f}", "", "", f"CPU {cpu_plain:.2f} s; {load}")]
    for name, tree in trees.items():
        farm, cpu_farm = statistics.median(walls[name]), statistics.median(cpus[name])
        runs = f"median of {len(walls[name])} ({min(walls[name]):.2f}-{max(walls[name]):.2f} s)"
        who = "farm run" if name == "farm" else f"farm run of {tree}"
        rows.append((f"(d) {label}, {who} {profile}", f"{farm:.2f}", f"{farm / plain:.2f}", "",
                     f"fixed cost {farm - plain:.2f} s of wall (target <= 1 s); CPU {cpu_farm:.2f} s, "
                     f"{cpu_farm - cpu_plain:.2f} s more than ffmpeg's; {runs}"))
    return rows


def process_cpu(pid: int) -> tuple[float, float]:
    """(own, waited-for children's) CPU seconds of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def controller_cost(work: Path, profile: str, count: int) -> list[tuple[str, ...]]:
    """(e): the controller's own CPU per one-frame job, the node's work not included."""
    sys.path.insert(0, str(ROOT))
    from tests.cluster_helpers import Cluster  # the harness the cluster tests use

    one = work / "one.mp4"  # made by fixed_cost
    cluster = Cluster(work / "cluster")
    try:
        cluster.start_controller()
        cluster.start_node("n1")
        cluster.wait_for_nodes("n1", timeout=120)
        pid = cluster.controller.pid
        # idle: what the controller spends meanwhile (heartbeats, lease, these polls)
        idle_from, started = process_cpu(pid)[0], time.monotonic()
        for _ in range(20):
            cluster.api("GET", "/api/nodes")
            time.sleep(0.25)
        idle_rate = (process_cpu(pid)[0] - idle_from) / (time.monotonic() - started)
        before, children_before = process_cpu(pid)
        started = time.monotonic()
        jobs = []
        for turn in range(count):
            answer = cluster.api("POST", "/api/batches", json={"profile": profile, "inputs": [str(one)],
                                                              "destination": str(work / "cluster-out" / str(turn))})
            assert answer.status_code == 201, answer.text
            jobs += [job["id"] for job in answer.json()["jobs"]]

        def finished() -> bool:
            states = [cluster.job(job)["state"] for job in jobs]
            failed = [job for job, state in zip(jobs, states) if state in ("failed", "cancelled")]
            if failed:
                raise SystemExit(f"job {failed[0]} failed: {cluster.job(failed[0]).get('error')}")
            time.sleep(0.25)
            return all(state == "done" for state in states)

        cluster.wait_until(finished, 60 + 30 * count, f"{count} jobs")
        elapsed = time.monotonic() - started
        after, children_after = process_cpu(pid)
    finally:
        cluster.stop()
    own = (after - before) / count
    net = (after - before - idle_rate * elapsed) / count
    return [("(e) one-frame jobs in a running controller", f"{elapsed:.2f}", "", str(count),
             f"controller CPU per job {net:.3f} s (target <= 0.2 s; {own:.3f} s before taking off "
             f"{idle_rate:.3f} s/s idle); its children {(children_after - children_before) / count:.3f} s per job")]


def children_cpu() -> float:
    """User and system CPU seconds of the finished child processes (and theirs), so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def print_table(console: Console, args: argparse.Namespace, rows: list[tuple[str, ...]], what: str) -> None:
    table = Table(title=f"transcode: {what}, profile {args.profile}, farm in {TREE}, {os.cpu_count()} cores, "
                        f"load {os.getloadavg()[0]:.1f}")
    for column in ("run", "wall s", "/ plain", "frames", "note"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
