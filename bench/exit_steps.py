"""Where the first-token exit steps pay: the ramps of one batch through the plain per-layer step
(`layer_step`, every layer computed whole) and through the first-token steps (`first_exit_step` /
`exit_step`: a layer at the first token for its ramp, the rest in the next step), against the
dense model compiled as one function, for several batch shapes (rows x tokens), pretrained
MiniLM, this machine, one run; the two forms measured alternately. Two cases: every row exits
at layer 4 (ramps 1-4: the plain form computes 4 layers, the first-token form 3 and four
first-token parts) and no row exits (all 6 ramps). They decide `EarlyExitModel.first_token_steps_from`.

    python bench/exit_steps.py [--shapes 1x16,1x64,8x32,16x32,64x32,32x64,64x64,128x64] [--seconds 2]

Writes results/exit_steps.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import time

from common import MINILM, timed, write_result

import numpy as np

from jaxexit import EarlyExitModel


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes: expected ROWSxTOKENS,... (e.g. 1x16,64x64), got {text!r}")
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: expected positive ROWSxTOKENS pairs, got {text!r}")
    return shapes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x16,1x64,8x32,16x32,64x32,32x64,64x64,128x64")
    parser.add_argument("--seconds", type=float, default=2.0, help="about this long per measurement")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)

    model = EarlyExitModel.from_pretrained(MINILM, num_labels=2)
    rng = np.random.default_rng(0)
    forms = {}
    for name, threshold in (("plain", 10**12), ("first_token", 0)):
        forms[name] = EarlyExitModel(model.config, model.params, model.tokenizer)
        forms[name].first_token_steps_from = threshold
    rows = []
    for B, T in shapes:
        ids = rng.integers(1000, 20000, (B, T)).astype(np.int32)
        ids[:, 0] = 101
        batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
        once = timed(lambda: model.final_logits(batch), repeats=1)
        repeats = max(3, int(args.seconds / max(once, 1e-4)))
        ms = {"full": 1000 * timed(lambda: model.final_logits(batch), repeats=repeats)}
        for case, ramps in (("exit4", 4), ("all", model.num_layers)):
            times = {name: [] for name in forms}
            for r in range(repeats + 2):  # the first two rounds warm up
                for name in (forms if r % 2 == 0 else reversed(list(forms))):
                    start = time.perf_counter()
                    for z in itertools.islice(forms[name].ramp_steps(batch), ramps):
                        np.asarray(z)
                    times[name].append(time.perf_counter() - start)
            for name, t in times.items():
                ms[f"{name}_{case}"] = 1000 * float(np.median(t[2:]))
        row = {"rows": B, "tokens": T, "batch_tokens": B * T, "repeats": repeats, **{f"{k}_ms": v for k, v in ms.items()}}
        rows.append(row)
        print(f"{B}x{T}: full {ms['full']:.1f} ms; exit at 4: plain {ms['plain_exit4']:.1f}, first-token "
              f"{ms['first_token_exit4']:.1f}; no exit: plain {ms['plain_all']:.1f}, first-token {ms['first_token_all']:.1f}",
              flush=True)

    md = (f"Median ms per batch (pretrained MiniLM-L6-H384, {model.num_layers} layers); the runners take the first-token steps "
          f"from {EarlyExitModel.first_token_steps_from} tokens per batch.\n\n"
          "| rows x tokens | full model (one function) | exit at 4: plain | exit at 4: first-token (ratio) "
          "| no exit: plain | no exit: first-token (ratio) |\n|---|---|---|---|---|---|\n")
    for r in rows:
        md += (f"| {r['rows']} x {r['tokens']} | {r['full_ms']:.1f} | {r['plain_exit4_ms']:.1f} | "
               f"{r['first_token_exit4_ms']:.1f} ({r['first_token_exit4_ms'] / r['plain_exit4_ms']:.2f}) | "
               f"{r['plain_all_ms']:.1f} | {r['first_token_all_ms']:.1f} ({r['first_token_all_ms'] / r['plain_all_ms']:.2f}) |\n")
    print(md)
    print("wrote", write_result("exit_steps", {"shapes": rows}, md))


if __name__ == "__main__":
    main()
