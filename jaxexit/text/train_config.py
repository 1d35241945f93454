"""Fine-tuning configuration: one typed dataclass, one named preset per GLUE task, CLI overrides."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from jaxexit.text.config import RAMP_INPUTS, RAMP_POOLERS, DictConfig

SCHEMES = ("two_stage", "joint", "alternate")


def config_field(default, help: str, choices: tuple | None = None):
    """A config field with its one-line `--help` text (and choices), kept beside its default."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class TrainConfig(DictConfig):
    task: str = config_field("sst2", "GLUE task (set by --config)")
    model: str = config_field("bert-base-uncased", "Hugging Face hub id or local checkpoint directory to start from")
    data_dir: str | None = config_field(None, "local GLUE TSV directory (the task's or the GLUE root); none: "
                                        "tensorflow-datasets, downloaded")
    skip_bad_rows: bool = config_field(False, "skip malformed TSV rows (reported: how many, where) instead of "
                                        "stopping at the first")
    scheme: str = config_field("two_stage", "two_stage: DeeBERT's two stages; joint: PABEE/PCEE's weighted sum "
                                      "of all ramps' losses; alternate: BERxiT's, even steps the final ramp's "
                                      "loss, odd steps the sum of all ramps' losses", SCHEMES)
    ramp_pooler: str | None = config_field(None, "one pooler per ramp or one shared by all (default: per_ramp for "
                                           "two_stage and alternate, shared for joint, as the papers)", RAMP_POOLERS)
    ramp_input: str = config_field("cls", "what each ramp reads of its layer: cls, the first token (the papers); mean, "
                                    "the masked mean of the token states (mean-pooling checkpoints)", RAMP_INPUTS)
    max_length: int = config_field(128, "tokens per input after truncation")
    batch_size: int = config_field(32, "training batch (global: split over all devices)")
    eval_batch_size: int = config_field(128, "evaluation batch")
    lr: float = config_field(2e-5, "peak learning rate (stage 1, joint)")
    stage2_lr: float | None = config_field(None, "peak learning rate of stage 2 (default: --lr)")
    epochs: float = config_field(3.0, "epochs per stage (fractions allowed)")
    stage2_epochs: float | None = config_field(None, "epochs of stage 2 (default: --epochs)")
    stage1_from: str | None = config_field(None, "two_stage: a finished run whose backbone and final ramp stage 2 "
                                           "starts from (stage 1 skipped, ramps 1..L-1 fresh)")
    lte: bool = config_field(False, "after fine-tuning, train BERxiT's learning-to-exit module in a stage of its own "
                               "(backbone and ramps frozen)")
    lte_from: str | None = config_field(None, "a finished run: train only its learning-to-exit module, on its backbone and "
                                        "ramps, into a new run (implies --lte; scheme and ramp settings from that run)")
    lte_lr: float = config_field(2e-4, "peak learning rate of the LTE stage (castorini/berxit: 2e-4)")
    lte_epochs: float = config_field(1.0, "epochs of the LTE stage (castorini/berxit: 1)")
    max_steps: int = config_field(0, "stop each stage after this many steps (0: no limit; smoke tests)")
    warmup_ratio: float = config_field(0.1, "linear warm-up over this fraction of a stage's steps, then linear decay")
    weight_decay: float = config_field(0.01, "AdamW decoupled weight decay (never on biases or LayerNorm)")
    adam_b1: float = config_field(0.9, "Adam beta1")
    adam_b2: float = config_field(0.999, "Adam beta2")
    adam_eps: float = config_field(1e-8, "Adam epsilon")
    max_grad_norm: float = config_field(1.0, "global-norm gradient clipping of the trained parameters (0: off)")
    seed: int = config_field(42, "seed of initialisation, data order and dropout")
    output_dir: str = config_field("runs", "where runs are written (output_dir/run_name)")
    run_name: str | None = config_field(None, "run directory name (default: <task>-<scheme>-<time>)")
    save_every: int = config_field(500, "steps between resumable checkpoints (also at every epoch's end)")
    log_every: int = config_field(20, "steps between training records in metrics.jsonl")
    max_train_examples: int = config_field(0, "use only the first N training examples (0: all)")
    max_eval_examples: int = config_field(0, "evaluate on the first N dev examples only (0: all)")

    def __post_init__(self):
        checks = [
            (self.scheme in SCHEMES, f"scheme must be one of {SCHEMES}, got {self.scheme!r}"),
            (self.ramp_pooler in (None, *RAMP_POOLERS),
             f"ramp_pooler must be one of {RAMP_POOLERS}, got {self.ramp_pooler!r}"),
            (self.ramp_input in RAMP_INPUTS, f"ramp_input must be one of {RAMP_INPUTS}, got {self.ramp_input!r}"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (2 <= self.max_length <= 4096, f"max_length must be in [2, 4096], got {self.max_length}"),
            (self.lr > 0 and (self.stage2_lr is None or self.stage2_lr > 0), "learning rates must be > 0"),
            (self.epochs > 0 and (self.stage2_epochs is None or self.stage2_epochs > 0), "epochs must be > 0"),
            (self.stage1_from is None or self.scheme == "two_stage", "stage1_from needs scheme two_stage"),
            (self.stage1_from is None or self.lte_from is None, "give stage1_from or lte_from, not both"),
            (self.lte_lr > 0 and self.lte_epochs > 0, "lte_lr and lte_epochs must be > 0"),
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
        return self.ramp_pooler or ("shared" if self.scheme == "joint" else "per_ramp")

    @property
    def stages(self) -> tuple[int, ...]:
        """1 and 2 for DeeBERT's scheme; 0 stands for the single joint stage, 3 for the alternating one;
        4 is the learning-to-exit stage that follows any of them (alone with lte_from)."""
        if self.lte_from:
            return (4,)
        if self.scheme == "joint":
            stages = (0,)
        elif self.scheme == "alternate":
            stages = (3,)
        else:
            stages = (2,) if self.stage1_from else (1, 2)
        return stages + (4,) if self.lte else stages

    @property
    def uses_lte(self) -> bool:
        return self.lte or self.lte_from is not None

    def stage_lr(self, stage: int) -> float:
        if stage == 4:
            return self.lte_lr
        return self.stage2_lr if stage == 2 and self.stage2_lr is not None else self.lr

    def stage_epochs(self, stage: int) -> float:
        if stage == 4:
            return self.lte_epochs
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
def parser_type(annotation) -> tuple[type, bool]:
    """(scalar type, accepts 'none') for a field annotation like `int | None`."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    scalar = [h for h in hints if h is not type(None)]
    return scalar[0], len(scalar) < len(hints)


def converter(kind: type, optional: bool, choices: tuple | None = None):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}{' or none' if optional else ''}, got {text!r}")
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value
    convert.__name__ = kind.__name__
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config PRESET` plus one `--field-name VALUE` per TrainConfig field (`add_field_arguments`)."""
    parser.add_argument("--config", default="sst2", metavar="PRESET",
                        help=f"task preset, the papers' recipe for it: {', '.join(PRESETS)} (default: sst2)")
    add_field_arguments(parser, TrainConfig, skip="task")


def add_field_arguments(parser: argparse.ArgumentParser, config_class, skip: str) -> None:
    """One `--field-name VALUE` per field of `config_class` but `skip` (the one a preset sets),
    typed, with its help and choices; boolean fields are switches (`--skip-bad-rows` /
    `--no-skip-bad-rows`). Every default is None: "not given on the command line"."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name == skip:
            continue
        kind, optional = parser_type(hints[field.name])
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if kind is bool:
            parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        choices = field.metadata["choices"]
        shown = f"{{{','.join(choices)}}}" if choices else kind.__name__.upper()
        parser.add_argument(flag, dest=field.name, default=None, type=converter(kind, optional, choices),
                            metavar=shown, help=help_text if field.default is None else
                            f"{help_text} (preset: {field.default})")


def given_fields(args: argparse.Namespace, config_class, skip: str) -> dict:
    """The fields of `config_class` (but `skip`) given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if f.name != skip and getattr(args, f.name, None) is not None}


def with_flags(base, args: argparse.Namespace, skip: str):
    """`base` (a preset) with the flags' overrides; a value out of range is a ValueError naming its flag."""
    try:
        return base.replace(**given_fields(args, type(base), skip))
    except ValueError as e:
        raise ValueError(flag_names(str(e), type(base))) from None


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The preset with the flags' overrides; a value out of range is a ValueError naming its flag."""
    return with_flags(preset(args.config), args, skip="task")


def flag_names(message: str, config_class) -> str:
    """`message` with each field name of `config_class` written as its command-line flag."""
    for f in dataclasses.fields(config_class):
        message = re.sub(rf"\b{f.name}\b", "--" + f.name.replace("_", "-"), message)
    return message
