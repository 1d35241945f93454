"""A certified exit setting from cached ramp outputs: `python infer/calibrate.py --help` shows the flags and examples.

The same as the console script `jaxexit-calibrate`; the code is in `jaxexit/cli/calibrate.py`.
"""

from jaxexit.cli.calibrate import main

if __name__ == "__main__":
    raise SystemExit(main())
