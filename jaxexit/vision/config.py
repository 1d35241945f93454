"""Training configuration of the multi-exit CIFAR ResNet: one typed dataclass, one preset per
dataset; every field carries its one-line help (the flags of jaxexit/cli/train_vision.py are made
from them, as jaxexit/cli/finetune.py's are from jaxexit/text/train_config.py).

The presets are He et al.'s CIFAR recipe as PABEE (and PCEE-BERT after it) train ResNet-56:
batch 128, SGD with momentum 0.9 (no Nesterov), learning rate 0.1, weight decay 1e-4, and the
joint weighted loss over the 27 exits. Two things are adapted to short runs and stated here:
* `schedule`: `cosine` (the default) decays 0.1 -> 0 over the run's own total steps, so a
  10-epoch run ends annealed; `step` is the paper's rule scaled to the run, lr / 10 at 50% and
  again at 75% of the total steps (32k and 48k of 64k iterations in the paper, ~164 epochs:
  `--epochs 164 --schedule step` is the full recipe).
* `epochs`: 10 (what a CPU can do in hours); the schedule follows whatever is chosen.
Weight decay is 1e-4 (He et al., PABEE), coupled L2 as in their SGD (added to the gradient before
momentum), on convolution and dense kernels only: never on BatchNorm scales or biases, nor on the
exits' biases.
"""

from __future__ import annotations

import dataclasses

from jaxexit.training.configs import DictConfig, config_field
from jaxexit.vision import images
from jaxexit.vision.resnet import ResNetConfig

SCHEDULES = ("cosine", "step")
DTYPES = ("float32", "bfloat16", "float16")
# Per dataset: the tfds name and the per-channel normalisation of its training images.
DATASETS = {
    "cifar10": (images.CIFAR10_MEAN, images.CIFAR10_STD),
    "cifar100": (images.CIFAR100_MEAN, images.CIFAR100_STD),
}


@dataclasses.dataclass(frozen=True)
class VisionTrainConfig(DictConfig):
    dataset: str = config_field("cifar10", "dataset (set by --config): its tfds name and its normalisation", tuple(DATASETS))
    data_dir: str | None = config_field(None, "image folder {train,test}/<class>/* (offline); none: tensorflow-datasets, "
                                        "downloaded")
    depth: int = config_field(56, "ResNet depth 6n + 2 (56: 27 blocks, hence 27 exits)")
    dtype: str = config_field("float32", "computation dtype of the network (parameters stay float32)", DTYPES)
    batch_size: int = config_field(128, "training batch (global: split over all devices)")
    eval_batch_size: int = config_field(256, "evaluation batch")
    epochs: int = config_field(10, "training epochs (the schedule spans them)")
    lr: float = config_field(0.1, "peak learning rate of SGD")
    momentum: float = config_field(0.9, "SGD momentum (heavy ball, no Nesterov)")
    weight_decay: float = config_field(1e-4, "L2 weight decay on conv and dense kernels only (He et al., PABEE: 1e-4)")
    schedule: str = config_field("cosine", "cosine: lr -> 0 over the run's steps; step: lr / 10 at 50% and 75% of them "
                                     "(He et al.'s 32k/48k of 64k)", SCHEDULES)
    max_steps: int = config_field(0, "stop after this many steps, the schedule spanning them (0: no limit; smoke tests)")
    seed: int = config_field(42, "seed of initialisation, data order and augmentation")
    output_dir: str = config_field("runs", "where runs are written (output_dir/run_name)")
    run_name: str | None = config_field(None, "run directory name (default: <dataset>-resnet<depth>-<time>)")
    save_every: int = config_field(100, "steps between resumable checkpoints, also at every epoch's end (0: epoch ends only)")
    log_every: int = config_field(20, "steps between training records in metrics.jsonl")
    max_train_examples: int = config_field(0, "train on N evenly spaced training images (every class; 0: all)")
    max_eval_examples: int = config_field(0, "evaluate on N evenly spaced test images (every class; 0: all)")

    def __post_init__(self):
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {tuple(DATASETS)}, got {self.dataset!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.save_every >= 0 and self.log_every >= 1, "save_every must be >= 0 and log_every >= 1"),
            (self.max_train_examples >= 0 and self.max_eval_examples >= 0, "max_*_examples must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.model_config(num_classes=1)  # a depth that is not 6n + 2 fails here, with the config

    def model_config(self, num_classes: int) -> ResNetConfig:
        return ResNetConfig(depth=self.depth, num_classes=num_classes, dtype=self.dtype)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the dataset's training images, on the [0, 1] scale."""
        return DATASETS[self.dataset]


PRESETS: dict[str, VisionTrainConfig] = {name: VisionTrainConfig(dataset=name) for name in DATASETS}


def preset(name: str) -> VisionTrainConfig:
    key = name.lower().replace("-", "")
    if key not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]
