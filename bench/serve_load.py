"""Closed-loop load against infer/serve.py on loopback, both engines side by side: throughput,
latency and realised saving per target saving, by this script's own client and by wrk; and the
latency controller following a step in load.

    python bench/serve_load.py --checkpoint runs/sst2-joint --name serve_load   # results/serve_load.{md,json,png}

The external load generator is wrk (Debian's package: `apt-get install wrk`; macOS: `brew install
wrk`), driven by a Lua script this benchmark writes (a JSON POST body per request, rotating over
the SST-2 dev sentences, and the 50/95/99th latency percentiles on exit). `hey` would do too, but
sends one body for every request, which would exit every request at the same layer.
`--generators internal` runs without wrk.

1. Grid: one server per engine (`--engine batch`, `--engine layer`), both started first. For each
   number of concurrent clients (1, 8, 32, 64) and each target saving (0: the full model, static
   exit at L; 0.25, 0.5, 0.75: pcee through the calibration table; each set by PUT /v1/policy),
   every client sends one SST-2 dev sentence per request and the next as soon as the answer
   arrives (closed loop), for `--duration` seconds after `--settle` seconds of unmeasured load;
   each generator in turn, the engines alternating which goes first. Each cell runs `--rounds`
   times, the targets in alternating order; the table gives the median round's throughput and that
   round's latencies. `of ideal`: throughput / (full-model throughput / (1 - realised saving)), the
   full model's on the same engine, generator and clients; `of ideal (batch)` against the batch
   engine's full model. The realised saving is 1 - mean exit layer / L over the measured requests
   (wrk: from the service's exit-layer histogram, before and after). `server cores`: the server's
   CPU while the cell ran, by thread (XLA's compute threads, the event loop, the engine's worker;
   from /proc, Linux only): how much of the machine went to the model and how much to the rest.
2. Step: a server (`--step-engine`) with `--latency-slo-ms` (default: halfway between the p95 at
   the most clients with the full model and with target 0.5) takes 4 clients, then 32, then 4
   again; the client-side p95 and the service's target saving are sampled every half second.

Writes results/<name>.{json,md,png}. The load generators share the machine's cores with the
service, as a client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from common import REPO, RESULTS, held, sst2_dev_texts, write_result

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS: dict[str, int] = {}  # url -> process id of the servers running


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds the process has used so far by kind of thread: `xla` (XLA's compute threads),
    `loop` (the main thread: uvicorn's event loop, HTTP, tokenising) and `other` (the engine's
    worker and the rest). Empty where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"xla": 0.0, "loop": 0.0, "other": 0.0}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tasks:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        kind = "loop" if int(tid) == pid else "xla" if "XLA" in comm else "other"
        out[kind] += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def cores(before: dict, after: dict, seconds: float) -> dict:
    return {f"cpu_{k}": (after[k] - before[k]) / seconds for k in after if k in before}


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
        SERVERS[url] = proc.pid
        yield url
    finally:
        SERVERS.pop(url, None)
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


def set_target(url: str, target: float, num_layers: int, hold: dict | None = None) -> dict:
    """Target 0 is the full model (every input through all L layers; the table's best setting at
    saving >= 0 may exit some inputs early); the others go through the calibration table, with the
    parameters in `hold` held (e.g. pcee's patience 1: the threshold alone moves the saving)."""
    spec = {"policy": "static", "k": num_layers} if target == 0 else {"target_saving": target, **(hold or {})}
    r = httpx.put(url + "/v1/policy", json=spec)
    r.raise_for_status()
    return r.json()["active"]


def exit_layers(url: str) -> tuple[float, float]:
    """(sum, count) of the service's exit-layer histogram."""
    text = httpx.get(url + "/metrics").text
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name in ("jaxexit_exit_layer_sum", "jaxexit_exit_layer_count")}
    return found["jaxexit_exit_layer_sum"], found["jaxexit_exit_layer_count"]


WRK_SCRIPT = """-- written by bench/serve_load.py: a JSON body per request, rotating over the sentences
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/classify", nil, bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('\\nRESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, ' ..
    '"p95_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, latency:percentile(50), latency:percentile(95),
    latency:percentile(99)))
end
"""


def wrk_script(texts: list[str], directory: Path) -> Path:
    bodies = ", ".join("[==[" + json.dumps({"texts": [t]}) + "]==]" for t in texts)
    path = directory / "classify.lua"
    path.write_text(WRK_SCRIPT % bodies)
    return path


