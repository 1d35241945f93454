"""The figures: score against saving (`plot_tradeoff`, DeeBERT Figure 2 / PCEE-BERT Figure 3) and
the figures of one run's analysis (`jaxexit.analysis.report`). docs/analysis.md says which paper
figure each one reproduces. matplotlib is imported on first use, with the Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxexit.exits import policies


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(rows: list[dict]) -> list[tuple[float, float]]:
    """(saving, score) points no other row beats on both, from the largest saving down."""
    front, best = [], -math.inf
    for saving, score in sorted(((r["saving"], r["score"]) for r in rows), key=lambda p: (-p[0], -p[1])):
        if score > best:  # from the largest saving down: keep points that improve the score
            front.append((saving, score))
            best = score
    return front


def plot_tradeoff(rows: list[dict], metric_name: str, title: str, path: Path) -> None:
    """Score against saving, one curve per policy (its Pareto front over the grid) plus all points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        ax.scatter([r["saving"] for r in mine], [r["score"] for r in mine], s=6, alpha=0.25)
        front = pareto_front(mine)
        ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=3, label=name,
                color=ax.collections[-1].get_facecolor()[0][:3])
    ax.set_xlabel("saving = 1 - avg_layers / L")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    plt = _pyplot()
    names = list(dict.fromkeys(policies.parse_label(r["policy"])[0] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), dpi=120, sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for label, style in ((name, "-"), (name + "+ensemble", "--")):
            front = pareto_front([r for r in rows if r["policy"] == label])
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


def plot_risk_violations(result: dict, title: str, path: Path) -> None:
    """How often the report half's consistency risk exceeded eps over the random halves, today's
    rule against the certified one, per policy, with delta (the certified rule's promise)."""
    plt = _pyplot()
    rows = result["violations"]["rows"]
    names = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), dpi=120, sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["policy"] == name]
        eps = [100 * r["max_risk"] for r in mine]
        for rule, style, label in (("naive", "o-", "today's rule"), ("certified", "s-", "certified")):
            line, = ax.plot(eps, [r[rule]["rate"] for r in mine], style, label=f"{label}, report half")
            ax.plot(eps, [r[rule]["population_rate"] for r in mine], ":", marker=style[0], color=line.get_color(),
                    alpha=0.6, label=f"{label}, whole split")
            for x, r in zip(eps, mine):
                ax.annotate(f"{100 * r[rule]['mean_report_saving']:.0f}%", (x, r[rule]["rate"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.axhline(result["risk_delta"], color="grey", ls=":", label=f"delta = {result['risk_delta']:g}")
        ax.set_xticks(eps)
        ax.set_xlabel("eps, % (consistency risk bound)")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"violation rate over {result['violations']['splits']} splits")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: report-half risk > eps (labels: mean report saving)".replace("`", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
