"""The model card of an export (`README.md` in the Hub's format, with its YAML header) and its trade-off
plot (`tradeoff.png`, beside it), written by `export.save_pretrained` (docs/export.md, "The model card").

With a calibration table (every ramp's outputs on the labelled dev split) and a task, the card holds:
each ramp's score; the offline trade-off (every applicable policy's default grid swept over the table:
the best score at a saving of at least 25%, 50% and 75%, in-sample, so no guarantee on other inputs);
the certified settings (Learn then Test over the whole table, `jaxexit.exits.risk.certify`: the entropy
and pcee settings whose answers differ from the full model's on at most eps of new inputs, eps 0.01,
0.02 and 0.05, with probability >= 0.9); the plot; and the two lines that load and serve the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxexit.exits import offline, risk
from jaxexit.text import glue, metrics
from jaxexit.text.config import EncoderConfig

CARD, PLOT = "README.md", "tradeoff.png"
TARGETS = (0.25, 0.5, 0.75)            # the trade-off table's savings
RISK_EPS, RISK_DELTA = (0.01, 0.02, 0.05), 0.1
CERTIFIED = ("entropy", "pcee")         # policies certified on the card (classification)


def write_card(directory: Path, name: str, cfg: EncoderConfig, block: dict, task: glue.Task | None,
               calibration) -> Path:
    """Write `README.md` (and, with a table and a task, `tradeoff.png`) into `directory`; `name` is the
    export's directory name, as the card's load and serve lines use it."""
    directory = Path(directory)
    tables = None
    if calibration is not None and task is not None:
        tables = _tables(cfg, task, calibration)
        _plot(tables, task, directory / PLOT)
    (directory / CARD).write_text(model_card(name, cfg, block, task, tables))
    return directory / CARD


def _yaml(value) -> str:
    return json.dumps(value)  # JSON is YAML: every string quoted and escaped


def model_card(name: str, cfg: EncoderConfig, block: dict, task: glue.Task | None, tables: dict | None) -> str:
    """The card's markdown (see the module docstring); `tables` from `_tables`, or None."""
    header = ["---", "library_name: jaxexit", "pipeline_tag: text-classification",
              f"tags: {_yaml(['early-exit', 'jax', 'flax', cfg.arch])}"]
    if task is not None:
        header += [f"datasets: {_yaml(['glue'])}", f"metrics: {_yaml([metrics.primary_metric(task)])}"]
    ramps = "first token" if cfg.ramp_input == "cls" else "masked mean"
    lines = [*header, "---", "", f"# Early-exit {cfg.arch.upper()}" + (f" for {task.tsv_dir}" if task else ""), "",
             f"A {cfg.num_hidden_layers}-layer {cfg.arch} encoder with a classifier (ramp) after every layer, "
             f"exported by jaxexit. Ramps read the {ramps} of their layer; poolers: {cfg.ramp_pooler}"
             + (", with a learning-to-exit head" if cfg.lte else "") + ".", ""]
    lines += _training(block, task)
    if tables is not None:
        lines += _score_lines(tables)
    lines += _use(name, cfg, tables)
    return "\n".join(lines)


def _training(block: dict, task: glue.Task | None) -> list[str]:
    recipe = block.get("recipe") or {}
    if task is None and not recipe and not block.get("scheme"):
        return []
    lines = ["## Training", ""]
    if task is not None:
        lines.append(f"* task: GLUE {task.tsv_dir} ({task.name}), labels "
                     + (", ".join(f"`{n}`" for n in task.label_names) if task.label_names else "a score (regression)"))
    if block.get("scheme"):
        lines.append(f"* scheme: `{block['scheme']}`")
    lines += [f"* {key}: `{value}`" for key, value in recipe.items() if key != "scheme"]
    return lines + [""]


