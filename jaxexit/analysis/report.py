"""The papers' analyses of fine-tuned runs, from one cached pass over a labelled split.

`analyze(run)` writes, for one run (see `infer/analyze.py`):

* DeeBERT Table 1: the full model against the entropy policy (pabee for regression) at the
  largest saving with under 0.5 point drop, within 1 point and within 4 points (the paper's
  "2-4 point" regime), with the measured wall saving of each chosen setting in latency mode;
* PCEE-BERT Table 2: every policy at savings near 25%, 50% and 75% (the best setting whose
  calibration-half saving is within 5 points of each; the nearest if none is), static (budgeted)
  exit as the reference;
* figures: score against saving for every policy (DeeBERT Figure 2, PCEE-BERT Figure 3),
  per-layer score (DeeBERT Figure 4), exit-layer histograms at several thresholds (DeeBERT
  Figure 6), measured wall saving against saving in latency mode (DeeBERT Figure 3), and PCEE
  at patience 1, 2, 3, 6 over a fine tau grid: score against saving and average exit layer
  against tau (PCEE-BERT Figures 7 and 8, its "any speed-up ratio" claim), PABEE's few
  reachable savings beside it;
* PCEE-BERT's ablations: its confidence variants (-v1 max probability, -v2 the learned exit where
  the checkpoint has an LTE) at the Table 2 savings and as score-saving curves (its Figure 4), and
  every policy with and without the cross-layer ensemble (its Figure 6). A checkpoint with an LTE
  adds BERxiT to Table 2 and to the trade-off figure.

Every threshold is chosen on a seeded random half of the split (the calibration half,
`offline.split_halves`; the seed is in `analysis.json`) and reported on the other half (the report
half), so no table entry is tuned on the inputs it is scored on. Scores are in
the task's primary metric (accuracy, F1, MCC, Pearson) as fractions; tables print points (x100).

`tables(analyses)` gathers several runs' `analysis.json` into the markdown tables, with the mean
and standard deviation over seeds where a task and scheme were trained with several seeds.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxexit.text import glue, metrics
from jaxexit.exits import offline, policies, runners
from jaxexit.text.model import EarlyExitModel

TARGET_SAVINGS = (0.25, 0.5, 0.75)  # Table 2: each policy at about these savings (offline.SAVING_BAND)
DEEBERT_DROPS = (0.005, 0.01, 0.04)  # under 0.5 point; within 1 point; within 4 (the "2-4 point" regime)
PCEE_FIGURE_PATIENCE = (1, 2, 3, 6)  # PCEE-BERT Figure 8 (12 layers); those below L are drawn
PCEE_FIGURE_TAUS = tuple(round(float(t), 2) for t in np.linspace(0.0, 1.0, 101))
HISTOGRAM_LEVELS = (0.1, 0.3, 0.6, 0.9)  # entropy thresholds as fractions of ln C


def _calibrated(name, logits, labels, metric, halves, **rule) -> dict:
    """Calibrate on the calibration half, report on the report half; a row with `note` if no
    setting qualifies."""
    try:
        cal = offline.calibrate_on_halves(name, logits, labels, metric, halves, **rule)
    except ValueError as e:
        return {"policy": name, "note": str(e)}
    held = cal.heldout
    return {"policy": name, "params": dict(cal.policy.params), "rule": cal.rule, "score": held["score"],
            "drop": held["drop"], "saving": held["saving"], "avg_layers": held["avg_layers"],
            "calibration_saving": cal.calibration["saving"], "calibration_drop": cal.calibration["drop"],
            "exit_histogram": held["exit_histogram"]}


def deebert_rows(task, logits, labels, halves) -> list[dict]:
    name = "pabee" if task.is_regression else "entropy"
    return [{"max_drop": d, **_calibrated(name, logits, labels, metrics.primary_scorer(task), halves, max_drop=d)}
            for d in DEEBERT_DROPS]


def _near_saving_rows(task, outputs, labels, halves, names) -> list[dict]:
    """Each policy of `names` calibrated near each of the Table 2 savings."""
    return [{"near_saving": t, **_calibrated(name, outputs, labels, metrics.primary_scorer(task), halves,
                                             near_saving=t)}
            for name in names for t in TARGET_SAVINGS]


def _applicable(outputs) -> tuple[str, ...]:
    logits, lte = offline.parts(outputs)
    return offline.applicable(logits.shape[2], lte is not None)


def pcee_rows(task, outputs, labels, halves) -> list[dict]:
    return _near_saving_rows(task, outputs, labels, halves, _applicable(outputs))


def variant_labels(num_labels: int, lte: bool) -> list[str]:
    """PCEE-BERT and its confidence variants (section 4.6.1) that apply: -v1 needs a softmax, -v2 an LTE."""
    if num_labels == 1:
        return ["pcee[learned]"] if lte else []
    return ["pcee", "pcee[maxprob]"] + (["pcee[learned]"] if lte else [])


def variant_rows(task, outputs, labels, halves) -> list[dict]:
    logits, lte = offline.parts(outputs)
    return _near_saving_rows(task, outputs, labels, halves, variant_labels(logits.shape[2], lte is not None))


def ensemble_labels(outputs) -> list[str]:
    """Every policy that applies, each with and without the cross-layer ensemble."""
    return [label for name in _applicable(outputs) for label in (name, name + "+ensemble")]


def ensemble_rows(task, outputs, labels, halves) -> list[dict]:
    """Every policy with and without the cross-layer ensemble at the Table 2 savings."""
    return _near_saving_rows(task, outputs, labels, halves, ensemble_labels(outputs))


def histogram_settings(num_layers: int, num_labels: int) -> list[policies.Policy]:
    """Figure 6's thresholds: entropy at fractions of ln C; pabee patience 1..L-1 for regression."""
    if num_labels == 1:
        return [policies.make_policy("pabee", num_layers, 1, patience=p, delta=0.1) for p in range(1, num_layers)]
    return [policies.make_policy("entropy", num_layers, num_labels, S=round(f * math.log(num_labels), 4))
            for f in HISTOGRAM_LEVELS]


