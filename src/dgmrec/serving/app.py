"""The HTTP application of ``dgmrec serve`` (FastAPI; the ``serve`` extra).

Routes: ``GET /users/{user}/recommendations``, ``GET /items/{item}/similar``, ``POST /items``, ``POST /feedback``,
``GET /health``, ``GET /metrics``; the schema at ``/openapi.json``, an interactive page at ``/docs``.

Every rejected request gets a 4xx answer ``{"detail": "<field>: <problem>", "field": "<field>"}``: unknown ids
404, taken ids 409, bodies over the size limit 413, everything else malformed 422. Endpoints are plain functions,
run by the server's thread pool; they read the current snapshot of :class:`~dgmrec.serving.state.ServingState`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError, StarletteHTTPException
from fastapi.responses import JSONResponse

from dgmrec.errors import InputError
from dgmrec.serving.schemas import (
    AddedItem,
    AddItemsRequest,
    AddItemsResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    Metrics,
    Recommendation,
    Recommendations,
    RouteMetrics,
    SimilarItem,
    SimilarItems,
)
from dgmrec.serving.state import ConflictError, NotFoundError, ServingState

log = logging.getLogger("dgmrec.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY = 8 * 1024 * 1024
DEFAULT_MAX_K = 1000
LATENCY_WINDOW = 10_000

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown user or item."},
    422: {"model": ErrorResponse, "description": "Malformed request; the message names the field."},
}


# ---------------------------------------------------------------------------------------------- metrics
class RouteStats:
    """Request counts and the latencies of the last requests of one route."""

    def __init__(self) -> None:
        self.count = 0
        self.errors_4xx = 0
        self.errors_5xx = 0
        self.total_s = 0.0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)


class MetricsRecorder:
    """Per-route counts and latency percentiles, safe to update from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, RouteStats] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            stats = self._routes.setdefault(route, RouteStats())
            stats.count += 1
            stats.errors_4xx += 400 <= status < 500
            stats.errors_5xx += status >= 500
            stats.total_s += seconds
            stats.latencies.append(seconds)

    def summary(self) -> dict[str, RouteMetrics]:
        with self._lock:
            routes = {k: (v.count, v.errors_4xx, v.errors_5xx, v.total_s, np.asarray(v.latencies))
                      for k, v in self._routes.items()}
        out = {}
        for route, (count, e4, e5, total, lat) in sorted(routes.items()):
            p50, p95, p99 = (np.percentile(lat, [50, 95, 99]) * 1000 if len(lat) else (0.0, 0.0, 0.0))
            out[route] = RouteMetrics(count=count, errors_4xx=e4, errors_5xx=e5,
                                      mean_ms=round(1000 * total / max(count, 1), 3), p50_ms=round(float(p50), 3),
                                      p95_ms=round(float(p95), 3), p99_ms=round(float(p99), 3))
        return out


class MetricsMiddleware:
    """Times every request and records it under its route template (``GET /users/{user}/recommendations``)."""

    def __init__(self, app: ASGIApp, recorder: MetricsRecorder) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            key = f"{scope.get('method', '')} {path.replace(':path', '')}" if path else "unmatched"
            self.recorder.record(key, status, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- body limit
async def _send_error(send: Send, status: int, detail: str, field: str | None) -> None:
    body = json.dumps({"detail": detail, "field": field}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Rejects request bodies over ``max_bytes`` with 413, by their Content-Length or while they stream."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"body: larger than the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "content-length: not an integer", "content-length")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, message, "body")
                    return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        # read the whole body (at most max_bytes) before the application sees it, then hand it over
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, message, "body")
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------- errors
def _error(status: int, detail: str, field: str | None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "field": field})


def _input_error(exc: InputError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFoundError) else 409 if isinstance(exc, ConflictError) else 422
    return _error(status, str(exc), exc.source)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return _error(422, "malformed request", None)
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:] if len(loc) > 1 else loc
    field = ".".join(p if not p.isdigit() else f"[{p}]" for p in loc).replace(".[", "[") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _error(422, f"{field}: {first.get('msg', 'invalid')}{more}", field)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        return _input_error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error (logged by the server)", None)


