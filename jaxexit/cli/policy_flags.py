"""The exit-policy flags shared by `jaxexit-infer` and `jaxexit-serve`: `--policy`, `--confidence`,
`--ensemble` and each policy parameter, and the policy they name. The parameter flags, and which
policy they name without `--policy`, come from the policy registry (`jaxexit.exits.registry`)."""

from __future__ import annotations

from jaxexit.exits import policies, registry


def _param_flags() -> dict[str, tuple[tuple[str, ...], type, str]]:
    """Parameter name -> (flags, type, help) over every registry entry: one flag per name, its
    help joined over the policies that take it ("pcee: ...; pabee: ...")."""
    flags, kind, helps = {}, {}, {}
    for spec in registry.REGISTRY.values():
        for p in spec.params:
            names = flags.setdefault(p.name, [])
            names += [f for f in p.cli_flags if f not in names]
            kind[p.name] = p.kind
            helps.setdefault(p.name, []).append(f"{spec.name}: {p.help}")
    return {k: (tuple(flags[k]), kind[k], "; ".join(helps[k])) for k in flags}


PARAM_FLAGS = tuple(_param_flags())  # the policy parameter flags' dests (policies.PARAM_NAMES)

# Which policy the given flags name when --policy is absent: (policy, flags that name it, flags it
# also takes), from each entry's `implied_by` / `implied_with`. The entries' `implied_by` sets are
# disjoint, so at most one matches: --tau means PCEE (patience 1, DeeBERT's rule on normalised
# entropy, unless --patience is given); --patience alone (or with --delta) means PABEE; --S
# entropy, --t maxprob, --k static, --margin margin.
_IMPLIED = tuple((s.name, set(s.implied_by), set(s.implied_with))
                 for s in registry.REGISTRY.values() if s.implied_by)


def add_policy_flags(p) -> None:
    """The policy flags of infer/run.py and infer/serve.py: `--policy`, `--confidence`,
    `--ensemble` and each parameter in `PARAM_FLAGS`."""
    p.add_argument("--policy", choices=policies.POLICIES, help="default: pcee when only --patience/--tau are given")
    p.add_argument("--confidence", choices=policies.CONFIDENCES,
                   help="pcee's per-layer confidence test: entropy (PCEE-BERT, default: H / ln C < tau), maxprob "
                        "(PCEE-BERT-v1: max p > tau) or learned (PCEE-BERT-v2: the LTE's predicted error < tau)")
    p.add_argument("--ensemble", action="store_true",
                   help="cross-layer ensemble: predict from the mean of ramps 1..m's probabilities (exits unchanged)")
    for dest, (flags, kind, text) in _param_flags().items():
        p.add_argument(*flags, dest=dest, type=kind, help=text)


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
    """The policy `--policy` names, or the one its parameter flags imply (see `_IMPLIED`, with the
    entry's `implied_defaults`: pcee's patience 1), with `--confidence` and `--ensemble`."""
    given = {k: v for k, v in params.items() if v is not None}
    label = policy_label(name, given, confidence, ensemble)
    if name is None:
        given = {**registry.get(policies.parse_label(label)[0]).implied_defaults, **given}
    return policies.make_policy(label, num_layers, num_labels, **given)
