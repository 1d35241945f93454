"""Early-exit inference with a fine-tuned checkpoint: `python infer/run.py --help` shows the flags and examples.

The same as the console script `jaxexit-infer`; the code is in `jaxexit/cli/infer.py`.
"""

from jaxexit.cli.infer import main

if __name__ == "__main__":
    raise SystemExit(main())
