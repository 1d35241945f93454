"""A fine-tuned multi-exit model as a Hugging Face checkpoint directory, and back (docs/export.md).

    OUT/
      config.json          transformers' config for the backbone (model_type, sizes, id2label, ...)
                           plus an `early_exit` block: everything needed to rebuild the model exactly
      model.safetensors    the backbone under transformers' own names (`bert.encoder.layer.0...`,
                           `hf_import.export_names`); every ramp, pooler and LTE head under
                           `early_exit.*`; for first-token runs also the final ramp under the names
                           transformers' `*ForSequenceClassification` reads
      tokenizer files      as the tokenizer's save_pretrained writes them
      calibration.npz      optional: every ramp's outputs on a labelled split (the serving table's format)
      README.md            the model card (`export_card`), with `tradeoff.png` when there is a table

`jaxexit.text.checkpoints` opens such a directory where the commands take a run.

Kernels are stored in PyTorch's Linear layout (`[out, in]`, the transpose of Flax's) and float32, so
loading gives back the same bits and the same logits at every ramp.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxexit.exits import offline
from jaxexit.exits.types import RampOutputs
from jaxexit.text import export_card, glue, hf_import, modeling
from jaxexit.text.config import ARCHITECTURES, EncoderConfig
from jaxexit.text.hf_import import CheckpointError
from jaxexit.text.model import TOKENIZER_FILES, EarlyExitModel
from jaxexit.text.tokenization import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG, WEIGHTS, TABLE = "config.json", "model.safetensors", "calibration.npz"
CARD, PLOT = export_card.CARD, export_card.PLOT
BLOCK = "early_exit"
# transformers' sequence-classification class per architecture, and where it reads the final ramp.
CLASSES = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
           "albert": "AlbertForSequenceClassification"}
BASE_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel"}
_RESERVED = ("format_version", "num_ramps", "ramp_input", "ramp_pooler", "lte", "task", "max_length",
             "encoder_config", "calibration")
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "max_position_embeddings", "type_vocab_size")


class Calibration(NamedTuple):
    """Every ramp's outputs on a labelled split: logits `[L, N, C]` (or `RampOutputs` with the LTE's)
    and the labels `[N]`."""

    outputs: np.ndarray | RampOutputs
    labels: np.ndarray
    split: str = "validation"


# ---- tensors -------------------------------------------------------------------------------------
def _head_names(cfg: EncoderConfig) -> dict[str, tuple[str, str]]:
    """transformers' names of the final ramp's pooler and classifier: name -> (module, leaf)."""
    dense = {"weight": "kernel", "bias": "bias"}
    if cfg.arch == "roberta":  # RobertaClassificationHead: dense + tanh, then out_proj
        modules = {"classifier.dense": "pooler", "classifier.out_proj": "classifier"}
    else:
        modules = {hf_import.PREFIX[cfg.arch] + ("pooler" if cfg.arch == "albert" else "pooler.dense"): "pooler",
                   "classifier": "classifier"}
    return {f"{m}.{suffix}": (part, leaf) for m, part in modules.items() for suffix, leaf in dense.items()}


def _own_names(tree: dict, prefix: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    """`early_exit.*` file name -> (path in `tree`, transpose) for the ramps or the LTE head: the
    parameter path with `kernel` written as `weight` (transposed), e.g. `early_exit.ramps.0.classifier.weight`;
    a shared pooler is `early_exit.pooler.dense.weight`."""
    out = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(k.key for k in path)
        *module, leaf = keys
        name = f"{BLOCK}.pooler" if module[:1] == ["pooler"] and prefix == "ramps" else f"{BLOCK}.{prefix}"
        rest = module[1:] if name.endswith(".pooler") else module
        out[".".join([name, *rest, "weight" if leaf == "kernel" else leaf])] = ((prefix, *keys), leaf == "kernel")
    return out


def tensors(model: EarlyExitModel) -> dict[str, np.ndarray]:
    """Every file tensor of `model` (float32, PyTorch layout)."""
    cfg, params = model.config, jax.tree_util.tree_map(np.asarray, model.params)
    out = {}

    def put(name, value, transpose):
        out[name] = np.ascontiguousarray(np.asarray(value, np.float32).T if transpose else value, np.float32)

    for name, (path, transpose) in hf_import.export_names(cfg).items():
        if path[0] != "pooler":
            put(name, _get(params["backbone"], path), transpose)
    for part in ("ramps", "lte") if cfg.lte else ("ramps",):
        for name, (path, transpose) in _own_names(params[part], part).items():
            put(name, _get(params, path), transpose)
    if cfg.ramp_input == "cls":
        final = modeling.ramp_params(cfg, params, cfg.num_hidden_layers - 1)
        for name, (part, leaf) in _head_names(cfg).items():
            module = final[part]["dense"] if part == "pooler" else final[part]
            put(name, module[leaf], leaf == "kernel")
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# ---- config ----------------------------------------------------------------------------------------
def hf_config(cfg: EncoderConfig, label_names: tuple[str, ...] = ()) -> dict:
    """transformers' config of the backbone and, for first-token runs, its classification head."""
    names = label_names if len(label_names) == cfg.num_labels else [f"LABEL_{i}" for i in range(cfg.num_labels)]
    hf = {"model_type": cfg.arch,
          "architectures": [CLASSES[cfg.arch] if cfg.ramp_input == "cls" else BASE_CLASSES[cfg.arch]],
          **{k: getattr(cfg, k) for k in _SIZES},
          "hidden_act": cfg.hidden_act, "hidden_dropout_prob": cfg.hidden_dropout_prob,
          "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob, "layer_norm_eps": cfg.layer_norm_eps,
          "pad_token_id": cfg.pad_token_id, "initializer_range": cfg.initializer_range,
          "classifier_dropout": cfg.classifier_dropout, "position_embedding_type": "absolute",
          "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
          "problem_type": "regression" if cfg.is_regression else "single_label_classification",
          "torch_dtype": "float32"}
    if cfg.arch == "albert":
        hf.update(embedding_size=cfg.embedding_width, num_hidden_groups=cfg.num_hidden_groups, inner_group_num=1,
                  classifier_dropout_prob=cfg.ramp_dropout)
    return hf


