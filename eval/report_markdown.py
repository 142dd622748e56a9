"""The report as Markdown: the paper's tables (best in bold), significance, analyses and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import analysis

SEQUENCE_ROWS = 10  # rows per pattern length in the sequence tables


def _pct(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}"


def _cell(value, width: int = 80) -> str:
    """A value as one Markdown table cell: one line, pipes escaped, long text cut."""
    text = "-" if value is None else " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _p(p: Optional[float]) -> str:
    return "-" if p is None else f"{p:.3g}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _answer(ans: dict) -> list[str]:
    """The lead: one line per tested method with its gains (95% paired bootstrap CI, one-tailed p), then the ceiling."""
    if not ans["rows"]:
        return []
    out = ["", "## The answer", "",
           "Gain in points (x 100) over each reference, all tasks pooled, paired over examples: mean [95% paired "
           "bootstrap CI], one-tailed paired t-test p (H1: gain > 0).", ""]
    for row in ans["rows"]:
        parts = [f"{g['reference']} {_pct(g['gain'], 1)} [{_pct(g['ci95'][0], 1)}, {_pct(g['ci95'][1], 1)}], "
                 f"p={_p(g['p'])}" for g in row["gains"]]
        out.append(f"- **{row['method']}** scores {_pct(row['score'], 1)}; gain over " + "; over ".join(parts) + ".")
    oracle = ans["oracle"]
    out.append("- **oracle** (upper bound: per example the best single model) scores "
               + (f"{_pct(oracle, 1)}." if oracle is not None else "- (add `oracle` to eval.methods to see it)."))
    return out


def _sweep(rep: dict) -> list[str]:
    """The cost–quality sweep: one row per setting of each swept method, then the other methods."""
    labels = rep["labels"]
    out = ["", "## Cost–quality sweep", "",
           "Score x 100 (mean over the columns; 95% CI with one column) against the share (x 100) of all patches "
           "written by each model, one row per setting; the other methods below for reference.", ""]

    def row(method: str, setting: str, p: dict) -> list[str]:
        ci = f" [{_pct(p['ci95'][0])}, {_pct(p['ci95'][1])}]" if p["ci95"] else ""
        return [method, setting, _pct(p["score"]) + ci] + [_pct(x, 1) for x in p["share"]]

    body = [row(line["method"], f"{line['key']}={p['value']:g}", p) for line in rep["sweep"]["lines"] for p in line["points"]]
    body += [row(p["method"], "-", p) for p in rep["sweep"]["reference"]]
    return out + _table(["method", "setting", "score"] + [f"{c['name']} ({l})" for c, l in zip(rep["pool"], labels)],
                        body)


def render_pooled(result: dict) -> str:
    """The answer of several runs of one recipe: each run's, then all pooled."""
    out = [f"# The answer over {len(result['runs'])} runs", ""]
    for run in result["runs"]:
        out += ["", f"## Run `{run['run']}`"] + _answer(run)[2:]
    out += ["", "## All runs pooled"] + _answer(result["pooled"])[2:]
    return "\n".join(out) + "\n"


