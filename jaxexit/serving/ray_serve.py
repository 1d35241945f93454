"""The service on Ray Serve: N replicas of it behind one HTTP address, one policy for all of them
(`jaxexit-serve --ray`; docs/serving.md, "Ray Serve"). Needs the `ray` extra (`ray[serve]`).

Two deployments make the application. `Model` replicas each hold a whole `Service` (the model, its
engine, metrics) with the HTTP app of `jaxexit.serving.app` in front of it, called in-process, so
every endpoint, body and error is the single-process service's. `Ingress` takes each HTTP request
and hands it to a `Model` replica through a deployment handle; when the replica dies under it, the
request goes again to another (classification and policy writes are idempotent), so a lost replica
costs retries, not 5xx.

The active policy is the `Model` deployment's user config, `{"policy": spec, "source": ...,
"version": n}` (`spec` as `PUT /v1/policy` takes it): every replica applies it in `reconfigure`, a
replica started later starts with it, and `PUT /v1/policy` on any replica checks the spec, writes a
new user config through the Serve controller (a lightweight update: replicas are reconfigured, not
restarted) and answers once every replica runs it. The calibration table is computed once, by the
application builder (`app`, the config's import path), and handed to every replica with its
arguments. The application is deployed from a Serve config (`serve_config`; `serve deploy` takes the
same file), which is what makes a user-config change a lightweight update.

Each replica answers with `X-Jaxexit-Replica` (its id) and `X-Jaxexit-Replica-Pid` (and the ingress
with `X-Jaxexit-Attempts` when a replica failed under the request first); `/metrics` is
the metrics of the replica that answered. Shadow traffic and the latency controller are per process
and are refused here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve
from ray.experimental import internal_kv
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxexit.serving import auth
from jaxexit.serving.app import create_app
from jaxexit.serving.errors import RequestError
from jaxexit.serving.service import ActivePolicy, build_service, calibration_table
from jaxexit.text import checkpoints

log = logging.getLogger("ray.serve")  # Serve's logger: the lines land in the replicas' Serve logs

APP = "jaxexit"
MODEL, INGRESS = "Model", "Ingress"
IMPORT_PATH = "jaxexit.serving.ray_serve:app"

# The builder's arguments (the config's `args`): what `build_service` takes, by the CLI's names.
DEFAULT_ARGS = {"checkpoint": None, "runs_dir": "runs", "data_dir": None, "table": True, "require_table": False,
                "max_batch": 32, "max_wait_ms": 2.0, "max_inputs": 256, "max_body_bytes": 1 << 20,
                "engine": "layer", "compile_cache": None, "admin_token_file": None}
_KV_NAMESPACE = "jaxexit"
_APPLY_TIMEOUT_S = 120.0


def _applied_key(replica: str) -> bytes:
    return f"{APP}/policy-version/{replica}".encode()


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes
                    ) -> tuple[int, list, bytes]:
    """One HTTP request through the ASGI `app` in this process: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": None,
             "server": None}
    answered = asyncio.Event()
    delivered = False
    out = {"status": 500, "headers": [], "body": []}

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            out["body"].append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 -- a bug past the app's handlers: its 500 was sent already
        log.exception("%s %s failed", method, path)
        if not answered.is_set():
            return 500, [(b"content-type", b"application/json")], b'{"error": "internal error; see the replica log"}'
    return out["status"], out["headers"], b"".join(out["body"])


@serve.deployment(name=MODEL, max_ongoing_requests=256, health_check_period_s=2.0, health_check_timeout_s=60.0,
                  graceful_shutdown_timeout_s=5.0)
