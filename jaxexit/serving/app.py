"""HTTP in front of a `serving.Service` (FastAPI; the bodies are described by `serving.schema`).

    POST /v1/classify   {"texts": [...]} or {"pairs": [[a, b], ...]}
    GET  /v1/policy     the active policy (and certificate), what the calibration table offers, the
                        shadow buffer, the controller
    PUT  /v1/policy     {"policy": "pcee", "patience": 2, "tau": 0.3}, {"target_saving": 0.5} or
                        {"max_risk": 0.02, "risk_delta": 0.1, "risk": "consistency"} (certified)
    POST /v1/calibrate  re-certify the active risk target on the shadow buffer alone
    GET  /healthz       {"status": "ok", ...}
    GET  /metrics       Prometheus text
    GET  /openapi.json  the contract: every body, status and error of this service

Every refusal is a 4xx (503: the model could not answer) with `{"error": "<what is wrong>"}`. With
an admin token, PUT /v1/policy and POST /v1/calibrate need `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from pydantic_core import from_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxexit.exits import registry
from jaxexit.serving import schema
from jaxexit.serving.auth import AdminToken, warn_if_open
from jaxexit.serving.errors import RequestError
from jaxexit.serving.service import ActivePolicy, Service

log = logging.getLogger(__name__)


ENDPOINTS = ("/v1/classify", "/v1/policy", "/v1/calibrate", "/healthz", "/metrics")
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class ClassifyRequest(BaseModel):
    """What POST /v1/classify parses (the per-task checks follow: `_inputs`)."""
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


class Methods:
    """ASGI middleware: a method a known path does not take. OPTIONS gets 204 and every other 405
    with `{"error": ...}`, both with `Allow` listing all the methods of the resource (the router
    alone would list those of its first route: GET for /v1/policy, which also takes PUT)."""

    def __init__(self, app, allowed: dict[str, frozenset[str]]):
        self.app = app
        self.allowed = allowed
        self.allow = {path: ", ".join([m for m in _METHOD_ORDER if m in methods] + ["OPTIONS"])
                      for path, methods in allowed.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            methods = self.allowed.get(scope["path"])
            if methods is not None and scope["method"] not in methods:
                headers = {"Allow": self.allow[scope["path"]]}
                if scope["method"] == "OPTIONS":
                    return await Response(status_code=204, headers=headers)(scope, receive, send)
                error = f"{scope['method']} is not allowed on {scope['path']}; it takes {self.allow[scope['path']]}"
                return await JSONResponse({"error": error}, 405, headers)(scope, receive, send)
        return await self.app(scope, receive, send)


def _where(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts).lstrip(".") or "body"


def _json_content(request: Request) -> None:
    """A body sent as something other than JSON is refused (415); one with no Content-Type is read
    as JSON."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise RequestError(f"the body must be JSON (Content-Type: application/json), got Content-Type {declared!r}",
                           status=415)


def _inputs(service: Service, body: ClassifyRequest) -> tuple[list | None, list | None]:
    """The request's texts or pairs after today's checks (`Service.check_inputs`: exactly one,
    not empty, not too many, the task's kind) and the schema's: the other kind not even as null,
    no empty sentence."""
    texts, pairs = body.texts, body.pairs
    service.check_inputs(texts, pairs)
    task = service.task
    if task.is_pair and "texts" in body.model_fields_set:
        raise RequestError(f'{task.tsv_dir} classifies sentence pairs: send "pairs": [[a, b], ...] and no "texts"')
    if not task.is_pair and "pairs" in body.model_fields_set:
        raise RequestError(f'{task.tsv_dir} classifies single sentences: send "texts": [...] and no "pairs"')
    if texts is not None and "" in texts:
        raise RequestError(f"texts[{texts.index('')}] is empty: nothing to classify")
    if pairs is not None:
        for i, (a, b) in enumerate(pairs):
            if not a or not b:
                raise RequestError(f"pairs[{i}][{0 if not a else 1}] is empty: a pair takes two sentences")
    return texts, pairs


def _utf8(message: str) -> str:
    """A JSON parser's message, with a hint when the bytes were not UTF-8."""
    return message + " (the body must be UTF-8)" if "unicode" in message.lower() else message


def _json(raw: bytes):
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        raise RequestError(_utf8(f"the body is not JSON ({e})")) from None


INT_PARAMS = frozenset(p.name for s in registry.REGISTRY.values() for p in s.params if p.kind is int)


def _integers(spec):
    """A policy body with integer parameters written as 2.0 read as 2 (JSON, and its schema, do
    not tell them apart)."""
    if not isinstance(spec, dict):
        return spec
    return {k: int(v) if k in INT_PARAMS and isinstance(v, float) and v.is_integer() else v for k, v in spec.items()}


