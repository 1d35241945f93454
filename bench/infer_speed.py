"""Early-exit inference speed on SST-2 dev with a fine-tuned checkpoint, this machine, one run:

* latency mode (batch 1): the early-exit run at a setting with saving near --target (0.4) against
  the full model on the same inputs -> wall_saving / saving;
* batch-1 full-model latency against transformers' PyTorch BertModel on the same sentences and
  the same (pretrained MiniLM) weights;
* batched mode at --batch-size 64 near the same saving: throughput against the full model;
* on-device mode (lax.while_loop) at batch 1; device and batched modes also paired with the full
  model input by input (batch by batch), as latency mode is;
* the offline sweep: seconds for every policy's grid after the single model pass.

    python bench/infer_speed.py [--checkpoint runs/<run>] [--target 0.4] [--limit 0]

Writes results/infer_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import time

from common import GLUE, MINILM, timed, write_result

import jax
import numpy as np

from jaxexit.text import batches, glue, metrics
from jaxexit.exits import offline, policies, runners
from jaxexit import EarlyExitModel
from jaxexit.training.runs import resolve_run
from jaxexit.exits.policies import make_policy


def closest_setting(rows, target: float, window: float = 0.05):
    """Among every policy's grid, the best-scoring setting with saving within `window` of `target`
    (if none is, the setting with the nearest saving)."""
    near = [r for r in rows if abs(r["saving"] - target) <= window]
    if near:
        return max(near, key=lambda r: (r["score"], -abs(r["saving"] - target)))
    return min(rows, key=lambda r: (abs(r["saving"] - target), -r["score"]))


def paired(early, full, items: list, rounds: int) -> list[tuple[float, float]]:
    """Seconds of `early(item)` and of `full(item)` over the same items, measured item by item in
    alternating order for `rounds` rounds (so that the machine's noise hits both alike); returns
    per-round (early, full) totals. Both must be warm (compiled for every item's shape)."""
    out = []
    for r in range(rounds):
        totals = [0.0, 0.0]
        for i, item in enumerate(items):
            for which in ((0, 1) if (i + r) % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                (early, full)[which](item)
                totals[which] += time.perf_counter() - start
        out.append((totals[0], totals[1]))
    return out


def paired_latency(model, policy, split, rounds: int, pipelined: bool = True, head_layers: int | None = None):
    """`paired` over batch-1 inputs: the latency runner (`runners.exit_one`; `head_layers`: see
    there) against the full model."""
    singles = runners.single_inputs(model, split)
    runners.warm_up(model.final_logits, singles, 2)
    runners.warm_up(lambda b: runners.warm_latency(model, policy, b, pipelined, head_layers), singles, 2)
    return paired(lambda b: runners.exit_one(model, policy, b, pipelined, head_layers), model.final_logits,
                  singles, rounds)


def paired_device(model, policy, split, rounds: int):
    """`paired` over batch-1 inputs: the on-device loop (`EarlyExitModel.device_exits`) against the full model."""
    singles = runners.single_inputs(model, split)

    def early(b):
        jax.block_until_ready(model.device_exits(b, policy))
    runners.warm_up(model.final_logits, singles, 1)
    runners.warm_up(early, singles, 1)
    return paired(early, model.final_logits, singles, rounds)


def paired_batched(model, policy, split, batch_size: int, rounds: int):
    """`paired` over batches of `batch_size` rows: the batched runner (`runners.exit_batch`, exited
    rows leaving the batch) against the full model on the same batch."""
    chunks = runners._chunks(model, split, batch_size)
    runners.warm_up(lambda b: runners.warm_exit_batch(model, b, batch_size), [b for _, b in chunks], 1)
    runners.warm_up(model.final_logits, [b for _, b in chunks], 1)
    return paired(lambda c: runners.exit_batch(model, policy, c[1], len(c[0])), lambda c: model.final_logits(c[1]),
                  chunks, rounds)


def median_ratio(pairs: list[tuple[float, float]], of) -> float:
    values = sorted(of(e, f) for e, f in pairs)
    return values[len(values) // 2]


def wall_figures(pairs: list[tuple[float, float]], saving: float) -> dict:
    """`paired`'s per-round (early, full) totals as wall savings, their median, and that over `saving`."""
    median = median_ratio(pairs, lambda e, f: 1 - e / f)
    return {"rounds": [{"early_exit_s": e, "full_model_s": f, "wall_saving": 1 - e / f} for e, f in pairs],
            "median_wall_saving": median, "median_wall_saving_over_saving": median / saving if saving else None}


def torch_latency(sentences_batches, repeats: int = 1) -> float | None:
    try:
        import torch
        from transformers import BertModel
    except ImportError:
        return None
    model = BertModel.from_pretrained(str(MINILM)).eval()
    inputs = [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in sentences_batches]
    with torch.inference_mode():
        for b in inputs[:5]:
            model(**b)
        start = time.perf_counter()
        for _ in range(repeats):
            for b in inputs:
                model(**b)
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a fine-tuned SST-2 run (default: runs/LATEST)")
    parser.add_argument("--target", type=float, default=0.4, help="saving to aim the setting at")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="first N dev inputs only (0: all 872)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the paired latency measurement")
    args = parser.parse_args()

    run = resolve_run(args.checkpoint)
    model = EarlyExitModel.from_run(run.path)
    task = glue.get_task("sst2")
    examples = glue.load_examples(task, "dev", GLUE / "SST-2")
    examples = examples[: args.limit] if args.limit else examples
    split = batches.encode_examples(model.tokenizer, task, examples)
    labels = split.labels

    start = time.perf_counter()
    cached = runners.cached_logits(model, split, args.batch_size)
    pass_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rows = offline.sweep(cached, labels, metrics.accuracy)
    sweep_seconds = time.perf_counter() - start

    best = closest_setting(rows, args.target)
    policy = make_policy(best["policy"], model.num_layers, 2, **best["params"])

    latency = runners.run_latency(model, policy, split)
    _, full_latency = runners.run_full_latency(model, split)
    paired_lat = paired_latency(model, policy, split, args.rounds)
    host = paired_latency(model, policy, split, args.rounds, pipelined=False)
    # the pipelined steps without the first call's fusion of the layers no row can exit at (a
    # policy that can exit at layer 1 has none: the run above is that measurement)
    fused = policies.earliest_exit(policy) - 1
    per_call = paired_latency(model, policy, split, args.rounds, head_layers=1) if fused else paired_lat
    batched = runners.run_batched(model, policy, split, args.batch_size)
    _, full_batched = runners.run_full_batched(model, split, args.batch_size)
    device = runners.run_on_device(model, policy, split, 1)
    # device and batched modes against the full model, alternated as latency mode is (the runs
    # above give their exits and a one-off time each, taken apart from the full model's)
    device_pairs = paired_device(model, policy, split, args.rounds)
    batched_pairs = paired_batched(model, policy, split, args.batch_size, args.rounds)
    # Host-decision overhead per layer: every layer dispatched and decided on (static k = L, so the
    # same work as the full model) against the full model compiled as one function.
    sample = split.take(np.arange(min(200, len(split))))
    every = make_policy("static", model.num_layers, 2, k=model.num_layers)
    per_layer = paired_latency(model, every, sample, 1, head_layers=1)[0]
    overhead_ms = 1000 * (per_layer[0] - per_layer[1]) / len(sample) / model.num_layers
    saving = offline.efficiency(latency.exit_layer, model.num_layers)["saving"]
    ideal = 1 / (1 - saving)  # batched mode's throughput ratio if exited rows cost nothing
    wall_saving = 1 - latency.seconds / full_latency

    # Batch-1 full model against PyTorch, same sentences, same pretrained weights.
    pretrained = EarlyExitModel.from_pretrained(MINILM, num_labels=2)
    singles = runners.single_inputs(pretrained, split)
    jax_full = timed(lambda: [pretrained.final_logits(b) for b in singles], repeats=1, warmup=1)
    torch_full = torch_latency(singles)

    n = len(split)
    figures = {
        "checkpoint": str(run.path), "n": n, "num_layers": model.num_layers, "policy": policy.as_dict(),
        "score": float(metrics.accuracy(latency.prediction, labels)),
        "full_score": float(metrics.accuracy(cached[-1].argmax(-1), labels)),
        "saving": saving, "avg_layers": float(latency.exit_layer.mean()),
        "latency_paired": wall_figures(paired_lat, saving),
        "latency_paired_host_decisions": wall_figures(host, saving),
        "latency_paired_a_call_per_layer": wall_figures(per_call, saving),
        "latency": {"early_exit_s": latency.seconds, "full_model_s": full_latency, "wall_saving": wall_saving,
                    "wall_saving_over_saving": wall_saving / saving if saving else None,
                    "ms_per_input_early_exit": 1000 * latency.seconds / n, "ms_per_input_full": 1000 * full_latency / n},
        "batch1_full_model_vs_torch": {"jax_s": jax_full, "torch_s": torch_full,
                                        "ratio": jax_full / torch_full if torch_full else None},
        "batched": {"batch_size": args.batch_size, "early_exit_s": batched.seconds, "full_model_s": full_batched,
                    "throughput_ratio": full_batched / batched.seconds},
        "host_decision_overhead": {"inputs": len(sample), "all_layers_stepped_s": per_layer[0],
                                   "full_model_s": per_layer[1], "ms_per_layer": overhead_ms,
                                   "fraction_of_a_layer": overhead_ms / (1000 * per_layer[1] / len(sample) / model.num_layers)},
        "device_batch1": {"early_exit_s": device.seconds, "wall_saving": 1 - device.seconds / full_latency},
        "device_paired": wall_figures(device_pairs, saving),
        "batched_paired": {"rounds": [{"early_exit_s": e, "full_model_s": f, "throughput_ratio": f / e} for e, f in batched_pairs],
                           "median_throughput_ratio": median_ratio(batched_pairs, lambda e, f: f / e),
                           "ideal_throughput_ratio": ideal,
                           "median_over_ideal": median_ratio(batched_pairs, lambda e, f: f / e) / ideal},
        "sweep": {"settings": len(rows), "seconds": sweep_seconds, "model_pass_seconds": pass_seconds},
        "modes_agree": bool(np.array_equal(latency.exit_layer, batched.exit_layer)
                            and np.array_equal(latency.exit_layer, device.exit_layer)),
    }
    f = figures
    pw = f["latency_paired"]
    md = (f"SST-2 dev ({n} inputs), checkpoint `{run.path}`, {policy} (the best-scoring grid setting of any "
          f"policy with saving within 0.05 of {args.target}): accuracy {f['score']:.4f} (full model {f['full_score']:.4f}), "
          f"avg layers {f['avg_layers']:.2f} of {model.num_layers}, saving {saving:.3f}.\n\n"
          f"| measure | value |\n|---|---|\n"
          f"| latency mode: early exit / full model (s) | {latency.seconds:.2f} / {full_latency:.2f} |\n"
          f"| latency mode: ms per input, early exit / full | {f['latency']['ms_per_input_early_exit']:.2f} / {f['latency']['ms_per_input_full']:.2f} |\n"
          f"| **wall_saving / saving** (latency) | **{f['latency']['wall_saving_over_saving']:.3f}** (wall_saving {wall_saving:.3f}) |\n"
          f"| latency mode, paired per input ({args.rounds} rounds): median wall_saving / saving | **{pw['median_wall_saving_over_saving']:.3f}** (wall_saving {pw['median_wall_saving']:.3f}; rounds "
          + ", ".join(f"{r['wall_saving']:.3f}" for r in pw["rounds"]) + ") |\n"
          f"| the same with a call per layer (`head_layers=1`: layers 1..{fused + 1} not run as one call): median wall_saving / saving | "
          f"{f['latency_paired_a_call_per_layer']['median_wall_saving_over_saving']:.3f} |\n"
          f"| the same with host decisions (`exit_one(pipelined=False)`): median wall_saving / saving | "
          f"{f['latency_paired_host_decisions']['median_wall_saving_over_saving']:.3f} |\n"
          f"| host-decision overhead per layer (batch 1, all L layers stepped vs the full model, {len(sample)} inputs) | {overhead_ms:.3f} ms = {f['host_decision_overhead']['fraction_of_a_layer']:.2f} of a layer |\n"
          f"| on-device loop, batch 1: wall_saving (one run against the latency row's full-model time) | {f['device_batch1']['wall_saving']:.3f} |\n"
          f"| on-device loop, batch 1, paired per input ({args.rounds} rounds): median wall_saving / saving | **{f['device_paired']['median_wall_saving_over_saving']:.3f}** "
          f"(wall_saving {f['device_paired']['median_wall_saving']:.3f}; rounds " + ", ".join(f"{r['wall_saving']:.3f}" for r in f["device_paired"]["rounds"]) + ") |\n"
          f"| batched (batch {args.batch_size}): full model / early exit time = **throughput ratio** (one run each) | **{f['batched']['throughput_ratio']:.2f}x** |\n"
          f"| batched, paired per batch ({args.rounds} rounds): median throughput ratio, over the ideal 1 / (1 - saving) = {ideal:.2f}x | "
          f"**{f['batched_paired']['median_throughput_ratio']:.2f}x** ({f['batched_paired']['median_over_ideal']:.2f} of ideal; rounds "
          + ", ".join(f"{r['throughput_ratio']:.2f}" for r in f["batched_paired"]["rounds"]) + ") |\n")
    if torch_full:
        md += f"| batch-1 full model, JAX / PyTorch BertModel time | **{f['batch1_full_model_vs_torch']['ratio']:.3f}** ({jax_full:.2f} s / {torch_full:.2f} s) |\n"
    md += (f"| offline sweep: {len(rows)} settings after one pass | {sweep_seconds:.3f} s (the pass: {pass_seconds:.1f} s) |\n"
           f"| latency, batched and on-device exits identical | {f['modes_agree']} |\n")
    print(md)
    print("wrote", write_result("infer_speed", figures, md))


if __name__ == "__main__":
    main()