def render_markdown(rep: dict, plots: list[str]) -> str:
    """The report as Markdown: the paper's tables, best in bold, then the analyses and plots."""
    cols, scores, labels = rep["columns"], rep["scores"], rep["labels"]
    names = [m["name"] for m in rep["methods"]]
    out = [f"# Evaluation report: {rep['recipe']}", ""]
    out.append("Pool: " + ", ".join(f"[{c['index']}] {c['name']} ({c['role']}, `{l}`)" for c, l in zip(rep["pool"], labels)))
    out += _answer(rep["answer"])
    out += ["", "## Methods x tasks", "",
            "Mean score x 100 (averaged over seeds); best per column in **bold**. `avg` is the mean over columns.", ""]
    best_avg = max(rep["average"], key=rep["average"].get) if rep["average"] else None
    cost = rep.get("cost") or {}
    with_cost = any(cost.get(n) for n in names)
    body = []
    for n in names:
        cells = []
        for c in cols:
            v = scores[n].get(c)
            text = _pct(v["mean"]) if v else "-"
            cells.append(f"**{text}**" if v and rep["best"][c] == n else text)
        avg = _pct(rep["average"].get(n))
        ratio = (cost.get(n) or {}).get("x_aligned_tokens")
        body.append([n] + cells + [f"**{avg}**" if n == best_avg else avg]
                    + ([f"{ratio:.2f}x" if ratio is not None else "-"] if with_cost else []))
    out += _table(["method"] + cols + ["avg"] + (["tokens vs aligned"] if with_cost else []), body)

    out += ["", "## 95% bootstrap confidence intervals", "", "Mean [low, high] x 100 over examples.", ""]
    out += _table(["method"] + cols, [[n] + [
        f"{_pct(scores[n][c]['mean'])} [{_pct(scores[n][c]['ci95'][0])}, {_pct(scores[n][c]['ci95'][1])}]"
        if c in scores[n] else "-" for c in cols] for n in names])

    if with_cost:
        out += ["", "## Cost per method", "",
                "Per response, summed over every model (switchkit.cost): tokens read (prefilled) and written, forward "
                "passes, the switcher's or router's passes, and total tokens relative to "
                f"`{rep.get('cost_reference') or 'the aligned model'}` alone. Averaged over all tasks and seeds; the "
                "score beside it is the mean x 100 over every example of every column [95% bootstrap CI].", ""]
        out += _table(["method", "score [95% CI]", "tokens read", "tokens written", "forward passes",
                       "switcher passes", "tokens vs aligned", "passes vs aligned"], [
            [n, f"{_pct(v['score'])} [{_pct(v['score_ci95'][0])}, {_pct(v['score_ci95'][1])}]"
             if v.get("score_ci95") else "-",
             f"{v['prompt_tokens']:.1f}", f"{v['generated_tokens']:.1f}", f"{v['passes']:.1f}",
             f"{v['switcher_passes']:.1f}",
             *(f"{v[k]:.2f}x" if v.get(k) is not None else "-" for k in ("x_aligned_tokens", "x_aligned_passes"))]
            for n in names if (v := cost.get(n))]
            + [[n, "not run on this pool (below)"] + ["-"] * 6 for n in rep.get("not_applicable", {})])
    if rep.get("not_applicable"):
        out += ["", "## Methods not run on this pool", "",
                "Named in `eval.methods` but left out (`eval.skip_inapplicable`), because this pool cannot run them:", ""]
        out += [f"- `{n}`: {reason}" for n, reason in rep["not_applicable"].items()]

    if rep["significance"]:
        out += ["", "## Significance against the best baseline", "",
                "One-tailed paired t-test (scipy `ttest_rel`, H1: method > best baseline); * p < 0.1, ** p < 0.05, *** p < 0.01. "
                "Gain and its 95% bootstrap CI are x 100.", ""]
        out += _table(["method", "task", "best baseline", "gain", "gain 95% CI", "t", "p", "sig."], [[
            s["method"], s["column"], s["baseline"], _pct(s["diff"]),
            f"[{_pct(s['diff_ci95'][0])}, {_pct(s['diff_ci95'][1])}]", _num(s["t"], 2),
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

        out += ["", "## Answer fixed in the first patch", "",
                "Share (x 100) of responses whose extracted answer already occurs in their first segment (the aligned "
                "model's first patch, unless the method names every writer): when it is high, later switching "
                "cannot change the answer.", ""]
        out += _table(["method", "task", "all responses", "responses scored right"], [
            [n, c, _pct(v["in_first_patch"], 1), _pct(v["right_and_in_first_patch"], 1)]
            for n, per_col in rep["first_patch"].items() for c, v in per_col.items()])

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

    if rep.get("sweep"):
        out += _sweep(rep)

    if any(rep["examples"].values()):
        out += ["", f"## How responses were scored ({rep['examples_method']})", "",
                "A few predictions per task: what the scorer extracted from the response and the score it gave.", ""]
        out += _table(["task", "input", "output", "gold", "extracted", "score"], [
            [c, _cell(r["input"]), _cell(r["output"]), _cell(r["gold"]), _cell(r["extracted"]), f"{r['score']:.2f}"]
            for c, rows in rep["examples"].items() for r in rows])

    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"