class Model:
    """A replica: a whole `Service`, warmed up, and its HTTP app; the policy from the user config."""

    def __init__(self, options: dict, table):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        token = auth.read_token(options["admin_token_file"]) if options.get("admin_token_file") else None
        cache = options.get("compile_cache")
        self.service = build_service(
            options["checkpoint"], options["runs_dir"], table=table if table is not None else False,
            max_batch=options["max_batch"], max_wait_s=options["max_wait_ms"] / 1e3, max_inputs=options["max_inputs"],
            compile_cache=False if cache == "none" else cache or True, engine=options["engine"])
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.headers = [(b"x-jaxexit-replica", self.replica.encode()),
                        (b"x-jaxexit-replica-pid", str(os.getpid()).encode())]
        self.version = -1
        self.app = create_app(self.service, options["max_body_bytes"], token, set_policy=self.publish,
                              calibrate=_no_shadow)

    def reconfigure(self, config: dict | None) -> None:
        """The user config changed (or this replica starts): run its policy."""
        config = config or {}
        spec = config.get("policy") or {"policy": "static", "k": self.service.model.num_layers}
        self.service.set_policy(spec, source=config.get("source", "config"))
        self.version = int(config.get("version", 0))
        internal_kv._internal_kv_put(_applied_key(self.replica), str(self.version).encode(), overwrite=True,
                                     namespace=_KV_NAMESPACE)

    async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> tuple[int, list, bytes]:
        status, out, content = await call_asgi(self.app, method, path, query, headers, body)
        return status, out + self.headers, content

    def publish(self, spec) -> ActivePolicy:
        """PUT /v1/policy: check `spec` here (RequestError: nothing changes), make it the user
        config of every replica, wait until each runs it."""
        self.service.resolve(spec, "api")
        version = time.time_ns()
        write_user_config({"policy": _clean(spec), "source": "api", "version": version})
        wait_applied(version)
        return self.service.active

    def close(self) -> None:
        self.service.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- shutting down
            pass


def _clean(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if v is not None}


def _no_shadow() -> ActivePolicy:
    raise RequestError("re-certifying on shadow traffic is not available on Ray Serve (each replica's shadow "
                       "buffer would be its own): set the risk target with PUT /v1/policy, certified on the "
                       "calibration table", status=409)


def write_user_config(user_config: dict) -> None:
    """Make `user_config` the `Model` deployment's: the Serve config as deployed, with it changed,
    applied through the controller (the other applications' configs unchanged)."""
    from ray.serve.context import _get_global_client as client_of
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    client = client_of()
    apps = client.get_serve_details().get("applications", {})
    configs = {name: details.get("deployed_app_config") for name, details in apps.items()}
    ours = configs.get(APP)
    if ours is None:
        raise RequestError(f"the application {APP!r} was not deployed from a Serve config (jaxexit-serve --ray or "
                           "serve deploy): its policy cannot be changed on every replica", status=409)
    deployments = ours.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == MODEL), None)
    if entry is None:
        entry = {"name": MODEL}
        deployments.append(entry)
    entry["user_config"] = user_config
    declared = [ServeApplicationSchema.model_validate(c) for c in configs.values() if c is not None]
    client.deploy_apps(ServeDeploySchema(applications=declared))


def applied_versions() -> dict[str, int | None]:
    """Per live `Model` replica, the user-config version it last applied (None: not yet)."""
    from ray.serve.context import _get_global_client as client_of

    app = client_of().get_serve_details().get("applications", {}).get(APP, {})
    replicas = app.get("deployments", {}).get(MODEL, {}).get("replicas", [])
    out = {}
    for r in replicas:
        if r.get("state") in ("RUNNING", "UPDATING", "STARTING"):
            raw = internal_kv._internal_kv_get(_applied_key(r["replica_id"]), namespace=_KV_NAMESPACE)
            out[r["replica_id"]] = None if raw is None else int(raw)
    return out


