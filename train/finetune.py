"""Fine-tune a multi-exit model on GLUE: `python train/finetune.py --help` shows the flags and examples.

The same as the console script `jaxexit-finetune`; the code is in `jaxexit/cli/finetune.py`.
"""

from jaxexit.cli.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