def pcee_curves(logits, labels, metric) -> dict | None:
    """PCEE-BERT Figures 7 and 8 on the whole split (nothing is chosen, so nothing is held out):
    for each patience, score, saving and average exit layer at every tau of a 0.01 grid, and the
    largest saving jump between neighbouring taus (small: any saving in the range is reachable);
    PABEE's reachable savings (one per patience) beside it. None for regression (no entropy)."""
    L, _, C = logits.shape
    if C == 1:
        return None
    patience = [p for p in PCEE_FIGURE_PATIENCE if p < L]
    grid = [{"patience": p, "tau": t} for p in patience for t in PCEE_FIGURE_TAUS]
    rows = offline.sweep(logits, labels, metric, {"pcee": grid})
    curves = []
    for i, p in enumerate(patience):
        part = rows[i * len(PCEE_FIGURE_TAUS):(i + 1) * len(PCEE_FIGURE_TAUS)]
        saving = [r["saving"] for r in part]
        curves.append({"patience": p, "score": [r["score"] for r in part], "saving": saving,
                       "avg_layers": [r["avg_layers"] for r in part],
                       "largest_step": max(abs(b - a) for a, b in zip(saving, saving[1:]))})
    pabee = [{"params": r["params"], "score": r["score"], "saving": r["saving"]}
             for r in offline.sweep(logits, labels, metric, {"pabee": None})]
    return {"taus": list(PCEE_FIGURE_TAUS), "curves": curves, "pabee": pabee}


TIMING_ROUNDS = 3


