#!/usr/bin/env bash
# The fine-tuning runs behind results/train/ and the analyses behind results/analysis/:
# MiniLM-L6-H384 (../shared) on GLUE, this 2-core CPU. Each command is exactly what produced its
# directory (also recorded in its summary.json / analysis.json).
#
# Deviations from the papers' preset, on purpose, to fit a CPU session: epochs cut from 3 per
# stage (2 for CoLA, 1 for MRPC, STS-B and SST-2; SST-2 joint 0.5; one step of MRPC at length 128 takes
# ~5.6 s here), lr 5e-5 instead of BERT-base's 2e-5
# (MiniLM barely moves in the first hundred steps at 2e-5, in PyTorch too) and, for stage 2,
# lr 1e-3 (the frozen early layers' first-token states vary ~1e-3 across inputs; at 5e-5 even
# ramp 4 stays far below what it reaches at 1e-3; see results/README.md).
#
#   bash results/train_minilm.sh            # everything, in this order (~2-3 h on 2 cores)
#   bash results/train_minilm.sh cola mrpc  # only these blocks
#   bash results/train_minilm.sh tables     # results/tables.md from every results/analysis/*/analysis.json
set -uo pipefail
cd "$(dirname "$0")/.."
M=../shared/models/all-MiniLM-L6-v2
G=../shared/data/glue
train() { python train/finetune.py --model "$M" --lr 5e-5 --stage2-lr 1e-3 --no-progress --results-dir results/train "$@"; }
analyze() { python infer/analyze.py "runs/$1" --out "results/analysis/$1"; }
both() {  # task dir, preset, epochs
  train --config "$2" --data-dir "$G/$1" --epochs "$3" --scheme two_stage --run-name "$2-two_stage" && analyze "$2-two_stage"
  train --config "$2" --data-dir "$G/$1" --epochs "$3" --scheme joint --run-name "$2-joint" && analyze "$2-joint"
}
joint() {  # task dir, preset, epochs, seed (the default seed is 42)
  train --config "$2" --data-dir "$G/$1" --epochs "$3" --seed "$4" --scheme joint --run-name "$2-joint-s$4" \
    && analyze "$2-joint-s$4"
}
block() {
  case "$1" in
    sst2-stage1)  # the first SST-2 run (session 1; stage 2 at lr 5e-5): stage 1 for sst2-two_stage below
      python train/finetune.py --model "$M" --lr 5e-5 --no-progress --results-dir results/train --config sst2 \
        --data-dir $G/SST-2 --epochs 1 --run-name sst2-two_stage ;;
    sst2)  # stage 2 again at lr 1e-3 on the same stage-1 backbone and final ramp
      train --config sst2 --data-dir $G/SST-2 --epochs 1 --stage1-from runs/sst2-two_stage \
        --run-name sst2-two_stage-s2lr1e-3 && analyze sst2-two_stage-s2lr1e-3 ;;
    cola) both CoLA cola 2 ;;
    mrpc) both MRPC mrpc 1 ;;
    stsb) both STS-B stsb 1 ;;
    seeds) block seeds-mrpc; block seeds-cola ;;
    seeds-mrpc) for seed in 43 44; do joint MRPC mrpc 1 $seed; done ;;
    seeds-cola) for seed in 43 44; do joint CoLA cola 2 $seed; done ;;
    sst2-joint) train --config sst2 --data-dir $G/SST-2 --epochs 0.5 --scheme joint --run-name sst2-joint \
        && analyze sst2-joint ;;
    tables) python infer/analyze.py --tables results/analysis --out results/tables.md > /dev/null ;;
    *) echo "unknown block $1"; return 2 ;;
  esac
}
for b in "${@:-sst2-stage1 cola mrpc stsb seeds sst2 sst2-joint tables}"; do
  for x in $b; do echo "== $x $(date -u +%H:%M)"; block "$x"; done
done
