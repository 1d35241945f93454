"""The service on Ray Serve with 1 and 2 model replicas against the single process, on this machine.

    python bench/serve_ray.py --checkpoint runs/sst2-joint --name serve_ray     # results/serve_ray.{md,json}

One server at a time (the same flags but for `--ray --replicas N`): the single process
(`jaxexit-serve`), Ray Serve with one model replica, with two. For each number of closed-loop
clients and each target saving (0: the full model; others through the calibration table, set by
PUT /v1/policy, which on Ray reaches every replica), this script's asyncio client (the realised
saving from the answers' exit layers) and wrk (throughput and latency; it needs `apt-get install
wrk`, or `--generators internal`) each load it for `--duration` seconds after `--settle`. The
table gives throughput (inputs/s), p50/p95/p99 and each throughput against the single process's
in the same cell. The load generators share the cores with the service and with Ray's own
processes (GCS, raylet, controller, proxy, ingress), as a client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np

from common import sst2_dev_texts, write_result
from serve_load import closed_loop, server, set_target, wrk, wrk_script

CONFIGS = {"process": [], "ray-1": ["--ray", "--replicas", "1"], "ray-2": ["--ray", "--replicas", "2"]}


def measure(url, generator, texts, script, clients, settle, duration, num_layers) -> dict:
    if generator == "internal":
        rec = asyncio.run(closed_loop(url, texts, clients, settle, duration))
        lat, layers = np.array([x[1] for x in rec]), np.array([x[2] for x in rec])
        return {"throughput": len(rec) / duration, **{f"p{q}_ms": float(np.percentile(lat, q) * 1e3) for q in (50, 95, 99)},
                "saving": float(1 - layers.mean() / num_layers), "errors": 0}
    wrk(url, script, clients, settle)
    r = wrk(url, script, clients, duration)
    return {"throughput": r["requests"] / (r["duration_us"] / 1e6), "errors": r["errors"],
            **{f"p{q}_ms": r[f"p{q}_us"] / 1e3 for q in (50, 95, 99)}, "saving": None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sst2-joint", help="an SST-2 run of train/finetune.py")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--generators", nargs="+", default=["internal", "wrk"], choices=["internal", "wrk"])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--name", default="serve_ray", help="results/<name>.{json,md}")
    args = p.parse_args(argv)
    if "wrk" in args.generators and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk; or --generators internal")
    texts = sst2_dev_texts()
    logs = Path(tempfile.mkdtemp(prefix="serve_ray-"))
    script = wrk_script(texts, logs)
    cells = []
    for config in args.configs:
        flags = ["--max-batch", str(args.max_batch), "--target-saving", "0", *CONFIGS[config]]
        with server(args.checkpoint, flags, logs, config) as url:
            L = httpx.get(url + "/healthz").json()["num_layers"]
            for clients in args.clients:
                for target in args.targets:
                    policy = set_target(url, target, L)
                    saving = None
                    for generator in args.generators:
                        got = measure(url, generator, texts, script, clients, args.settle, args.duration, L)
                        saving = got["saving"] if got["saving"] is not None else saving
                        cells.append({"config": config, "generator": generator, "clients": clients, "target": target,
                                      "policy": policy, **got, "saving": saving})
                        print(f"{config:>7} {generator:>8} clients {clients:>2} target {target:.2f}: "
                              f"{got['throughput']:.1f} inputs/s, p50 {got['p50_ms']:.0f} ms, p95 {got['p95_ms']:.0f} "
                              f"ms, p99 {got['p99_ms']:.0f} ms", flush=True)
    base = {(c["generator"], c["clients"], c["target"]): c["throughput"] for c in cells if c["config"] == "process"}
    lines = [f"Closed loop on loopback, one SST-2 dev sentence per request, checkpoint `{args.checkpoint}`, "
             f"`--max-batch {args.max_batch}`, {args.duration:g} s measured after {args.settle:g} s; one server at a "
             f"time on this machine ({os.cpu_count()} cores): the single process, Ray Serve with 1 and 2 model "
             "replicas (an ingress deployment before them). `x process`: throughput over the single process's in "
             "the same cell. Saving: realised, from the internal client's answers.", "",
             "| config | generator | clients | target | inputs/s | x process | p50 ms | p95 ms | p99 ms | saving |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        ref = base.get((c["generator"], c["clients"], c["target"]))
        ratio = "" if not ref else f"{c['throughput'] / ref:.2f}"
        saving = "" if c["saving"] is None else f"{c['saving']:.3f}"
        lines.append(f"| {c['config']} | {c['generator']} | {c['clients']} | {c['target']:.2f} | {c['throughput']:.1f} | "
                     f"{ratio} | {c['p50_ms']:.0f} | {c['p95_ms']:.0f} | {c['p99_ms']:.0f} | {saving} |")
    figures = {"checkpoint": args.checkpoint, "max_batch": args.max_batch, "cells": cells}
    print(f"wrote {write_result(args.name, figures, chr(10).join(lines))}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with contextlib.suppress(KeyboardInterrupt):
        main()
