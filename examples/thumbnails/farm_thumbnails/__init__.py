"""`thumbnails`: a contact sheet per movie, built by nodes in parallel.

Each segment grabs a few evenly spaced frames of one part of the movie as small PNGs;
assembling tiles them, in order, into one sheet with ffmpeg. Written the way any
third party would: its own package, the `farm` entry point, `context.run` for every
command, outputs under a temporary name.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from farm import hookimpl
from farm.errors import PlanError, ProcessorError
from farm.model import SegmentPlan
from farm.outputs import deliver, output_path
from farm.processor import Processor


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: int = Field(default=4, ge=1, le=20)
    rows: int = Field(default=3, ge=1, le=20)
    width: int = Field(default=240, ge=16, le=1920, description="width of one thumbnail")
    per_segment: int = Field(default=4, ge=1, description="thumbnails grabbed by one segment")


def movie_seconds(path: Path) -> float:
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "json", str(path)],
                           capture_output=True, text=True)
    try:
        return float(json.loads(probe.stdout)["format"]["duration"])
    except (KeyError, ValueError, json.JSONDecodeError):
        raise PlanError(f"{path.name} is not a movie ffprobe can read") from None


class Thumbnails(Processor):
    name = "thumbnails"
    description = "a contact sheet of evenly spaced thumbnails for each movie"
    settings_model = Settings

    def requires(self, job):
        return {**job.profile.requires, "ffmpeg": ""}

    def plan(self, job):
        settings: Settings = job.settings
        count = settings.columns * settings.rows
        seconds = movie_seconds(job.input)
        times = [seconds * (i + 0.5) / count for i in range(count)]
        return [SegmentPlan(f"thumbnails {start + 1}-{start + len(chunk)}", params={"first": start, "times": chunk})
                for start in range(0, count, settings.per_segment)
                for chunk in [times[start:start + settings.per_segment]]]

    def run(self, segment, context):
        settings: Settings = segment.job.settings
        names = []
        for offset, at in enumerate(segment.params["times"]):
            name = f"thumb_{segment.params['first'] + offset:03d}.png"
            context.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-ss", f"{at:.3f}", "-i",
                         str(segment.job.input), "-frames:v", "1", "-vf", f"scale={settings.width}:-2",
                         str(segment.output_dir / name)])
            names.append(name)
        context.progress(1.0, f"{len(names)} thumbnails")
        return {"dir": str(segment.output_dir), "files": names}

    def assemble(self, job, results, context):
        settings: Settings = job.settings
        target = output_path(job, "{stem}-sheet.png", "png")
        if target.exists() and not job.overwrite:
            raise ProcessorError(f"{target} already exists; pass --overwrite to replace it")
        listing = context.scratch / "thumbs.txt"
        files = [Path(r["dir"]) / name for r in results for name in r["files"]]
        listing.write_text("".join(f"file '{f}'\n" for f in files))
        # Tiled in the job's work folder (the one place a sandboxed command of an assemble
        # step may write), then delivered: copied under a temporary name and renamed.
        sheet = context.scratch / f"sheet-{uuid.uuid4().hex[:8]}.png"
        context.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "concat", "-safe", "0",
                     "-protocol_whitelist", "file", "-i", str(listing),
                     "-vf", f"tile={settings.columns}x{settings.rows}", "-frames:v", "1", str(sheet)])
        deliver(sheet, target, destination=job.destination)
        return [str(target)]


@hookimpl
def farm_processors():
    return [Thumbnails()]
