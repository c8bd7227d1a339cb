"""Scenes nobody here wrote: Debian's POV-Ray sample animations (package
``povray-examples``), each rendered through ``farm run`` in segments of 3 and by hand
(``povray scene.ini +SFn +EFm`` in the scene's folder), compared frame by frame on
decoded pixels. Prints a Markdown table (docs/povray.md holds the last one).

    .venv/bin/python benchmarks/povray_samples.py [--frames 3-10] [--size 96x72]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

EXAMPLES = Path("/usr/share/doc/povray/examples/animations")


def pixels(path: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgba64le", "-"],
                          capture_output=True, check=True).stdout


def compare(ini: Path, first: int, last: int, width: int, height: int, tmp: Path,
            extra: tuple[str, ...] = ()) -> tuple[str, str]:
    """(frames, verdict) for one sample INI; ``extra`` arguments go to both renders."""
    declared = {k.strip().lower(): v.split(";")[0].strip() for k, _, v in
                (line.partition("=") for line in ini.read_text(errors="replace").splitlines()) if _}
    final = int(declared.get("final_frame", last))
    first, last = min(first, final), min(last, final)
    frames = f"{first}-{last} of {declared.get('initial_frame', '1')}-{final}"
    work = tmp / (ini.stem + "".join(extra))
    profile = work / "profile.yaml"
    work.mkdir()
    profile.write_text(yaml.safe_dump({
        "name": "sample", "processor": "imageseq", "segment": {"frames": 3}, "retries": 0, "timeout": "10m",
        "settings": {"renderer": "povray", "output": "f_####.png", "width": width, "height": height,
                     "renderer_args": list(extra)}}))
    env = {**os.environ, "FARM_STATE": str(work / "state")}
    run = subprocess.run([sys.executable, "-m", "farm.cli", "run", str(profile), str(ini), "-o", str(work / "farm"),
                          "--set", f"frames={first}-{last}", "--quiet"], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        said = (run.stdout.strip().splitlines() or run.stderr.strip().splitlines() or ["?"])[-1].strip()
        return frames, f"refused by Farm: {said.replace(str(EXAMPLES) + '/', '')[:300]}"
    (work / "hand").mkdir()
    hand = subprocess.run(["povray", ini.name, *extra, f"+W{width}", f"+H{height}", f"+SF{first}", f"+EF{last}",
                           f"+O{work / 'hand' / 'h.png'}", "+FN", "-D", "-V"], cwd=ini.parent,
                          capture_output=True, text=True)
    if hand.returncode != 0:
        return frames, "povray itself fails"
    by_number = {int(p.stem[1:]): p for p in (work / "hand").glob("h*.png")}
    differing = [n for n in range(first, last + 1)
                 if n not in by_number or pixels(by_number[n]) != pixels(work / "farm" / f"f_{n:04d}.png")]
    return frames, "yes" if not differing else f"no (frames {', '.join(map(str, differing))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="3-10", help="the sub-range of each animation to render")
    parser.add_argument("--size", default="96x72")
    args = parser.parse_args()
    if not EXAMPLES.is_dir():
        sys.exit(f"{EXAMPLES} is missing: install Debian's povray-examples (apt-get install povray-examples)")
    first, last = map(int, args.frames.split("-"))
    width, height = map(int, args.size.split("x"))
    print(f"| scene | frames | identical pixels |\n| --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for ini in sorted(EXAMPLES.glob("*/*.ini")):
            frames, verdict = compare(ini, first, last, width, height, Path(tmp))
            if verdict.startswith("no"):  # radiosity on several threads differs between two runs of povray itself
                _, alone = compare(ini, first, last, width, height, Path(tmp), ("+WT1",))
                verdict += f"; with +WT1 (one thread) in both: {alone}"
            print(f"| {ini.parent.name}/{ini.name} | {frames} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
