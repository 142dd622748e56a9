"""``toolkit report run=DIR``: Markdown tables, PNG plots and one JSON with every number, from saved predictions.

The report reads ``results.json`` and the finished cells of an eval folder (``DIR`` is the eval folder or a
run folder holding ``eval/``); it loads no model and generates nothing. It writes ``report/report.md``,
``report/report.json`` and ``report/*.png`` inside the eval folder.

*Tested* methods are the toolkit's own (``ours``: trained switchers, distilled model); when a run has none,
the collaborative methods (random, untuned, ...) are tested against the single models instead. Each tested
method is compared per task with the best other method (the best baseline): a one-tailed paired z-test and
a bootstrap CI of the per-example gain (see :mod:`switchkit.eval.analysis`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from switchkit.io import InputError, atomic_path, read_jsonl, write_json_atomic, write_text_atomic

from . import analysis

SEQUENCE_ROWS = 10  # rows per pattern length in the Markdown sequence tables


def find_eval_dir(run_dir: str | Path) -> Path:
    """The eval folder: ``DIR`` itself when it holds ``results.json``, else ``DIR/eval``."""
    run_dir = Path(run_dir)
    for candidate in (run_dir, run_dir / "eval"):
        if (candidate / "results.json").is_file():
            return candidate
    raise InputError(f"{run_dir}: no results.json here or in {run_dir / 'eval'}: run `toolkit eval` first")


def load_results(eval_dir: Path) -> tuple[dict, dict[tuple[str, str], list[dict]]]:
    """The run summary and the saved predictions per (method, column), all seeds together."""
    path = eval_dir / "results.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    for key in ("pool", "methods", "cells"):
        if key not in summary:
            raise InputError(f"{path}: missing field {key!r}")
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in summary["cells"]:
        rows[(cell["method"], column(cell["task"], cell["split"]))] += read_jsonl(
            eval_dir / cell["path"], required=("id", "score", "segments"))
    return summary, dict(rows)


def column(task: str, split: str) -> str:
    """A results column: ``task/split``."""
    return f"{task}/{split}"


def model_labels(pool: list[dict]) -> list[str]:
    """Short model labels from roles (P, F, A, E), with the index added when two roles share a letter."""
    letters = [c["role"][0].upper() for c in pool]
    return [f"{l}{i}" if letters.count(l) > 1 else l for i, l in enumerate(letters)]


def _relabel(pattern: str, labels: list[str]) -> str:
    return ">".join(labels[int(m)] for m in pattern.split(">"))


def build_report(eval_dir: Path) -> dict:
    """Every number of the report, computed from the saved predictions."""
    summary, rows = load_results(eval_dir)
    pool = summary["pool"]
    n_models = len(pool)
    labels = model_labels(pool)
    methods = [m for m in summary["methods"] if any(k[0] == m["name"] for k in rows)]
    names = [m["name"] for m in methods]
    order = [column(t["name"], t["split"]) for t in summary.get("tasks", [])]
    present = {col for _, col in rows}
    columns = [c for c in order if c in present] + sorted(present - set(order))

    scores: dict = defaultdict(dict)
    by_id: dict = defaultdict(dict)
    for (name, col), recs in rows.items():
        seed_means = defaultdict(list)
        for r in recs:
            seed_means[r.get("seed", 0)].append(float(r["score"]))
        means = [float(np.mean(v)) for v in seed_means.values()]
        per_example = analysis.mean_by_id(recs)
        scores[name][col] = {
            "mean": float(np.mean(means)),
            "std_over_seeds": float(np.std(means)) if len(means) > 1 else 0.0,
            "seeds": len(means),
            "n": len(per_example),
            "ci95": list(analysis.bootstrap_ci(list(per_example.values()))),
        }
        by_id[name][col] = per_example
    best = {col: max((n for n in names if col in scores[n]), key=lambda n: scores[n][col]["mean"]) for col in columns}
    average = {n: float(np.mean([scores[n][c]["mean"] for c in columns])) for n in names if all(c in scores[n] for c in columns)}

    singles = [m["name"] for m in methods if not m["collaborative"] and not m["ours"]]
    tested = [m["name"] for m in methods if m["ours"]] or [m["name"] for m in methods if m["collaborative"]]
    collaborative = [m["name"] for m in methods if m["collaborative"]]

    significance = []
    for name in tested:
        for col in columns:
            others = [n for n in names if n not in tested and col in scores[n]]
            if col not in scores[name] or not others:
                continue
            base = max(others, key=lambda n: scores[n][col]["mean"])
            test = analysis.z_test(by_id[name][col], by_id[base][col])
            lo, hi = analysis.bootstrap_ci(analysis.paired_diffs(by_id[name][col], by_id[base][col]))
            significance.append({"method": name, "column": col, "baseline": base, **test,
                                 "stars": analysis.stars(test["p"]), "diff_ci95": [lo, hi]})

    gain = {n: {c: scores[n][c]["mean"] - max(scores[s][c]["mean"] for s in singles if c in scores[s])
                for c in columns if c in scores[n] and any(c in scores[s] for s in singles)}
            for n in names if n not in singles}

    new_skills = {n: {c: analysis.new_skills(by_id[n][c], {s: by_id[s][c] for s in singles if c in by_id[s]})
                      for c in columns if c in by_id[n]}
                  for n in names if n not in singles and len(singles) > 1}

    p_metrics = {}
    roles = {f"single:{c['name']}": c["role"] for c in pool}
    pre = [s for s in singles if roles.get(s) == "pretrained"]
    rest = [s for s in singles if s in roles and roles[s] != "pretrained"]
    if pre and rest:
        for n in collaborative + [t for t in tested if t not in collaborative]:
            p_metrics[n] = {c: analysis.p_metrics(scores[pre[0]][c]["mean"], [scores[s][c]["mean"] for s in rest],
                                                  scores[n][c]["mean"])
                            for c in columns if all(c in scores[s] for s in pre + rest + [n])}

    switching, sequences, positions, share = {}, {}, {}, {}
    for n in collaborative:
        recs = [r for c in columns for r in rows.get((n, c), [])]
        switching[n] = {c: analysis.switching_frequency(rows[(n, c)]) for c in columns if (n, c) in rows}
        switching[n]["all"] = analysis.switching_frequency(recs)
        sequences[n] = {}
        for length in (2, 3):
            seq_rows = analysis.sequence_effects(recs, length)
            for r in seq_rows:
                r["label"] = _relabel(r["pattern"], labels)
            sequences[n][str(length)] = seq_rows
        positions[n] = analysis.position_usage(recs, n_models)
        share[n] = analysis.model_share(recs, n_models)

    return {
        "recipe": summary.get("recipe"), "pool": pool, "labels": labels, "columns": columns,
        "methods": methods, "tested": tested, "singles": singles,
        "scores": dict(scores), "average": average, "best": best, "significance": significance, "gain": gain,
        "new_skills": new_skills, "p_metrics": p_metrics, "switching": switching, "sequences": sequences,
        "positions": positions, "model_share": share,
    }


# ---------------------------------------------------------------- Markdown


def _pct(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def render_markdown(rep: dict, plots: list[str]) -> str:
    """The report as Markdown: the paper's tables, best in bold, then the analyses and plots."""
    cols, scores, labels = rep["columns"], rep["scores"], rep["labels"]
    names = [m["name"] for m in rep["methods"]]
    out = [f"# Evaluation report: {rep['recipe']}", ""]
    out.append("Pool: " + ", ".join(f"[{c['index']}] {c['name']} ({c['role']}, `{l}`)" for c, l in zip(rep["pool"], labels)))
    out += ["", "## Methods x tasks", "",
            "Mean score x 100 (averaged over seeds); best per column in **bold**. `avg` is the mean over columns.", ""]
    best_avg = max(rep["average"], key=rep["average"].get) if rep["average"] else None
    body = []
    for n in names:
        cells = []
        for c in cols:
            v = scores[n].get(c)
            text = _pct(v["mean"]) if v else "-"
            cells.append(f"**{text}**" if v and rep["best"][c] == n else text)
        avg = _pct(rep["average"].get(n))
        body.append([n] + cells + [f"**{avg}**" if n == best_avg else avg])
    out += _table(["method"] + cols + ["avg"], body)

    out += ["", "## 95% bootstrap confidence intervals", "", "Mean [low, high] x 100 over examples.", ""]
    out += _table(["method"] + cols, [[n] + [
        f"{_pct(scores[n][c]['mean'])} [{_pct(scores[n][c]['ci95'][0])}, {_pct(scores[n][c]['ci95'][1])}]"
        if c in scores[n] else "-" for c in cols] for n in names])

    if rep["significance"]:
        out += ["", "## Significance against the best baseline", "",
                "One-tailed paired z-test (H1: method > best baseline); * p < 0.1, ** p < 0.05, *** p < 0.01. "
                "Gain and its 95% bootstrap CI are x 100.", ""]
        out += _table(["method", "task", "best baseline", "gain", "gain 95% CI", "z", "p", "sig."], [[
            s["method"], s["column"], s["baseline"], _pct(s["diff"]),
            f"[{_pct(s['diff_ci95'][0])}, {_pct(s['diff_ci95'][1])}]", _num(s["z"], 2),
            "-" if s["p"] is None else f"{s['p']:.4f}", s["stars"]] for s in rep["significance"]])

    if rep["new_skills"]:
        out += ["", "## New skills", "",
                "Share of examples (x 100) by how many single models were correct (score >= 0.5) and whether the "
                "method was. `new`: all singles wrong, method correct; `lost`: some single correct, method wrong.", ""]
        body = []
        for n, per_col in rep["new_skills"].items():
            for c, t in per_col.items():
                sh = t["shares"]
                body.append([n, c] + [f"{_pct(sh[r]['correct'], 1)} / {_pct(sh[r]['wrong'], 1)}"
                                      for r in ("all_correct", "some_correct", "all_wrong")]
                            + [_pct(t["new"], 1), _pct(t["lost"], 1), _pct(t["net"], 1)])
        out += _table(["method", "task", "all correct (right / wrong)", "some correct (right / wrong)",
                       "all wrong (right / wrong)", "new", "lost", "net"], body)

    if rep["p_metrics"]:
        out += ["", "## P-performance and P-helpfulness", "",
                "With B = the best single non-pretrained model: P-performance = (P - B) / B, "
                "P-helpfulness = (C - B) / B, where C is the method.", ""]
        out += _table(["method", "task", "P-performance", "P-helpfulness"], [
            [n, c, _num(v["p_performance"]), _num(v["p_helpfulness"])]
            for n, per_col in rep["p_metrics"].items() for c, v in per_col.items()])

    if rep["switching"]:
        out += ["", "## Switching frequency", "",
                "Switches (writer changes) per response and per patch boundary, share of responses with a switch.", ""]
        out += _table(["method", "task", "patches / response", "switches / response", "switches / boundary",
                       "responses with a switch"], [
            [n, c, f"{v['patches_per_response']:.2f}", f"{v['switches_per_response']:.2f}",
             _pct(v["switches_per_boundary"], 1), _pct(v["responses_with_switch"], 1)]
            for n, per_col in rep["switching"].items() for c, v in per_col.items()])

        out += ["", "## Model use by position", "",
                "Share (x 100) of the patches in the begin / middle / end third of responses written by each model "
                "(all tasks).", ""]
        out += _table(["method", "model", "begin", "middle", "end", "overall"], [
            [n, f"{c['name']} ({labels[i]})"] + [_pct(pos[p][i], 1) for p in analysis.POSITIONS]
            + [_pct(rep["model_share"][n][i], 1)]
            for n, pos in rep["positions"].items() for i, c in enumerate(rep["pool"])])

        out += ["", "## Switching sequences", "",
                "Frequency: share of responses whose switching sequence contains the pattern. Treatment effect: "
                "mean score with the pattern minus without (x 100). All tasks pooled; most frequent first.", ""]
        body = []
        for n, by_len in rep["sequences"].items():
            for length, seq_rows in by_len.items():
                body += [[n, length, r["label"], _pct(r["frequency"], 1), _pct(r["effect"])]
                         for r in seq_rows[:SEQUENCE_ROWS]]
        out += _table(["method", "length", "sequence", "frequency", "treatment effect"], body)

    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_gain(rep: dict, path: Path) -> bool:
    """Bars: each non-single method's score minus the best single model's, per task."""
    import matplotlib.pyplot as plt

    gain = {n: g for n, g in rep["gain"].items() if g}
    if not gain:
        return False
    cols = rep["columns"]
    width = min(0.8 / len(gain), 0.35)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(cols) + 2), 3.6))
    for k, (n, g) in enumerate(gain.items()):
        xs = [i + (k - (len(gain) - 1) / 2) * width for i in range(len(cols))]
        ax.bar(xs, [100 * g.get(c, 0.0) for c in cols], width, label=n)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("gain over best single model (points)")
    ax.set_title("Gain per task")
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


PLOTS = {"gain_per_task.png": plot_gain, "position_usage.png": plot_positions,
         "sequences.png": plot_sequences, "p_metrics.png": plot_p_metrics}


def report_command(run_dir: str) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots under ``<eval dir>/report``; return that folder."""
    import matplotlib

    matplotlib.use("Agg")
    eval_dir = find_eval_dir(run_dir)
    rep = build_report(eval_dir)
    out = eval_dir / "report"
    plots = [name for name, plot in PLOTS.items() if plot(rep, out / name)]
    write_json_atomic(out / "report.json", rep)
    write_text_atomic(out / "report.md", render_markdown(rep, plots))
    print(f"report: {out / 'report.md'}")
    return out
