"""Certified exit settings (Learn then Test, `jaxexit.exits.risk`) against today's rule on one
run's cached outputs: did the promise "risk <= eps" hold on inputs the setting was not chosen on?

* `analyze(outputs, labels)`:
  * `table`: every policy that applies, eps 0.01 / 0.02 / 0.05, delta 0.1, the consistency risk
    (and the drop risk with labels), certified on the calibration half (`offline.split_halves`,
    the analysis's seed) and measured on the report half: the certified setting, its bound and
    savings, its realised risk and saving, and the same for today's rule (`risk.naive_choice`:
    the largest calibration saving whose calibration risk is <= eps, no guarantee);
  * `violations`: over `splits` random halves (seeds 0..splits-1), for the entropy policy
    (pabee for regression) and pcee, consistency risk: how often each rule's report-half risk
    exceeded eps, and its mean report-half saving. The certified rule promises <= delta.
* `write` puts them in `risk.json`, `risk.md` and `risk_violations.png`; `regenerate` remakes them
  for a committed analysis directory from its `logits.npy` (and `lte.npy`) and the split's labels.

Regression (STS-B) compares outputs within `REGRESSION_TOLERANCE` = 0.2 label units (of 0-5): two
predictions, or a prediction and its label, further apart than that differ.

Every setting's risk events and exit layers are computed once over all N inputs; a split then
only sums columns (one matrix product for all splits), so 100 splits cost seconds.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from jaxexit.exits import offline, policies
from jaxexit.exits import risk as lt
from jaxexit.exits.types import RampOutputs

EPS = (0.01, 0.02, 0.05)
DELTA = 0.1
METHOD = "binomial"
SPLITS = 100
REGRESSION_TOLERANCE = 0.2
GLUE_DATA = "../shared/data/glue"
CIFAR_DATA = "../shared/data/cifar10"


def tolerance_for(num_labels: int) -> float | None:
    return REGRESSION_TOLERANCE if num_labels == 1 else None


def violation_policies(num_labels: int, lte: bool = False) -> list[str]:
    """The policies the violation counts cover: entropy (pabee for regression) and pcee, where they apply."""
    first = "pabee" if num_labels == 1 else "entropy"
    return [p for p in (first, "pcee") if p in offline.applicable(num_labels, lte)]


# ---- one policy's settings, evaluated once -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """A policy's calibration settings (flat, its fixed sequences as index ranges) and the full-model
    fallback (last row), with their risk events and exit layers on all N inputs."""

    label: str
    settings: list
    order: list
    events: np.ndarray      # [G + 1, N] float
    layers: np.ndarray      # [G + 1, N] exit layers
    num_layers: int

    @property
    def fallback(self) -> int:
        return len(self.settings) - 1


def family(label: str, outputs, risk: str, labels=None, tolerance=None) -> Family:
    logits = offline.parts(outputs)[0]
    L, N, C = logits.shape
    order = lt.sequences(label, L, C)
    flat = [policies.make_policy(label, L, C, **s) for seq in order for s in seq]
    events, layers = lt.risk_table(flat, outputs, risk, labels, tolerance)
    # the fallback: the full model (risk 0, every input to layer L)
    events = np.vstack([events, np.zeros((1, N))])
    layers = np.vstack([layers, np.full((1, N), L)])
    starts = np.cumsum([0] + [len(seq) for seq in order])
    return Family(label, flat + [lt.full_model(L, C)], [range(a, b) for a, b in zip(starts[:-1], starts[1:])],
                  events.astype(np.float64), layers.astype(np.float64), L)


def _choices(fam: Family, cal_counts: np.ndarray, cal_saving: np.ndarray, n: int, eps: float,
             delta: float) -> tuple[int, int, int]:
    """(certified index, certified count, today's rule's index) on one calibration half; the
    fallback where a rule picks nothing."""
    g = fam.fallback
    best, rejected = lt.choose(cal_counts[:g], cal_saving[:g], fam.order, n, eps, delta, METHOD)
    naive = lt.naive_choice(cal_counts[:g], cal_saving[:g], n, eps)
    return (g if best is None else best), rejected, (g if naive is None else naive)


def _halves_sums(fam: Family, member: np.ndarray):
    """Calibration-half event counts and exit-layer sums `[G + 1, S]` for halves `member [S, N]` (0/1)."""
    return fam.events @ member.T, fam.layers @ member.T


def _membership(n: int, seeds) -> np.ndarray:
    member = np.zeros((len(seeds), n))
    for i, s in enumerate(seeds):
        member[i, offline.split_halves(n, s)[0]] = 1.0
    return member


# ---- (a) the table on the analysis's own halves ------------------------------------------------------
def table_rows(fam: Family, risk: str, seed: int, eps_values=EPS, delta: float = DELTA) -> list[dict]:
    n_all = fam.events.shape[1]
    cal_rows, report_rows = offline.split_halves(n_all, seed)
    n, m = len(cal_rows), len(report_rows)
    counts, layer_sums = _halves_sums(fam, _membership(n_all, [seed]))
    counts, layer_sums = counts[:, 0], layer_sums[:, 0]
    cal_saving = 1.0 - layer_sums / n / fam.num_layers
    rep_counts = fam.events.sum(1) - counts
    rep_saving = 1.0 - (fam.layers.sum(1) - layer_sums) / m / fam.num_layers

    def measured(i: int) -> dict:
        return {"params": {} if i == fam.fallback else dict(fam.settings[i].params), "full_model": i == fam.fallback,
                "calibration_risk": counts[i] / n, "calibration_saving": cal_saving[i],
                "report_risk": rep_counts[i] / m, "report_saving": rep_saving[i]}

    rows = []
    for eps in eps_values:
        best, rejected, naive = _choices(fam, counts, cal_saving, n, eps, delta)
        level = delta / len(fam.order)
        bound = 0.0 if best == fam.fallback else min(eps, lt.upper_bound(int(counts[best]), n, level, METHOD))
        rows.append({"policy": fam.label, "risk": risk, "max_risk": eps,
                     "certified": {**measured(best), "certified": best != fam.fallback, "bound": bound,
                                   "tested": fam.fallback, "rejected": rejected, "sequences": len(fam.order)},
                     "naive": measured(naive)})
    return rows


# ---- (b) violations over many random halves ------------------------------------------------------------
def violation_rows(fam: Family, seeds, eps_values=EPS, delta: float = DELTA) -> list[dict]:
    n_all = fam.events.shape[1]
    n = n_all // 2
    m = n_all - n
    counts, layer_sums = _halves_sums(fam, _membership(n_all, seeds))
    cal_saving = 1.0 - layer_sums / n / fam.num_layers
    rep_risk = (fam.events.sum(1)[:, None] - counts) / m
    rep_saving = 1.0 - (fam.layers.sum(1)[:, None] - layer_sums) / m / fam.num_layers
    rows = []
    for eps in eps_values:
        picks = {"certified": [], "naive": []}
        certified = 0
        for s in range(len(seeds)):
            best, _, naive = _choices(fam, counts[:, s], cal_saving[:, s], n, eps, delta)
            picks["certified"].append(best)
            picks["naive"].append(naive)
            certified += best != fam.fallback
        row = {"policy": fam.label, "risk": "consistency", "max_risk": eps, "splits": len(seeds)}
        for rule, chosen in picks.items():
            risk_s = rep_risk[chosen, np.arange(len(seeds))]
            saving_s = rep_saving[chosen, np.arange(len(seeds))]
            violations = int(np.sum(risk_s > eps + 1e-12))
            # What Learn then Test promises, with the whole split as the population the halves are drawn
            # from: the chosen setting's risk on all N inputs. The report half adds its own sampling noise
            # (and, being the complement of a half chosen for few events, leans above it).
            population = int(np.sum(fam.events[chosen].mean(1) > eps + 1e-12))
            row[rule] = {"violations": violations, "rate": violations / len(seeds),
                         "population_violations": population, "population_rate": population / len(seeds),
                         "mean_report_risk": float(risk_s.mean()), "mean_report_saving": float(saving_s.mean())}
        row["certified"]["splits_certified"] = int(certified)
        rows.append(row)
    return rows


def analyze(outputs, labels=None, *, split_seed: int = 0, splits: int = SPLITS, eps_values=EPS,
            delta: float = DELTA) -> dict:
    """(a) and (b) above for one run's cached outputs `[L, N, C]` (or RampOutputs) and labels
    `[N]` (None: the consistency risk only)."""
    if splits < 1:
        raise ValueError(f"the violation counts need at least 1 random split, got {splits}")
    logits, lte = offline.parts(outputs)
    L, N, C = logits.shape
    tolerance = tolerance_for(C)
    risks = lt.RISKS if labels is not None else ("consistency",)
    table, violations = [], []
    for risk in risks:
        for label in offline.applicable(C, lte is not None):
            fam = family(label, outputs, risk, labels, tolerance)
            table += table_rows(fam, risk, split_seed, eps_values, delta)
            if risk == "consistency" and label in violation_policies(C, lte is not None):
                violations += violation_rows(fam, range(splits), eps_values, delta)
    cal_rows, report_rows = offline.split_halves(N, split_seed)
    return {"risk_delta": delta, "method": METHOD, "max_risks": list(eps_values), "tolerance": tolerance,
            "risks": list(risks), "n": N, "num_layers": L, "split_seed": split_seed,
            "calibration_n": len(cal_rows), "report_n": len(report_rows),
            "table": _plain(table), "violations": {"seeds": [0, splits - 1], "splits": splits,
                                                   "rows": _plain(violations)}}


def _plain(value):
    """numpy scalars -> Python numbers, for json."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


