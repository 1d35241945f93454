"""The papers' tables and figures for fine-tuned runs (DeeBERT Table 1 / Figures 2-4, 6; PCEE-BERT Table 2).

    python infer/analyze.py runs/mrpc-joint --out results/analysis/mrpc-joint
    python infer/analyze.py --tables results/analysis --out results/tables.md
    python infer/analyze.py runs/cifar10-resnet56 --out results/vision/cifar10-resnet56

A train/train_vision.py run (multi-exit ResNet) is analysed on its test split the same way, plus
PCEE-BERT's Table 3 form (PABEE against PCEE at the savings nearest 75/50/25%).

The first form runs one cached pass over dev (plus timed latency runs for the wall-saving figure)
and writes analysis.json, tables.md, logits.npy, tradeoff.{csv,png}, per_layer.png,
exit_histograms.png and wall_saving.png under --out (for MNLI, whose dev is two splits, under
--out/validation_matched/ and --out/validation_mismatched/). Thresholds are chosen on a seeded
random half of the split and reported on the other half. The second gathers every analysis.json
under the given directories into one markdown file (mean and spread over seeds).

Also installed as the console script `jaxexit-analyze`; the code is in `jaxexit/cli/analyze.py`.
"""

from jaxexit.cli.analyze import main

if __name__ == "__main__":
    raise SystemExit(main())
