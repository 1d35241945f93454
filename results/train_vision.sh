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
#   bash results/train_vision.sh       # train (or resume, or skip when finished), then analyse
#   bash results/train_vision.sh pack  # the unfinished run's latest checkpoint -> handoff/ (to commit)
#
# runs/ does not survive a change of machine, and on the slower machines the run takes more than one
# working session (~26 min per epoch at 3.9 s/step), so an unfinished run travels in git:
# `pack` writes handoff/cifar10-resnet56.tar.gz (the run directory with only its latest checkpoint,
# ~7 MB), and a later `bash results/train_vision.sh` on a machine without runs/cifar10-resnet56
# unpacks it and resumes (batches depend only on the seed, the epoch and the batch index, so the
# resumed run takes exactly the steps the uninterrupted one would have). Delete the file once the
# run has finished.
#
# The images are extracted from ../shared/data/cifar10/cifar10-jpg.tar.xz into data/cifar10 if missing.
set -uo pipefail
cd "$(dirname "$0")/.."
name=cifar10-resnet56
handoff=handoff/$name.tar.gz
if [ "${1:-}" = pack ]; then
  ckpts=runs/$name/checkpoints
  latest=$(ls "$ckpts" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  if [ -z "$latest" ] || [ ! -f "$ckpts/$latest/commit_success.txt" ]; then
    echo "no finished checkpoint in $ckpts to pack"; exit 1
  fi
  [ -f "runs/$name/summary.json" ] && echo "note: runs/$name has finished; the handoff is only needed for unfinished runs"
  tmp=$(mktemp -d) && mkdir -p "$tmp/$name/checkpoints" && mkdir -p handoff || exit 1
  find "runs/$name" -maxdepth 1 -type f -exec cp {} "$tmp/$name/" \;
  cp -r "$ckpts/$latest" "$tmp/$name/checkpoints/" && tar czf "$handoff.tmp" -C "$tmp" "$name" && mv "$handoff.tmp" "$handoff" || exit 1
  rm -rf "$tmp"
  echo "packed runs/$name at step $latest into $handoff ($(du -h "$handoff" | cut -f1)); commit it"
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: bash results/train_vision.sh [pack]"; exit 2
fi
if [ ! -d "runs/$name" ] && [ -f "$handoff" ]; then
  mkdir -p runs && tar xzf "$handoff" -C runs || exit 1
  echo "unpacked $handoff into runs/$name: resuming it"
fi
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
if [ -f "$handoff" ] && [ -f "runs/$name/summary.json" ]; then
  echo "runs/$name has finished: its handoff is no longer needed (git rm $handoff)"
fi