def _task(task) -> glue.Task | None:
    return None if task is None else glue.get_task(task)


# ---- saving ----------------------------------------------------------------------------------------
def save_pretrained(model: EarlyExitModel, out_dir: str | os.PathLike, *, task=None,
                    calibration: Calibration | None = None, extra: dict | None = None) -> Path:
    """Write `model` to `out_dir` (see the module docstring); `task` (a GLUE task or its name) names the
    labels, `calibration` adds the table, `extra` (e.g. the scheme, the run) joins the `early_exit` block.
    Atomic: the directory appears complete or not at all; an earlier export there is replaced."""
    cfg, task, out = model.config, _task(task), Path(out_dir)
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra may not set the reserved early_exit fields {clash}")
    if task is not None and task.num_labels != cfg.num_labels:
        raise ValueError(f"task {task.name} has {task.num_labels} labels, the model {cfg.num_labels}")
    if out.exists() and not (out.is_dir() and (is_export(out) or not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not an exported model: choose another directory")
    if dtype := {k: v.dtype for k, v in _leaves(model.params) if v.dtype != np.float32}:
        raise ValueError(f"parameters must be float32 to export exactly, got {dtype}")
    block = {"format_version": FORMAT_VERSION, "num_ramps": cfg.num_hidden_layers, "ramp_input": cfg.ramp_input,
             "ramp_pooler": cfg.ramp_pooler, "lte": cfg.lte, "task": task and task.name,
             "max_length": model.tokenizer and model.tokenizer.max_length, "encoder_config": cfg.to_dict(),
             "calibration": None, **(extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.numpy import save_file

        save_file(tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
        else:
            log.warning("the model has no tokenizer: %s will hold no tokenizer files", out)
        if calibration is not None:
            block["calibration"] = write_table(tmp / TABLE, cfg, calibration, task)
        (tmp / CONFIG).write_text(json.dumps({**hf_config(cfg, task.label_names if task else ()), BLOCK: block},
                                             indent=2) + "\n")
        export_card.write_card(tmp, out.resolve().name, cfg, block, task, calibration)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _leaves(tree):
    return [("/".join(str(k.key) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _replace(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an existing `out` is swapped out first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_table(path: Path, cfg: EncoderConfig, calibration: Calibration, task: glue.Task | None) -> dict:
    """The calibration table as `<run>/serving/outputs-<split>.npz` holds it (logits, labels, lte, meta)."""
    logits, lte = offline.parts(calibration.outputs)
    labels = np.asarray(calibration.labels)
    want = (cfg.num_hidden_layers, len(labels), cfg.num_labels)
    if logits.shape != want:
        raise ValueError(f"calibration outputs have shape {logits.shape}, the model and labels need {want}")
    if lte is not None and lte.shape != want[:2]:
        raise ValueError(f"calibration lte outputs have shape {lte.shape}, expected {want[:2]}")
    meta = {"task": task and task.name, "split": calibration.split, "inputs": len(labels)}
    arrays = {"logits": logits.astype(np.float32), "labels": labels, "meta": np.array(json.dumps(meta))}
    if lte is not None:
        arrays["lte"] = lte.astype(np.float32)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return {"file": TABLE, **meta}


# ---- loading ---------------------------------------------------------------------------------------
def is_export(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a `config.json` with an `early_exit` block."""
    path = Path(directory) / CONFIG
    try:
        return path.is_file() and isinstance(json.loads(path.read_text()).get(BLOCK), dict)
    except (json.JSONDecodeError, AttributeError):
        return False


def read_config(directory: Path) -> tuple[dict, dict, EncoderConfig]:
    """`(hf config, early_exit block, EncoderConfig)`, checked against each other."""
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {directory}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    block = hf.get(BLOCK)
    if not isinstance(block, dict):
        raise CheckpointError(f"{path} has no {BLOCK} block: a plain Hugging Face checkpoint; load it with "
                              "EarlyExitModel.from_pretrained(path, num_labels=...) (fresh ramps)")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {BLOCK}.format_version is {version!r}; this jaxexit reads {FORMAT_VERSION}")
    if not isinstance(block.get("encoder_config"), dict):
        raise CheckpointError(f"{path}: {BLOCK}.encoder_config is missing or not an object (every EncoderConfig "
                              "field, as save_pretrained writes it)")
    try:
        cfg = EncoderConfig.from_dict(block["encoder_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {BLOCK}.encoder_config: {e}") from None

    def agree(field, found, want):
        if found != want:
            raise CheckpointError(f"{path}: {field} is {found!r} but {BLOCK}.encoder_config says {want!r}")

    agree("model_type", ARCHITECTURES.get(hf.get("model_type")), cfg.arch)
    for key in _SIZES:
        agree(key, hf.get(key), getattr(cfg, key))
    agree("id2label (num_labels)", len(hf.get("id2label") or {}), cfg.num_labels)
    agree(f"{BLOCK}.num_ramps", block.get("num_ramps"), cfg.num_hidden_layers)
    for key in ("ramp_input", "ramp_pooler", "lte"):
        agree(f"{BLOCK}.{key}", block.get(key), getattr(cfg, key))
    return hf, block, cfg


def load_pretrained(name_or_path: str | os.PathLike, max_length: int | None = None) -> EarlyExitModel:
    """The model `save_pretrained` wrote (a local directory or a hub id), ramps and all; logits equal
    to the exported model's at every ramp. `max_length` overrides the tokenizer's (the export's)."""
    directory = hf_import.resolve(name_or_path)
    _, block, cfg = read_config(directory)
    files = hf_import.weight_files(directory)
    ids = jax.numpy.zeros((1, 2), jax.numpy.int32)
    expected = jax.eval_shape(lambda: modeling.MultiExitEncoder(cfg).init(jax.random.PRNGKey(0), ids, ids, ids + 1)
                              )["params"]
    where = ", ".join(str(f) for f in files)
    try:
        backbone, _ = hf_import.load_backbone(cfg, files, expected["backbone"])
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    params = {"backbone": backbone, **_load_own(cfg, files, expected)}
    tokenizer = None
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = Tokenizer.from_pretrained(directory, max_length=max_length or block.get("max_length") or 128)
    return EarlyExitModel(cfg, params, tokenizer, source=str(name_or_path))


def _load_own(cfg: EncoderConfig, files: list[Path], expected: dict) -> dict:
    """The ramps (and LTE head) from the `early_exit.*` tensors, every one present with its shape."""
    from safetensors import safe_open

    table = {}
    for part in ("ramps", "lte") if cfg.lte else ("ramps",):
        table.update(_own_names(expected[part], part))
    found = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                if name.startswith(BLOCK + "."):
                    found[name] = (file, handle.get_tensor(name))
    extra, missing = sorted(set(found) - set(table)), sorted(set(table) - set(found))
    if extra or missing:
        what = (f"hold {hf_import._head(extra)}, which" if extra else f"lack {hf_import._head(missing)}, which")
        raise CheckpointError(
            f"{files[0] if len(files) == 1 else files}: the weights {what} {CONFIG}'s {BLOCK} block (num_ramps "
            f"{cfg.num_hidden_layers}, ramp_pooler {cfg.ramp_pooler}, lte {cfg.lte}) "
            + ("does not have" if extra else "needs"))
    params: dict = {}
    for name, (path, transpose) in table.items():
        file, value = found[name]
        value = value.T if transpose else value
        want = tuple(_get(expected, path).shape)
        if tuple(value.shape) != want or not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(value.shape)} ({value.dtype}) where "
                                  f"{'/'.join(path)} needs {want} (float)")
        tree = params
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = np.asarray(value, np.float32)
    return params


def read_table(directory: str | os.PathLike) -> Calibration | None:
    """The export's calibration table, or None when it has none; checked against its config."""
    directory = Path(directory)
    _, block, cfg = read_config(directory)
    if not block.get("calibration"):
        return None
    path = directory / block["calibration"].get("file", TABLE)
    if not path.is_file():
        raise FileNotFoundError(f"{directory / CONFIG} names the calibration table {path.name}, which is not there")
    try:
        with np.load(path) as data:
            logits, labels = data["logits"], data["labels"]
            lte = data["lte"] if "lte" in data else None
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a calibration table (logits, labels, meta as save_pretrained writes "
                              f"them): {e}") from None
    want = (cfg.num_hidden_layers, len(labels), cfg.num_labels)
    if logits.shape != want or labels.ndim != 1:
        raise CheckpointError(f"{path}: logits have shape {logits.shape} and labels {labels.shape}; {CONFIG} and "
                              f"the labels need logits {want} and labels [N]")
    if lte is not None and (not cfg.lte or lte.shape != want[:2]):
        raise CheckpointError(f"{path}: lte outputs have shape {lte.shape}, but {CONFIG}'s {BLOCK}.lte is {cfg.lte} "
                              f"(expected {want[:2] if cfg.lte else 'none'})")
    return Calibration(logits if lte is None else RampOutputs(logits, lte), labels, meta.get("split", "validation"))


def from_pretrained_export(directory: Path, asked: dict, source, max_length: int | None) -> EarlyExitModel | None:
    """`EarlyExitModel.from_pretrained` on an export: the whole model when the settings `asked` (those
    given, not None) agree with it; else None (a warning says why), and the caller imports the backbone
    alone with fresh ramps, as from any Hugging Face checkpoint."""
    _, _, cfg = read_config(directory)
    differ = {k: (v, getattr(cfg, k, None)) for k, v in asked.items() if v is not None and v != getattr(cfg, k, None)}
    if not differ:
        model = load_pretrained(directory, max_length)
        model.source = str(source)
        return model
    said = ", ".join(f"{k} {v!r} (the export has {e!r})" for k, (v, e) in differ.items())
    log.warning("%s is an exported early-exit model, but %s: loading its backbone only, ramps start fresh",
                source, said)
    return None


def push_to_hub(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, api=None) -> str:
    """Upload an export to the Hugging Face Hub (huggingface_hub's `HfApi`, or `api`; its token from
    `hf auth login` or `HF_TOKEN`); the repo is created when missing. Returns the repo's address."""
    if not is_export(out_dir):
        raise ValueError(f"{out_dir} is not an exported model (no {CONFIG} with an {BLOCK} block)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model",
                      commit_message="jaxexit export (early-exit model)")
    return f"https://huggingface.co/{repo_id}"
