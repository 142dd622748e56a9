"""The report's PNG plots, drawn from the numbers :func:`switchkit.eval.report.build_report` computed."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from switchkit.io import atomic_path

from . import analysis
from .report_markdown import SEQUENCE_ROWS


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_gain(rep: dict, path: Path) -> bool:
    """Bars with 95% CI error bars: each tested method's gain over random, untuned and the best single model, per task."""
    import matplotlib.pyplot as plt

    per_task = {n: g for n, g in rep["answer"]["per_task"].items() if any(g.values())}
    if not per_task:
        return False
    cols = rep["columns"]
    fig, axes = plt.subplots(1, len(per_task), figsize=(max(5, 2.2 * len(cols) + 2) * len(per_task), 3.8),
                             squeeze=False)
    for ax, (name, by_col) in zip(axes[0], per_task.items()):
        refs = list(dict.fromkeys(g["reference"].split(" (")[0] for gs in by_col.values() for g in gs))
        width = min(0.8 / len(refs), 0.3)
        for k, ref in enumerate(refs):
            found = [next((g for g in by_col[c] if g["reference"].split(" (")[0] == ref), None) for c in cols]
            xs = [i + (k - (len(refs) - 1) / 2) * width for i in range(len(cols))]
            ys = [100 * g["gain"] if g else 0.0 for g in found]
            err = [[100 * (g["gain"] - g["ci95"][0]) if g else 0.0 for g in found],
                   [100 * (g["ci95"][1] - g["gain"]) if g else 0.0 for g in found]]
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"vs {ref}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylabel("gain (points, 95% CI)")
        ax.set_title(f"{name}: gain per task")
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_positions(rep: dict, path: Path) -> bool:
    """Bars per model: share of begin / middle / end patches it wrote, one panel per collaborative method."""
    import matplotlib.pyplot as plt

    if not rep["positions"]:
        return False
    names = list(rep["positions"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False, sharey=True)
    ticks = [f"{c['name']}\n({c['role']})" for c in rep["pool"]]
    for ax, n in zip(axes[0], names):
        for k, p in enumerate(analysis.POSITIONS):
            xs = [i + (k - 1) * 0.27 for i in range(len(ticks))]
            ax.bar(xs, [100 * v for v in rep["positions"][n][p]], 0.27, label=p)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.set_title(n)
        ax.set_ylim(0, 118)  # headroom for the legend
        ax.set_yticks(range(0, 101, 20))
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    axes[0][0].set_ylabel("share of patches (%)")
    fig.suptitle("Model use by position")
    _save(fig, path)
    return True


def plot_sequences(rep: dict, path: Path) -> bool:
    """Scatter of frequency against treatment effect of 2- and 3-length switching sequences."""
    import matplotlib.pyplot as plt

    if not any(r["effect"] is not None for by_len in rep["sequences"].values() for rs in by_len.values() for r in rs):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, length in zip(axes, ("2", "3")):
        for n, by_len in rep["sequences"].items():
            pts = [r for r in by_len[length] if r["effect"] is not None]
            ax.scatter([r["frequency"] for r in pts], [100 * r["effect"] for r in pts], label=n, s=22)
            at: dict = defaultdict(list)  # patterns at the same point share one label
            for r in pts[:SEQUENCE_ROWS]:
                at[(round(r["frequency"], 4), round(100 * r["effect"], 4))].append(r["label"])
            for xy, names in at.items():
                ax.annotate(", ".join(names), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("frequency (share of responses)")
        ax.set_ylabel("treatment effect (points)")
        ax.set_title(f"{length}-length sequences")
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return True


def plot_p_metrics(rep: dict, path: Path) -> bool:
    """Scatter of P-performance against P-helpfulness, one point per task and method."""
    import matplotlib.pyplot as plt

    pts = [(n, c, v) for n, per_col in rep["p_metrics"].items() for c, v in per_col.items()
           if v["p_performance"] is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for n in dict.fromkeys(p[0] for p in pts):
        mine = [p for p in pts if p[0] == n]
        ax.scatter([v["p_performance"] for _, _, v in mine], [v["p_helpfulness"] for _, _, v in mine], label=n)
        for _, c, v in mine:
            ax.annotate(c, (v["p_performance"], v["p_helpfulness"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("P-performance")
    ax.set_ylabel("P-helpfulness")
    ax.set_title("Pretrained model: alone vs in collaboration")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _annotate(ax, xs, ys, labels, dy: int, **style) -> None:
    """One annotation per place (labels of points within 2 x-units and 1 y-unit are joined); on the right half
    of a 0..100 x-axis the text goes to the left of its point."""
    at: dict = {}
    for x, y, label in zip(xs, ys, labels):
        at.setdefault((round(x / 2), round(y)), ((x, y), []))[1].append(label)
    for (x, y), names in at.values():
        right = x > 50
        ax.annotate(", ".join(names), (x, y), xytext=(-4 if right else 4, dy), textcoords="offset points",
                    ha="right" if right else "left", **style)


def plot_cost_quality(rep: dict, path: Path) -> bool:
    """The sweep's cost–quality curve: score against the aligned model's share of patches, one point per setting,
    with the other methods as reference points."""
    import matplotlib.pyplot as plt

    if not rep.get("sweep"):
        return False
    aligned = next((c["index"] for c in reversed(rep["pool"]) if c["role"] == "aligned"), len(rep["pool"]) - 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for line in rep["sweep"]["lines"]:
        pts = line["points"]
        xs, ys = [100 * p["share"][aligned] for p in pts], [100 * p["score"] for p in pts]
        errors = None
        if all(p["ci95"] for p in pts):
            errors = [[y - 100 * p["ci95"][0] for y, p in zip(ys, pts)], [100 * p["ci95"][1] - y for y, p in zip(ys, pts)]]
        drawn = ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, elinewidth=0.8,
                            label=f"{line['method']} ({line['key']})")
        for bars in drawn[-1]:  # the CI bars (none over several tasks) stay behind the curve
            bars.set_alpha(0.35)
        _annotate(ax, xs, ys, [f"{p['value']:g}" for p in pts], 4, fontsize=8)
    refs = rep["sweep"]["reference"]
    xs, ys = [100 * p["share"][aligned] for p in refs], [100 * p["score"] for p in refs]
    ax.scatter(xs, ys, marker="x", color="grey")
    _annotate(ax, xs, ys, [p["method"] for p in refs], -10, fontsize=7, color="dimgrey")
    ax.set_xlim(-5, 105)
    ax.set_xlabel("share of patches written by the aligned model (%)")
    ax.set_ylabel("score (mean over tasks, x 100)")
    ax.set_title(f"Cost–quality curve (aligned model: {rep['pool'][aligned]['name']})", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


PLOTS = {"gain_per_task.png": plot_gain, "position_usage.png": plot_positions,
         "sequences.png": plot_sequences, "p_metrics.png": plot_p_metrics, "cost_quality.png": plot_cost_quality}
