"""Run a batch from a script with Farm's Python API and print what it made.

    .venv/bin/python examples/submit_batch.py [DEST]
"""

import sys
from pathlib import Path

import farm

HERE = Path(__file__).resolve().parent

destination = sys.argv[1] if len(sys.argv) > 1 else "out/scripted"
batch = farm.run(HERE / "testsrc-frames.yaml", destination=destination, overrides=["frames=1-20"], overwrite=True)
for job in batch.jobs:
    print(f"{job.id} {job.state}: {len(job.outputs)} files in {destination}")
    if job.error:
        print(f"  reason: {job.error}")
sys.exit(0 if all(job.state == "done" for job in batch.jobs) else 1)
