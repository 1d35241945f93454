"""The engines without HTTP: closed-loop clients inside the process, so that an engine's own
efficiency is measured apart from the web server's and the load generator's cost per request.

    python bench/engine_loop.py --checkpoint runs/sst2-base-random --name engine_loop_base --costs

For each engine (`batch`, `layer`) and target saving (0: the full model, static exit at L; the
others through the run's calibration table with `--hold` parameters held, as bench/serve_load.py
sets them), `--clients` clients each submit one SST-2 dev sentence to the engine and the next as
soon as the answer arrives, for `--duration` seconds after `--settle` seconds (median of
`--rounds`). A client thread does the submitting, as the web server's event loop would, so the
engine's worker does nothing a server's would not. Reports throughput, the realised saving, `of
ideal` (throughput / (the same engine's full-model throughput / (1 - realised saving))), p50/p95
latency and, for the layer engine, the rows a step ran.

`--costs`: also times the layer engine's step of one deeper layer per (rows, length bucket), the
per-row cost against a step of `--max-batch` rows: what the scheduling rule weighs.

Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import queue
import threading
import time

import jax
import numpy as np

from common import held, sst2_dev_texts, timed, write_result

from jaxexit.serving.schedule import row_buckets  # noqa: E402
from jaxexit.serving.service import build_service  # noqa: E402


def closed_loop(engine, policy, rows, types, clients: int, settle: float, duration: float) -> dict:
    """Run `clients` closed-loop clients on `engine` under `policy`; figures of the measured span."""
    done: queue.SimpleQueue = queue.SimpleQueue()  # (client, row, sent, result) as answers arrive
    record: list[tuple[float, float, int, int]] = []  # (answered, latency, exit layer, length bucket)
    stop = threading.Event()
    counter = itertools.count()
    lengths = [engine.model.tokenizer.bucket_length(len(r)) for r in rows]

    def send(client: int) -> None:
        i = next(counter) % len(rows)
        sent = time.perf_counter()
        engine.submit([rows[i]], [types[i]], policy).add_done_callback(lambda f: done.put((client, i, sent, f)))

    def clients_thread() -> None:
        for c in range(clients):
            send(c)
        while not stop.is_set():
            try:
                client, i, sent, future = done.get(timeout=0.1)
            except queue.Empty:
                continue
            layer, _ = future.result()
            now = time.perf_counter()
            record.append((now, now - sent, int(layer[0]), lengths[i]))
            if not stop.is_set():
                send(client)

    steps = getattr(engine, "steps", None)  # the layer engine's last steps: (layer, length, rows, policies)
    if steps is not None:
        steps.clear()
    thread = threading.Thread(target=clients_thread, daemon=True)
    thread.start()
    time.sleep(settle)
    start, first = time.perf_counter(), len(steps or ())
    time.sleep(duration)
    end, last = time.perf_counter(), len(steps or ())
    ran = list(steps)[first:last] if steps is not None and last < steps.maxlen else None
    stop.set()
    thread.join()
    while True:  # let the requests in flight finish before the next cell
        try:
            done.get(timeout=2.0)
        except queue.Empty:
            break
    span = [r for r in record if start <= r[0] < end]
    latency = np.array([r[1] for r in span]) * 1e3
    layers = np.array([r[2] for r in span])
    by_length = {int(T): int(layers[np.array([r[3] for r in span]) == T].sum()) for T in {r[3] for r in span}}
    return {"throughput": len(span) / (end - start), "saving": float(1 - layers.mean() / policy.num_layers),
            "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
            "rows_per_step": None if not ran else float(np.mean([s[2] for s in ran])),
            "steps_per_s": None if not ran else len(ran) / (end - start),
            "layers_by_length": by_length, "inputs_by_length": {int(T): sum(r[3] == T for r in span) for T in by_length}}


def step_costs(engine, max_batch: int, lengths: list[int]) -> list[dict]:
    """Seconds of one layer-engine step of layer L/2 per (rows, length): the device's cost alone."""
    layer = engine.num_layers // 2
    out = []
    for length in lengths:
        pool = engine._pool(length)
        for n in row_buckets(max_batch):
            slots = np.arange(n, dtype=np.int32)

            def step():
                pool.hidden, z = engine._advance(pool.hidden, pool.bias, slots, engine._layers[layer],
                                                 engine._ramps[layer])
                jax.block_until_ready(z)

            out.append({"length": length, "rows": n, "ms": timed(step, repeats=7) * 1e3})
    for c in out:
        full = next(x for x in out if x["length"] == c["length"] and x["rows"] == max_batch)
        c["per_row_vs_full"] = (c["ms"] / c["rows"]) / (full["ms"] / max_batch)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sst2-joint", help="an SST-2 run of train/finetune.py")
    p.add_argument("--engines", nargs="+", default=["batch", "layer"], choices=["batch", "layer"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--hold", nargs="*", default=["policy=entropy"], metavar="NAME=VALUE",
                   help="policy parameters held while the target moves (default: policy=entropy)")
    p.add_argument("--costs", action="store_true", help="also time the layer engine's step per (rows, length)")
    p.add_argument("--name", default="engine_loop")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.settle < 0 or args.rounds < 1:
        p.error("--clients and --rounds must be >= 1, --duration > 0 and --settle >= 0")
    if any(not 0 <= t < 1 for t in args.targets):
        p.error("targets must be in [0, 1)")
    hold = held(args.hold)
    texts = sst2_dev_texts()

    cells, costs = [], None
    for name in args.engines:
        service = build_service(args.checkpoint, engine=name, max_batch=args.max_batch,
                                max_wait_s=args.max_wait_ms / 1e3, require_table=True)
        rows, types = service.model.tokenizer.encode(texts)
        L = service.model.num_layers
        try:
            for target in args.targets:
                spec = {"policy": "static", "k": L} if target == 0 else {"target_saving": target, **hold}
                policy = service.set_policy(spec, source="bench").policy
                runs = [closed_loop(service.engine, policy, rows, types, args.clients, args.settle, args.duration)
                        for _ in range(args.rounds)]
                median = sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]
                cells.append({"engine": name, "target": target, "policy": str(policy), **median,
                              "rounds": [r["throughput"] for r in runs]})
                print(f"{name} target {target:.2f} {policy}: {median['throughput']:.1f} inputs/s, saving "
                      f"{median['saving']:.3f}, p95 {median['p95_ms']:.0f} ms", flush=True)
            if name == "layer" and args.costs:
                costs = step_costs(service.engine, args.max_batch, [16, 32, 64])
        finally:
            service.close()
    # the saving in layer work: each input's layers weighed by its length's cost a row in a full step
    per_row = {x["length"]: x["ms"] / x["rows"] for x in costs or () if x["rows"] == args.max_batch}
    for c in cells:
        full = next((x for x in cells if x["engine"] == c["engine"] and x["target"] == 0), None)
        c["of_ideal"] = None if full is None else c["throughput"] / (full["throughput"] / (1 - c["saving"]))
        c["cost_saving"] = None
        if per_row and all(T in per_row for T in c["layers_by_length"]):
            spent = sum(per_row[T] * n for T, n in c["layers_by_length"].items())
            whole = sum(per_row[T] * n * L for T, n in c["inputs_by_length"].items())
            c["cost_saving"] = 1 - spent / whole

    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = [f"In-process closed loop, {args.clients} clients, one SST-2 dev sentence per request, checkpoint "
             f"`{args.checkpoint}`, no HTTP; {args.duration:g} s measured after {args.settle:g} s, median of "
             f"{args.rounds} round(s). `of ideal`: against the same engine's full model.", "",
             "`saving in cost` (with `--costs`): the saving with each input's layers weighed by its length bucket's cost "
             f"a row in a {args.max_batch}-row step, as the device spends it; long inputs leaving later than short ones "
             "make it smaller than the saving in layers, which `of ideal` divides by.", "",
             "| engine | target saving | policy | throughput | realised saving | saving in cost | of ideal | p50 ms | "
             "p95 ms | rows a step | steps/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['engine']} | {c['target']:.2f} | {c['policy']} | {c['throughput']:.1f} | {c['saving']:.3f} | "
                     f"{fmt(c['cost_saving'], '.3f')} | "
                     f"{fmt(c['of_ideal'], '.3f')} | {c['p50_ms']:.0f} | {c['p95_ms']:.0f} | "
                     f"{fmt(c['rows_per_step'], '.2f')} | {fmt(c['steps_per_s'], '.1f')} |")
    if costs:
        lines += ["", f"The layer engine's step of one layer (layer {L // 2 + 1}) by rows and length bucket, ms "
                  f"(per row against a step of {args.max_batch} rows):", "",
                  "| rows | " + " | ".join(f"{T} tokens" for T in (16, 32, 64)) + " |", "|---|---|---|---|"]
        for n in sorted({c["rows"] for c in costs}):
            row = [next(c for c in costs if c["rows"] == n and c["length"] == T) for T in (16, 32, 64)]
            lines.append(f"| {n} | " + " | ".join(f"{c['ms']:.2f} ({c['per_row_vs_full']:.2f}x)" for c in row) + " |")
    path = write_result(args.name, {"cells": cells, "step_costs": costs, "clients": args.clients}, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