def wrk(url: str, script: Path, clients: int, seconds: float) -> dict:
    """wrk, one thread, `clients` connections (closed loop: each sends its next request when the
    answer arrives), for `seconds`."""
    out = subprocess.run(["wrk", "-t", "1", "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "60s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    return json.loads(line.removeprefix("RESULT "))


def cell(url: str, generator: str, texts, script, clients, settle, duration, num_layers) -> dict:
    """One measured run of `generator` against `url`: throughput, latency percentiles, saving."""
    pid = SERVERS.get(url)
    if generator == "internal":
        cpu, began = thread_cpu(pid) if pid else {}, time.monotonic()
        rec = asyncio.run(closed_loop(url, texts, clients, settle, duration))
        cpu = cores(cpu, thread_cpu(pid), time.monotonic() - began) if cpu else {}  # settling included
        if not rec:
            raise RuntimeError(f"no request to {url} started and ended within the {duration} s measured")
        lat = np.array([x[1] for x in rec])
        layers = np.array([x[2] for x in rec])
        return {"throughput": len(rec) / duration, "requests": len(rec), "errors": 0,
                **{f"p{q}_ms": float(np.percentile(lat, q) * 1e3) for q in (50, 95, 99)},
                "saving": float(1 - layers.mean() / num_layers), **cpu}
    wrk(url, script, clients, settle)  # settling, unmeasured
    before = exit_layers(url)
    cpu, began = thread_cpu(pid) if pid else {}, time.monotonic()
    r = wrk(url, script, clients, duration)
    cpu = cores(cpu, thread_cpu(pid), time.monotonic() - began) if cpu else {}
    after = exit_layers(url)
    count = after[1] - before[1]
    return {"throughput": r["requests"] / (r["duration_us"] / 1e6), "requests": r["requests"], "errors": r["errors"],
            **{f"p{q}_ms": r[f"p{q}_us"] / 1e3 for q in (50, 95, 99)},
            "saving": float(1 - (after[0] - before[0]) / count / num_layers) if count else float("nan"), **cpu}


def grid(urls: dict, generators, texts, script, clients_list, targets, settle, duration, rounds, num_layers,
         hold: dict | None = None) -> list:
    cells = []
    engines = list(urls)
    for clients in clients_list:
        runs = {}
        for r in range(rounds):
            for target in (targets if r % 2 == 0 else targets[::-1]):
                policies = {e: set_target(urls[e], target, num_layers, hold) for e in engines}
                for generator in generators:
                    for engine in (engines if r % 2 == 0 else engines[::-1]):
                        got = cell(urls[engine], generator, texts, script, clients, settle, duration, num_layers)
                        got["policy"] = policies[engine]
                        runs.setdefault((engine, generator, target), []).append(got)
                        print(f"{engine:>5} {generator:>8} clients {clients:>2}, target {target:.2f}: "
                              f"{got['throughput']:.1f} inputs/s, p50 {got['p50_ms']:.0f} ms, p95 {got['p95_ms']:.0f} "
                              f"ms, p99 {got['p99_ms']:.0f} ms, saving {got['saving']:.3f}", flush=True)
        for (engine, generator, target), measured in runs.items():
            ordered = sorted(measured, key=lambda x: x["throughput"])
            cells.append({"engine": engine, "generator": generator, "clients": clients, "target": target,
                          **ordered[len(ordered) // 2], "throughput_rounds": [x["throughput"] for x in measured]})
    full = {(c["engine"], c["generator"], c["clients"]): c["throughput"] for c in cells if c["target"] == 0}
    for c in cells:
        own, batch = full.get((c["engine"], c["generator"], c["clients"])), full.get(("batch", c["generator"], c["clients"]))
        c["x_full"] = c["throughput"] / own if own else None
        c["of_ideal"] = c["throughput"] / (own / (1 - c["saving"])) if own else None
        c["of_ideal_batch"] = c["throughput"] / (batch / (1 - c["saving"])) if batch else None
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

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=110)
    targets = sorted({c["target"] for c in cells})
    styles = {"batch": "--", "layer": "-"}
    marks = {"internal": "o", "wrk": "s"}
    generators = sorted({c["generator"] for c in cells})
    main = "internal" if "internal" in generators else generators[0]

    def line(ax, key, clients, engine, generator, color, label):
        mine = sorted((c for c in cells if (c["clients"], c["engine"], c["generator"]) == (clients, engine, generator)),
                      key=lambda c: c["target"])
        if mine:
            ax.plot([c["target"] for c in mine], [c[key] if c[key] is not None else np.nan for c in mine],
                    ls=styles.get(engine, "-"), marker=marks.get(generator, "o"), color=color, label=label)

    for i, clients in enumerate(sorted({c["clients"] for c in cells})):
        for engine in styles:
            line(axes[0, 0], "throughput", clients, engine, main, f"C{i}", f"{engine}, {clients} clients")
    axes[0, 0].set(xlabel="target saving", ylabel="throughput (inputs/s)", title=f"throughput ({main} client)",
                   xticks=targets)
    most = sorted({c["clients"] for c in cells})[-2:]  # the two largest loads
    for ax, key, title in ((axes[0, 1], "of_ideal", "throughput / ideal (full model / (1 - realised saving))"),
                           (axes[1, 0], "p95_ms", "p95 latency (ms)")):
        for i, clients in enumerate(most):
            for engine in styles:
                for generator in generators:
                    line(ax, key, clients, engine, generator, f"C{i}", f"{engine}, {generator}, {clients} clients")
        ax.set(xlabel="target saving", title=title, xticks=targets)
    axes[0, 1].axhline(0.95, color="0.5", lw=1, ls=":")
    axes[1, 0].set_yscale("log")
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1, 1]
    if trace:
        t = [x["t"] for x in trace]
        ax.plot(t, [x["p95_ms"] if x["p95_ms"] is not None else np.nan for x in trace], color="C3",
                label="p95 (last 2 s)")
        ax.axhline(slo_ms, color="C3", ls="--", lw=1, label=f"objective {slo_ms:.0f} ms")
        ax.set(xlabel="seconds", ylabel="p95 latency (ms)",
               title="load step: " + " -> ".join(str(c) for c, _ in phases) + " clients")
        twin = ax.twinx()
        twin.step(t, [x["target"] for x in trace], color="C0", where="post", label="target saving")
        twin.set_ylabel("target saving")
        twin.set_ylim(-0.02, 1)
        edge = 0.0
        for clients, seconds in phases:
            if clients == max(c for c, _ in phases):
                ax.axvspan(edge, edge + seconds, color="0.9")
            edge += seconds
        lines, more = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(cells) -> list[str]:
    lines = ["| engine | generator | clients | target saving | policy | throughput | x full model | of ideal | "
             "of ideal (batch full) | p50 ms | p95 ms | p99 ms | realised saving | server cores: XLA / loop / other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(cells, key=lambda c: (c["clients"], c["target"], c["generator"], c["engine"]))
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for c in order:
        pol = c["policy"]
        shown = pol["policy"] + "(" + ", ".join(f"{k}={v:g}" for k, v in pol.items()
                                                 if k in ("patience", "tau", "S", "t", "k")) + ")"
        lines.append(f"| {c['engine']} | {c['generator']} | {c['clients']} | {c['target']:.2f} | {shown} | "
                     f"{c['throughput']:.1f} | {fmt(c['x_full'])} | {fmt(c['of_ideal'])} | {fmt(c['of_ideal_batch'])} | "
                     f"{c['p50_ms']:.0f} | {c['p95_ms']:.0f} | {c['p99_ms']:.0f} | {c['saving']:.3f} | "
                     + (" / ".join(f"{c[k]:.2f}" for k in ("cpu_xla", "cpu_loop", "cpu_other")) if "cpu_xla" in c else "-")
                     + " |")
    return lines


def verdict(cells, clients: int = 32) -> list[str]:
    """The issue's bar at `clients`: the layer engine at >= 0.95 of ideal at targets 0.5 and 0.75,
    its p95 no worse than the batch engine's, per generator."""
    by = {(c["engine"], c["generator"], c["clients"], c["target"]): c for c in cells}
    out = []
    for generator in sorted({c["generator"] for c in cells}):
        for target in (0.5, 0.75):
            layer, batch = by.get(("layer", generator, clients, target)), by.get(("batch", generator, clients, target))
            if layer is None or batch is None or layer["of_ideal"] is None:
                continue
            out.append(f"* {generator}, {clients} clients, target {target}: layer engine {layer['of_ideal']:.2f} of ideal "
                       f"({'meets' if layer['of_ideal'] >= 0.95 else 'below'} 0.95; batch engine "
                       f"{batch['of_ideal']:.2f}), p95 {layer['p95_ms']:.0f} ms against {batch['p95_ms']:.0f} ms "
                       f"({'no worse' if layer['p95_ms'] <= batch['p95_ms'] else 'worse'}); throughput "
                       f"{layer['throughput']:.1f} against {batch['throughput']:.1f} inputs/s.")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/sst2-joint", help="an SST-2 run of train/finetune.py")
    p.add_argument("--engines", nargs="+", default=["batch", "layer"], choices=["batch", "layer"])
    p.add_argument("--generators", nargs="+", default=["internal", "wrk"], choices=["internal", "wrk"],
                   help="internal: this script's asyncio client; wrk: the wrk load generator (apt-get install wrk)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--targets", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell and round")
    p.add_argument("--settle", type=float, default=3.0, help="unmeasured seconds of load before each cell")
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell; the median is reported (default 3)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--no-step", action="store_true", help="the grid only")
    p.add_argument("--step-engine", default="layer", choices=["batch", "layer"], help="the step test's engine")
    p.add_argument("--slo-ms", type=float, help="the step test's latency objective (default: from the grid)")
    p.add_argument("--step", default="4:20,32:40,4:30", help="the step test's phases, clients:seconds")
    p.add_argument("--hold", nargs="*", default=[], metavar="NAME=VALUE",
                   help="the policy, or parameters held, while the table maps each target (e.g. policy=entropy: "
                        "exits spread over the layers, where pcee's best setting may send every input out at one)")
    p.add_argument("--name", default="serve_load", help="results/<name>.{json,md,png}")
    args = p.parse_args(argv)
    hold = held(args.hold)
    phases = [(int(c), float(s)) for c, s in (x.split(":") for x in args.step.split(","))]
    if "wrk" in args.generators and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian, Ubuntu), brew install wrk (macOS); "
                         "or --generators internal")
    texts = sst2_dev_texts()
    common = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))
    script = wrk_script(texts, logs)
    with contextlib.ExitStack() as stack:
        urls = {e: stack.enter_context(server(args.checkpoint, common + ["--engine", e, "--target-saving", "0"], logs,
                                              f"grid-{e}")) for e in args.engines}
        L = httpx.get(next(iter(urls.values())) + "/healthz").json()["num_layers"]
        cells = grid(urls, args.generators, texts, script, args.clients, args.targets, args.settle, args.duration,
                     args.rounds, L, hold)
    most = max(args.clients)
    by = {(c["engine"], c["generator"], c["clients"], c["target"]): c for c in cells}
    first = (args.step_engine, args.generators[0], most)
    slo = args.slo_ms
    if slo is None and (*first, 0.0) in by and (*first, 0.5) in by:
        slo = round((by[(*first, 0.0)]["p95_ms"] + by[(*first, 0.5)]["p95_ms"]) / 2)
    trace = []
    if slo is not None and not args.no_step:
        flags = common + ["--engine", args.step_engine, "--latency-slo-ms", str(slo), "--min-saving", "0",
                          "--max-saving", str(max(args.targets)), "--control-interval-s", "1",
                          "--control-window-s", "2", "--control-step", "0.05"]
        with server(args.checkpoint, flags, logs, "step") as url:
            trace = step_test(url, texts, phases)
    png = RESULTS / f"{args.name}.png"
    plot(cells, trace, slo or 0, phases, png)

    lines = ["Closed-loop load on loopback against `infer/serve.py`, the two engines side by side "
             f"(`--engine batch`: a batch at a time, up to {args.max_batch} inputs, max wait {args.max_wait_ms:g} ms, "
             "rows leaving it as they exit; `--engine layer`: layer-level continuous batching, docs/serving.md), "
             f"one SST-2 dev sentence per request, checkpoint `{args.checkpoint}`"
             f"{'; targets mapped with ' + ', '.join(f'{k}={v}' for k, v in hold.items()) + ' held' if hold else ''}"
             "; generators: "
             f"{', '.join(args.generators)} (`internal`: this script's asyncio client; `wrk`: wrk 4, one thread, a "
             f"connection per client, a Lua script rotating the JSON bodies). {args.duration:.0f} s measured per cell "
             f"after {args.settle:.0f} s of settling, median of {args.rounds} round(s). Throughput in inputs/s; "
             "latency from sending to the answer, client side. `x full model` and `of ideal` compare with the full "
             "model (target 0) on the same engine, generator and clients: of ideal = throughput / (full / (1 - "
             "realised saving)); `of ideal (batch full)` with the batch engine's full model. `server cores`: CPU "
             "the server process used while the generator ran, in cores, by its threads: XLA's compute threads, the "
             "main thread (uvicorn's event loop: HTTP, JSON, tokenising) and the others (the engine's worker: "
             "dispatching steps, the policy's step, answering).\n",
             *verdict(cells), "", *table(cells)]
    if trace:
        peak = [x for x in trace if x["load"] == max(c for c, _ in phases)]
        lines += ["", f"Load step ({args.step_engine} engine) {' -> '.join(f'{c} clients for {s:.0f} s' for c, s in phases)} "
                  f"with `--latency-slo-ms {slo}` (controller: every 1 s, p95 over 2 s, step 0.05, target in "
                  f"[0, {max(args.targets)}]): the target saving reached {max(x['target'] for x in trace):.2f} "
                  f"under the peak load (mean {np.mean([x['target'] for x in peak]):.2f} there) and ended at "
                  f"{trace[-1]['target']:.2f}. Trace: results/{args.name}.json (`trace`)."]
    lines += ["", f"![throughput, fraction of ideal, p95 latency and the load step]({args.name}.png)", ""]
    figures = {"checkpoint": args.checkpoint, "max_batch": args.max_batch, "engines": args.engines, "hold": hold,
               "generators": args.generators, "cells": cells, "slo_ms": slo, "phases": phases, "trace": trace}
    print(f"wrote {write_result(args.name, figures, chr(10).join(lines))} and {png}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
