"""`farm plugin new NAME`: an installable processor package that passes its own tests.

The package has a pyproject with the `farm` entry point, a processor (one text file
per frame, written by a subprocess through the node runner), a profile, a README, and
a test that runs it through `farm run`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, TextIO

from farm import __version__
from farm.errors import ExitStatus, UsageError

PYPROJECT = '''[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "farm-{name}"
version = "0.1.0"
description = "A Farm processor: {name}"
requires-python = ">=3.11"
dependencies = ["farm>={farm_version}"]

[project.optional-dependencies]
test = ["pytest"]

# Farm finds processors only through this entry-point group.
[project.entry-points.farm]
{name} = "farm_{module}"

[tool.setuptools]
packages = ["farm_{module}"]
'''

PROCESSOR = '''"""The `{name}` processor: writes one text file per frame, by running a small command
per segment. Replace `run` with your renderer or tool; keep the rest of the contract."""

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from farm import hookimpl
from farm.frames import chunk_frames, format_frames
from farm.model import SegmentPlan
from farm.outputs import deliver
from farm.processor import Processor


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(default="hello from {name}", description="what each frame's file says")


class {cls}(Processor):
    name = "{name}"
    description = "writes one text file per frame"
    settings_model = Settings
    frame_based = True
    inputs = "none"

    def outputs(self, job):
        # Every path the job will write, before it runs: the core claims them, and refuses
        # the job when one exists (unless --overwrite) or another job will write it.
        return [job.destination / f"frame_{{frame:04d}}.txt" for frame in job.frames]

    def plan(self, job):
        size = job.profile.segment.frames or 10
        return [SegmentPlan(f"frames {{format_frames(chunk)}}", chunk) for chunk in chunk_frames(job.frames, size)]

    def run(self, segment, context):
        script = "import sys, pathlib; [pathlib.Path(sys.argv[1], f'frame_{{int(f):04d}}.txt').write_text(sys.argv[2]) for f in sys.argv[3:]]"
        context.run([sys.executable, "-c", script, str(segment.output_dir), segment.job.settings.text,
                     *map(str, segment.frames)])
        context.progress(1.0, "written")
        return {{"dir": str(segment.output_dir), "frames": segment.frames}}

    def assemble(self, job, results, context):
        # All or nothing: staged in the destination, then renamed into place, never over
        # an existing file unless job.overwrite.
        files = {{job.destination / f"frame_{{frame:04d}}.txt": Path(result["dir"]) / f"frame_{{frame:04d}}.txt"
                 for result in results for frame in result["frames"]}}
        return [str(path) for path in deliver(files, job, context, noun="frames")]


@hookimpl
def farm_processors():
    return [{cls}()]
'''

PROFILE = '''name: {name}-example
description: ten frames of the {name} processor, five per segment
processor: {name}
frames: 1-10
segment:
  frames: 5
settings:
  text: hello from {name}
'''

TEST = '''"""Runs the processor through the real `farm run`, as a user would."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def test_farm_run_writes_every_frame(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "farm.cli", "--state", str(tmp_path / "state"), "run",
         str(HERE / "profiles" / "{name}-example.yaml"), "-o", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=300,
        cwd=tmp_path,  # `-m` imports from the current folder first: a farm/ checkout there would shadow Farm
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done" and job["segments"] == 2
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"frame_{{i:04d}}.txt" for i in range(1, 11)]
    assert (tmp_path / "out" / "frame_0007.txt").read_text() == "hello from {name}"
'''

README = '''# farm-{name}

A processor plugin for Farm. Install it next to Farm and it is found through the
`farm` entry-point group:

    pip install -e .
    farm plugins                       # lists {name}
    farm run profiles/{name}-example.yaml -o out
    pytest                             # runs it through `farm run`
'''


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    plugin = commands.add_parser("plugin", parents=[common], help="tools for plugin authors",
                                 description="Tools for plugin authors.")
    actions = plugin.add_subparsers(dest="plugin_command", metavar="ACTION")
    actions.required = True
    new = actions.add_parser("new", parents=[common], help="scaffold an installable processor package",
                             description="Write a processor package that passes its own tests out of the box.")
    new.add_argument("name", help="the processor's name: lowercase letters, digits and '-'")
    new.add_argument("--dir", help="where to create it (default: ./farm-NAME)")
    return {"plugin": cmd_plugin}


def scaffold(name: str, folder: Path) -> Path:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", name):
        raise UsageError(f"plugin name {name!r}: use lowercase letters, digits and '-', starting with a letter")
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"{folder} exists and is not empty; choose another --dir")
    module = name.replace("-", "_")
    cls = "".join(part.capitalize() for part in module.split("_")) + "Processor"
    values = {"name": name, "module": module, "cls": cls, "farm_version": __version__.split("+")[0]}
    files = {
        "pyproject.toml": PYPROJECT, f"farm_{module}/__init__.py": PROCESSOR,
        f"profiles/{name}-example.yaml": PROFILE, f"tests/test_{module}.py": TEST, "README.md": README,
    }
    for relative, template in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    return folder


def cmd_plugin(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    folder = Path(args.dir or f"farm-{args.name}")
    scaffold(args.name, folder)
    print(f"created {folder}: pip install -e {folder} && pytest {folder}", file=stdout)
    return ExitStatus.OK
