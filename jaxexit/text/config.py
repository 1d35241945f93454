"""Encoder configuration: one frozen dataclass, read from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxexit.training.configs import DictConfig

# Hugging Face `model_type` -> the architecture family jaxexit implements for it.
ARCHITECTURES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "albert": "albert",
}
RAMP_POOLERS = ("per_ramp", "shared")
RAMP_INPUTS = ("cls", "mean")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(DictConfig):
    """Shape and numerics of a multi-exit encoder.

    Field names follow the Hugging Face config where one exists, so that a config
    read from `config.json` can be compared with the file by eye.
    """

    arch: str = "bert"  # "bert" | "roberta" | "albert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # "gelu" is the exact erf GELU, as in the reference
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    embedding_size: int | None = None  # ALBERT's factorised embedding width (None: hidden_size)
    num_hidden_groups: int = 1  # ALBERT: distinct layer parameter sets shared over the L layers
    # Multi-exit head.
    num_labels: int = 2  # 1 means regression (STS-B)
    ramp_pooler: str = "per_ramp"  # "per_ramp" (DeeBERT) or "shared" (PABEE / PCEE)
    ramp_input: str = "cls"  # what a ramp reads of its layer: the first token (the papers) or the masked mean
    lte: bool = False  # BERxiT's learning-to-exit module (params["lte"]), one for all layers
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as in BERT
    dtype: str = "float32"  # compute dtype; parameters are always float32

    def __post_init__(self):
        _check(self.arch in set(ARCHITECTURES.values()), f"arch must be one of bert, roberta, albert, got {self.arch!r}")
        _check(self.ramp_pooler in RAMP_POOLERS, f"ramp_pooler must be one of {RAMP_POOLERS}, got {self.ramp_pooler!r}")
        _check(self.ramp_input in RAMP_INPUTS, f"ramp_input must be one of {RAMP_INPUTS}, got {self.ramp_input!r}")
        _check(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} is not supported (known: {ACTIVATIONS})")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.num_labels >= 1, f"num_labels must be >= 1, got {self.num_labels}")
        _check(self.num_hidden_layers >= 1, f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}",
        )
        _check(
            self.num_hidden_groups >= 1 and self.num_hidden_layers % self.num_hidden_groups == 0,
            f"num_hidden_layers {self.num_hidden_layers} must be a multiple of num_hidden_groups {self.num_hidden_groups}",
        )
        _check(self.arch == "albert" or self.num_hidden_groups == 1, "num_hidden_groups > 1 is an ALBERT feature")

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def num_layer_params(self) -> int:
        """How many distinct layer parameter sets the backbone holds (L, or ALBERT's groups)."""
        return self.num_hidden_groups if self.arch == "albert" else self.num_hidden_layers

    def layer_param_index(self, layer: int) -> int:
        """Which layer parameter set 0-based layer `layer` uses (ALBERT shares them)."""
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_hidden_layers})")
        if self.arch != "albert":
            return layer
        return layer * self.num_hidden_groups // self.num_hidden_layers

    @property
    def ramp_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    # ---- Hugging Face ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, **overrides: Any) -> "EncoderConfig":
        """Build from a Hugging Face config dict; `overrides` set the multi-exit fields."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; jaxexit implements {sorted(ARCHITECTURES)}"
            )
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        arch = ARCHITECTURES[model_type]
        fields = {
            "arch": arch,
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "num_hidden_layers": hf["num_hidden_layers"],
            "num_attention_heads": hf["num_attention_heads"],
            "intermediate_size": hf["intermediate_size"],
            "hidden_act": hf.get("hidden_act", "gelu"),
            "hidden_dropout_prob": hf.get("hidden_dropout_prob", 0.1),
            "attention_probs_dropout_prob": hf.get("attention_probs_dropout_prob", 0.1),
            "max_position_embeddings": hf.get("max_position_embeddings", 512),
            "type_vocab_size": hf.get("type_vocab_size", 2),
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-12),
            "pad_token_id": hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
            "initializer_range": hf.get("initializer_range", 0.02),
            "classifier_dropout": hf.get("classifier_dropout", hf.get("classifier_dropout_prob")),
        }
        if arch == "albert":
            if hf.get("inner_group_num", 1) != 1:
                raise ValueError("ALBERT with inner_group_num != 1 is not supported (every released ALBERT has 1)")
            fields["embedding_size"] = hf.get("embedding_size", 128)
            fields["num_hidden_groups"] = hf.get("num_hidden_groups", 1)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_file(cls, path: str | Path, **overrides: Any) -> "EncoderConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(hf, **overrides)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
