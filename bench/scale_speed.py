"""Early exit in wall-clock time at two scales, against the PyTorch way, one run:

    python bench/scale_speed.py                       # BERT-base shape (random weights) and MiniLM
    python bench/scale_speed.py --scales base --lengths 32 --inputs 30 --rounds 2

For each model (`base`: 12 layers, hidden 768, random weights, which do not change the time;
`minilm`: ../shared's all-MiniLM-L6-v2, 6 layers) and input length (32 and 128 tokens), with
static exits at 1/3, 1/2, 2/3 and all of the layers, and with the exit distribution of a real
setting (pcee nearest 40% saving on the SST-2 checkpoint given by --checkpoint, layers scaled to L):

* latency mode, batch 1: early exit (`runners.exit_one`, pipelined with the decisions on the device,
  a call per layer (`head_layers=1`: every layer decided on, as for a policy that can exit at any
  layer), and with host decisions) against the dense model compiled as one function, input by input in
  alternating order -> `wall_saving / saving`;
* on-device mode, batch 1 (`EarlyExitModel.device_exits`, one `lax.while_loop`) -> `wall_saving / saving`;
* the ceiling of both with plain layer steps: every layer and its ramp by the plain step as one
  function, alternated with the rest -> `1 - (k / L) * t(that) / t(dense)`, over saving (the
  dense model's last layer can cost less than a plain step, so this can be below 1);
* batched mode, batch --batch-size: throughput against the dense model -> its ratio to the ideal
  `1 / (1 - saving)`;
* the same exits in a PyTorch DeeBERT-style loop (transformers' BertModel layers, eager and SDPA
  attention; after each layer its ramp on the first token and a host read of the entropy) ->
  jaxexit latency-mode time / PyTorch time at equal exits.

Writes results/scale_speed.{json,md}. Measure with nothing else running.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np

from common import BERT_BASE, GLUE, MINILM, write_result

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxexit.text import batches, exit_steps, glue, metrics, modeling  # noqa: E402
from jaxexit.exits import offline, policies, runners
from jaxexit import EarlyExitModel
from jaxexit.text.config import EncoderConfig  # noqa: E402

BASE = dict(BERT_BASE, num_labels=2)


def jax_model(scale: str) -> EarlyExitModel:
    if scale == "base":
        return EarlyExitModel.from_config(EncoderConfig(**BASE))
    return EarlyExitModel.from_pretrained(MINILM, num_labels=2)


def inputs(model: EarlyExitModel, n: int, length: int, rows: int = 1, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = model.config.vocab_size
    out = []
    for _ in range(n):
        ids = rng.integers(1000, vocab, size=(rows, length), dtype=np.int32)
        out.append({"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)})
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def plain_layers(cfg, params, batch):
    """Every layer with its ramp, by the plain exit step (`exit_steps.layer_ramp_step`, what latency
    mode runs per layer at batch 1), compiled as one function: k of its L steps are what an exit at
    k costs with no host work at all, so `1 - (k / L) * t(plain_layers) / t(dense)` is the most
    wall saving plain steps can give against the dense model (whose last layer may cost less)."""
    carry, bias = exit_steps.embed(cfg, params, batch)
    logits = []
    for i in range(cfg.num_hidden_layers):
        carry, z = exit_steps.layer_ramp_step(cfg, modeling.layer_params(cfg, params, i),
                                              modeling.ramp_params(cfg, params, i), carry, bias)
        logits.append(z)
    return jnp.stack(logits)


def static(model: EarlyExitModel, k: int) -> policies.Policy:
    return policies.make_policy("static", model.num_layers, 2, k=k)


def paired(fns: dict, items: list, rounds: int, first_round: int = 0) -> dict[str, list[float]]:
    """Per round, the total seconds of each function over `items`, the functions alternated in a
    rotating order input by input (so that the machine's drift hits each alike)."""
    names = list(fns)
    totals = {name: [] for name in names}
    for r in range(first_round, first_round + rounds):
        acc = dict.fromkeys(names, 0.0)
        for i, item in enumerate(items):
            shift = (i + r) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                fns[name](item)
                acc[name] += time.perf_counter() - start
        for name in names:
            totals[name].append(acc[name])
    return totals


def torch_loop(cfg: dict, attention: str, threads: int):
    """A DeeBERT-style early-exit loop in PyTorch with BertModel's layers; returns
    `run(batch, exit_at) -> logits` (exit_at: the layer after which to leave, 1-based)."""
    try:
        import torch
        from transformers import BertConfig, BertModel
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                        intermediate_size=cfg["intermediate_size"], max_position_embeddings=cfg["max_position_embeddings"],
                        attn_implementation=attention)
    model = BertModel(config, add_pooling_layer=False).eval()
    H = cfg["hidden_size"]
    if hasattr(model, "_create_attention_masks"):  # transformers 5: the mask the attention kind wants
        def make_mask(hidden, mask):
            return model._create_attention_masks(mask, None, hidden, None, None)[0]
    else:  # transformers 4: the additive extended mask
        def make_mask(hidden, mask):
            return model.get_extended_attention_mask(mask, mask.shape)
    ramps = [torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, 2)).eval()
             for _ in range(cfg["num_hidden_layers"])]

    @torch.inference_mode()
    def run(batch, exit_at: int):
        ids = torch.from_numpy(batch["input_ids"]).long()
        mask = torch.from_numpy(batch["attention_mask"]).long()
        hidden = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        ext = make_mask(hidden, mask)
        for i, layer in enumerate(model.encoder.layer):
            out = layer(hidden, ext)
            hidden = out[0] if isinstance(out, tuple) else out
            logits = ramps[i](hidden[:, 0])
            p = torch.softmax(logits, -1)
            entropy = float(-(p * torch.log(p)).sum())  # the host read DeeBERT's rule needs
            if i + 1 >= exit_at and entropy >= 0:
                return logits
        return logits

    return run


