"""HTTP in front of a `serving.Service` (FastAPI; pydantic validates the bodies).

    POST /v1/classify   {"texts": [...]} or {"pairs": [[a, b], ...]}
    GET  /v1/policy     the active policy (and certificate), what the calibration table offers, the
                        shadow buffer, the controller
    PUT  /v1/policy     {"policy": "pcee", "patience": 2, "tau": 0.3}, {"target_saving": 0.5} or
                        {"max_risk": 0.02, "risk_delta": 0.1, "risk": "consistency"} (certified)
    POST /v1/calibrate  re-certify the active risk target on the shadow buffer alone
    GET  /healthz       {"status": "ok", ...}
    GET  /metrics       Prometheus text

Every refusal is a 4xx with `{"error": "<what is wrong>"}`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from jaxexit.serving.errors import RequestError
from jaxexit.serving.service import Service

log = logging.getLogger(__name__)


ENDPOINTS = ("/v1/classify", "/v1/policy", "/v1/calibrate", "/healthz", "/metrics")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] | None = None
    pairs: list[tuple[StrictStr, StrictStr]] | None = None


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it
    (by its Content-Length, or while it streams in)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        response = JSONResponse({"error": f"request body over {self.limit} bytes (--max-body-bytes)"}, status_code=413)
        await response(scope, None, send)


class CountRequests:
    """ASGI middleware: every answer counted by endpoint and status (`jaxexit_requests_total`,
    `jaxexit_request_errors_total` for 4xx and 5xx). Plain ASGI, not `BaseHTTPMiddleware`, which
    costs a task and a stream per request."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        status = {}

        async def tracked(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            code = status.get("code", 500)
            self.metrics.requests.labels(endpoint, str(code)).inc()
            if code >= 400:
                self.metrics.errors.labels(endpoint, str(code)).inc()


def _where(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts).lstrip(".") or "body"


def create_app(service: Service, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="jaxexit", description="early-exit classification whose speed is turned while it runs")
    metrics = service.metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)  # added last: outermost, so it counts BodyLimit's 413s

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = _where(first.get("loc", ()))
        message = first.get("msg") if first.get("type") == "json_invalid" else f"{where}: {first.get('msg')}"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.post("/v1/classify")
    async def classify(request: Request):
        try:  # parsed here, not by FastAPI, so that a body sent without a JSON content type still parses
            body = ClassifyRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        future, active, arrived = service.submit(body.texts, body.pairs)
        exit_layer, outputs = await asyncio.wrap_future(future)
        return JSONResponse(service.answer(active, exit_layer, outputs, arrived))  # no jsonable_encoder pass

    @app.get("/v1/policy")
    async def get_policy():
        return service.describe_policy()

    @app.put("/v1/policy")
    async def put_policy(request: Request):
        try:
            spec = await request.json()
        except ValueError:
            raise RequestError("the body is not JSON") from None
        active = await asyncio.to_thread(service.set_policy, spec)  # a certification takes a while: not on the loop
        return {"active": active.describe()}

    @app.post("/v1/calibrate")
    async def calibrate():
        active = await asyncio.to_thread(service.calibrate)
        return {"active": active.describe()}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": service.source, "task": service.task.tsv_dir,
                "num_layers": service.model.num_layers, "policy": str(service.active.policy),
                "uptime_s": round(time.monotonic() - started, 1)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    started = time.monotonic()
    return app


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, max_body_bytes: int = 1 << 20) -> None:
    """Answer HTTP on `host:port` (uvicorn) until stopped; the service is closed after."""
    import uvicorn

    app = create_app(service, max_body_bytes=max_body_bytes)
    log.info("serving %s (%s, %d layers) on http://%s:%d with %s", service.source, service.task.tsv_dir,
             service.model.num_layers, host, port, service.active.policy)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
