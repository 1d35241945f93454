"""A BERT-base-shaped checkpoint with random weights, in Hugging Face format, for timing at the
papers' scale (12 layers, hidden 768, 12 heads, intermediate 3072; the weights do not change the
time). No BERT-base weights are needed: the tokenizer comes from any BERT-uncased checkpoint with
the 30522-token vocabulary (default: all-MiniLM-L6-v2 beside the repository).

    python bench/random_base.py runs/bert-base-random
    python train/finetune.py --config sst2 --model runs/bert-base-random --data-dir ../shared/data/glue/SST-2 \\
        --scheme joint --ramp-input mean --lr 1e-4 --max-train-examples 2000 --run-name sst2-base-random

The run trained this way (backbone and ramps from random weights) learns a little, enough for
its exits to spread over the layers the way a load benchmark needs (bench/serve_load.py).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import BERT_BASE, MINILM

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="directory to write (must not exist)")
    p.add_argument("--tokenizer-from", type=Path, default=MINILM,
                   help="a BERT-uncased checkpoint directory whose tokenizer files to copy (vocabulary of 30522)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new directory")
    vocab_file = args.tokenizer_from / "vocab.txt"
    if not vocab_file.is_file():
        raise SystemExit(f"{args.tokenizer_from} has no vocab.txt: give --tokenizer-from a BERT checkpoint directory")
    vocab = sum(1 for _ in open(vocab_file, encoding="utf-8"))
    if vocab != BERT_BASE["vocab_size"]:
        raise SystemExit(f"{vocab_file} has {vocab} tokens, not {BERT_BASE['vocab_size']}")

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(args.seed)
    config = BertConfig(**BERT_BASE)
    BertModel(config).save_pretrained(args.out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.tokenizer_from / name).is_file():
            shutil.copyfile(args.tokenizer_from / name, args.out / name)  # not its mode: the source may be read-only
    print(f"wrote {args.out}: BERT-base shape, random weights (seed {args.seed}), tokenizer of {args.tokenizer_from}")


if __name__ == "__main__":
    main()
