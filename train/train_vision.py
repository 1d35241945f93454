"""Train a multi-exit ResNet on CIFAR (what the console script `jaxexit-train-vision` does).

    python train/train_vision.py --config cifar10 --data-dir /tmp/cifar10     # image folder {train,test}/<class>/*
    python train/train_vision.py --config cifar100                            # tensorflow-datasets (online)
    python train/train_vision.py --config cifar10 --epochs 164 --schedule step   # He et al.'s full recipe
    python train/train_vision.py --resume runs/cifar10-resnet56-20261121-101500
"""

from jaxexit.cli.train_vision import main

if __name__ == "__main__":
    raise SystemExit(main())