# ---- files -----------------------------------------------------------------------------------------------
def write(result: dict, out_dir, title: str, command: str = "") -> None:
    """`risk.json`, `risk.md` and `risk_violations.png` under `out_dir`."""
    from jaxexit.analysis import markdown, plots

    out = Path(out_dir)
    result = {**result, "command": command} if command else result
    (out / "risk.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "risk.md").write_text(markdown.risk_tables(result, title))
    plots.plot_risk_violations(result, title, out / "risk_violations.png")


def committed_outputs(analysis_dir):
    d = Path(analysis_dir)
    logits = np.load(d / "logits.npy")
    return RampOutputs(logits, np.load(d / "lte.npy")) if (d / "lte.npy").is_file() else logits


def committed_labels(about: dict, data_dir: str | None = None) -> np.ndarray:
    """The labels of the split an `analysis.json` (`about`) was made on: GLUE dev from `data_dir`
    (a GLUE root or the task's folder; default ../shared/data/glue), image test labels from an
    image folder or ../shared/data/cifar10 (its test images unpacked from the .tar.xz there)."""
    if str(about.get("model", "")).startswith("resnet"):
        return _image_labels([data_dir] if data_dir else [about.get("data"), CIFAR_DATA])
    from jaxexit.text import glue

    task = glue.get_task(about["task"])
    root = Path(data_dir or GLUE_DATA)
    folder = root / task.tsv_dir if (root / task.tsv_dir).is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"no GLUE data at {folder} (--data-dir names the GLUE root or the task's folder)")
    return glue.labels_array(task, glue.load_examples(task, about["split"], folder))


