"""Strict import of Hugging Face safetensors checkpoints into the multi-exit parameter pytree.

Two tables, kept apart (as MaxText does): `_name_map` says which file tensor fills which
parameter path, and the value hook (`_KIND`) says how (transpose a Linear weight into a Flax
kernel, or not). Every backbone parameter must be filled, every file tensor used or knowingly
ignored, every shape must match; otherwise `CheckpointError` names the tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from jaxexit.text.config import EncoderConfig

log = logging.getLogger(__name__)

PREFIXES = ("bert.", "roberta.", "albert.")
PREFIX = {"bert": "bert.", "roberta": "roberta.", "albert": "albert."}  # what save_pretrained writes

# File tensors that are known not to belong to the encoder, and why they are dropped.
IGNORED = (
    (re.compile(r"^cls\."), "BERT pre-training heads (MLM/NSP)"),
    (re.compile(r"^lm_head\."), "RoBERTa MLM head"),
    (re.compile(r"^predictions\."), "ALBERT MLM head"),
    (re.compile(r"^sop_classifier\."), "ALBERT sentence-order head"),
    (re.compile(r"^(classifier|qa_outputs)\."), "task head of another fine-tune (ramps start fresh)"),
    (re.compile(r"(^|\.)(position_ids|token_type_ids)$"), "index buffer saved by old transformers"),
    (re.compile(r"^early_exit\."), "ramps of a jaxexit export (jaxexit.text.export reads them)"),
)

# The files a hub download needs: config, safetensors weights, tokenizer.
HUB_PATTERNS = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "calibration.npz",  # a jaxexit export's calibration table (jaxexit.text.export)
)

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
OTHER_FORMATS = ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


# ---- locating a checkpoint ---------------------------------------------------------------------
def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface_hub.

    The download honours huggingface_hub's cache (`HF_HOME`, `HF_HUB_CACHE`) and
    `HF_HUB_OFFLINE=1`, under which only the cache is read.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(HUB_PATTERNS)))
    except Exception as e:  # offline and not cached, unknown repo, network error
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline else
               "the Hugging Face Hub could not provide it (offline, or no such model)")
        detail = " ".join(str(e).split("\n")[0].split())
        raise FileNotFoundError(
            f"cannot load model {text!r}: it is not a local directory and {why}; give the path of a local "
            f"Hugging Face checkpoint directory instead (--model DIR) [{type(e).__name__}: {detail}]"
        ) from None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of an index)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (needs 'weight_map'): {e}") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not there: {missing}")
        return shards
    pickled = [name for name in PICKLED if (directory / name).is_file()]
    if pickled:
        raise CheckpointError(
            f"{directory} holds only {pickled[0]}, a pickled PyTorch file. jaxexit does not load it: "
            "unpickling can run arbitrary code from the file. Convert it once, where you trust it, "
            "with transformers and torch: python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{directory}').save_pretrained('OUT_DIR')\" "
            "(save_pretrained writes model.safetensors), then copy the tokenizer files and load OUT_DIR."
        )
    others = [name for name in OTHER_FORMATS if (directory / name).is_file()]
    found = f" (found {others}; only safetensors is read)" if others else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}{found}")


# ---- the two tables ----------------------------------------------------------------------------
# kind -> {file suffix: (parameter leaf, transpose)}
_KIND = {
    "dense": {"weight": ("kernel", True), "bias": ("bias", False)},
    "norm": {"weight": ("scale", False), "bias": ("bias", False)},
    "embed": {"weight": ("embedding", False)},
}

_BERT_LAYER = {
    "attention.self.query": ("attention/self/query", "dense"),
    "attention.self.key": ("attention/self/key", "dense"),
    "attention.self.value": ("attention/self/value", "dense"),
    "attention.output.dense": ("attention/output/dense", "dense"),
    "attention.output.LayerNorm": ("attention/output/LayerNorm", "norm"),
    "intermediate.dense": ("intermediate/dense", "dense"),
    "output.dense": ("output/dense", "dense"),
    "output.LayerNorm": ("output/LayerNorm", "norm"),
}
_ALBERT_LAYER = {
    "attention.query": ("attention/self/query", "dense"),
    "attention.key": ("attention/self/key", "dense"),
    "attention.value": ("attention/self/value", "dense"),
    "attention.dense": ("attention/output/dense", "dense"),
    "attention.LayerNorm": ("attention/output/LayerNorm", "norm"),
    "ffn": ("intermediate/dense", "dense"),
    "ffn_output": ("output/dense", "dense"),
    "full_layer_layer_norm": ("output/LayerNorm", "norm"),
}


def _module_map(cfg: EncoderConfig) -> dict[str, tuple[str, str]]:
    """File module name -> (parameter path under `backbone/`, kind). The pooler maps to `pooler/...`."""
    modules = {
        "embeddings.word_embeddings": ("embeddings/word_embeddings", "embed"),
        "embeddings.position_embeddings": ("embeddings/position_embeddings", "embed"),
        "embeddings.token_type_embeddings": ("embeddings/token_type_embeddings", "embed"),
        "embeddings.LayerNorm": ("embeddings/LayerNorm", "norm"),
    }
    if cfg.arch == "albert":
        modules["encoder.embedding_hidden_mapping_in"] = ("embeddings/embedding_hidden_mapping_in", "dense")
        modules["pooler"] = ("pooler/dense", "dense")
        layer_table, layer_prefix = _ALBERT_LAYER, "encoder.albert_layer_groups.{}.albert_layers.0."
    else:
        modules["pooler.dense"] = ("pooler/dense", "dense")
        layer_table, layer_prefix = _BERT_LAYER, "encoder.layer.{}."
    for g in range(cfg.num_layer_params):
        for name, (path, kind) in layer_table.items():
            modules[layer_prefix.format(g) + name] = (f"layer/{g}/{path}", kind)
    return modules


def _name_map(cfg: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """File tensor name -> (parameter path, transpose)."""
    table = {}
    for module, (path, kind) in _module_map(cfg).items():
        for suffix, (leaf, transpose) in _KIND[kind].items():
            table[f"{module}.{suffix}"] = (tuple(path.split("/")) + (leaf,), transpose)
    return table


def export_names(cfg: EncoderConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """The table the other way, for writing: prefixed file tensor name (`bert.encoder.layer.0...`, as
    transformers' task classes name them) -> (parameter path, transpose). `load_backbone` reads it back."""
    return {PREFIX[cfg.arch] + name: entry for name, entry in _name_map(cfg).items()}


def _normalise(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.endswith(".gamma"):  # legacy TF-converted LayerNorm names
        name = name[: -len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[: -len(".beta")] + ".bias"
    return name


def _ignored(name: str) -> str | None:
    for pattern, why in IGNORED:
        if pattern.search(name):
            return why
    return None


# ---- loading -----------------------------------------------------------------------------------
def load_backbone(cfg: EncoderConfig, files: list[Path], expected: dict) -> tuple[dict, dict | None]:
    """Read `files` into `(backbone params, pretrained pooler params or None)` as float32 numpy.

    `expected` is the backbone's shape pytree (from `jax.eval_shape`); every leaf must be filled.
    """
    from safetensors import safe_open

    table = _name_map(cfg)
    handles, sources = {}, {}  # normalised name -> (file, original name)
    for file in files:
        try:
            handle = safe_open(str(file), framework="numpy")
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        handles[file] = handle
        for original in handle.keys():
            name = _normalise(original)
            if name in sources:
                raise CheckpointError(f"tensor {original!r} in {file} duplicates {sources[name][1]!r}")
            sources[name] = (file, original)

    unexpected = sorted(
        orig for name, (_, orig) in sources.items() if name not in table and _ignored(name) is None
    )
    if unexpected:
        raise CheckpointError(
            f"unexpected tensors for a {cfg.arch} encoder with {cfg.num_hidden_layers} layers: "
            f"{_head(unexpected)} (the config and the weights disagree, or this is another architecture)"
        )
    ignored = sorted({_ignored(n) for n in sources if n not in table})
    if ignored:
        log.info("ignoring checkpoint tensors: %s", "; ".join(ignored))

    has_pooler = any(name in sources for name, (path, _) in table.items() if path[0] == "pooler")
    missing = sorted(
        name for name, (path, _) in table.items()
        if name not in sources and (path[0] != "pooler" or has_pooler)
    )
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors the {cfg.arch} encoder needs: {_head(missing)}")

    backbone, pooler = {}, {}
    for name, (path, transpose) in table.items():
        if name not in sources:
            continue  # a checkpoint without a pooler
        file, original = sources[name]
        value = handles[file].get_tensor(original)
        if transpose:
            value = value.T
        if path[0] == "pooler":
            want = (cfg.hidden_size,) * (2 if path[-1] == "kernel" else 1)
            _put(pooler, path[1:], value, want, original)
        else:
            _put(backbone, path, value, _get(expected, path).shape, original)
    _check_covered(backbone, expected)
    return backbone, (pooler or None)


def _put(tree: dict, path: tuple[str, ...], value: np.ndarray, want: tuple, name: str) -> None:
    if tuple(value.shape) != tuple(want):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)} where {'/'.join(path)} needs {tuple(want)}"
        )
    if not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f"tensor {name!r} has dtype {value.dtype}, expected a float type")
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = np.asarray(value, dtype=np.float32)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _check_covered(loaded: dict, expected: dict, prefix: str = "backbone") -> None:
    """Every expected leaf was assigned (guards the name table itself)."""
    if set(loaded) != set(expected):
        raise CheckpointError(f"{prefix}: assigned {sorted(loaded)}, model has {sorted(expected)}")
    for key, sub in expected.items():
        if isinstance(sub, dict):
            _check_covered(loaded[key], sub, f"{prefix}/{key}")


def _head(names: list[str], n: int = 8) -> str:
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
