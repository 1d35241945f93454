#!/usr/bin/env bash
# The CIFAR-10 run behind results/vision/ (PCEE-BERT section 4.6.4, Table 3 form): the 27-exit
# ResNet-56 on this 2-core CPU, then its analysis. Each command is exactly what produced its
# directory (also recorded in summary.json / analysis.json).
#
# Deviation from the paper's recipe (PABEE's: 164 epochs, lr 0.1 /10 at 50% and 75%), on purpose:
# 10 epochs on a cosine schedule, the most that fits one working session on the faster of these
# 2-core machines (390 steps of batch 128 per epoch; measured with XLA's own convolution gradient
# 1.6 s/step there, 3.2-8.2 s/step on slower ones; the per-tap kernel gradient now halves that:
# results/resnet_step.md); `--epochs 164 --schedule step` is the paper's.
#
#   bash results/train_vision.sh     # train (or resume, or skip when finished), then analyse
#
# The images are extracted from ../shared/data/cifar10/cifar10-jpg.tar.xz into data/cifar10 if missing.
set -uo pipefail
cd "$(dirname "$0")/.."
name=cifar10-resnet56
if [ ! -d data/cifar10/train ]; then
  mkdir -p data/cifar10 && tar xJf ../shared/data/cifar10/cifar10-jpg.tar.xz -C data/cifar10 || exit 1
fi
if [ -f "runs/$name/summary.json" ]; then
  echo "runs/$name finished: skipped"
elif [ -d "runs/$name" ]; then
  python train/train_vision.py --resume "runs/$name" --no-progress --results-dir results/vision/train || exit 1
else
  python train/train_vision.py --config cifar10 --data-dir data/cifar10 --epochs 10 --run-name "$name" \
    --no-progress --results-dir results/vision/train || exit 1
fi
if [ -f "results/vision/$name/analysis.json" ] && [ "results/vision/$name/analysis.json" -nt "runs/$name/summary.json" ]; then
  echo "results/vision/$name up to date: skipped"
else
  python infer/analyze.py "runs/$name" --out "results/vision/$name"
fi
