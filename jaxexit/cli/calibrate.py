"""`jaxexit-calibrate` (`infer/calibrate.py`): a certified exit setting from cached ramp outputs.

Learn then Test (`jaxexit.exits.risk.certify`) over one policy's open parameters, on ramp outputs
saved earlier, with no checkpoint: an `.npz` holding `logits [L, N, C]` (and, optionally,
`labels [N]` and the LTE's `lte [L, N]` for learned policies), or an `.npy` of logits alone (the
committed results/*/logits.npy). It prints the certificate's line and, as its last line, the
certificate as one JSON object (a service or a script reads it).
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np

from jaxexit.cli import console
from jaxexit.cli.policy_flags import PARAM_FLAGS, add_policy_flags, policy_label
from jaxexit.exits import risk
from jaxexit.exits.types import RampOutputs

_USAGE = """A certified exit setting from cached ramp outputs (no checkpoint needed).

    python infer/calibrate.py --outputs results/analysis/sst2-joint-per_ramp-e3/logits.npy \\
        --policy entropy --max-risk 0.02            # S: differs from the full model on <= 2% of new inputs
    python infer/calibrate.py --outputs dev.npz --policy pcee --patience 2 --risk drop --max-risk 0.01
    python infer/calibrate.py --outputs stsb.npz --policy pabee --max-risk 0.05 --risk-tolerance 0.5

--outputs: an .npz with logits [L, N, C] (optional: labels [N]; lte [L, N] for learned policies) or
an .npy of logits. The last line printed is the certificate as JSON; with too few inputs it names
the full model (certified: false).
"""


def build_parser() -> argparse.ArgumentParser:
    p = console.Parser(description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outputs", required=True, metavar="FILE",
                   help="cached ramp outputs: .npz (logits [L, N, C], optional labels [N], lte [L, N]) or .npy logits")
    add_policy_flags(p)  # parameters given are held fixed; the others are certified
    p.add_argument("--max-risk", type=float, required=True, metavar="EPS",
                   help="the risk to certify: at most EPS on new inputs with probability >= 1 - --risk-delta")
    p.add_argument("--risk-delta", type=float, default=0.1, metavar="D",
                   help="the probability that the guarantee fails (default 0.1)")
    p.add_argument("--risk", choices=risk.RISKS, default="consistency",
                   help="consistency (default; the exit's prediction differs from the full model's, needs no labels) "
                        "| drop (the full model right, the exit wrong; needs labels in the file)")
    p.add_argument("--risk-bound", choices=risk.BOUNDS, default="binomial",
                   help="p-values: binomial (default; the exact tail) | hb (Hoeffding-Bentkus)")
    p.add_argument("--risk-tolerance", type=float, metavar="T",
                   help="regression only: outputs further apart than T differ (or are wrong)")
    return p


def load_outputs(path: str) -> tuple[object, np.ndarray | None]:
    """`(logits [L, N, C] or RampOutputs(logits, lte), labels [N] or None)` from `path`; ValueError
    naming what is wrong with the file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--outputs {path} does not exist")
    if file.suffix not in (".npz", ".npy"):
        raise ValueError(f"--outputs {path}: expected an .npz (logits, optional labels and lte) or an .npy of logits")
    try:
        arrays = _arrays(file)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"--outputs {path} is not a readable {file.suffix} file ({e})") from e
    if "logits" not in arrays:
        raise ValueError(f"--outputs {path} holds {', '.join(sorted(arrays)) or 'nothing'}, but no 'logits' array")
    logits, labels, lte = arrays["logits"], arrays.get("labels"), arrays.get("lte")
    if logits.ndim != 3 or 0 in logits.shape:
        raise ValueError(f"--outputs {path}: logits must be [L, N, C], got shape {logits.shape}")
    L, n, _ = logits.shape
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"--outputs {path}: labels must be [N] = [{n}] (one per input), got shape {labels.shape}")
    if lte is not None and lte.shape != (L, n):
        raise ValueError(f"--outputs {path}: lte must be [L, N] = [{L}, {n}], got shape {lte.shape}")
    return (logits if lte is None else RampOutputs(logits, lte)), labels


def _arrays(file: Path) -> dict[str, np.ndarray]:
    """The file's arrays by name; an .npy is the logits."""
    data = np.load(file, allow_pickle=False)
    if file.suffix == ".npy" or isinstance(data, np.ndarray):
        if file.suffix == ".npz":
            raise ValueError("it holds one array, not named arrays")
        return {"logits": np.asarray(data)}
    with data:
        return {k: np.asarray(data[k]) for k in data.files}


def _json(value):
    """numpy scalars in a certificate as plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _run(args) -> dict:
    for flag, value in (("--max-risk", args.max_risk), ("--risk-delta", args.risk_delta)):
        if not 0 < value < 1:
            raise ValueError(f"{flag} must be in (0, 1), got {value}")
    outputs, labels = load_outputs(args.outputs)
    if args.risk == "drop" and labels is None:
        raise ValueError(f"the drop risk needs labels, and --outputs {args.outputs} has none (a 'labels' array [N] "
                         "in an .npz); without labels use --risk consistency")
    params = {k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) is not None}
    label = policy_label(args.policy, params, args.confidence, args.ensemble)
    cert = risk.certify(label, outputs, risk=args.risk, max_risk=args.max_risk, delta=args.risk_delta,
                        labels=labels if args.risk == "drop" else None, tolerance=args.risk_tolerance,
                        method=args.risk_bound, fixed=params)
    result = cert.as_dict()
    print(cert.describe())
    print(json.dumps(result, default=_json))
    return result


def run(argv=None) -> dict:
    """The command on `argv` (default: the process's); the certificate as a dict. A user error ends
    it with `error: ...` and exit status 2 (`console.fail`)."""
    args = build_parser().parse_args(argv)
    console.setup(keep_for_file=False)
    try:
        return _run(args)
    except console.USER_ERRORS as e:
        console.fail(str(e), e)


def main(argv=None) -> None:
    """The console script `jaxexit-calibrate`."""
    run(argv)