def jax_cfg(model: EarlyExitModel) -> dict:
    c = model.config
    return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                max_position_embeddings=c.max_position_embeddings)


def real_exits(checkpoint: str | None, target: float = 0.4) -> tuple[np.ndarray, str] | None:
    """Exit layers (of 6) of pcee's setting nearest `target` saving on SST-2 dev, and its name."""
    if not checkpoint:
        return None
    model = EarlyExitModel.from_run(checkpoint)
    task = glue.get_task("sst2")
    split = batches.encode_examples(model.tokenizer, task, glue.load_examples(task, "dev", GLUE / "SST-2"))
    cached = runners.cached_logits(model, split)
    cal = offline.calibrate("pcee", cached, split.labels, metrics.accuracy, near_saving=target)
    return offline.exit_layers(cal.policy, cached), str(cal.policy)


def measure(model: EarlyExitModel, length: int, ks: list[int], mix: np.ndarray | None, args) -> list[dict]:
    L = model.num_layers
    singles = inputs(model, args.inputs, length)
    big = inputs(model, 3, length, rows=args.batch_size, seed=1)
    torch_runs = {a: torch_loop(jax_cfg(model), a, args.torch_threads) for a in ("eager", "sdpa")}
    rows = []
    settings = [(f"static k={k}", [k] * len(singles)) for k in ks]
    if mix is not None:
        scaled = np.clip(np.round(mix * L / 6).astype(int), 1, L)
        draw = np.random.default_rng(0).choice(scaled, size=len(singles))
        settings.append(("real setting", draw.tolist()))
    at = {k: static(model, k) for k in range(1, L + 1)}  # built once, outside the timed calls
    for name, exit_at in settings:
        saving = 1 - float(np.mean(exit_at)) / L
        items = list(zip(singles, exit_at))

        def device(item):
            b, k = item
            jax.block_until_ready(model.device_exits(b, at[k]))

        fns = {"dense": lambda item: model.final_logits(item[0]),
               "plain_layers": lambda item: jax.block_until_ready(
                   plain_layers(model.config, model.step_params, model._check(item[0]))),
               # head_layers=1: a call per layer, every layer decided on, as for a policy that can
               # exit anywhere (a static policy's own default runs its k layers as one call)
               "latency": lambda item: runners.exit_one(model, at[item[1]], item[0], head_layers=1),
               "latency_host": lambda item: runners.exit_one(model, at[item[1]], item[0], pipelined=False),
               "device": device}
        torch_fns = {f"torch_{a}": (lambda item, run=run: run(item[0], item[1]))
                     for a, run in torch_runs.items() if run is not None}
        for pipelined in (True, False):  # every step either latency form can take (static policies share them)
            runners.warm_latency(model, at[L], singles[0], pipelined, head_layers=1 if pipelined else None)
        paired(fns, items[:2], 1)  # compile and warm every path
        paired(torch_fns, items[:2], 1)
        totals = {n: [] for n in [*fns, *torch_fns]}
        for r in range(args.rounds):
            # PyTorch's OpenMP threads spin for a while after each call and would slow whatever JAX call
            # came next: its loops run in a block of their own each round, after the JAX block.
            for group in (fns, torch_fns):
                for n, t in paired(group, items, 1, first_round=r).items():
                    totals[n] += t
                time.sleep(0.5)
        med = {n: float(np.median(t)) for n, t in totals.items()}
        ratio = lambda mode: [1 - e / d for e, d in zip(totals[mode], totals["dense"])]  # noqa: E731
        row = {"setting": name, "length": length, "saving": saving, "inputs": len(items), "rounds": args.rounds,
               "ms": {n: 1e3 * v / len(items) for n, v in med.items()}}
        ceiling = [1 - float(np.mean(exit_at)) / L * p / d for p, d in zip(totals["plain_layers"], totals["dense"])]
        row["plain_ceiling_ws_over_saving"] = float(np.median(ceiling)) / saving if saving > 0 else None
        for mode in ("latency", "latency_host", "device"):
            ws = float(np.median(ratio(mode)))
            row[f"{mode}_wall_saving"] = ws
            row[f"{mode}_ws_over_saving"] = ws / saving if saving > 0 else None
        for a in torch_runs:
            if f"torch_{a}" in med:
                row[f"jax_over_torch_{a}"] = med["latency"] / med[f"torch_{a}"]
        if name.startswith("static"):  # batched: every row exits at k
            pol = at[exit_at[0]]
            timing = paired({"dense": lambda b: model.final_logits(b),
                             "early": lambda b: runners.exit_batch(model, pol, b, args.batch_size)}, big, args.rounds)
            full, early = float(np.median(timing["dense"])), float(np.median(timing["early"]))
            ideal = 1 / (1 - saving) if saving < 1 else math.inf
            row["batched_throughput_ratio"] = full / early
            row["batched_over_ideal"] = (full / early) / ideal
        rows.append(row)
        print(f"  {name:>14} len {length}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in row["ms"].items())
              + f"; latency ws/s {row['latency_ws_over_saving'] or 0:.2f}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", nargs="+", default=["base", "minilm"], choices=["base", "minilm"])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    p.add_argument("--inputs", type=int, default=30, help="batch-1 inputs per setting")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--checkpoint", default="runs/sst2-joint",
                   help="SST-2 run for the real exit distribution ('' to skip it)")
    p.add_argument("--name", default="scale_speed")
    args = p.parse_args()
    mix = real_exits(args.checkpoint)
    mix_layers, mix_name = mix if mix is not None else (None, None)
    results = {}
    for scale in args.scales:
        model = jax_model(scale)
        L = model.num_layers
        ks = sorted({max(1, round(L / 3)), L // 2, round(2 * L / 3), L})
        print(f"{scale}: {L} layers, hidden {model.config.hidden_size}", flush=True)
        results[scale] = [r for length in args.lengths for r in measure(model, length, ks, mix_layers, args)]

    lines = [f"Batch-1 inputs: {args.inputs} random-token inputs per setting, {args.rounds} rounds, every mode "
             "alternated input by input (the PyTorch loops in a block of their own after the JAX modes each round); medians over rounds. `ws/s` = wall_saving / saving. Latency: pipelined "
             "(the default: policy on the device, layer i+1 queued before ramp i's flag is read); host decisions: "
             "the host reads each ramp's logits and decides before the next dispatch. Plain-step ceiling: "
             "1 - (k / L) x t(every layer and ramp by the plain step, one function) / t(dense), over saving: "
             "the most latency or device mode can reach with plain steps and no host cost. Batched: batch "
             f"{args.batch_size}, every row exiting at k, throughput over the dense model's and over the ideal "
             "1 / (1 - saving). PyTorch: transformers' BertModel layers in a DeeBERT-style loop (ramp on the first "
             f"token and a host read of its entropy after every layer), {args.torch_threads} threads.",
             "" if mix_name is None else f"`real setting`: exits of {mix_name} on SST-2 dev ({args.checkpoint}), "
             "layers scaled to L, drawn per input.", ""]
    for scale, rows in results.items():
        lines += [f"### {scale}", "", "| exits | tokens | saving | dense ms | latency ms | latency ws/s | "
                  "latency, host decisions: ws/s | device ws/s | plain-step ceiling ws/s | batched x dense (x ideal) | torch eager ms | "
                  "torch sdpa ms | jaxexit / torch eager | jaxexit / torch sdpa |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            def f(key, fmt="{:.2f}"):
                return "-" if r.get(key) is None else fmt.format(r[key])
            ms = r["ms"]
            batched = (f"{r['batched_throughput_ratio']:.2f} ({r['batched_over_ideal']:.2f})"
                       if "batched_throughput_ratio" in r else "-")
            lines.append(f"| {r['setting']} | {r['length']} | {r['saving']:.3f} | {ms['dense']:.1f} | {ms['latency']:.1f} | "
                         f"{f('latency_ws_over_saving')} | {f('latency_host_ws_over_saving')} | "
                         f"{f('device_ws_over_saving')} | {f('plain_ceiling_ws_over_saving')} | {batched} | "
                         f"{ms.get('torch_eager', float('nan')):.1f} | {ms.get('torch_sdpa', float('nan')):.1f} | "
                         f"{f('jax_over_torch_eager')} | {f('jax_over_torch_sdpa')} |")
        lines.append("")
    print(write_result(args.name, {"results": results, "real_setting": mix_name}, "\n".join(lines)))


if __name__ == "__main__":
    main()