# ---- numbers -----------------------------------------------------------------------------------------
def _tables(cfg: EncoderConfig, task: glue.Task, calibration) -> dict:
    """Per-ramp scores, the sweep rows, the trade-off rows and the certificates on the table."""
    outputs, labels = calibration.outputs, np.asarray(calibration.labels)
    score = metrics.primary_scorer(task)
    logits = offline.parts(outputs)[0]
    rows = offline.sweep(outputs, labels, score)
    full = offline.full_score(outputs, labels, score)
    tradeoff = []
    for label in dict.fromkeys(r["policy"] for r in rows):
        mine = [offline.with_drop(r, full) for r in rows if r["policy"] == label]
        for target in TARGETS:
            try:
                index, _ = offline.choose(mine, target_saving=target, name=label)
            except ValueError:
                tradeoff.append({"policy": label, "target": target, "row": None,
                                 "reach": max(r["saving"] for r in mine)})
                continue
            tradeoff.append({"policy": label, "target": target, "row": mine[index]})
    certified = []
    if not cfg.is_regression:  # regression's consistency risk needs a tolerance only its user can give
        for label in CERTIFIED:
            for eps in RISK_EPS:
                cert = risk.certify(label, outputs, risk="consistency", max_risk=eps, delta=RISK_DELTA)
                certified.append((label, cert, offline.evaluate(cert.policy, outputs, labels, score).score))
    return {"task": task, "split": calibration.split, "n": logits.shape[1], "metric": metrics.primary_metric(task),
            "per_ramp": [score(p, labels) for p in offline.ramp_predictions(outputs)], "full": full,
            "rows": rows, "tradeoff": tradeoff, "certified": certified, "regression": cfg.is_regression}


