"""POV-Ray frames at 320x240: one povray process against `farm run` in segments of 4 on
2 slots, in the same run. Two scenes: the bundled one (48 frames, no antialiasing) and,
when Debian's povray-examples is installed, a sample scene with antialiasing (its INI's
Antialias=On, Antialias_Depth=3; 20 frames).

    .venv/bin/python benchmarks/imageseq.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "examples" / "povray" / "bouncing.pov"
SAMPLE = Path("/usr/share/doc/povray/examples/animations/ambient/ambient.ini")  # Debian's povray-examples


def one_process(tmp: Path, argv: list[str], cwd: Path, frames: int) -> float:
    single = tmp / "single"
    single.mkdir()
    started = time.perf_counter()
    subprocess.run(["povray", *argv, f"+O{single}/frame.png", "+FN", "+W320", "+H240", "-D", "-V"],
                   cwd=cwd, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    assert len(list(single.glob("frame*.png"))) == frames
    return seconds


def through_farm(tmp: Path, profile: Path, source: Path, frames: int) -> float:
    config = tmp / "farm.yaml"
    config.write_text(yaml.safe_dump({"node": {"slots": 2}}))
    env = {**os.environ, "FARM_STATE": str(tmp / "state"), "FARM_CONFIG": str(config)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "farm.cli", "run", str(profile), str(source), "-o", str(tmp / "farm"),
                    "--set", "segment.frames=4", "--set", "settings.width=320", "--set", "settings.height=240",
                    "--quiet"], env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    assert len(list((tmp / "farm").glob("*.png"))) == frames
    return seconds


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        one = one_process(tmp / "a", [f"+I{SCENE}", "+KFI1", "+KFF48"], SCENE.parent, 48)
        farm = through_farm(tmp / "a", ROOT / "examples" / "povray" / "bouncing.yaml", SCENE, 48)
        rows.append(("bouncing.pov, 48 frames, no antialiasing", one, farm))
        if SAMPLE.is_file():
            (tmp / "b").mkdir()
            one = one_process(tmp / "b", [SAMPLE.name], SAMPLE.parent, 20)
            farm = through_farm(tmp / "b", ROOT / "profiles" / "povray-png.yaml", SAMPLE, 20)
            rows.append((f"{SAMPLE.name} (Debian sample), 20 frames, antialiasing", one, farm))
    table = Table(title="POV-Ray frames at 320x240, 2 cores (same run)")
    for column in ("scene", "one povray process (s)", "farm run, segments of 4, 2 slots (s)", "ratio"):
        table.add_column(column)
    for scene, one, farm in rows:
        table.add_row(scene, f"{one:.2f}", f"{farm:.2f}", f"{farm / one:.2f}")
    Console().print(table)
    if not SAMPLE.is_file():
        print(f"(the antialiased sample needs {SAMPLE}: apt-get install povray-examples)")


if __name__ == "__main__":
    main()
