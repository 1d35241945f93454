"""The papers' analyses of fine-tuned runs, from one cached pass over a labelled split.

`analyze(run)` writes, for one run (`jaxexit-analyze`, `infer/analyze.py`):

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
* certified exit settings (`jaxexit.analysis.risk`): per policy and eps, the Learn-then-Test
  setting against today's rule on the report half, and how often each broke "risk <= eps" over
  100 random halves (`risk.md`, `risk.json`, `risk_violations.png`);
* PCEE-BERT's ablations: its confidence variants (-v1 max probability, -v2 the learned exit where
  the checkpoint has an LTE) at the Table 2 savings and as score-saving curves (its Figure 4), and
  every policy with and without the cross-layer ensemble (its Figure 6). A checkpoint with an LTE
  adds BERxiT to Table 2 and to the trade-off figure.

Every threshold is chosen on a seeded random half of the split (the calibration half,
`offline.split_halves`; the seed is in `analysis.json`) and reported on the other half (the report
half), so no table entry is tuned on the inputs it is scored on. Scores are in
the task's primary metric (accuracy, F1, MCC, Pearson) as fractions; tables print points (x100).

`tables(analyses)` (`jaxexit.analysis.markdown`) gathers several runs' `analysis.json` into the
markdown tables, with the mean and standard deviation over seeds where a task and scheme were
trained with several seeds. The numbers come from `compute`, the figures from `plots`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxexit.analysis import compute, inference, plots
from jaxexit.analysis import risk as risk_analysis
from jaxexit.analysis.markdown import tables
from jaxexit.exits import offline, policies, runners
from jaxexit.text import glue, metrics
from jaxexit.text.inputs import load_inputs
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.runs import resolve_run


def analyze(run_dir, out_dir, data_dir: str | None = None, split: str = "validation", timing_inputs: int = 200,
            command: str = "", split_seed: int = 0, skip_bad_rows: bool = False) -> dict:
    """Every analysis above for one run and one split (`glue.resolve_splits` names MNLI's two dev
    splits; `infer/analyze.py` runs each); writes `analysis.json`, `tables.md`, CSV and PNGs to
    `out_dir`. A `train/train_vision.py` run goes to `analyze_vision`."""
    run = resolve_run(str(run_dir))
    if is_vision_run(run.path):
        return analyze_vision(run.path, out_dir, data_dir, timing_inputs, command, split_seed)
    train_cfg = run.train_config()
    task = glue.get_task(train_cfg["task"])
    model = EarlyExitModel.from_run(run.path)
    split_name = glue.canonical_split(task, split)
    data, _ = load_inputs(run, model, task, split_name, data_dir or train_cfg.get("data_dir"),
                          skip_bad_rows=skip_bad_rows)
    if not data.labelled:
        raise ValueError(f"{task.tsv_dir} {split_name} has no labels; the analyses need a labelled split")
    about = {"task": task.name, "tsv_dir": task.tsv_dir, "split": split_name, "checkpoint": str(run.path),
             "scheme": train_cfg["scheme"], "seed": train_cfg["seed"], "model": train_cfg["model"]}
    return report(task, runners.cached_logits(model, data), data.labels, out_dir, about,
                  lambda rows, settings: compute.wall_savings(model, data.take(rows), settings),
                  timing_inputs, command, split_seed)


def report(task: glue.Task, outputs, labels: np.ndarray, out_dir, about: dict, time_settings, timing_inputs: int,
           command: str = "", split_seed: int = 0) -> dict:
    """The analyses of one run's cached outputs (`[L, N, C]` logits, or `RampOutputs` with an LTE's)
    on a labelled split: `about` names the run and split (task, split, checkpoint, scheme, seed,
    model); `time_settings(rows, policies)` times the chosen settings in latency mode on those
    report-half rows (`compute.wall_savings`)."""
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
        "deebert": compute.deebert_rows(task, outputs, labels, halves),
        "pcee": compute.pcee_rows(task, outputs, labels, halves),
        "histograms": [offline.evaluate(p, logits, labels, metric).row() for p in compute.histogram_settings(L, C)],
        "pcee_curves": compute.pcee_curves(logits, labels, metric),
        "variants": compute.variant_rows(task, outputs, labels, halves),
        "ensemble": compute.ensemble_rows(task, outputs, labels, halves),
    }
    _, _, sweep_rows = inference.sweep(task, outputs, labels, out / "tradeoff")
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
    plots.plot_per_layer(result, out / "per_layer.png")
    plots.plot_histograms(result, out / "exit_histograms.png")
    if "timing" in result:
        plots.plot_wall_saving(result, out / "wall_saving.png")
    if result["pcee_curves"]:
        plots.plot_pcee_curves(result, out / "pcee_patience.png")
    # Figures 4 and 6 sweep only what the trade-off sweep above did not (its rows are every plain policy).
    def swept(wanted: list[str]) -> list[dict]:
        missing = [label for label in wanted if label not in {r["policy"] for r in sweep_rows}]
        extra = offline.sweep(outputs, labels, metric, dict.fromkeys(missing)) if missing else []
        return [r for r in sweep_rows + extra if r["policy"] in wanted]

    variants = compute.variant_labels(C, lte is not None)
    if len(variants) > 1:  # PCEE-BERT Figure 4: the confidence variants on one checkpoint
        plots.plot_tradeoff(swept(variants), result["metric"], f"{task.tsv_dir}: PCEE-BERT's confidence variants",
                            out / "pcee_variants.png")
    plots.plot_ensemble(result, swept(compute.ensemble_labels(outputs)), out / "ensemble.png")
    (out / "tables.md").write_text(tables([result], command=command))
    # Certified exit settings against today's rule (risk.md, risk.json, risk_violations.png).
    risk_analysis.write(risk_analysis.analyze(outputs, labels, split_seed=split_seed), out,
                        risk_analysis.title_of(result), command)
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
    from jaxexit.training.checkpoint import read_json
    from jaxexit.vision import images
    from jaxexit.vision.model import VisionExitModel

    run_dir = Path(run_dir)
    model = VisionExitModel.from_run(run_dir)
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
        return compute.wall_savings(model, pictures[rows], settings, runners.run_full_latency, _latency)

    outputs = runners.cached_logits(model, pictures, batch_size=min(256, max(len(pictures), 1)))
    return report(task, outputs, np.asarray(labels), out_dir, about,
                  time_settings, timing_inputs, command, split_seed)


def _latency(model, policy, pictures):
    """Latency mode on a ResNet: host decisions between blocks (the pipelined form is the text
    encoder's)."""
    return runners.run_latency(model, policy, pictures, pipelined=False)
