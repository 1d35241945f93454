"""`jaxexit-serve` (`infer/serve.py`): serve a fine-tuned run over HTTP. The service is assembled by
`jaxexit.serving.service.build_service` and put behind HTTP by `jaxexit.serving.app.serve`; this
module holds the flags.
"""

from __future__ import annotations

import argparse
import logging
import os

from jaxexit.cli import console, policy_flags
from jaxexit.exits import registry, risk
from jaxexit.serving import auth

log = logging.getLogger(__name__)

# --help's text (the scripts' usage, as infer/serve.py has always shown it)
_USAGE = """Serve a fine-tuned run over HTTP; its speed/quality trade-off is turned while it runs.

    python infer/serve.py --checkpoint runs/sst2-joint --target-saving 0.5       # pcee at >= 50% saving
    python infer/serve.py --patience 2 --tau 0.3 --port 8080                      # explicit thresholds
    python infer/serve.py --target-saving 0.25 --latency-slo-ms 150 --max-saving 0.75   # speed follows the load
    python infer/serve.py --max-risk 0.02 --shadow-rate 0.05     # certified: P(answer != full model's) <= 2%

    curl -s localhost:8000/v1/classify -H 'content-type: application/json' -d '{"texts": ["a gripping film"]}'
    curl -s -X PUT localhost:8000/v1/policy -H 'content-type: application/json' -d '{"target_saving": 0.75}'
    curl -s localhost:8000/openapi.json      # the contract: every body, status and error

With --admin-token-file (or $JAXEXIT_ADMIN_TOKEN_FILE), PUT /v1/policy and POST /v1/calibrate need
-H "Authorization: Bearer $(cat FILE)"; reads and classification stay open.

A target saving maps to the best thresholds of the policy (pcee unless --policy names another; its
parameters given as flags are held) with at least that saving on the run's labelled dev split.
Ramp outputs on that split are computed once and stored in <run>/serving/ (an export: its own
calibration table, or with --data-dir OUT.jaxexit/serving/). A --max-risk target is
certified there (Learn then Test) and re-certified on shadow traffic by POST /v1/calibrate.
"""


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a train/finetune.py run directory or a jaxexit-export directory "
                   "(default: the latest run in --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where train/finetune.py wrote its runs (default: runs)")
    policy_flags.add_policy_flags(p)
    p.add_argument("--target-saving", type=float,
                   help="start at the best setting with at least this saving on dev (parameters given are held)")
    p.add_argument("--max-risk", type=float,
                   help="start at the setting with the largest saving whose --risk is certified <= this on dev "
                        "(Learn then Test; nothing certifiable: the full model)")
    p.add_argument("--risk-delta", type=float, default=0.1,
                   help="the certificate holds with probability >= 1 - this (default 0.1)")
    p.add_argument("--risk", choices=risk.RISKS, default="consistency",
                   help="consistency: the answer differs from the full model's (no labels; default); drop: the "
                        "full model is right and the exit wrong (dev labels)")
    p.add_argument("--risk-bound", choices=risk.BOUNDS, default="binomial",
                   help="the p-value: the exact binomial tail (default) or Hoeffding-Bentkus")
    p.add_argument("--risk-tolerance", type=float,
                   help="regression: outputs further apart than this differ (needed there, refused elsewhere)")
    p.add_argument("--shadow-rate", type=float, default=0.0,
                   help="fraction of live inputs (drawn at random) also run to the last layer and kept for "
                        "POST /v1/calibrate (default 0: none)")
    p.add_argument("--shadow-buffer", type=int, default=5000,
                   help="the most recent shadowed inputs kept (default 5000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; another one without an "
                        "admin token is warned about)")
    p.add_argument("--admin-token-file", metavar="PATH",
                   help=f"a file holding the admin token: PUT /v1/policy and POST /v1/calibrate then need "
                        f"'Authorization: Bearer <token>' (default: the file ${auth.TOKEN_FILE_ENV} names; "
                        "none: anyone reaching the port may change the policy)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-batch", type=int, default=32, help="most inputs in one model batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="longest an input waits for others to share its batch (default 2 ms)")
    p.add_argument("--engine", choices=("batch", "layer"), default="layer",
                   help="layer: layer-level continuous batching, rows of any request meeting at each layer "
                        "(default); batch: a batch at a time, rows leaving it as they exit (docs/serving.md, Engines)")
    p.add_argument("--max-inputs", type=int, default=256, help="most inputs in one request (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--latency-slo-ms", type=float,
                   help="adaptive speed: move the target saving so that the p95 latency stays under this")
    p.add_argument("--min-saving", type=float, default=0.0, help="adaptive speed: lowest target (default 0)")
    p.add_argument("--max-saving", type=float,
                   help="adaptive speed: highest target (default: the most the policy reaches on dev)")
    p.add_argument("--control-interval-s", type=float, default=1.0, help="adaptive speed: seconds between decisions")
    p.add_argument("--control-window-s", type=float, default=5.0,
                   help="adaptive speed: the p95 is over requests answered in this many seconds")
    p.add_argument("--control-step", type=float, default=0.05, help="adaptive speed: target change per decision")
    p.add_argument("--data-dir", help="GLUE TSV directory of the calibration split (default: the run's; "
                   "an export: its calibration table)")
    p.add_argument("--compile-cache", default=None,
                   help="XLA's persistent compilation cache, so that a restart skips most of the warm-up's "
                        "compiling (default: <run>/serving/xla-cache; 'none' to keep nothing)")
    p.add_argument("--no-table", action="store_true",
                   help="no calibration table (explicit thresholds only; no --target-saving or --latency-slo-ms)")
    ray = p.add_argument_group("Ray Serve (pip install -e .[ray]; docs/serving.md, Ray Serve)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: --replicas copies of the service behind one address, one policy for all")
    ray.add_argument("--replicas", type=int, default=1, help="--ray: model replicas (default 1)")
    ray.add_argument("--autoscale", metavar="MIN:MAX",
                     help="--ray: autoscale the model replicas between MIN and MAX (instead of --replicas)")
    ray.add_argument("--target-ongoing-requests", type=float, default=8.0,
                     help="--autoscale: requests in flight per replica that Serve aims at (default 8)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="--ray: CPUs Ray reserves per replica (default 1)")
    ray.add_argument("--ray-address",
                     help="--ray: a running Ray cluster to join (default: start one on this machine, loopback only)")
    ray.add_argument("--write-serve-config", metavar="FILE",
                     help="--ray: write the Serve config (YAML, for `serve deploy FILE` or `serve run FILE`) and exit")
    return p


def autoscale_range(text: str) -> tuple[int, int]:
    """--autoscale MIN:MAX, checked."""
    low, sep, high = text.partition(":")
    try:
        low_n, high_n = int(low), int(high)
    except ValueError:
        low_n = high_n = -1
    if not sep or not 0 <= low_n <= high_n or high_n < 1:
        raise ValueError(f"--autoscale takes MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low_n, high_n


def check_flags(args) -> None:
    checks = [
        (not 0 < args.port < 65536, f"--port must be in 1..65535, got {args.port}"),
        (args.max_batch < 1, f"--max-batch must be >= 1, got {args.max_batch}"),
        (args.max_wait_ms < 0, f"--max-wait-ms must be >= 0, got {args.max_wait_ms}"),
        (args.max_inputs < 1, f"--max-inputs must be >= 1, got {args.max_inputs}"),
        (args.max_body_bytes < 1024, f"--max-body-bytes must be >= 1024, got {args.max_body_bytes}"),
        (args.target_saving is not None and not 0 <= args.target_saving < 1,
         f"--target-saving must be in [0, 1), got {args.target_saving}"),
        (args.latency_slo_ms is not None and not args.latency_slo_ms > 0,
         f"--latency-slo-ms must be > 0, got {args.latency_slo_ms}"),
        (not 0 <= args.min_saving < 1, f"--min-saving must be in [0, 1), got {args.min_saving}"),
        (args.max_saving is not None and not args.min_saving <= args.max_saving < 1,
         f"--max-saving must be in [--min-saving, 1), got {args.max_saving}"),
        (args.no_table and (args.target_saving is not None or args.latency_slo_ms is not None),
         "--no-table leaves nothing to map --target-saving or --latency-slo-ms through"),
        (args.max_risk is not None and not 0 < args.max_risk < 1, f"--max-risk must be in (0, 1), got {args.max_risk}"),
        (not 0 < args.risk_delta < 1, f"--risk-delta must be in (0, 1), got {args.risk_delta}"),
        (args.risk_tolerance is not None and not args.risk_tolerance >= 0,
         f"--risk-tolerance must be >= 0, got {args.risk_tolerance}"),
        (args.max_risk is not None and args.target_saving is not None, "give --max-risk or --target-saving, not both"),
        (args.max_risk is not None and args.latency_slo_ms is not None,
         "--latency-slo-ms moves a target saving; it cannot move a --max-risk target"),
        (args.max_risk is not None and args.no_table, "--no-table leaves no labelled split to certify --max-risk on"),
        (args.max_risk is None and (args.risk != "consistency" or args.risk_bound != "binomial"
                                    or args.risk_tolerance is not None),
         "--risk, --risk-bound and --risk-tolerance go with --max-risk"),
        (not 0 <= args.shadow_rate <= 1, f"--shadow-rate must be in [0, 1], got {args.shadow_rate}"),
        (args.shadow_buffer < 1, f"--shadow-buffer must be >= 1, got {args.shadow_buffer}"),
        (args.control_interval_s <= 0 or args.control_window_s <= 0 or not 0 < args.control_step < 1,
         "--control-interval-s and --control-window-s must be > 0, --control-step in (0, 1)"),
    ]
    if args.ray:
        checks += [
            (args.replicas < 1, f"--replicas must be >= 1, got {args.replicas}"),
            (not args.replica_cpus >= 0, f"--replica-cpus must be >= 0, got {args.replica_cpus}"),
            (not args.target_ongoing_requests > 0,
             f"--target-ongoing-requests must be > 0, got {args.target_ongoing_requests}"),
            (args.latency_slo_ms is not None,
             "--latency-slo-ms is not available with --ray: each replica would move its own target"),
            (args.shadow_rate > 0, "--shadow-rate is not available with --ray: each replica would keep its own buffer"),
        ]
    elif any(x is not None for x in (args.autoscale, args.ray_address, args.write_serve_config)) or \
            args.replicas != 1:
        checks.append((True, "--replicas, --autoscale, --ray-address and --write-serve-config go with --ray"))
    for bad, message in checks:
        if bad:
            raise ValueError(message)
    if args.ray and args.autoscale is not None:
        autoscale_range(args.autoscale)


def start_policy(args, model) -> dict | None:
    """The first policy as a `Service.set_policy` spec (None: the full model); explicit parameters
    checked against the model here, at start."""
    spec = flag_spec(args)
    if spec is None or "max_risk" in spec or "target_saving" in spec:
        return spec
    params = {k: getattr(args, k) for k in policy_flags.PARAM_FLAGS if getattr(args, k) is not None}
    policy = policy_flags.policy_from_args(args.policy, params, model.num_layers, model.config.num_labels,
                                        args.confidence, args.ensemble)
    return {"policy": policy.name, **dict(policy.params), "confidence": args.confidence,
            "ensemble": args.ensemble or None}


def _control(args) -> dict | None:
    """The latency controller's settings (`build_service`'s `control`), with --latency-slo-ms."""
    if args.latency_slo_ms is None:
        return None
    return {"slo_s": args.latency_slo_ms / 1e3, "min_saving": args.min_saving, "max_saving": args.max_saving,
            "step": args.control_step, "interval_s": args.control_interval_s, "window_s": args.control_window_s}


def admin_token(args, environ=None) -> str | None:
    """The admin token from --admin-token-file, else from the file $JAXEXIT_ADMIN_TOKEN_FILE names
    (None: no token); ValueError naming the file when it is missing or empty."""
    environ = os.environ if environ is None else environ
    path = args.admin_token_file or environ.get(auth.TOKEN_FILE_ENV) or None
    return None if path is None else auth.read_token(path)


def flag_spec(args) -> dict | None:
    """The first policy as a `Service.set_policy` spec from the flags alone (no model: --ray puts it
    in the Serve config, and each replica checks it; `start_policy` checks explicit parameters
    against the model); None: the full model."""
    params = {k: getattr(args, k) for k in policy_flags.PARAM_FLAGS if getattr(args, k) is not None}
    extra = {"confidence": args.confidence, "ensemble": args.ensemble or None}
    target = args.target_saving
    if target is None and args.latency_slo_ms is not None:
        target = args.min_saving  # the latency controller starts at the lowest target
    if args.max_risk is not None:
        spec = {"policy": args.policy or "pcee", "max_risk": args.max_risk, "risk_delta": args.risk_delta,
                "risk": args.risk, "risk_bound": args.risk_bound, "risk_tolerance": args.risk_tolerance,
                **params, **extra}
    elif target is not None:
        spec = {"policy": args.policy or "pcee", "target_saving": target, **params, **extra}
    elif not params and args.policy is None:
        return None
    else:
        name = policy_flags.policy_name(args.policy, params)
        implied = {} if args.policy is not None else registry.get(name).implied_defaults
        spec = {"policy": name, **implied, **params, **extra}
    return {k: v for k, v in spec.items() if v is not None}


def ray_config(args) -> dict:
    """The Serve config of `--ray` (`jaxexit.serving.ray_serve.serve_config`)."""
    from jaxexit.serving import ray_serve

    from jaxexit.text import checkpoints

    def absolute(path):
        return None if path is None else os.path.abspath(path)

    source = checkpoints.resolve_checkpoint(args.checkpoint, args.runs_dir)  # the replicas' cwd is Ray's
    builder = {"checkpoint": str(source.path.resolve()), "runs_dir": absolute(args.runs_dir),
               "data_dir": absolute(args.data_dir),
               "table": not args.no_table,
               "require_table": any(x is not None for x in (args.target_saving, args.max_risk)),
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "max_inputs": args.max_inputs,
               "max_body_bytes": args.max_body_bytes, "engine": args.engine, "compile_cache": args.compile_cache,
               "admin_token_file": absolute(args.admin_token_file or os.environ.get(auth.TOKEN_FILE_ENV) or None)}
    autoscaling = None
    if args.autoscale is not None:
        low, high = autoscale_range(args.autoscale)
        autoscaling = {"min_replicas": low, "max_replicas": high,
                       "target_ongoing_requests": args.target_ongoing_requests}
    return ray_serve.serve_config(builder, policy=flag_spec(args), replicas=args.replicas, autoscaling=autoscaling,
                                  replica_cpus=args.replica_cpus, host=args.host, port=args.port)


def serve_on_ray(args) -> None:
    """--ray: deploy on Ray Serve (a local Ray unless --ray-address), then wait for a signal."""
    import signal
    import threading

    import yaml

    config = ray_config(args)
    if args.write_serve_config:
        with open(args.write_serve_config, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        print(f"wrote {args.write_serve_config}; deploy it with: serve deploy {args.write_serve_config}")
        return
    try:
        import ray
        from ray import serve

        from jaxexit.serving import ray_serve
    except ImportError as e:
        raise ImportError(f"--ray needs Ray Serve: pip install -e '.[ray]' (or 'ray[serve]') ({e})") from None

    auth.warn_if_open(args.host, config["applications"][0]["args"].get("admin_token_file") is not None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=256 << 20,
                 _node_ip_address="127.0.0.1")
    try:
        try:
            ray_serve.deploy(config)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        count = args.autoscale or args.replicas
        log.info("serving %s on http://%s:%d with %s model replica(s) on Ray Serve",
                 config["applications"][0]["args"]["checkpoint"], args.host, args.port, count)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> None:
    """The console script `jaxexit-serve`: answers HTTP until stopped."""
    from jaxexit.serving.app import serve
    from jaxexit.serving.service import build_service

    args = build_parser().parse_args(argv)
    console.setup(keep_for_file=False)
    try:
        check_flags(args)
        if args.ray:
            admin_token(args)  # a bad token file fails here, before Ray starts
            return serve_on_ray(args)
        token = admin_token(args)  # before the warm-up: a bad token file fails at once
        service = build_service(
            args.checkpoint, args.runs_dir, start=lambda model: start_policy(args, model), table=not args.no_table,
            require_table=any(x is not None for x in (args.target_saving, args.latency_slo_ms, args.max_risk)),
            data_dir=args.data_dir,
            max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3, max_inputs=args.max_inputs,
            compile_cache=False if args.compile_cache == "none" else args.compile_cache or True,
            control=_control(args), shadow_rate=args.shadow_rate, shadow_buffer=args.shadow_buffer,
            engine=args.engine)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)
    serve(service, args.host, args.port, args.max_body_bytes, admin_token=token)
