"""The thumbnails processor through the real `farm run`, on a movie made by ffmpeg."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def test_a_contact_sheet_of_twelve_thumbnails(tmp_path):
    movie = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=6", "-pix_fmt", "yuv420p", str(movie)], check=True)
    result = subprocess.run([sys.executable, "-m", "farm.cli", "--state", str(tmp_path / "state"), "run",
                             str(HERE / "profiles" / "contact-sheet.yaml"), str(movie), "-o", str(tmp_path / "out"),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done" and job["segments"] == 3
    sheet = tmp_path / "out" / "clip-sheet.png"
    size = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=width,height", "-of", "csv=p=0",
                           str(sheet)], capture_output=True, text=True, check=True).stdout.strip()
    assert size == "960,540"  # 4 x 240 wide, 3 x 180 high


def test_something_that_is_not_a_movie_fails_with_the_reason(tmp_path):
    fake = tmp_path / "notes.mov"
    fake.write_text("not a movie")
    result = subprocess.run([sys.executable, "-m", "farm.cli", "--state", str(tmp_path / "state"), "run",
                             str(HERE / "profiles" / "contact-sheet.yaml"), str(fake), "-o", str(tmp_path / "out"),
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "notes.mov is not a movie ffprobe can read" in json.loads(result.stdout)["jobs"][0]["error"]