def wall_savings(model: EarlyExitModel, split, settings: list[policies.Policy], full_latency=runners.run_full_latency,
                 latency=runners.run_latency, rounds: int = TIMING_ROUNDS) -> dict:
    """Latency mode (batch 1) on the same inputs (`split`, as `full_latency(model, split)` and
    `latency(model, policy, split)` take them): in each of `rounds` rounds, every setting is timed
    right after the full model, and its `wall_saving` is 1 - the median over rounds of the paired
    ratio (setting / full), so a slow spell of a shared machine moves both sides of a pair
    together; `seconds` and `full_model_seconds` are medians too."""
    fulls, times, exit_layers = [], [[] for _ in settings], [None] * len(settings)
    for _ in range(rounds):
        for i, policy in enumerate(settings):
            fulls.append(full_latency(model, split)[1])
            exits = latency(model, policy, split)
            times[i].append(exits.seconds)
            exit_layers[i] = exits.exit_layer  # the same every round
    rows = []
    for i, policy in enumerate(settings):
        paired = np.asarray(times[i]) / np.asarray(fulls[i::len(settings)])
        saving = offline.efficiency(exit_layers[i], model.num_layers)["saving"]
        rows.append({"policy": policy.name, "params": dict(policy.params), "saving": saving,
                     "seconds": float(np.median(times[i])), "wall_saving": float(1.0 - np.median(paired)),
                     "wall_saving_rounds": [float(w) for w in 1.0 - paired]})
    return {"inputs": len(split), "rounds": rounds, "full_model_seconds": float(np.median(fulls)), "settings": rows}


def analyze(run_dir, out_dir, data_dir: str | None = None, split: str = "validation", timing_inputs: int = 200,
            command: str = "", split_seed: int = 0, skip_bad_rows: bool = False) -> dict:
    """Every analysis above for one run and one split (`glue.resolve_splits` names MNLI's two dev
    splits; `infer/analyze.py` runs each); writes `analysis.json`, `tables.md`, CSV and PNGs to
    `out_dir`. A `train/train_vision.py` run goes to `analyze_vision`."""
    from jaxexit.cli import infer

    run = infer.resolve_run(str(run_dir))
    if is_vision_run(run.path):
        return analyze_vision(run.path, out_dir, data_dir, timing_inputs, command, split_seed)
    train_cfg = run.train_config()
    task = glue.get_task(train_cfg["task"])
    model = EarlyExitModel.from_run(run.path)
    split_name = glue.canonical_split(task, split)
    data, _ = infer.load_inputs(run, model, task, split_name, data_dir or train_cfg.get("data_dir"),
                                    skip_bad_rows=skip_bad_rows)
    if not data.labelled:
        raise ValueError(f"{task.tsv_dir} {split_name} has no labels; the analyses need a labelled split")
    about = {"task": task.name, "tsv_dir": task.tsv_dir, "split": split_name, "checkpoint": str(run.path),
             "scheme": train_cfg["scheme"], "seed": train_cfg["seed"], "model": train_cfg["model"]}
    return report(task, runners.cached_logits(model, data), data.labels, out_dir, about,
                  lambda rows, settings: wall_savings(model, data.take(rows), settings),
                  timing_inputs, command, split_seed)