def _setting(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _score_lines(t: dict) -> list[str]:
    task, name, n = t["task"], t["metric"], t["n"]
    lines = [f"## Scores on {task.tsv_dir} {t['split']} ({n} inputs)", "",
             f"Every ramp alone (ramp i exits after layer i; ramp {len(t['per_ramp'])} is the full model):", "",
             f"| ramp | {name} |", "|---|---|"]
    lines += [f"| {i + 1} | {s:.4f} |" for i, s in enumerate(t["per_ramp"])]
    lines += ["", "## Trade-off", "",
              f"Each policy's best {name} with at least the target saving (saving = 1 - average layers / "
              f"{len(t['per_ramp'])}), from the offline sweep of its default grid over the same {n} inputs. "
              "Chosen and scored on the same inputs: a description of this split, no guarantee on others "
              f"(the full model: {t['full']:.4f}).", "",
              f"| policy | target saving | saving | avg layers | {name} | drop | setting |",
              "|---|---|---|---|---|---|---|"]
    for entry in t["tradeoff"]:
        row = entry["row"]
        if row is None:
            lines.append(f"| {entry['policy']} | {entry['target']:.2f} | - | - | - | - | "
                         f"unreached (at most {entry['reach']:.3f}) |")
        else:
            lines.append(f"| {entry['policy']} | {entry['target']:.2f} | {row['saving']:.3f} | {row['avg_layers']:.2f} "
                         f"| {row['score']:.4f} | {row['drop']:+.4f} | {_setting(row['params'])} |")
    lines += ["", f"![{name} against saving, every policy]({PLOT})", ""]
    lines += ["## Certified settings", ""]
    if t["regression"]:
        return lines + ["A regression model's consistency risk needs a tolerance (how far apart two scores may be and "
                        "still agree), which only its user can choose: certify one with `jaxexit-infer --checkpoint "
                        "DIR --policy pabee --max-risk 0.05 --risk-tolerance T`.", ""]
    lines += [f"Learn then Test over the {n} inputs above (`jaxexit.exits.risk.certify`, exact binomial p-values, "
              f"fixed-sequence testing): with probability at least {1 - RISK_DELTA:g}, the certified setting's "
              "answer differs from the full model's on at most eps of new inputs from the same distribution "
              "(the consistency risk; no labels needed). Saving and score are on these inputs. Where nothing is "
              "certified the full model answers.", "",
              f"| policy | eps | setting | risk bound | saving | {name} |", "|---|---|---|---|---|---|"]
    for label, cert, score in t["certified"]:
        if cert.certified:
            lines.append(f"| {label} | {cert.max_risk:g} | {_setting(cert.params)} | {cert.bound:.4f} | "
                         f"{cert.saving:.3f} | {score:.4f} |")
        else:
            lines.append(f"| {label} | {cert.max_risk:g} | none: {cert.reason} | - | 0.000 | {score:.4f} |")
    return lines + [""]


def _use(name: str, cfg: EncoderConfig, tables: dict | None) -> list[str]:
    serve = f"jaxexit-serve --checkpoint {name}"
    if tables is not None:
        pcee = [c for label, c, _ in tables["certified"] if label == "pcee" and c.certified and c.saving > 0]
        reach = max((r["saving"] for r in tables["rows"] if r["policy"] == "pcee"), default=0.0)
        if pcee:
            serve += f" --max-risk {pcee[0].max_risk:g}"
        elif reach >= 0.05:
            serve += f" --target-saving {math.floor(min(reach, 0.5) * 20) / 20:g}"
    lines = ["## Use", "", "Load it (this directory, or its Hub id once pushed) and serve it over HTTP:", "",
             "```python", "from jaxexit import EarlyExitModel",
             f"model = EarlyExitModel.from_pretrained({_yaml(name)})  # every ramp, exactly", "```", "",
             "```bash", f"{serve}  # from the Hub: hf download REPO_ID --local-dir {name}", "```", "",
             "`model.ramp_logits(model.tokenize([\"a sentence\"]))` gives every ramp's logits `[ramps, batch, "
             "labels]`; the service answers `POST /v1/classify` and takes a new policy at `PUT /v1/policy`.", ""]
    if cfg.ramp_input == "cls":
        lines += ["In PyTorch, `transformers.AutoModelForSequenceClassification.from_pretrained(...)` loads the "
                  "backbone and the final ramp (the full model's classifier); the other ramps are the "
                  "`early_exit.*` tensors, which transformers does not use.", ""]
    else:
        lines += ["In PyTorch, `transformers.AutoModel.from_pretrained(..., output_hidden_states=True)` gives every "
                  "layer's hidden states; ramp i applies `tanh(pooler(mean))` then the classifier, with the "
                  "`early_exit.ramps.<i-1>.*` tensors (`early_exit.pooler.*` when shared), `mean` being the "
                  "attention-masked mean of layer i's token states.", ""]
    return lines


# ---- the plot ----------------------------------------------------------------------------------------
def pareto_front(rows: list[dict]) -> list[tuple[float, float]]:
    """(saving, score) points no other row beats on both, from the largest saving down."""
    front, best = [], -math.inf
    for saving, score in sorted(((r["saving"], r["score"]) for r in rows), key=lambda p: (-p[0], -p[1])):
        if score > best:
            front.append((saving, score))
            best = score
    return front[::-1]


def _plot(t: dict, task: glue.Task, path: Path) -> None:
    """Score against saving: each policy's Pareto front over its grid, the full model, the certified settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    try:
        for label in dict.fromkeys(r["policy"] for r in t["rows"]):
            front = pareto_front([r for r in t["rows"] if r["policy"] == label])
            ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=3, label=label)
        ax.axhline(t["full"], color="grey", lw=0.8, ls="--", label="full model")
        done = [(c.saving, s) for _, c, s in t["certified"] if c.certified]
        if done:
            ax.scatter(*zip(*done), marker="*", s=90, color="black", zorder=5,
                       label=f"certified (eps {', '.join(f'{e:g}' for e in RISK_EPS)})")
        ax.set_xlabel("saving = 1 - avg layers / L")
        ax.set_ylabel(t["metric"])
        ax.set_title(f"{task.tsv_dir} {t['split']} ({t['n']} inputs): offline trade-off")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
