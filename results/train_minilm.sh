#!/usr/bin/env bash
# The fine-tuning runs behind results/train/: MiniLM-L6-H384 (../shared) on GLUE, this 2-core CPU.
# Epochs are cut from the papers' 3 per stage to fit a CPU session (1 for SST-2, 2 for the small
# tasks), and lr is 5e-5 instead of BERT-base's 2e-5 (MiniLM barely moves in the first hundred
# steps at 2e-5, in PyTorch too). Each command is exactly what produced its directory.
set -euo pipefail
cd "$(dirname "$0")/.."
M=../shared/models/all-MiniLM-L6-v2
G=../shared/data/glue
run() { python train/finetune.py --model "$M" --lr 5e-5 --no-progress --results-dir results/train "$@"; }
run --config sst2 --data-dir $G/SST-2 --epochs 1 --run-name sst2-two_stage
for task in MRPC CoLA STS-B; do
  cfg=$(echo "$task" | tr -d '-' | tr 'A-Z' 'a-z')
  run --config "$cfg" --data-dir "$G/$task" --epochs 2 --scheme two_stage --run-name "$cfg-two_stage"
  run --config "$cfg" --data-dir "$G/$task" --epochs 2 --scheme joint --run-name "$cfg-joint"
done