def report(task: glue.Task, outputs, labels: np.ndarray, out_dir, about: dict, time_settings, timing_inputs: int,
           command: str = "", split_seed: int = 0) -> dict:
    """The analyses of one run's cached outputs (`[L, N, C]` logits, or `RampOutputs` with an LTE's)
    on a labelled split: `about` names the run and split (task, split, checkpoint, scheme, seed,
    model); `time_settings(rows, policies)` times the chosen settings in latency mode on those
    report-half rows (`wall_savings`)."""
    from jaxexit.cli import infer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logits, lte = offline.parts(outputs)
    L, N, C = logits.shape
    halves = offline.split_halves(N, split_seed)
    cal_rows, report_rows = halves
    metric = metrics.primary_scorer(task)
    result = {
        **about, "metric": metrics.primary_metric(task), "num_layers": L, "n": N, "command": command,
        "split_seed": split_seed, "calibration_n": len(cal_rows), "report_n": len(report_rows),
        "halves": "thresholds " + offline.describe_halves(halves, split_seed),
        "full_score": offline.full_score(logits, labels, metric),
        "full_score_report": offline.full_score(logits[:, report_rows], labels[report_rows], metric),
        "lte": lte is not None,
        "per_layer": [metrics.task_metrics(task, p, labels) for p in offline.ramp_predictions(logits)],
        "deebert": deebert_rows(task, outputs, labels, halves),
        "pcee": pcee_rows(task, outputs, labels, halves),
        "histograms": [offline.evaluate(p, logits, labels, metric).row() for p in histogram_settings(L, C)],
        "pcee_curves": pcee_curves(logits, labels, metric),
        "variants": variant_rows(task, outputs, labels, halves),
        "ensemble": ensemble_rows(task, outputs, labels, halves),
    }
    _, _, sweep_rows = infer.sweep(task, outputs, labels, out / "tradeoff")
    result["settings_swept"] = len(sweep_rows)
    if timing_inputs:
        chosen = [r for r in result["deebert"] + result["histograms"] if "params" in r]
        settings = list({(r["policy"], tuple(r["params"].items())): policies.make_policy(r["policy"], L, C, **r["params"])
                         for r in chosen}.values())
        result["timing"] = time_settings(report_rows[:timing_inputs], settings)
    np.save(out / "logits.npy", logits)
    if lte is not None:
        np.save(out / "lte.npy", lte)
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_per_layer(result, out / "per_layer.png")
    plot_histograms(result, out / "exit_histograms.png")
    if "timing" in result:
        plot_wall_saving(result, out / "wall_saving.png")
    if result["pcee_curves"]:
        plot_pcee_curves(result, out / "pcee_patience.png")
    # Figures 4 and 6 sweep only what the trade-off sweep above did not (its rows are every plain policy).
    def swept(wanted: list[str]) -> list[dict]:
        missing = [label for label in wanted if label not in {r["policy"] for r in sweep_rows}]
        extra = offline.sweep(outputs, labels, metric, dict.fromkeys(missing)) if missing else []
        return [r for r in sweep_rows + extra if r["policy"] in wanted]

    variants = variant_labels(C, lte is not None)
    if len(variants) > 1:  # PCEE-BERT Figure 4: the confidence variants on one checkpoint
        infer.plot_tradeoff(swept(variants), result["metric"], f"{task.tsv_dir}: PCEE-BERT's confidence variants",
                                out / "pcee_variants.png")
    plot_ensemble(result, swept(ensemble_labels(outputs)), out / "ensemble.png")
    (out / "tables.md").write_text(tables([result], command=command))
    return result


# ---- the multi-exit ResNet (PCEE-BERT section 4.6.4) --------------------------------------------------
def is_vision_run(path) -> bool:
    return (Path(path) / "resnet_config.json").is_file()


def vision_task(dataset: str, class_names) -> glue.Task:
    """An image dataset in the shape the tables and metrics take a task: classes, accuracy."""
    display = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(dataset, dataset)
    return glue.Task(name=dataset, tsv_dir=display, text_features=(), tsv_text_columns=(), tsv_label_column="label",
                     label_names=tuple(class_names), metric_names=("accuracy",), dev_splits=("test",))


