"""Closed-loop load against infer/serve.py on loopback: throughput and latency per target saving,
and the latency controller following a step in load.

    python bench/serve_load.py --checkpoint runs/sst2-joint

1. Grid: for each number of concurrent clients (1, 8, 32) and each target saving (0: the full
   model, static exit at L; 0.25, 0.5, 0.75: pcee through the calibration table; each set by
   PUT /v1/policy), every client sends one SST-2 dev sentence
   per request and the next as soon as the answer arrives, for `--duration` seconds after
   `--settle` seconds of unmeasured load. Each cell runs `--rounds` times, the targets in
   alternating order; the table gives the median round's throughput and that round's latencies.
2. Step: a second server with `--latency-slo-ms` (default: halfway between the p95 at the most
   clients with the full model and with target 0.5) takes 4 clients, then 32, then 4 again; the
   client-side p95 and the service's target saving are sampled every half second.

Writes results/serve_load.{json,md,png}. The load generator (one asyncio process, httpx) shares
the machine's cores with the service, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import GLUE, REPO, RESULTS, write_result

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(checkpoint: str, flags: list[str], log_dir: Path, name: str):
    port = free_port()
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "infer" / "serve.py"), "--checkpoint", checkpoint,
                             "--port", str(port), *flags], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"infer/serve.py exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() - start > 900:
                raise SystemExit(f"infer/serve.py did not start in 900 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        print(f"{name}: up after {time.monotonic() - start:.0f} s ({url})", flush=True)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


class Connection:
    """One keep-alive HTTP/1.1 connection, written out by hand: the load generator shares the
    machine's cores with the service, and httpx's async client costs several times more CPU per
    request than this."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def post(self, path: str, obj) -> tuple[int, dict]:
        body = json.dumps(obj).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                          % (path.encode(), self.host.encode(), len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
        return status, json.loads(await self.reader.readexactly(length))


async def closed_loop(url: str, texts: list[str], clients: int, settle: float, duration: float,
                      live: tuple[list, float] | None = None) -> list[tuple[float, float, int]]:
    """`clients` closed-loop clients for settle + duration seconds: (start, latency, exit layer) of
    every request that started after `settle` and ended by the end. `live=(sink, origin)` also
    appends every request to `sink` as it ends, its start counted from `origin`."""
    records = []
    begin = time.perf_counter()
    stop = begin + settle + duration

    async def client(i: int):
        j = i * 97
        async with Connection(url) as conn:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                status, answer = await conn.post("/v1/classify", {"texts": [texts[j % len(texts)]]})
                end = time.perf_counter()
                j += 1
                if status != 200:
                    raise RuntimeError(f"{status}: {answer}")
                layer = answer["results"][0]["exit_layer"]
                if start >= begin + settle and end <= stop:
                    records.append((start - begin, end - start, layer))
                if live is not None:
                    live[0].append((start - live[1], end - start, layer))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return records


def set_target(url: str, target: float, num_layers: int) -> dict:
    """Target 0 is the full model (every input through all L layers; the table's best setting at
    saving >= 0 may exit some inputs early); the others go through the calibration table."""
    spec = {"policy": "static", "k": num_layers} if target == 0 else {"target_saving": target}
    r = httpx.put(url + "/v1/policy", json=spec)
    r.raise_for_status()
    return r.json()["active"]


def grid(url: str, texts: list[str], clients_list, targets, settle, duration, rounds, num_layers) -> list[dict]:
    cells = []
    for clients in clients_list:
        runs = {t: [] for t in targets}
        for r in range(rounds):
            for target in (targets if r % 2 == 0 else targets[::-1]):
                active = set_target(url, target, num_layers)
                rec = asyncio.run(closed_loop(url, texts, clients, settle, duration))
                lat = np.array([x[1] for x in rec])
                layers = np.array([x[2] for x in rec])
                runs[target].append({"throughput": len(rec) / duration, "p50_ms": float(np.percentile(lat, 50) * 1e3),
                                     "p95_ms": float(np.percentile(lat, 95) * 1e3), "requests": len(rec),
                                     "saving": float(1 - layers.mean() / num_layers), "policy": active})
                print(f"clients {clients:>2}, target {target:.2f}: {runs[target][-1]['throughput']:.1f} inputs/s, "
                      f"p50 {runs[target][-1]['p50_ms']:.0f} ms, p95 {runs[target][-1]['p95_ms']:.0f} ms, "
                      f"saving {runs[target][-1]['saving']:.3f}", flush=True)
        for target in targets:
            ordered = sorted(runs[target], key=lambda x: x["throughput"])
            median = ordered[len(ordered) // 2]
            cells.append({"clients": clients, "target": target, **median,
                          "throughput_rounds": [x["throughput"] for x in runs[target]]})
    return cells


def step_test(url: str, texts: list[str], phases: list[tuple[int, float]]) -> list[dict]:
    """Phases of (clients, seconds) back to back; every 0.5 s: the p95 of the requests answered in
    the last 2 s and the active target saving."""
    records, trace = [], []

    async def drive():
        begin = time.perf_counter()
        stop_sampling = asyncio.Event()
        current = {"clients": phases[0][0]}

        async def sampler():
            async with httpx.AsyncClient(timeout=30) as http:
                while not stop_sampling.is_set():
                    await asyncio.sleep(0.5)
                    now = time.perf_counter() - begin
                    recent = [lat for s, lat, _ in records if now - 2.0 <= s + lat <= now]
                    active = (await http.get(url + "/v1/policy")).json()["active"]
                    trace.append({"t": now, "p95_ms": float(np.percentile(recent, 95) * 1e3) if recent else None,
                                  "target": active["target_saving"], "load": current["clients"]})

        task = asyncio.create_task(sampler())
        for clients, seconds in phases:
            current["clients"] = clients
            await closed_loop(url, texts, clients, 0.0, seconds, live=(records, begin))
        stop_sampling.set()
        await task

    asyncio.run(drive())
    return trace


def plot(cells, trace, slo_ms, phases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    targets = sorted({c["target"] for c in cells})
    for clients in sorted({c["clients"] for c in cells}):
        mine = sorted((c for c in cells if c["clients"] == clients), key=lambda c: c["target"])
        axes[0].plot([c["target"] for c in mine], [c["throughput"] for c in mine], marker="o", label=f"{clients} clients")
        axes[1].plot([c["target"] for c in mine], [c["p95_ms"] for c in mine], marker="o", label=f"{clients} clients")
    axes[0].set(xlabel="target saving", ylabel="throughput (inputs/s)", title="throughput", xticks=targets)
    axes[1].set(xlabel="target saving", ylabel="p95 latency (ms)", title="p95 latency", yscale="log", xticks=targets)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    t = [x["t"] for x in trace]
    ax.plot(t, [x["p95_ms"] if x["p95_ms"] is not None else np.nan for x in trace], color="C3", label="p95 (last 2 s)")
    ax.axhline(slo_ms, color="C3", ls="--", lw=1, label=f"objective {slo_ms:.0f} ms")
    ax.set(xlabel="seconds", ylabel="p95 latency (ms)", title="load step: " + " -> ".join(str(c) for c, _ in phases)
           + " clients")
    twin = ax.twinx()
    twin.step(t, [x["target"] for x in trace], color="C0", where="post", label="target saving")
    twin.set_ylabel("target saving")
    twin.set_ylim(-0.02, 1)
    edge = 0.0
    for clients, seconds in phases:
        if clients == max(c for c, _ in phases):
            ax.axvspan(edge, edge + seconds, color="0.9")
        edge += seconds
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sst2-joint", help="an SST-2 run of train/finetune.py")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell and round")
    p.add_argument("--settle", type=float, default=3.0, help="unmeasured seconds of load before each cell")
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell; the median is reported (default 3)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--no-step", action="store_true", help="the grid only")
    p.add_argument("--slo-ms", type=float, help="the step test's latency objective (default: from the grid)")
    p.add_argument("--step", default="4:20,32:40,4:30", help="the step test's phases, clients:seconds")
    p.add_argument("--name", default="serve_load", help="results/<name>.{json,md,png}")
    args = p.parse_args(argv)
    phases = [(int(c), float(s)) for c, s in (x.split(":") for x in args.step.split(","))]
    dev = GLUE / "SST-2" / "dev.tsv"
    if not dev.is_file():
        raise SystemExit(f"{dev} is missing (../shared)")
    texts = [line.split("\t")[0] for line in dev.read_text().splitlines()[1:] if line.strip()]
    common = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    with server(args.checkpoint, common + ["--target-saving", "0"], logs, "grid") as url:
        L = httpx.get(url + "/healthz").json()["num_layers"]
        cells = grid(url, texts, args.clients, args.targets, args.settle, args.duration, args.rounds, L)
    most = max(args.clients)
    by = {(c["clients"], c["target"]): c for c in cells}
    slo = args.slo_ms
    if slo is None and (most, 0.0) in by and (most, 0.5) in by:
        slo = round((by[(most, 0.0)]["p95_ms"] + by[(most, 0.5)]["p95_ms"]) / 2)
    trace = []
    if slo is not None and not args.no_step:
        flags = common + ["--latency-slo-ms", str(slo), "--min-saving", "0", "--max-saving", str(max(args.targets)),
                          "--control-interval-s", "1", "--control-window-s", "2", "--control-step", "0.05"]
        with server(args.checkpoint, flags, logs, "step") as url:
            trace = step_test(url, texts, phases)
    png = RESULTS / f"{args.name}.png"
    plot(cells, trace, slo or 0, phases, png)

    lines = ["Closed-loop load on loopback against `infer/serve.py` (dynamic batches of up to "
             f"{args.max_batch}, max wait {args.max_wait_ms:g} ms), one SST-2 dev sentence per request, checkpoint `{args.checkpoint}`; "
             f"{args.duration:.0f} s measured per cell after {args.settle:.0f} s of settling, median of {args.rounds} "
             "rounds (targets in alternating order). Throughput in inputs/s; latency from sending to the answer, "
             "client side. `saving` is the realised one (1 - mean exit layer / L).\n",
             "| clients | target saving | policy | throughput | x full model | p50 ms | p95 ms | realised saving |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        base = by.get((c["clients"], 0.0))
        ratio = f"{c['throughput'] / base['throughput']:.2f}" if base else "-"
        pol = c["policy"]
        shown = pol["policy"] + "(" + ", ".join(f"{k}={v:g}" for k, v in pol.items()
                                                 if k in ("patience", "tau", "S", "t", "k")) + ")"
        lines.append(f"| {c['clients']} | {c['target']:.2f} | {shown} | {c['throughput']:.1f} | {ratio} | "
                     f"{c['p50_ms']:.0f} | {c['p95_ms']:.0f} | {c['saving']:.3f} |")
    if trace:
        peak = [x for x in trace if x["load"] == max(c for c, _ in phases)]
        lines += ["", f"Load step {' -> '.join(f'{c} clients for {s:.0f} s' for c, s in phases)} with "
                  f"`--latency-slo-ms {slo}` (controller: every 1 s, p95 over 2 s, step 0.05, target in "
                  f"[0, {max(args.targets)}]): the target saving reached {max(x['target'] for x in trace):.2f} "
                  f"under the peak load (mean {np.mean([x['target'] for x in peak]):.2f} there) and ended at "
                  f"{trace[-1]['target']:.2f}. Trace: results/{args.name}.json (`trace`)."]
    lines += ["", f"![throughput, latency and the load step]({args.name}.png)", ""]
    figures = {"checkpoint": args.checkpoint, "max_batch": args.max_batch, "cells": cells, "slo_ms": slo,
               "phases": phases, "trace": trace}
    print(f"wrote {write_result(args.name, figures, chr(10).join(lines))} and {png}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
