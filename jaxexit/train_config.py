"""Fine-tuning configuration: one typed dataclass, one named preset per GLUE task, CLI overrides."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from jaxexit.config import DictConfig
SCHEMES = ("two_stage", "joint")


@dataclasses.dataclass(frozen=True)
class TrainConfig(DictConfig):
    task: str = "sst2"  # GLUE task (sst2, mrpc, cola, stsb, qqp, mnli, qnli, rte)
    model: str = "bert-base-uncased"  # Hugging Face hub id or local checkpoint directory
    data_dir: str | None = None  # local GLUE TSV directory of the task; None: tensorflow-datasets
    scheme: str = "two_stage"  # "two_stage" (DeeBERT) or "joint" (PABEE / PCEE, weights i / sum i)
    ramp_pooler: str | None = None  # None: "per_ramp" for two_stage, "shared" for joint, as the papers
    max_length: int = 128  # tokens per input after truncation
    batch_size: int = 32  # global batch, split over all devices
    eval_batch_size: int = 128
    lr: float = 2e-5  # peak learning rate (stage 1, joint)
    stage2_lr: float | None = None  # None: same as lr
    epochs: float = 3.0  # per stage (fractional epochs allowed)
    stage2_epochs: float | None = None  # None: same as epochs
    stage1_from: str | None = None  # two_stage only: a finished run whose backbone and final ramp stage 2
    #                                 starts from (stage 1 is skipped; ramps 1..L-1 start fresh)
    max_steps: int = 0  # > 0: stop each stage after this many steps (smoke tests, benchmarks)
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of a stage's steps, then linear decay
    weight_decay: float = 0.01  # AdamW decoupled decay; never on biases or LayerNorm
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping of the trained parameters; 0 disables
    seed: int = 42
    output_dir: str = "runs"  # runs are written under output_dir/run_name
    run_name: str | None = None  # None: <task>-<scheme>-<timestamp>
    save_every: int = 500  # steps between resumable checkpoints (and always at an epoch's end)
    log_every: int = 20  # steps between metrics.jsonl training records
    max_train_examples: int = 0  # > 0: use only the first N training examples (tiny runs)
    max_eval_examples: int = 0  # > 0: evaluate on the first N dev examples only

    def __post_init__(self):
        checks = [
            (self.scheme in SCHEMES, f"scheme must be one of {SCHEMES}, got {self.scheme!r}"),
            (self.ramp_pooler in (None, "per_ramp", "shared"), "ramp_pooler must be per_ramp or shared"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (2 <= self.max_length <= 4096, f"max_length must be in [2, 4096], got {self.max_length}"),
            (self.lr > 0 and (self.stage2_lr is None or self.stage2_lr > 0), "learning rates must be > 0"),
            (self.epochs > 0 and (self.stage2_epochs is None or self.stage2_epochs > 0), "epochs must be > 0"),
            (self.stage1_from is None or self.scheme == "two_stage", "stage1_from needs scheme two_stage"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0"),
            (self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1"),
            (self.max_train_examples >= 0 and self.max_eval_examples >= 0, "max_*_examples must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def pooler(self) -> str:
        return self.ramp_pooler or ("per_ramp" if self.scheme == "two_stage" else "shared")

    @property
    def stages(self) -> tuple[int, ...]:
        """1 and 2 for DeeBERT's scheme; 0 stands for the single joint stage."""
        if self.scheme == "joint":
            return (0,)
        return (2,) if self.stage1_from else (1, 2)

    def stage_lr(self, stage: int) -> float:
        return self.stage2_lr if stage == 2 and self.stage2_lr is not None else self.lr

    def stage_epochs(self, stage: int) -> float:
        return self.stage2_epochs if stage == 2 and self.stage2_epochs is not None else self.epochs



# One preset per task: the papers' recipe (bert-base-uncased, max length 128, lr 2e-5, batch 32;
# 3 epochs per stage, as the DeeBERT/BERxiT highway scripts run it).
PRESETS: dict[str, TrainConfig] = {
    task: TrainConfig(task=task) for task in ("sst2", "mrpc", "cola", "stsb", "qqp", "mnli", "qnli", "rte")
}


def preset(name: str) -> TrainConfig:
    key = name.lower().replace("-", "")
    if key not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


# ---- command line --------------------------------------------------------------------------------
def _parser_type(annotation) -> tuple[type, bool]:
    """(scalar type, accepts 'none') for a field annotation like `int | None`."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    scalar = [h for h in hints if h is not type(None)]
    return scalar[0], len(scalar) < len(hints)


def _converter(kind: type, optional: bool):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}{' or none' if optional else ''}, got {text!r}")
    convert.__name__ = kind.__name__
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config PRESET` plus one `--field-name VALUE` per TrainConfig field (typed)."""
    parser.add_argument("--config", default="sst2", help=f"task preset: {', '.join(PRESETS)}")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "task":
            continue  # set by --config
        kind, optional = _parser_type(hints[field.name])
        parser.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, default=None,
            type=_converter(kind, optional), metavar=kind.__name__.upper(),
            help=f"(preset: {field.default})",
        )


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    base = preset(args.config)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "task" and getattr(args, f.name, None) is not None}
    return base.replace(**overrides)