def analyze_vision(run_dir, out_dir, data_dir: str | None = None, timing_inputs: int = 200, command: str = "",
                   split_seed: int = 0) -> dict:
    """`analyze` for a `train/train_vision.py` run on its test split (the image datasets have no
    dev split; the calibration and report halves are halves of test, as for GLUE dev)."""
    from jaxexit.vision import images, model as vision_model
    from jaxexit.training.checkpoint import read_json

    run_dir = Path(run_dir)
    model = vision_model.VisionExitModel.from_run(run_dir)
    cfg = read_json(run_dir / "train_config.json")
    data_dir = data_dir or cfg.get("data_dir")
    if data_dir:
        pictures, labels, class_names = images.load_image_folder(data_dir, "test")
        source = data_dir
    else:
        pictures, labels, class_names = images.load_tfds(cfg["dataset"], "test")
        source = f"tfds {cfg['dataset']}"
    if model.class_names and tuple(class_names) != model.class_names:
        raise ValueError(f"{source}: classes {list(class_names)[:5]}... differ from the run's {list(model.class_names)[:5]}...")
    task = vision_task(cfg["dataset"], class_names)
    about = {"task": task.name, "tsv_dir": task.tsv_dir, "split": "test", "checkpoint": str(run_dir),
             "scheme": "joint", "seed": cfg["seed"], "model": f"resnet{cfg['depth']}", "data": source}

    def time_settings(rows, settings):
        return wall_savings(model, pictures[rows], settings, vision_model.run_full_latency, vision_model.run_latency)

    return report(task, vision_model.cached_logits(model, pictures), np.asarray(labels), out_dir, about,
                  time_settings, timing_inputs, command, split_seed)


