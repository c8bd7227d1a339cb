"""The controller's HTTP API (FastAPI): batches, jobs, segments, attempts, nodes.

Every route wants ``Authorization: Bearer TOKEN``. Errors are JSON ``{"error": ...}``
with a sentence a person can act on. Reads come from the store; changes go through
the scheduler's own thread.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from farm import __version__
from farm.errors import FarmError
from farm.security import token_matches
from farm.store import Store


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, description="profile name or path on the controller")
    inputs: list[str] = Field(default_factory=list, description="input paths as the controller sees them")
    destination: str | None = None
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as --set")
    overwrite: bool = False
    priority: str | int | None = Field(default=None, description="high, normal, low or a number")


def job_document(row: Any, segments: list[Any] | None = None) -> dict[str, Any]:
    doc = {
        "id": row["id"], "batch": row["batch_id"], "input": row["input"], "profile": row["profile_name"],
        "processor": row["processor"], "destination": row["destination"], "priority": row["priority"],
        "state": row["state"], "error": row["error"], "waiting": row["waiting"],
        "outputs": json.loads(row["outputs"] or "[]"), "created": row["created"], "updated": row["updated"],
    }
    if segments is not None:
        doc["segments"] = len(segments)
        doc["segments_done"] = sum(1 for s in segments if s["state"] == "done")
    return doc


def create_app(controller: Any) -> FastAPI:
    app = FastAPI(title="Farm", version=__version__,
                  description="The Farm controller: batches, jobs, segments and nodes.")
    reader = Store(controller.store.path)
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not token_matches(controller.bundle.token, credentials.credentials):
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer TOKEN' with the "
                                "cluster's token (in its bundle)")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(FarmError)
    async def farm_error(request: Request, exc: FarmError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=422)

    def job_or_404(job_id: str) -> Any:
        row = reader.job(job_id)
        if row is None:
            raise ApiError(404, f"no job {job_id!r}")
        return row

    @app.get("/api/cluster", dependencies=[Depends(authorised)])
    def cluster() -> dict[str, Any]:
        return controller.info()

    @app.post("/api/batches", status_code=201, dependencies=[Depends(authorised)])
    def submit(body: SubmitRequest) -> dict[str, Any]:
        from farm.controller import Submission

        batch_id, job_ids = controller.submit(Submission(**body.model_dump()))
        return {"batch": batch_id, "jobs": [job_document(reader.job(j), reader.segments(j)) for j in job_ids]}

    @app.get("/api/jobs", dependencies=[Depends(authorised)])
    def jobs(batch: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        rows = reader.jobs(batch)
        return [job_document(row, reader.segments(row["id"])) for row in rows if state is None or row["state"] == state]

    @app.get("/api/jobs/{job_id}", dependencies=[Depends(authorised)])
    def job(job_id: str) -> dict[str, Any]:
        row = job_or_404(job_id)
        segments = reader.segments(job_id)
        doc = job_document(row, segments)
        attempts: dict[str, list[dict[str, Any]]] = {}
        for attempt in reader.attempts(job_id=job_id):
            attempts.setdefault(attempt["segment_id"], []).append({
                "id": attempt["id"], "node": attempt["node"], "state": attempt["state"],
                "started": attempt["started"], "ended": attempt["ended"], "exit_status": attempt["exit_status"],
                "reason": attempt["reason"],
            })
        doc["segment_list"] = [
            {"id": s["id"], "index": s["idx"], "label": s["label"], "state": s["state"], "attempts": attempts.get(s["id"], []),
             "error": s["error"]}
            for s in segments
        ]
        return doc

    @app.post("/api/jobs/{job_id}/cancel", dependencies=[Depends(authorised)])
    def cancel(job_id: str) -> dict[str, Any]:
        row = job_or_404(job_id)
        if row["state"] in ("done", "failed", "cancelled"):
            raise ApiError(409, f"job {job_id} is already {row['state']}")
        controller.scheduler.cancel(job_id)
        return {"job": job_id, "cancel": "requested"}

    @app.post("/api/jobs/{job_id}/retry", dependencies=[Depends(authorised)])
    def retry(job_id: str) -> dict[str, Any]:
        job_or_404(job_id)
        count = controller.scheduler.call(lambda: controller.scheduler.retry(job_id)).result(timeout=30)
        return {"job": job_id, "segments_queued": count}

    def node_document(view: Any) -> dict[str, Any]:
        paused = view.name in controller.scheduler.paused_nodes
        state = "paused" if paused else ("part-time" if not view.accepting else ("busy" if view.running else "idle"))
        return {"name": view.name, "address": view.address, "slots": view.slots, "running": view.running,
                "state": state, "reason": view.reason, "capabilities": view.capabilities}

    @app.get("/api/nodes", dependencies=[Depends(authorised)])
    def nodes() -> list[dict[str, Any]]:
        return [node_document(view) for view in controller.scheduler._nodes]

    def set_paused(name: str, paused: bool) -> dict[str, Any]:
        if not name.strip() or len(name) > 200:
            raise ApiError(400, "a node name is 1 to 200 characters")
        controller.scheduler.call(lambda: controller.scheduler.set_node_paused(name, paused)).result(timeout=30)
        return {"node": name, "paused": paused}

    @app.post("/api/nodes/{name}/pause", dependencies=[Depends(authorised)])
    def pause(name: str) -> dict[str, Any]:
        return set_paused(name, True)

    @app.post("/api/nodes/{name}/resume", dependencies=[Depends(authorised)])
    def resume(name: str) -> dict[str, Any]:
        return set_paused(name, False)

    return app