def create_app(service: Service, max_body_bytes: int = 1 << 20, admin_token: str | None = None, *,
               set_policy: Callable[[dict], ActivePolicy] | None = None,
               calibrate: Callable[[], ActivePolicy] | None = None) -> FastAPI:
    """The HTTP app of `service`; with `admin_token`, what changes the service needs it.
    `set_policy` and `calibrate` replace `service.set_policy` and `service.calibrate` behind PUT
    /v1/policy and POST /v1/calibrate (Ray Serve: the policy goes to every replica)."""
    set_policy = set_policy or service.set_policy
    recalibrate = calibrate or service.calibrate
    contract = schema.build(service)
    app = FastAPI(title="jaxexit", version="1",
                  description="early-exit classification whose speed is turned while it runs")
    metrics = service.metrics
    admin = AdminToken(admin_token) if admin_token is not None else None
    changes: list = []
    if admin is not None:
        bearer = HTTPBearer(auto_error=False, description="the admin token (--admin-token-file)")

        async def require_admin(request: Request, _=Security(bearer)):
            admin.check(request.headers.get("authorization"), f"{request.method} {request.url.path}")

        changes = [Depends(require_admin)]
    guarded = (401, 403) if admin is not None else ()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = _where(first.get("loc", ()))
        message = _utf8(first.get("msg")) if first.get("type") == "json_invalid" else f"{where}: {first.get('msg')}"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"no endpoint {request.url.path}; see /openapi.json" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):  # a bug: logged by the server, a JSON body all the same
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the service's log"}, status_code=500)

    @app.post("/v1/classify", response_model=None,
              responses=contract.responses(contract.classify_answer, 413, 415, 422, 503))
    async def classify(request: Request):
        """Classify sentences (or pairs): per input the answer and its exit layer."""
        _json_content(request)
        try:  # parsed here, not by FastAPI: the service's own checks and messages
            body = ClassifyRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        texts, pairs = _inputs(service, body)
        try:
            future, active, arrived, truncated = service.submit(texts, pairs)
        except RuntimeError as e:  # the engine is closed
            raise RequestError(f"the service is not taking requests: {e}", status=503) from None
        try:
            exit_layer, outputs = await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001 -- the engine logged it; the client learns that it failed
            raise RequestError(f"the model could not run this request's batch ({type(e).__name__}: {e})",
                               status=503) from None
        answer = service.answer(active, exit_layer, outputs, arrived)
        for result, cut in zip(answer["results"], truncated):
            result["truncated"] = cut
        return JSONResponse(answer)  # no jsonable_encoder pass

    @app.get("/v1/policy", response_model=None, responses=contract.responses(contract.policy_state))
    async def get_policy():
        """The active policy, the policies this model runs and what the calibration table offers."""
        return service.describe_policy()

    @app.put("/v1/policy", response_model=None, dependencies=changes,
             responses=contract.responses(contract.policy_answer, *guarded, 409, 413, 415, 422))
    async def put_policy(request: Request):
        """Replace the policy: explicit parameters, a target saving or a risk target."""
        _json_content(request)
        spec = _integers(_json(await request.body()))
        active = await asyncio.to_thread(set_policy, spec)  # a certification takes a while: not on the loop
        return {"active": active.describe()}

    @app.post("/v1/calibrate", response_model=None, dependencies=changes,
              responses=contract.responses(contract.policy_answer, *guarded, 409, 413))
    async def calibrate():
        """Re-certify the active risk target on the shadow buffer alone."""
        active = await asyncio.to_thread(recalibrate)
        return {"active": active.describe()}

    @app.get("/healthz", response_model=None, responses=contract.responses(schema.Health))
    async def healthz():
        """Up, with the model, its task and the policy."""
        return {"status": "ok", "model": service.source, "task": service.task.tsv_dir,
                "num_layers": service.model.num_layers, "policy": str(service.active.policy),
                "uptime_s": round(time.monotonic() - started, 1)}

    @app.get("/metrics", response_model=None, response_class=PlainTextResponse,
             responses=contract.responses(None, text=True))
    async def prometheus():
        """Prometheus metrics (text exposition)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = contract.openapi(get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
    allowed: dict[str, set[str]] = {}
    for route in app.routes:
        if getattr(route, "methods", None):
            allowed.setdefault(route.path, set()).update(route.methods)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Methods, allowed={p: frozenset(m) for p, m in allowed.items()})
    app.add_middleware(CountRequests, metrics=metrics)  # added last: outermost, so it counts the 405s and 413s
    started = time.monotonic()
    return app


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000, max_body_bytes: int = 1 << 20,
          admin_token: str | None = None) -> None:
    """Answer HTTP on `host:port` (uvicorn) until stopped; the service is closed after. With
    `admin_token`, PUT /v1/policy and POST /v1/calibrate need it; without, and on an address other
    than loopback, a warning says that anyone reaching the port can change the policy."""
    import uvicorn

    app = create_app(service, max_body_bytes=max_body_bytes, admin_token=admin_token)
    log.info("serving %s (%s, %d layers) on http://%s:%d with %s%s", service.source, service.task.tsv_dir,
             service.model.num_layers, host, port, service.active.policy,
             "; policy changes need the admin token" if admin_token is not None else "")
    warn_if_open(host, admin_token is not None)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