# ---- figures -----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_layer(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    name = result["metric"]
    layers = np.arange(1, len(result["per_layer"]) + 1)
    ax.plot(layers, [r[name] for r in result["per_layer"]], marker="o")
    ax.set_xlabel("exit ramp (layer)")
    ax.set_ylabel(f"{result['tsv_dir']} {result['split']} {name}")
    ax.set_title(f"Per-layer score ({result['scheme']})")
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["histograms"]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.8), dpi=120, sharey=True)
    for ax, r in zip(np.atleast_1d(axes), rows):
        hist = np.asarray(r["exit_histogram"])
        ax.bar(np.arange(1, len(hist) + 1), hist / hist.sum())
        label = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        ax.set_title(f"{r['policy']} {label}\nsaving {r['saving']:.2f}", fontsize=9)
        ax.set_xlabel("exit layer")
        ax.set_xticks(np.arange(1, len(hist) + 1))
    np.atleast_1d(axes)[0].set_ylabel("fraction of inputs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_wall_saving(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["timing"]["settings"]
    fig, ax = plt.subplots(figsize=(4.4, 4.0), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="wall saving = saving")
    ax.scatter([r["saving"] for r in rows], [r["wall_saving"] for r in rows], label="latency mode, batch 1")
    ax.set_xlabel("saving = 1 - avg_layers / L")
    ax.set_ylabel("wall_saving (measured)")
    ax.set_title(f"{result['tsv_dir']}: measured vs expected saving", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(min(0.0, *[r["wall_saving"] for r in rows]) - 0.05, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pcee_curves(result: dict, path: Path) -> None:
    """PCEE-BERT Figure 7 (score vs saving per patience, PABEE's points beside) and Figure 8
    (average exit layer vs tau per patience)."""
    plt = _pyplot()
    curves = result["pcee_curves"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for c in curves["curves"]:
        left.plot(c["saving"], c["score"], marker=".", ms=3, lw=1, label=f"pcee patience {c['patience']}")
        right.plot(curves["taus"], c["avg_layers"], lw=1.5, label=f"patience {c['patience']}")
    left.scatter([r["saving"] for r in curves["pabee"]], [r["score"] for r in curves["pabee"]], marker="x",
                 color="black", zorder=3, label="pabee (patience 1..L)")
    left.set_xlabel("saving = 1 - avg_layers / L")
    left.set_ylabel(f"{result['tsv_dir']} {result['split']} {result['metric']}")
    left.set_title("Score vs saving (PCEE-BERT Figure 7 form)", fontsize=10)
    right.set_xlabel("tau (normalised entropy threshold)")
    right.set_ylabel("average exit layer")
    right.set_ylim(0, result["num_layers"] + 0.2)
    right.set_title("Average exit layer vs tau (PCEE-BERT Figure 8 form)", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ensemble(result: dict, rows: list[dict], path: Path) -> None:
    """PCEE-BERT Figure 6 form: per policy, score against saving with and without the ensemble
    (each the Pareto front of its grid)."""
    from jaxexit.cli import infer

    plt = _pyplot()
    names = list(dict.fromkeys(policies.parse_label(r["policy"])[0] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=120, sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for label, style in ((name, "-"), (name + "+ensemble", "--")):
            front = infer.pareto_front([r for r in rows if r["policy"] == label])
            ax.plot([p[0] for p in front], [p[1] for p in front], style, marker="o", ms=2,
                    label="ensemble" if label != name else "plain")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("saving")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel(f"{result['tsv_dir']} {result['metric']}")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle("With and without the cross-layer ensemble (PCEE-BERT Figure 6 form)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- tables over runs --------------------------------------------------------------------------------
def _pts(values: list[float]) -> str:
    """Points (x100): the value, or mean ± standard deviation over seeds."""
    values = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _setup(analysis: dict) -> str:
    """The run's name without a `-s<seed>` suffix: runs named `<setup>-s<seed>` (as
    results/train_minilm.sh names them) are seeds of `<setup>`."""
    return re.sub(r"-s\d+$", "", Path(analysis["checkpoint"]).name)


def _group(analyses: list[dict], scheme: str) -> dict[str, list[dict]]:
    """Runs of `scheme` by task, and by setup (shown with the task) where a task has several."""
    runs = [a for a in analyses if a["scheme"] == scheme]
    setups = defaultdict(set)
    for a in runs:
        setups[a["tsv_dir"]].add(_setup(a))
    groups = defaultdict(list)
    for a in runs:
        label = a["tsv_dir"] if len(setups[a["tsv_dir"]]) == 1 else f"{a['tsv_dir']} `{_setup(a)}`"
        if a["split"] != "validation":  # MNLI's matched and mismatched, side by side
            label += " " + a["split"].removeprefix("validation_")
        groups[label].append(a)
    return dict(groups)


def _cell(rows: list[dict | None]) -> str:
    rows = [r for r in rows if r is not None]
    if not rows or any("note" in r for r in rows):
        return "n/a"
    return f"{_pts([r['score'] for r in rows])} ({_pts([r['saving'] for r in rows])}%)"


def _wall_saving(analysis: dict, row: dict) -> float | None:
    """The measured wall saving of a chosen setting (latency mode), if it was timed."""
    for t in analysis.get("timing", {}).get("settings", []):
        if t["policy"] == row.get("policy") and t["params"] == row.get("params"):
            return t["wall_saving"]
    return None


def _deebert_cell(runs: list[dict], drop: float) -> str:
    rows = [next(r for r in a["deebert"] if r["max_drop"] == drop) for a in runs]
    cell = _cell(rows)
    walls = [_wall_saving(a, r) for a, r in zip(runs, rows)]
    if cell != "n/a" and all(w is not None for w in walls):
        cell = cell[:-1] + f", wall {_pts(walls)}%)"
    return cell


_SAVING_HEADER = ["| policy | " + " | ".join(f"saving near {int(t * 100)}% on the calibration half"
                                              for t in TARGET_SAVINGS) + " |", "|---|" + "---|" * len(TARGET_SAVINGS)]


def _saving_row(label: str, runs: list[dict], key: str, note: str = "") -> str:
    """One policy's cells at the Table 2 savings, from each run's `key` rows (mean ± sd over runs)."""
    cells = [_cell([next((r for r in a.get(key, []) if r["policy"] == label and r["near_saving"] == t), None)
                    for a in runs]) for t in TARGET_SAVINGS]
    return f"| {label}{note} | " + " | ".join(cells) + " |"


def _ablation_tables(groups: dict[str, list[dict]], scheme: str) -> list[str]:
    """PCEE-BERT's ablations at the Table 2 savings: confidence variants (Figure 4) and each policy
    with and without the ensemble (Figure 6). Runs analysed before these existed are skipped."""
    out = []
    for key, title in (("variants", "PCEE-BERT Figure 4 form: confidence variants (pcee = PCEE-BERT, "
                                    "pcee[maxprob] = -v1, pcee[learned] = -v2)"),
                       ("ensemble", "PCEE-BERT Figure 6 form: each policy with and without the cross-layer ensemble")):
        for task, runs in sorted(groups.items()):
            labels = list(dict.fromkeys(r["policy"] for r in runs[0].get(key, [])))
            if len(labels) < 2:
                continue
            out += [f"### {title} ({scheme} checkpoints)", "", f"{task}, {len(runs)} seed(s):", ""] + _SAVING_HEADER
            out += [_saving_row(label, runs, key) for label in labels] + [""]
    return out


def _coverage_rows(groups: dict[str, list[dict]]) -> list[str]:
    """PCEE-BERT Figure 8's claim in numbers: per patience, the savings tau reaches and the largest
    jump between neighbouring taus; PABEE's reachable savings (first seed of each setup)."""
    out = []
    for task, runs in sorted(groups.items()):
        curves = runs[0].get("pcee_curves")
        if not curves:
            continue
        pcee = "; ".join(f"p={c['patience']}: {100 * min(c['saving']):.0f}-{100 * max(c['saving']):.0f}% "
                         f"(step <= {100 * c['largest_step']:.1f})" for c in curves["curves"])
        pabee = ", ".join(f"{100 * r['saving']:.0f}" for r in sorted(curves["pabee"], key=lambda r: r["saving"]))
        out.append(f"| {task} | {pcee} | {pabee} |")
    if out:
        out = ["| task | PCEE: savings over tau in [0, 1] (largest jump between taus 0.01 apart), % | "
               "PABEE: the only savings it reaches, % |", "|---|---|---|"] + out + [""]
    return out


def tables(analyses: list[dict], command: str = "") -> str:
    """Markdown: DeeBERT Table 1 (two_stage runs), PCEE-BERT Table 2 (joint runs), per-layer scores."""
    out = []
    if command:
        out += [f"Made by: `{command}`", ""]
    for a in analyses:
        if "split_seed" not in a:
            raise ValueError(f"the analysis of {a['checkpoint']} predates seeded calibration halves "
                             "(thresholds chosen on contiguous halves); run infer/analyze.py on it again")
    sizes = sorted({(a["tsv_dir"], a["split"], a["calibration_n"], a["report_n"], a["split_seed"]) for a in analyses})
    halves = "; ".join(f"{task} {split}: {c} calibration / {r} report inputs, split seed {seed}"
                       for task, split, c, r, seed in sizes)
    out += ["Every threshold is chosen on the calibration half of dev (of test for images; a seeded random half) and every "
            f"score and saving below is measured on the other half, the report half ({halves}). "
            "Scores in points of the task's metric; cells are `score (saving %)`; `a ± b` is the mean and "
            "standard deviation over seeds.", ""]
    for scheme in sorted({a["scheme"] for a in analyses}):
        groups = _group(analyses, scheme)
        out += [f"### DeeBERT Table 1 form ({scheme} checkpoints)", "",
                "Largest saving whose drop on the calibration half is at most the column's; `wall` is the "
                "measured wall saving of that setting in latency mode (batch 1, on up to "
                f"{runs_timed(analyses)} report-half inputs{timing_rounds(analyses)}).", "",
                "| task (metric, policy) | seeds | full model | "
                + " | ".join(f"drop {'<' if d == DEEBERT_DROPS[0] else '<='} {100 * d:g}" for d in DEEBERT_DROPS)
                + " |", "|---|---|---|" + "---|" * len(DEEBERT_DROPS)]
        for task, runs in sorted(groups.items()):
            cells = [_deebert_cell(runs, d) for d in DEEBERT_DROPS]
            policy = runs[0]["deebert"][0]["policy"]
            out.append(f"| {task} ({runs[0]['metric']}, {policy}) | {len(runs)} | "
                       f"{_pts([a['full_score_report'] for a in runs])} | " + " | ".join(cells) + " |")
        out.append("")
        out += [f"### PCEE-BERT Table 2 form ({scheme} checkpoints)", ""]
        for task, runs in sorted(groups.items()):
            out += [f"{task} ({runs[0]['metric']}), full model {_pts([a['full_score_report'] for a in runs])}, "
                    f"{len(runs)} seed(s):", ""] + _SAVING_HEADER
            out += [_saving_row(name, runs, "pcee", " (reference)" if name == "static" else "")
                    for name in dict.fromkeys(r["policy"] for r in runs[0]["pcee"])]
            out.append("")
        out += _ablation_tables(groups, scheme)
        coverage = _coverage_rows(groups)
        if coverage:
            out += [f"### PCEE-BERT Figure 8 form: which savings each policy reaches ({scheme} checkpoints, "
                    "whole dev)", ""] + coverage
        depth = max(a["num_layers"] for runs in groups.values() for a in runs)
        out += [f"### Per-layer score ({scheme} checkpoints, whole dev)", "",
                "| task (metric) | " + " | ".join(f"ramp {i + 1}" for i in range(depth)) + " |",
                "|---|" + "---|" * depth]
        for task, runs in sorted(groups.items()):
            metric = runs[0]["metric"]
            cols = [_pts([a["per_layer"][i][metric] for a in runs]) for i in range(runs[0]["num_layers"])]
            out.append(f"| {task} ({metric}) | " + " | ".join(cols + [""] * (depth - len(cols))) + " |")
        out.append("")
    out += _table3(analyses)
    return "\n".join(out)


def _table3(analyses: list[dict]) -> list[str]:
    """PCEE-BERT Table 3 form (its section 4.6.4): on a multi-exit ResNet, PABEE against PCEE at the
    savings nearest 75%, 50% and 25%, beside the full network."""
    runs = [a for a in analyses if str(a.get("model", "")).startswith("resnet")]
    if not runs:
        return []
    targets = sorted(TARGET_SAVINGS, reverse=True)
    out = ["### PCEE-BERT Table 3 form: PABEE against PCEE on the multi-exit ResNet", "",
           "Test accuracy on the report half (thresholds chosen on the calibration half of test); cells are "
           "`accuracy (saving %)`, the saving (PCEE-BERT's speed-up ratio) nearest the column's.", "",
           "| dataset, model | full network | " + " | ".join(f"{p} ~{int(t * 100)}%" for t in targets
                                                            for p in ("PABEE", "PCEE")) + " |",
           "|---|---|" + "---|" * (2 * len(targets))]
    for (task, model), group in sorted(_by(runs, lambda a: (a["tsv_dir"], a["model"])).items()):
        cells = [_cell([next((r for r in a["pcee"] if r["policy"] == p and r["near_saving"] == t), None)
                        for a in group]) for t in targets for p in ("pabee", "pcee")]
        out.append(f"| {task}, {model} | {_pts([a['full_score_report'] for a in group])} | " + " | ".join(cells) + " |")
    return out + [""]


def _by(items, key) -> dict:
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def runs_timed(analyses: list[dict]) -> int:
    return max((a.get("timing", {}).get("inputs", 0) for a in analyses), default=0)


def timing_rounds(analyses: list[dict]) -> str:
    """How the `wall` cells were timed, for the Table 1 caption (analyses older than the paired
    rounds of `wall_savings` hold one measurement each)."""
    rounds = sorted({a["timing"].get("rounds", 1) for a in analyses if "timing" in a})
    if not rounds or rounds == [1]:
        return ""
    older = "; analyses without rounds: one measurement" if 1 in rounds else ""
    return (f"; the median over {'/'.join(map(str, (r for r in rounds if r > 1)))} rounds, each timing the "
            f"setting right after the full model{older}")


def load_analyses(paths) -> list[dict]:
    found = []
    for p in map(Path, paths):
        files = sorted(p.rglob("analysis.json")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no analysis.json under {p}")
        found += [json.loads(f.read_text()) for f in files]
    return found
