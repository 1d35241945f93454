"""Tiny checkpoints and GLUE-format data written on the fly, so training tests need no download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fun", "moving", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull", "weak"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "and", "very"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL


def bert_tensors(vocab: int, hidden: int, layers: int, inter: int, positions: int, prefix: str = "",
                 pooler: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A random BERT state dict with Hugging Face names (torch layout: Linear weight is [out, in])."""
    rng = np.random.default_rng(seed)
    H = hidden
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, H), "embeddings.position_embeddings.weight": (positions, H),
        "embeddings.token_type_embeddings.weight": (2, H),
        "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(layers):
        for name, out, inp in [("attention.self.query", H, H), ("attention.self.key", H, H),
                               ("attention.self.value", H, H), ("attention.output.dense", H, H),
                               ("intermediate.dense", inter, H), ("output.dense", H, inter)]:
            shapes[f"encoder.layer.{i}.{name}.weight"] = (out, inp)
            shapes[f"encoder.layer.{i}.{name}.bias"] = (out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"encoder.layer.{i}.{norm}.weight"] = (H,)
            shapes[f"encoder.layer.{i}.{norm}.bias"] = (H,)
    if pooler:
        shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (H, H), (H,)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("LayerNorm.weight"):
            value = 1.0 + 0.1 * rng.normal(size=shape)
        else:
            value = 0.05 * rng.normal(size=shape)
        tensors[prefix + name] = value.astype(np.float32)
    return tensors


def make_tiny_checkpoint(directory: Path, hidden: int = 32, layers: int = 3, heads: int = 4, inter: int = 48,
                         positions: int = 64) -> Path:
    """A random tiny BERT in Hugging Face format, with a WordPiece vocabulary of VOCAB."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="bert", vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=positions,
                  type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": positions}))
    save_file(bert_tensors(len(VOCAB), hidden, layers, inter, positions), str(directory / "model.safetensors"))
    return directory


def make_tiny_glue(root: Path, train: int = 200, dev: int = 40, seed: int = 0) -> Path:
    """SST-2 and STS-B in the GLUE download layout; labels follow the words, so they can be learnt."""
    rng = np.random.default_rng(seed)
    root = Path(root)

    def sentence(label: int) -> str:
        words = list(rng.choice(NEUTRAL, size=rng.integers(2, 9)))
        cue = POSITIVE if label else NEGATIVE
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(cue)))
        return " ".join(words)

    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("dev", dev)):
        labels = rng.integers(0, 2, n)
        rows = ["sentence\tlabel"] + [f"{sentence(y)}\t{y}" for y in labels]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")

    (root / "STS-B").mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for split, n in (("train", train), ("dev", dev)):
        rows = [header]
        for i in range(n):
            a, b = sentence(int(rng.integers(0, 2))), sentence(int(rng.integers(0, 2)))
            score = 2.5 * (sum(w in POSITIVE for w in a.split()) + sum(w in POSITIVE for w in b.split())) / 2 * 2
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{a}\t{b}\t{min(score, 5.0):.3f}")
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root
