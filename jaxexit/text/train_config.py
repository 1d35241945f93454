"""Fine-tuning configuration: one typed dataclass, one named preset per GLUE task; every field
carries its one-line help (the flags of jaxexit/cli/finetune.py are made from them)."""

from __future__ import annotations

import dataclasses

from jaxexit.text.config import RAMP_INPUTS, RAMP_POOLERS
from jaxexit.training.configs import DictConfig, config_field
from jaxexit.training.stages import SCHEME_STAGES, Stage

SCHEMES = tuple(SCHEME_STAGES)


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
    def stages(self) -> tuple[Stage, ...]:
        """The scheme's stages (stage1_from: RAMPS alone), then LTE with `lte` (alone with lte_from)."""
        if self.lte_from:
            return (Stage.LTE,)
        stages = (Stage.RAMPS,) if self.stage1_from else SCHEME_STAGES[self.scheme]
        return stages + (Stage.LTE,) if self.lte else stages

    @property
    def uses_lte(self) -> bool:
        return self.lte or self.lte_from is not None

    def stage_lr(self, stage: Stage) -> float:
        if stage == Stage.LTE:
            return self.lte_lr
        return self.stage2_lr if stage == Stage.RAMPS and self.stage2_lr is not None else self.lr

    def stage_epochs(self, stage: Stage) -> float:
        if stage == Stage.LTE:
            return self.lte_epochs
        return self.stage2_epochs if stage == Stage.RAMPS and self.stage2_epochs is not None else self.epochs


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
