"""Serve a fine-tuned run over HTTP, its speed/quality trade-off turned while it runs: `python infer/serve.py --help` shows the flags and examples.

The same as the console script `jaxexit-serve`; the code is in `jaxexit/cli/serve.py`.
"""

from jaxexit.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
