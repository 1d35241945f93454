"""The exit-policy flags shared by `jaxexit-infer` and `jaxexit-serve`: `--policy`, `--confidence`,
`--ensemble` and each policy parameter, and the policy they name."""

from __future__ import annotations

from jaxexit.exits import policies


# Which policy the given flags name when --policy is absent: (policy, flags that name it, flags it
# also takes). First match wins: --tau means PCEE (patience 1, DeeBERT's rule on normalised
# entropy, unless --patience is given); --patience alone (or with --delta) means PABEE.
_IMPLIED = (
    ("pcee", {"tau"}, {"patience"}),
    ("pabee", {"patience", "delta"}, set()),
    ("entropy", {"S"}, set()),
    ("maxprob", {"t"}, set()),
    ("static", {"k"}, set()),
)


PARAM_FLAGS = ("patience", "tau", "S", "t", "delta", "k")  # infer/run.py's policy parameter flags


def add_policy_flags(p) -> None:
    """The policy flags of infer/run.py and infer/serve.py: `--policy`, `--confidence`,
    `--ensemble` and each parameter in `PARAM_FLAGS`."""
    p.add_argument("--policy", choices=policies.POLICIES, help="default: pcee when only --patience/--tau are given")
    p.add_argument("--confidence", choices=policies.CONFIDENCES,
                   help="pcee's per-layer confidence test: entropy (PCEE-BERT, default: H / ln C < tau), maxprob "
                        "(PCEE-BERT-v1: max p > tau) or learned (PCEE-BERT-v2: the LTE's predicted error < tau)")
    p.add_argument("--ensemble", action="store_true",
                   help="cross-layer ensemble: predict from the mean of ramps 1..m's probabilities (exits unchanged)")
    p.add_argument("--patience", type=int, help="pcee, pabee")
    p.add_argument("--tau", type=float, help="pcee: normalised-entropy threshold in [0, 1]")
    p.add_argument("--S", "--entropy", dest="S", type=float, help="entropy: threshold in nats (DeeBERT)")
    p.add_argument("--t", "--max-prob", dest="t", type=float,
                   help="maxprob: probability threshold; berxit: predicted-error threshold (both in [0, 1])")
    p.add_argument("--delta", type=float, help="pabee on regression: agreement tolerance")
    p.add_argument("--k", type=int, help="static: exit layer")


def policy_name(name: str | None, params: dict) -> str:
    """`--policy`, or the policy its parameter flags imply (see `_IMPLIED`)."""
    given = {k for k, v in params.items() if v is not None}
    if name is not None:
        return name
    if not given:
        raise ValueError("no exit policy: give --policy and its parameters (e.g. --patience 2 --tau 0.2)")
    name = next((n for n, keys, extra in _IMPLIED if given & keys and given <= keys | extra), None)
    if name is None:
        raise ValueError(f"the flags {', '.join('--' + k for k in sorted(given))} do not name one policy; give --policy")
    return name


def policy_label(name: str | None, params: dict, confidence: str | None = None, ensemble: bool = False) -> str:
    """The full policy label (`policies.parse_label`) from `--policy` or the parameter flags, plus
    `--confidence` (pcee) and `--ensemble`."""
    return policies.compose_label(policy_name(name, params), confidence or "entropy", ensemble)


def policy_from_args(name: str | None, params: dict, num_layers: int, num_labels: int,
                     confidence: str | None = None, ensemble: bool = False) -> policies.Policy:
    """The policy `--policy` names, or the one its parameter flags imply (see `_IMPLIED`), with
    `--confidence` and `--ensemble`."""
    given = {k: v for k, v in params.items() if v is not None}
    label = policy_label(name, given, confidence, ensemble)
    if name is None and label.startswith("pcee"):
        given.setdefault("patience", 1)
    return policies.make_policy(label, num_layers, num_labels, **given)