def wait_applied(version: int, timeout_s: float = _APPLY_TIMEOUT_S) -> None:
    """Until every live replica runs user-config `version` or a later one (a warning after
    `timeout_s`: the config holds it, the replicas will apply it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        versions = applied_versions()
        if versions and all(v is not None and v >= version for v in versions.values()):
            return
        if time.monotonic() > deadline:
            log.warning("policy version %d not yet applied by every replica after %.0f s: %s", version, timeout_s,
                        versions)
            return
        time.sleep(0.05)


@serve.deployment(name=INGRESS, max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Ingress:
    """Every HTTP request, handed to a `Model` replica; again to another when one dies under it."""

    def __init__(self, model, max_body_bytes: int = 1 << 20, attempts: int = 8):
        self.model, self.max_body_bytes, self.attempts = model, max_body_bytes, attempts

    async def __call__(self, request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return JSONResponse({"error": f"request body over {self.max_body_bytes} bytes (--max-body-bytes)"}, 413)
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return JSONResponse({"error": f"request body over {self.max_body_bytes} bytes (--max-body-bytes)"}, 413)
        scope = request.scope
        failure = None
        for attempt in range(self.attempts):
            try:
                status, headers, content = await self.model.handle.remote(
                    request.method, scope["path"], scope.get("query_string", b""), scope["headers"], body)
            except Exception as e:  # noqa: BLE001 -- the replica died or could not be reached: another one
                failure = e
                log.warning("%s %s: attempt %d failed (%s); again", request.method, scope["path"], attempt + 1,
                            type(e).__name__)
                await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))
                continue
            response = Response(content, status)
            response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
                (b"content-length", str(len(content)).encode())]
            if attempt:  # answered, by another replica than the first
                response.raw_headers.append((b"x-jaxexit-attempts", str(attempt + 1).encode()))
            return response
        return JSONResponse({"error": f"no model replica answered in {self.attempts} attempts "
                                      f"({type(failure).__name__}); see the Ray Serve logs"}, 503)


def app(args: dict):
    """The Serve application (`import_path: jaxexit.serving.ray_serve:app`; `args` are `DEFAULT_ARGS`'
    keys). Loads the run once here to compute the calibration table every replica gets."""
    unknown = sorted(set(args) - set(DEFAULT_ARGS))
    if unknown:
        raise ValueError(f"unknown args {', '.join(unknown)}; the application takes {', '.join(DEFAULT_ARGS)}")
    options = {**DEFAULT_ARGS, **args}
    source = checkpoints.resolve_checkpoint(options["checkpoint"], options["runs_dir"])
    options["checkpoint"] = str(source.path)
    table = None
    if options["table"]:
        task, model = checkpoints.task_and_model(source)
        table = calibration_table(source, task, model, options["data_dir"], options["require_table"])
    return Ingress.bind(Model.bind(options, table), options["max_body_bytes"])


def serve_config(args: dict, *, policy: dict | None, replicas: int | None = 1, autoscaling: dict | None = None,
                 replica_cpus: float = 1.0, host: str = "127.0.0.1", port: int = 8000) -> dict:
    """The Serve config (`serve deploy` takes it as YAML) of the application: `args` for the builder,
    the first `policy` as the `Model` user config, `replicas` or an `autoscaling` config."""
    model = {"name": MODEL, "user_config": {"policy": policy, "source": "start", "version": 0},
             "ray_actor_options": {"num_cpus": replica_cpus}}
    if autoscaling is not None:
        model["autoscaling_config"] = autoscaling
    else:
        model["num_replicas"] = replicas
    return {"http_options": {"host": host, "port": port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": IMPORT_PATH,
                              "args": {k: v for k, v in args.items() if v != DEFAULT_ARGS.get(k, object())},
                              "deployments": [model, {"name": INGRESS, "num_replicas": 1}]}]}


def deploy(config: dict, timeout_s: float = 900.0) -> None:
    """Start Serve on the connected Ray cluster with the config's HTTP options and deploy it; return
    when the application runs (RuntimeError with Serve's message when it fails)."""
    from ray.serve.context import _get_global_client as client_of
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=config.get("http_options") or {})
    client_of().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP)
        state = None if status is None else str(getattr(status.status, "value", status.status))
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Ray Serve could not deploy {APP}: {status.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{APP} not running after {timeout_s:.0f} s (status {state}); see the Ray Serve logs")
        time.sleep(0.5)