def _image_labels(candidates) -> np.ndarray:
    from jaxexit.vision import images

    for c in filter(None, candidates):
        c = Path(c)
        if (c / "test").is_dir():
            return images.load_image_folder(c, "test")[1]
        packed = sorted(c.glob("*.tar.xz")) if c.is_dir() else []
        if packed:
            with tempfile.TemporaryDirectory() as tmp, tarfile.open(packed[0]) as tar:
                tar.extractall(tmp, members=[t for t in tar if t.name.startswith("test/")], filter="data")
                return images.load_image_folder(tmp, "test")[1]
    raise FileNotFoundError(f"no image test split (test/<class>/ or a .tar.xz) in {[str(c) for c in candidates if c]}")


def title_of(about: dict) -> str:
    return f"{about['tsv_dir']} {about['split']}, `{Path(about['checkpoint']).name}`"


def regenerate(analysis_dir, data_dir: str | None = None, splits: int = SPLITS, command: str = "") -> dict:
    """`risk.*` for a committed analysis directory, from its logits and the split's labels (no checkpoint)."""
    d = Path(analysis_dir)
    if not (d / "analysis.json").is_file() or not (d / "logits.npy").is_file():
        raise FileNotFoundError(f"{d} holds no analysis.json and logits.npy (an infer/analyze.py output directory)")
    about = json.loads((d / "analysis.json").read_text())
    outputs = committed_outputs(d)
    labels = committed_labels(about, data_dir)
    n = offline.parts(outputs)[0].shape[1]
    if len(labels) != n:
        raise ValueError(f"{d}: logits for {n} inputs, but the labels found hold {len(labels)}")
    result = analyze(outputs, labels, split_seed=about.get("split_seed", 0), splits=splits)
    write(result, d, title_of(about), command)
    return result
