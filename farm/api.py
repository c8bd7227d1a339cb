"""The controller's HTTP API (FastAPI): batches, jobs, segments, attempts, nodes, events,
and the Batch Monitor page at ``/``.

Every ``/api`` route wants ``Authorization: Bearer TOKEN``, checked (with the body's size)
by :mod:`farm.gate` before any body is read, and a token's role decides what it may do
(:mod:`farm.tokens`): a wrong or revoked token is 401, a role that may not do something is
403 with a sentence that says which role it needs. Errors are JSON
``{"error": ...}`` with a sentence a person can act on. Reads come from the store (one
query for a list, however long); changes go through the scheduler's own thread. Live
changes stream from ``/api/events/stream`` as server-sent events.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm import __version__
from farm.attemptfiles import has_preview, read_live_log, read_preview
from farm.errors import FarmError, Forbidden, OutputConflict, StoreError
from farm.gate import UNAUTHORISED, Gate
from farm.model import TERMINAL_JOB_STATES, Submission
from farm.profiles import Priority
from farm.store import Store
from farm.tokens import Principal

if TYPE_CHECKING:
    from farm.config import FarmConfig
    from farm.events import EventHub
    from farm.scheduler import Scheduler

log = logging.getLogger("farm.api")
KEEPALIVE_SECONDS = 15.0
EVENTS_HEADER = "X-Farm-Events"  # the last live event id when a list was read: stream from there
WEB_FILES = {"monitor.js": "text/javascript", "monitor.css": "text/css", "api.js": "text/javascript",
             "api.css": "text/css"}


class ControllerView(Protocol):
    """What the API needs of the controller (:class:`farm.controller.Controller` is one), so
    that this module does not import the controller that serves it."""
    config: FarmConfig
    store: Store
    scheduler: Scheduler
    events: EventHub

    def authenticate(self, token: str | None) -> Principal | None: ...

    def submit(self, request: Submission) -> tuple[str, list[str]]: ...

    def info(self) -> dict[str, Any]: ...

    def node_documents(self) -> list[dict[str, Any]]: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, max_length=4096, description="profile name, or path on the controller (a path needs an admin token)")
    inputs: list[str] = Field(default_factory=list, description="input paths as the controller sees them")
    destination: str | None = Field(default=None, max_length=4096)
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, as --set")
    overwrite: bool = False
    priority: str | int | None = Field(default=None, description="high, normal, low or a number")


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: Literal["failed", "all"] = Field(
        default="failed", description="failed: only failed and cancelled segments; all: the whole job again")


class PriorityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: Priority = Field(description="high (10), normal (0), low (-10) or a whole number")


def job_document(row: Any) -> dict[str, Any]:
    """A job as lists show it; ``row`` comes from :meth:`Store.job_summaries`."""
    return {
        "id": row["id"], "batch": row["batch_id"], "input": row["input"], "profile": row["profile_name"],
        "processor": row["processor"], "destination": row["destination"], "priority": row["priority"],
        "state": row["state"], "error": row["error"], "waiting": row["waiting"],
        "outputs": json.loads(row["outputs"] or "[]"), "created": row["created"], "updated": row["updated"],
        "started": row["first_start"], "segments": row["segments_total"], "segments_done": row["segments_done"] or 0,
    }


def batch_state(states: list[str]) -> str:
    if any(state not in TERMINAL_JOB_STATES for state in states):
        for state in ("running", "assembling", "queued", "paused", "interrupted"):
            if state in states:
                return "running" if state == "assembling" else state
    if all(state == "done" for state in states):
        return "done"
    return "failed" if "failed" in states else "cancelled"


def batch_documents(batch_rows: list[Any], jobs: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        by_batch.setdefault(job["batch"], []).append(job)
    documents = []
    for row in batch_rows:
        members = by_batch.get(row["id"], [])
        total = sum(job["segments"] for job in members)
        done = sum(job["segments_done"] for job in members)
        starts = [job["started"] for job in members if job["started"]]
        state = batch_state([job["state"] for job in members]) if members else "done"
        progress = done / total if total else (1.0 if state == "done" else 0.0)
        eta = None
        if starts and state in ("running", "queued") and 0 < progress < 1:
            eta = round((now - min(starts)) * (1 - progress) / progress, 1)
        documents.append({
            "id": row["id"], "origin": row["origin"], "created": row["created"], "state": state,
            "jobs": len(members), "jobs_by_state": {s: sum(1 for j in members if j["state"] == s)
                                                    for s in sorted({j["state"] for j in members})},
            "segments": total, "segments_done": done, "progress": round(progress, 4),
            "started": min(starts) if starts else None, "eta_seconds": eta,
        })
    return documents


def attempt_document(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "segment": row["segment_id"], "node": row["node"], "state": row["state"],
            "started": row["started"], "ended": row["ended"], "exit_status": row["exit_status"],
            "reason": row["reason"]}


def create_app(controller: ControllerView) -> FastAPI:
    # FastAPI's own /docs and /redoc load their scripts from a public CDN: off, and /docs
    # is a page of our own (farm/web/api.html) that reads /openapi.json.
    app = FastAPI(title="Farm", version=__version__, docs_url=None, redoc_url=None,
                  description="The Farm controller: batches, jobs, segments, nodes and live events.")
    app.add_middleware(Gate, authenticate=controller.authenticate,
                       max_body=controller.config.controller.max_request_bytes)
    reader = Store(controller.store.path)
    bearer = HTTPBearer(auto_error=False)  # names the scheme in the OpenAPI spec

    def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        # a gate in front of the app may have found it already (request.state); else ask here
        found = getattr(request.state, "principal", None)
        if found is None:
            found = controller.authenticate(credentials.credentials if credentials is not None else None)
        if found is None:
            raise ApiError(401, UNAUTHORISED)
        return found

    def role(doing: str, *roles: str) -> Any:
        def check(who: Principal = Depends(principal)) -> Principal:
            if not who.may(*roles):
                raise ApiError(403, who.refusal(doing, *roles))
            return who
        return check

    readers = ("view", "submit", "admin")
    guarded = [Depends(role("reading", *readers))]
    steering = role("changing a job", "submit", "admin")

    def owner_of(batch_id: str) -> str | None:
        """Who submitted a batch; a chained batch (``then:JOB``) belongs to whoever
        submitted the job it follows."""
        for _ in range(64):
            row = reader.batch(batch_id)
            if row is None or not row["origin"].startswith("then:"):
                return row["origin"] if row is not None else None
            parent = reader.job(row["origin"].removeprefix("then:"))
            if parent is None:
                return None
            batch_id = parent["batch_id"]
        return None

    def must_own(who: Principal, batch_id: str, what: str) -> None:
        if who.may("admin") or who.owns(owner_of(batch_id)):
            return
        raise ApiError(403, f"token {who.name!r} has role {who.role}: it may change only the jobs it submitted, "
                            f"and {what} was submitted by another; changing it needs admin")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(FarmError)
    async def farm_error(request: Request, exc: FarmError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(OutputConflict)
    async def output_conflict(request: Request, exc: OutputConflict) -> JSONResponse:
        # an output exists, or another unfinished job will write it: the request clashes with the state
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # the request was fine; the controller cannot take it now (disk full, store locked)
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route: see /docs for the API" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"the controller failed on this request ({type(exc).__name__}); "
                                      "its log has the details"}, status_code=500)

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

    def in_scheduler(fn: Any) -> Any:
        """Run a change in the scheduler's thread; a refusal is a conflict, not a crash."""
        try:
            return controller.scheduler.call(fn).result(timeout=30)
        except StoreError:
            raise  # 503: the controller cannot take changes now
        except FarmError as exc:
            raise ApiError(409, str(exc)) from None
        except FutureTimeout:
            raise ApiError(503, "the controller's scheduler did not answer within 30 s; try again") from None

    # -- the page ------------------------------------------------------------------------

    web = files("farm") / "web"

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(web.joinpath("index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.get("/docs", include_in_schema=False)
    def reference() -> HTMLResponse:
        return HTMLResponse(web.joinpath("api.html").read_text(encoding="utf-8"))

    @app.get("/web/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in WEB_FILES:
            raise ApiError(404, f"no file {name!r}")
        return PlainTextResponse(web.joinpath(name).read_text(encoding="utf-8"), media_type=WEB_FILES[name])

    # -- reading -------------------------------------------------------------------------

    @app.get("/api/cluster", dependencies=[Depends(role("reading the cluster's address", "node", *readers))])
    def cluster() -> dict[str, Any]:
        return controller.info()

    from farm.transfer_api import add_routes

    controller.depot = add_routes(app, controller, role("moving files for segments", "node", "admin"),
                                  role("reading", *readers))

    @app.get("/api/batches", dependencies=guarded)
    def batches(response: Response) -> list[dict[str, Any]]:
        response.headers[EVENTS_HEADER] = str(controller.events.last_id)
        jobs = [job_document(row) for row in reader.job_summaries()]
        return batch_documents(reader.batches(), jobs, time.time())

    @app.get("/api/batches/{batch_id}", dependencies=guarded)
    def batch(batch_id: str) -> dict[str, Any]:
        row = reader.batch(batch_id)
        if row is None:
            raise ApiError(404, f"no batch {batch_id!r}")
        jobs = [job_document(job) for job in reader.job_summaries(batch_id)]
        return {**batch_documents([row], jobs, time.time())[0], "job_list": jobs}

    # The longest list the API serves, read by every open monitor at once: encoded once per
    # change of the store, not once per reader. The event mark is kept with the body, so a
    # client streams from where that body was read.
    listed: dict[tuple[str | None, str | None], tuple[int, int, bytes]] = {}

    @app.get("/api/jobs", dependencies=guarded, response_model=list[dict[str, Any]])
    def jobs(batch: str | None = None, state: str | None = None) -> Response:
        key = (batch, state)
        version = reader.data_version()
        cached = listed.get(key)
        if cached is None or cached[0] != version:
            mark = controller.events.last_id
            body = reader.job_summaries_json(batch, state)
            if len(listed) > 64:
                listed.clear()
            cached = listed[key] = (version, mark, body)
        return Response(cached[2], media_type="application/json", headers={EVENTS_HEADER: str(cached[1])})

    @app.get("/api/jobs/{job_id}", dependencies=guarded)
    def job(job_id: str, response: Response) -> dict[str, Any]:
        response.headers[EVENTS_HEADER] = str(controller.events.last_id)
        job_or_404(job_id)
        [summary] = reader.job_summaries_of([job_id])
        attempts: dict[str, list[dict[str, Any]]] = {}
        for attempt in reader.attempts(job_id=job_id):
            attempts.setdefault(attempt["segment_id"], []).append(attempt_document(attempt))
        return {**job_document(summary), "transfers": controller.depot.documents(job_id), "segment_list": [
            {"id": s["id"], "index": s["idx"], "label": s["label"], "state": s["state"],
             "attempts": attempts.get(s["id"], []), "error": s["error"]}
            for s in reader.segments(job_id)
        ]}

    @app.get("/api/attempts/{attempt_id}/log", dependencies=guarded)
    def attempt_log(attempt_id: str, after: int = Query(default=0, ge=0, le=2**62)) -> dict[str, Any]:
        """An attempt's log. While it runs, the lines written so far from byte ``after`` of
        its live log on, and ``next``, the ``after`` of the next call; once it has ended,
        the whole log as stored."""
        row = reader.attempt(attempt_id)
        if row is None:
            raise ApiError(404, f"no attempt {attempt_id!r}")
        if row["ended"] is None:
            text, following = read_live_log(Path(job_or_404(row["job_id"])["work_dir"]), row["id"], after)
            return {**attempt_document(row), "log": text, "live": True, "next": following}
        return {**attempt_document(row), "log": row["log"] or "", "live": False, "next": None}

    # -- pictures: what the processors' previews show (farm.attemptfiles) -------------------

    def picture(found: tuple[bytes, str] | None, what: str) -> Response:
        if found is None:
            raise ApiError(404, f"{what} has no preview")
        data, media_type = found
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    def previews_of(job_id: str) -> list[dict[str, Any]]:
        work_dir = Path(job_or_404(job_id)["work_dir"])
        segments = {s["id"]: s for s in reader.segments(job_id)}
        found = [{"attempt": a["id"], "segment": a["segment_id"], "index": segments[a["segment_id"]]["idx"],
                  "label": segments[a["segment_id"]]["label"], "node": a["node"], "ended": a["ended"]}
                 for a in reader.attempts(job_id=job_id)
                 if a["state"] == "done" and a["segment_id"] in segments and has_preview(work_dir, a["id"])]
        return sorted(found, key=lambda p: (p["index"], p["ended"]))

    @app.get("/api/jobs/{job_id}/previews", dependencies=guarded)
    def job_previews(job_id: str) -> list[dict[str, Any]]:
        """The segments of a job that have a preview (a frame, a poster frame), in order;
        each picture is at /api/attempts/{attempt}/preview."""
        return previews_of(job_id)

    @app.get("/api/jobs/{job_id}/preview", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
    def job_preview(job_id: str) -> Response:
        """The preview of the segment that finished last (the latest frame)."""
        found = previews_of(job_id)
        if not found:
            raise ApiError(404, f"job {job_id} has no preview yet")
        latest = max(found, key=lambda p: p["ended"])
        return picture(read_preview(Path(job_or_404(job_id)["work_dir"]), latest["attempt"]), f"job {job_id}")

    @app.get("/api/attempts/{attempt_id}/preview", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
    def attempt_preview(attempt_id: str) -> Response:
        """A JPEG or PNG at most 320 px wide that the segment's processor made of its work."""
        row = reader.attempt(attempt_id)
        if row is None:
            raise ApiError(404, f"no attempt {attempt_id!r}")
        return picture(read_preview(Path(job_or_404(row["job_id"])["work_dir"]), row["id"]), f"attempt {attempt_id}")

    @app.get("/api/nodes", dependencies=guarded)
    def nodes(response: Response) -> list[dict[str, Any]]:
        response.headers[EVENTS_HEADER] = str(controller.events.last_id)
        moved = controller.depot.by_node()  # nodes without shared storage: what went through the controller
        return [{**node, **({"transfers": moved[node["name"]]} if node["name"] in moved else {})}
                for node in controller.node_documents()]

    @app.get("/api/events", dependencies=guarded)
    def events(after: int = Query(default=0, ge=0, le=2**62), job: str | None = None,
               limit: int = Query(default=500, ge=1, le=5000)) -> list[dict[str, Any]]:
        """The stored history of state changes (the live stream is /api/events/stream)."""
        return [{"id": row["id"], "ts": row["ts"], "kind": row["kind"], "job": row["job_id"],
                 "segment": row["segment_id"], "attempt": row["attempt_id"],
                 "data": json.loads(row["data"]) if row["data"] else None}
                for row in reader.events_after(after, job, limit)]

    @app.get("/api/events/stream", dependencies=guarded, response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(request: Request, after: int | None = Query(default=None, ge=0, le=2**62),
                     credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> StreamingResponse:
        """Server-sent events: one ``data:`` line of JSON per change, with its ``id:``;
        reconnect with ``Last-Event-ID`` (or ``?after=``) to get what was missed. A stream
        ends when its token is revoked (at the next event or keep-alive)."""
        hub = controller.events
        last = request.headers.get("last-event-id", "")
        start = int(last) if last.isdigit() else (after if after is not None else hub.last_id)
        token = credentials.credentials if credentials is not None else None

        async def feed() -> AsyncIterator[str]:
            seen = start
            yield f"retry: 2000\n: connected at event {seen}\n\n"
            while not hub.closed and not await request.is_disconnected():
                batch = await hub.wait(seen, KEEPALIVE_SECONDS)
                if controller.authenticate(token) is None:
                    return  # revoked while streaming: what was not yet sent is not sent
                if not batch:
                    yield ": keep-alive\n\n"
                    continue
                seen = batch[-1].id
                yield "".join(entry.encoded() for entry in batch)

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # -- changing --------------------------------------------------------------------------

    @app.post("/api/batches", status_code=201)
    def submit(body: SubmitRequest, who: Principal = Depends(role("submitting", "submit", "admin"))) -> dict[str, Any]:
        batch_id, job_ids = controller.submit(Submission(**body.model_dump(), principal=who))
        return {"batch": batch_id, "jobs": [job_document(row) for row in reader.job_summaries_of(job_ids)]}

    @app.post("/api/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, who: Principal = Depends(steering)) -> dict[str, Any]:
        rows = reader.job_summaries(batch_id)
        if not rows:
            raise ApiError(404, f"no batch {batch_id!r}")
        must_own(who, batch_id, f"batch {batch_id}")
        open_jobs = [row["id"] for row in rows if row["state"] not in TERMINAL_JOB_STATES]
        for job_id in open_jobs:
            controller.scheduler.cancel(job_id)
        return {"batch": batch_id, "cancel": "requested" if open_jobs else "nothing left to cancel",
                "jobs": open_jobs}

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str, who: Principal = Depends(steering)) -> dict[str, Any]:
        row = job_or_404(job_id)
        must_own(who, row["batch_id"], f"job {job_id}")
        if row["state"] in TERMINAL_JOB_STATES:
            raise ApiError(409, f"job {job_id} is already {row['state']}")
        controller.scheduler.cancel(job_id)
        return {"job": job_id, "cancel": "requested"}

    @app.post("/api/jobs/{job_id}/retry")
    def retry(job_id: str, body: RetryRequest | None = None, who: Principal = Depends(steering)) -> dict[str, Any]:
        must_own(who, job_or_404(job_id)["batch_id"], f"job {job_id}")
        whole = body is not None and body.segments == "all"
        count = in_scheduler(lambda: controller.scheduler.retry(job_id, whole=whole))
        return {"job": job_id, "segments_queued": count}

    @app.post("/api/jobs/{job_id}/pause")
    def pause_job(job_id: str, who: Principal = Depends(steering)) -> dict[str, Any]:
        must_own(who, job_or_404(job_id)["batch_id"], f"job {job_id}")
        in_scheduler(lambda: controller.scheduler.pause(job_id))
        return {"job": job_id, "state": "paused"}

    @app.post("/api/jobs/{job_id}/resume")
    def resume_job(job_id: str, who: Principal = Depends(steering)) -> dict[str, Any]:
        must_own(who, job_or_404(job_id)["batch_id"], f"job {job_id}")
        in_scheduler(lambda: controller.scheduler.resume(job_id))
        return {"job": job_id, "state": reader.job(job_id)["state"]}

    @app.post("/api/jobs/{job_id}/priority")
    def priority(job_id: str, body: PriorityRequest, who: Principal = Depends(steering)) -> dict[str, Any]:
        must_own(who, job_or_404(job_id)["batch_id"], f"job {job_id}")
        in_scheduler(lambda: controller.scheduler.set_priority(job_id, body.priority))
        return {"job": job_id, "priority": body.priority}

    def set_paused(name: str, paused: bool) -> dict[str, Any]:
        if not name.strip() or len(name) > 200:
            raise ApiError(400, "a node name is 1 to 200 characters")
        in_scheduler(lambda: controller.scheduler.set_node_paused(name, paused))
        return {"node": name, "paused": paused}

    admin_only = [Depends(role("pausing or resuming a node", "admin"))]

    @app.post("/api/nodes/{name}/pause", dependencies=admin_only)
    def pause(name: str) -> dict[str, Any]:
        return set_paused(name, True)

    @app.post("/api/nodes/{name}/resume", dependencies=admin_only)
    def resume(name: str) -> dict[str, Any]:
        return set_paused(name, False)

    return app
