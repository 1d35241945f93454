"""Train a multi-exit ResNet on CIFAR: `python train/train_vision.py --help` shows the flags and examples.

The same as the console script `jaxexit-train-vision`; the code is in `jaxexit/cli/train_vision.py`.
"""

from jaxexit.cli.train_vision import main

if __name__ == "__main__":
    raise SystemExit(main())
