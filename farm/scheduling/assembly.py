"""Assembly and chaining: joining a job's segments once all are done, verifying the
result, delivering it, and submitting the job chained after it (``then:``).

Part of :class:`farm.scheduler.Scheduler` (a mixin: it works on the scheduler's state).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from farm.errors import FarmError, OutputConflict, SourceChanged
from farm.model import JobState, SegmentPlan
from farm.node import AttemptLog, CommandRunner, attempt_policy, check_source, runtime
from farm.outputs import staging_folder
from farm.processor import Context
from farm.scheduling.runtime import JobRuntime

log = logging.getLogger("farm.scheduler")


class Assembly:
    """Joining, verifying and delivering a job, then chaining the next."""

    def _start_assembly(self, rt: JobRuntime) -> None:
        self._set_job(rt, JobState.ASSEMBLING)
        results = [seg.result or {} for seg in sorted(rt.segments.values(), key=lambda s: s.index)]
        self._emit("job_assembling", rt, {})
        self._assembler.submit(self._assemble, rt, results)

    def _assemble(self, rt: JobRuntime, results: list[dict[str, Any]]) -> None:
        attempt_log = AttemptLog()
        cancelled = threading.Event()
        node = runtime()
        scratch = rt.job.work_dir / "assemble"
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            context = Context(
                scratch=scratch, logger=logging.getLogger(f"farm.assemble.{rt.job.id}"),
                progress=lambda fraction, message="": None, cancelled=cancelled, node=node.info(),
                # the joining process writes in the job's work folder and, for processors that
                # join straight into it, the job's staging folder in the destination
                run=CommandRunner(attempt_log, cancelled, f"job={rt.job.id} assemble", node.config.kill_grace,
                                  attempt_policy(node.config, rt.job,
                                                 [rt.job.work_dir, staging_folder(rt.job.destination, rt.job.id)]),
                                  home=scratch).run,
                claim=lambda paths: self.store.claim(rt.job.id, [str(path) for path in paths]),
            )
            check_source(rt.job)
            again = list(rt.processor.verify(rt.job, results, context))
            if again:
                value: Any = {"ok": False, "again": again}
            else:
                outputs = rt.processor.assemble(rt.job, results, context)
                value = {"ok": True, "outputs": [str(p) for p in outputs]}
        except FarmError as exc:
            value = {"ok": False, "reason": str(exc), "log": attempt_log.text()}
        except Exception as exc:
            value = {"ok": False, "reason": f"processor {rt.processor.name} failed to assemble: {type(exc).__name__}: {exc}",
                     "log": attempt_log.text()}
        if not value["ok"] and not value.get("again"):
            try:  # it may have failed because the source went away meanwhile: then that is the reason
                check_source(rt.job)
            except SourceChanged as exc:
                if not value["reason"].startswith(str(exc)):
                    value["reason"] = f"{exc} (assembling said: {value['reason']})"
        self.engine.outcomes.put(("assembled", rt.job.id, value))

    def _on_assembled(self, job_id: str, value: dict[str, Any]) -> None:
        rt = self.jobs[job_id]
        if rt.state != JobState.ASSEMBLING:
            return
        if value.get("again"):
            plans: list[SegmentPlan] = value["again"]
            rt.verify_rounds += 1
            labels = "; ".join(plan.label for plan in plans)
            if rt.verify_rounds > rt.job.profile.retries:
                self._set_job(rt, JobState.FAILED, error=f"verification still failing after {rt.job.profile.retries} "
                                                          f"re-runs: {labels}")
                rt.error = f"verification still failing after {rt.job.profile.retries} re-runs: {labels}"
                self._notify_later("farm_job_failed", job=rt.job, reason=rt.error)
                self._emit("job_failed", rt, {"reason": rt.error})
                return
            self._set_job(rt, JobState.RUNNING)
            self.store.event("verify_rerun", job_id=rt.job.id, data={"round": rt.verify_rounds, "segments": labels})
            self._add_segments(rt, plans)
            self._emit("job_rerun", rt, {"segments": labels})
            return
        if value["ok"]:
            rt.outputs = value["outputs"]
            self._set_job(rt, JobState.DONE, outputs=rt.outputs)
            if not self.keep_work:  # thousands of attempt folders: not in the dispatching thread
                self._pending_removals.append(rt.job.work_dir)
            self._notify_later("farm_job_finished", job=rt.job, outputs=rt.outputs)
            self._emit("job_done", rt, {"outputs": rt.outputs})
            self._chain(rt)
        else:
            reason = f"assembly failed: {value['reason']}"
            rt.error = reason
            self._set_job(rt, JobState.FAILED, error=reason)
            self._notify_later("farm_job_failed", job=rt.job, reason=reason)
            self._emit("job_failed", rt, {"reason": reason})

    def _chain(self, rt: JobRuntime) -> None:
        """Submit the ``then:`` job with this job's first output as its input."""
        if rt.then is None:
            return
        if not rt.outputs:
            self.store.event("chain_skipped", job_id=rt.job.id, data={"reason": "the job has no outputs"})
            return
        try:
            _, child_ids = self.submit(rt.then, [Path(rt.outputs[0])], rt.job.destination,
                                       origin=f"then:{rt.job.id}", overwrite=rt.job.overwrite)
        except OutputConflict as exc:  # this job is done; only the chained one is refused
            log.warning("job %s: the chained job %s was refused: %s", rt.job.id, rt.then.profile.name, exc)
            self.store.event("chain_refused", job_id=rt.job.id, data={"reason": str(exc)})
            return
        rt.children.extend(child_ids)
        self.store.event("chained", job_id=rt.job.id, data={"jobs": child_ids})
