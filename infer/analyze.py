"""The papers' tables and figures for fine-tuned runs: `python infer/analyze.py --help` shows the flags and examples.

The same as the console script `jaxexit-analyze`; the code is in `jaxexit/cli/analyze.py`.
"""

from jaxexit.cli.analyze import main

if __name__ == "__main__":
    raise SystemExit(main())
