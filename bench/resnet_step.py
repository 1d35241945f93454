"""Training-step time of the 27-exit ResNet-56 (CIFAR, batch 128, 32x32) with the convolution
kernel gradient computed two ways: `taps` (jaxexit.vision.resnet.conv3x3: 9 per-tap batched products,
the CPU default) and `xla` (XLA's own convolution gradient, the default elsewhere).

    python bench/resnet_step.py [--batch-size 128] [--steps 3] [--rounds 3]

The two programs are compiled first, then timed in alternating rounds of --steps steps each (on
the same random batch; the step updates the state, as in training); medians over rounds, and the
ratio within each round. Writes results/resnet_step.{json,md}. Measure with nothing else running.
"""

from __future__ import annotations

import argparse
import time

from common import write_result

import jax
import numpy as np

from jaxexit.vision import resnet, train as vision_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.rounds) < 1:
        parser.error("--batch-size, --steps and --rounds must be positive")

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch_size).astype(np.int32)}
    opt = vision_train.OptimizerSpec(0.1, 0.9, 1e-4, "cosine", 10_000)
    variants, states, compile_s = ("taps", "xla"), {}, {}
    for name in variants:
        cfg = resnet.ResNetConfig(conv_kernel_grad=name)
        start = time.perf_counter()
        state = vision_train.init_state(cfg, opt, (32, 32), jax.random.key(0, impl="rbg"))
        state, _ = vision_train.train_step(cfg, opt, state, batch)
        jax.block_until_ready(state)
        states[name], compile_s[name] = (cfg, state), time.perf_counter() - start

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            cfg, state = states[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                state, out = vision_train.train_step(cfg, opt, state, batch)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / args.steps)
            states[name] = (cfg, state)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ratios = [t / x for t, x in zip(times["taps"], times["xla"], strict=True)]
    figures = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
               "seconds_per_step": median, "rounds_seconds_per_step": times,
               "taps_over_xla": float(np.median(ratios)), "first_step_s": compile_s}
    md = (f"ResNet-56, 27 exits, joint loss, SGD; batch {args.batch_size} of 32x32 images; {args.rounds} rounds x "
          f"{args.steps} steps per variant, alternated; medians.\n\n"
          "| kernel gradient | s / step | images / s | first step (compile) s |\n|---|---|---|---|\n"
          + "".join(f"| {name} | {median[name]:.3f} | {args.batch_size / median[name]:.1f} | {compile_s[name]:.1f} |\n"
                    for name in variants)
          + f"\ntaps / xla time per step: **{figures['taps_over_xla']:.2f}** (median of the per-round ratios "
            f"{', '.join(f'{r:.2f}' for r in ratios)}).\n")
    print(md)
    print(write_result("resnet_step", figures, md))


if __name__ == "__main__":
    main()