# -------------------------------------------------------------------------------------------------- app
def create_app(state: ServingState, *, max_body_bytes: int = DEFAULT_MAX_BODY, max_k: int = DEFAULT_MAX_K) -> FastAPI:
    """The FastAPI application serving ``state``.

    Parameters
    ----------
    state:
        The loaded run.
    max_body_bytes:
        Largest request body accepted (413 above).
    max_k:
        Largest ``k`` of a list.
    """
    app = FastAPI(title="dgmrec", version="1", summary=f"Recommendations of a trained {state.model_name} run",
                  description="Recommend, find similar items, add items with partial modalities, record feedback.")
    app.state.serving = state
    recorder = MetricsRecorder()
    _install_handlers(app)

    @app.get("/users/{user:path}/recommendations", response_model=Recommendations, responses=_ERRORS,
             summary="Top-k items for a user")
    def recommendations(user: str,
                        k: int = Query(10, ge=1, le=max_k, description="Length of the list."),
                        exclude: Literal["seen", "train", "none"] = Query(
                            "seen", description="seen: the user's items of every split and feedback; train: the "
                                                "training items (the evaluation protocol); none.")) -> Recommendations:
        ranked = state.recommend(user, k, exclude)
        return Recommendations(user=user, k=k, exclude=exclude, source=ranked.source,  # type: ignore[arg-type]
                               items=[Recommendation(item=i, score=s, rank=r + 1)
                                      for r, (i, s) in enumerate(zip(ranked.items, ranked.scores, strict=True))])

    @app.get("/items/{item:path}/similar", response_model=SimilarItems, responses=_ERRORS,
             summary="Nearest items by a modality's completed features or by the final representation")
    def similar(item: str, k: int = Query(10, ge=1, le=max_k),
                modality: str | None = Query(None, min_length=1, max_length=64,
                                             description="A modality of the run; default: the final "
                                                         "representation.")) -> SimilarItems:
        ranked = state.similar(item, k, modality)
        return SimilarItems(item=item, space=ranked.source,
                            items=[SimilarItem(item=i, score=s) for i, s in zip(ranked.items, ranked.scores,
                                                                                strict=True)])

    @app.post("/items", response_model=AddItemsResponse,
              responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "An id is taken."},
                         413: {"model": ErrorResponse, "description": "Body too large."}},
              summary="Add items with the modalities they have (vectors or raw content); the model generates the rest")
    def add_items(body: AddItemsRequest) -> AddItemsResponse:
        added = state.add_items([(it.id, it.features) for it in body.items], [it.content for it in body.items])
        return AddItemsResponse(items=[AddedItem(id=a.id, observed=a.observed, generated=a.generated,
                                                 imputed=a.imputed) for a in added])

    @app.post("/feedback", response_model=FeedbackResponse,
              responses={**_ERRORS, 413: {"model": ErrorResponse, "description": "Body too large."}},
              summary="Record user-item interactions (excluded at once; stored for retraining)")
    def feedback(body: FeedbackRequest) -> FeedbackResponse:
        stored, new_users = state.add_feedback([(x.user, x.item, x.timestamp) for x in body.interactions])
        return FeedbackResponse(stored=stored, new_users=new_users)

    @app.get("/health", response_model=Health, summary="Liveness and sizes")
    def health() -> Health:
        return Health(**state.health())

    @app.get("/metrics", response_model=Metrics, summary="Request counts and latencies per route")
    def metrics() -> Metrics:
        return Metrics(routes=recorder.summary())

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, recorder=recorder)
    return app


def _check_listen(host: str, port: int) -> None:
    """An :class:`InputError` naming ``--host`` or ``--port``, before the run is loaded, when ``host:port``
    cannot be listened on (uvicorn would fail only after loading, with a traceback)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve {host!r} ({exc.strerror})", source="--host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror})", source="--port") from None


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, ann_above: int | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY, device: str | None = "cpu") -> None:
    """Load ``run_dir`` and serve it with uvicorn until interrupted."""
    import uvicorn

    from dgmrec.serving.state import DEFAULT_ANN_ABOVE

    _check_listen(host, port)
    state = ServingState(run_dir, device=device, ann_above=DEFAULT_ANN_ABOVE if ann_above is None else ann_above)
    app = create_app(state, max_body_bytes=max_body_bytes)
    h = state.health()
    print(f"serving {h['model']} ({h['users']} users, {h['items']} items + {h['added_items']} added, "
          f"{h['feedback']} feedback) on http://{host}:{port} (schema: /openapi.json)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        state.close()
