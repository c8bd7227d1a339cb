"""48 POV-Ray frames at 320x240: one povray process against `farm run` in segments of 4
on 2 slots, in the same run.

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single = tmp / "single"
        single.mkdir()
        started = time.perf_counter()
        subprocess.run(["povray", f"+I{SCENE}", "+Oframe.png", "+FN", "+W320", "+H240", "+KFI1", "+KFF48", "-D", "-V"],
                       cwd=single, check=True, capture_output=True)
        one = time.perf_counter() - started
        assert len(list(single.glob("frame*.png"))) == 48

        config = tmp / "farm.yaml"
        config.write_text(yaml.safe_dump({"node": {"slots": 2}}))
        env = {**os.environ, "FARM_STATE": str(tmp / "state"), "FARM_CONFIG": str(config)}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "farm.cli", "run", str(ROOT / "examples" / "povray" / "bouncing.yaml"),
                        str(SCENE), "-o", str(tmp / "farm"), "--set", "segment.frames=4", "--set", "settings.width=320",
                        "--set", "settings.height=240", "--quiet"], env=env, check=True, capture_output=True)
        farm = time.perf_counter() - started
        assert len(list((tmp / "farm").glob("*.png"))) == 48
    table = Table(title="48 POV-Ray frames at 320x240, 2 cores (same run)")
    for column in ("how", "seconds", "ratio to one povray"):
        table.add_column(column)
    table.add_row("one povray process, frames 1-48", f"{one:.2f}", "1.00")
    table.add_row("farm run, segments of 4, 2 slots", f"{farm:.2f}", f"{farm / one:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
