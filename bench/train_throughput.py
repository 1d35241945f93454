"""Training throughput (examples/s) of stage 1, stage 2 and joint on MiniLM + SST-2, and of the same
fine-tuning step in PyTorch transformers (BertForSequenceClassification, same batch shapes).

    python bench/train_throughput.py [--batch-size 32] [--length 64] [--steps 20]

Writes results/train_throughput.{json,md}. Ratios are measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import functools

from common import GLUE, MINILM, timed, write_result

import jax
import numpy as np

from jaxexit.text import batches, glue, steps
from jaxexit.training import optim
from jaxexit.training.stages import Stage
from jaxexit import EarlyExitModel


def jax_step_times(batch, stage: Stage, pooler: str, repeats: int) -> float:
    model = EarlyExitModel.from_pretrained(MINILM, num_labels=2, ramp_pooler=pooler)
    L = model.num_layers
    tx, labels = optim.make_optimizer(model.params, stage=stage, num_layers=L, lr=2e-5, total_steps=1000,
                                      warmup_ratio=0.1, weight_decay=0.01)
    state = {"params": model.params, "opt_state": tx.init(model.params), "step": np.int32(0)}
    fn = jax.jit(functools.partial(steps.train_step, model.config, stage, tx, labels), donate_argnums=(0,))
    rng = jax.random.key(0, impl="rbg")  # as the trainer
    box = [state]

    def run():
        box[0], out = fn(box[0], batch, rng)
        jax.block_until_ready(out["loss"])

    return timed(run, repeats)


def torch_step_time(batch, repeats: int) -> float | None:
    try:
        import torch
        from transformers import BertForSequenceClassification
    except ImportError:
        return None
    model = BertForSequenceClassification.from_pretrained(str(MINILM), num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "token_type_ids", "attention_mask")}
    labels = torch.from_numpy(batch["label"]).long()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return timed(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="padded sequence length of every batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    args = parser.parse_args()

    tokenizer = EarlyExitModel.from_pretrained(MINILM).tokenizer
    task = glue.get_task("sst2")
    examples = glue.load_examples(task, "train", GLUE / "SST-2")[: args.batch_size]
    split = batches.encode_examples(tokenizer, task, examples)
    batch = batches.collate(tokenizer, split, np.arange(args.batch_size))
    batch.update(tokenizer.pad(split.rows, split.types, length=args.length))

    seconds = {
        "stage1": jax_step_times(batch, Stage.BACKBONE, "per_ramp", args.steps),
        "stage2": jax_step_times(batch, Stage.RAMPS, "per_ramp", args.steps),
        "joint": jax_step_times(batch, Stage.JOINT, "shared", args.steps),
        "torch_finetune": torch_step_time(batch, args.steps),
    }
    rate = {k: (args.batch_size / v if v else None) for k, v in seconds.items()}
    figures = {
        "batch_size": args.batch_size, "length": args.length, "timed_steps": args.steps,
        "step_seconds": seconds, "examples_per_s": rate,
        "stage2_over_stage1_step_time": seconds["stage2"] / seconds["stage1"],
        "stage1_over_torch_throughput": (rate["stage1"] / rate["torch_finetune"]) if seconds["torch_finetune"] else None,
    }
    rows = "\n".join(f"| {k} | {seconds[k] * 1000:.1f} | {rate[k]:.1f} |" for k in seconds if seconds[k])
    md = (f"Training step, MiniLM-L6-H384 (all-MiniLM-L6-v2), SST-2 batch {args.batch_size} x {args.length} tokens, "
          f"median of {args.steps} steps.\n\n| step | ms/step | examples/s |\n|---|---|---|\n{rows}\n\n"
          f"* stage 2 / stage 1 step time: **{figures['stage2_over_stage1_step_time']:.2f}**\n")
    if figures["stage1_over_torch_throughput"]:
        md += f"* stage 1 / PyTorch throughput: **{figures['stage1_over_torch_throughput']:.2f}x**\n"
    print(md)
    print("wrote", write_result("train_throughput", figures, md))


if __name__ == "__main__":
    main()
