"""The controller's transfer routes (see :mod:`farm.transfer`): a job's declared inputs
by hash with HTTP ranges, outputs back into a running attempt's folder, and the list of
transfers. Annotations here are real (no ``from __future__ import annotations``): FastAPI
reads them to inject the request."""

import asyncio
import logging
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from farm.errors import DeterministicFailure, FarmError
from farm.model import TERMINAL_JOB_STATES
from farm.transfer import (
    HASH_HEADER,
    JOB_HEADER,
    MANIFEST_WAIT,
    NODE_HEADER,
    OFFSET_HEADER,
    ROUTE,
    STORAGE_MARK,
    Depot,
    parse_range,
)

log = logging.getLogger("farm.transfer")


def add_routes(app: Any, controller: Any, node_only: Any, readers: Any) -> Depot:
    """The transfer routes on the controller's API (``node_only``: a dependency that lets
    node and admin tokens in; ``readers``: any person's token)."""

    def running_job(job_id: str) -> Any:
        runtime = controller.scheduler.jobs.get(job_id)
        if runtime is None or runtime.state in TERMINAL_JOB_STATES:
            return None
        return runtime.job, runtime.processor

    def running_attempt(attempt_id: str) -> Any:
        attempt = controller.scheduler.attempts.get(attempt_id)
        runtime = controller.scheduler.jobs.get(attempt.job_id) if attempt is not None else None
        if attempt is None or not attempt.current or runtime is None:
            return None
        return attempt.job_id, runtime.job.work_dir / attempt_id

    depot = Depot(running_job, running_attempt)
    try:  # partial outputs of attempts that ended while the controller was down
        depot.sweep(controller.scheduler.work_root)
    except OSError as exc:
        log.warning("cannot clear partial uploads under %s: %s", controller.scheduler.work_root, exc)
    try:  # nodes with node.storage auto look for it to know whether they share the storage
        (controller.scheduler.work_root / STORAGE_MARK).write_text(
            "Farm's cluster storage: a node that sees this file writes segment outputs here\n")
    except OSError as exc:
        log.warning("cannot mark the cluster storage %s: %s; nodes with node.storage auto will send their "
                    "outputs through the controller", controller.scheduler.work_root, exc)

    def heard(kind: str, _runtime: Any, data: dict[str, Any]) -> None:
        if kind == "segment_progress" and "fetched" in data:
            fetched = data["fetched"]
            depot.fetched(fetched["node"], fetched["sha"], fetched["bytes"])

    controller.scheduler.listeners.append(heard)

    def refused(exc: Exception) -> JSONResponse:
        status = 404 if isinstance(exc, LookupError) else 409 if isinstance(exc, DeterministicFailure) else 400
        return JSONResponse({"error": str(exc).strip("'\"")}, status_code=status)

    @app.get(f"{ROUTE}/jobs/{{job_id}}/inputs", dependencies=[Depends(node_only)], include_in_schema=False)
    async def inputs(job_id: str, wait: float = MANIFEST_WAIT) -> Any:
        """A job's inputs, by hash; 202 while they are still being listed (the node asks again)."""
        try:
            listing = depot.manifest(job_id)
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(listing)), min(max(wait, 0), 50))
        except TimeoutError:
            return JSONResponse({"pending": f"listing the inputs of job {job_id}"}, status_code=202)
        except (LookupError, FarmError) as exc:
            return refused(exc)

    @app.get(f"{ROUTE}/blobs/{{sha}}", dependencies=[Depends(node_only)], include_in_schema=False)
    def blob(sha: str, request: Request) -> Any:
        try:
            _, size = depot.blob(sha)
            offset = parse_range(request.headers.get("range"), size)
            chunks = depot.send(sha, offset, request.headers.get(NODE_HEADER, "?")[:100],
                                request.headers.get(JOB_HEADER, "")[:100] or None)
        except (LookupError, FarmError) as exc:
            return refused(exc)
        headers = {"Content-Length": str(size - offset), "Accept-Ranges": "bytes"}
        if request.headers.get("range"):
            headers["Content-Range"] = f"bytes {offset}-{max(size - 1, offset)}/{size}"
        return StreamingResponse(chunks, status_code=206 if request.headers.get("range") else 200,
                                 media_type="application/octet-stream", headers=headers)

    @app.get(f"{ROUTE}/attempts/{{attempt_id}}/files/{{relative:path}}", dependencies=[Depends(node_only)],
             include_in_schema=False)
    async def arrived(attempt_id: str, relative: str, sha: str = "") -> Any:
        """How much of an output has arrived: a node whose upload broke sends the rest."""
        try:
            return {"arrived": await depot.arrived(attempt_id, relative, sha)}
        except (LookupError, FarmError) as exc:
            return refused(exc)

    @app.put(f"{ROUTE}/attempts/{{attempt_id}}/files/{{relative:path}}", dependencies=[Depends(node_only)],
             include_in_schema=False)
    async def output(attempt_id: str, relative: str, request: Request) -> Any:
        try:
            size = int(request.headers.get("content-length") or 0)
            offset = int(request.headers.get(OFFSET_HEADER) or 0)
        except ValueError:
            return refused(FarmError(f"Content-Length and {OFFSET_HEADER} must be whole numbers"))
        try:
            return await depot.receive(attempt_id, relative, request.headers.get(HASH_HEADER, ""), request.stream(),
                                       request.headers.get(NODE_HEADER, "?")[:100], size, offset)
        except (LookupError, FarmError) as exc:
            return refused(exc)
        except ClientDisconnect:  # what arrived is kept: the node asks how much and sends the rest
            log.info("the upload of %s for attempt %s broke off", relative, attempt_id)
            return Response(status_code=400)

    @app.get("/api/transfers", dependencies=[Depends(readers)])
    def transfers(job: str | None = None) -> list[dict[str, Any]]:
        """Files sent to nodes without shared storage, and outputs they sent back (of one
        job with ``?job=``): the last 200, with bytes moved and rate."""
        return depot.documents(job)

    return depot
