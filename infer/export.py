"""Export a fine-tuned run as a Hugging Face checkpoint directory: `python infer/export.py --help` shows the flags.

The same as the console script `jaxexit-export`; the code is in `jaxexit/cli/export.py`.
"""

from jaxexit.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
