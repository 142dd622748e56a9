"""``toolkit report run=DIR``: Markdown tables, PNG plots and one JSON with every number, from saved predictions.

The report reads ``results.json`` and the finished cells of an eval folder (``DIR`` is the eval folder or a
run folder holding ``eval/``); it loads no model and generates nothing. It writes ``report/report.md``,
``report/report.json`` and ``report/*.png`` inside the eval folder.

*Tested* methods are the toolkit's own (``ours``: trained switchers, distilled model); when a run has none,
the collaborative methods (random, untuned, ...) are tested against the single models instead. Each tested
method is compared per task with the best other method (the best baseline): a one-tailed paired t-test and
a bootstrap CI of the per-example gain (see :mod:`switchkit.eval.analysis`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from switchkit.io import InputError, atomic_path, check_output, read_jsonl, write_json_atomic, write_text_atomic

from . import analysis, sweep
from .report_markdown import render_markdown
from .report_plots import PLOTS

EXAMPLES = 4  # predictions shown per task, to see why responses scored as they did


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
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if not isinstance(summary, dict):
        raise InputError(f"{path}: expected a JSON object")
    for key in ("pool", "methods", "cells"):
        if key not in summary:
            raise InputError(f"{path}: missing field {key!r}")
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for i, cell in enumerate(summary["cells"]):
        if not isinstance(cell, dict) or not {"method", "task", "split", "path"} <= set(cell):
            raise InputError(f"{path}: cells.{i} needs method, task, split and path")
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


def scoring_examples(rows: list[dict], count: int = EXAMPLES) -> list[dict]:
    """A few predictions of one column, half scored right and half wrong where possible, to show how
    responses were judged (first seed only)."""
    seed = min((r.get("seed", 0) for r in rows), default=0)
    rows = [r for r in rows if r.get("seed", 0) == seed]
    right = [r for r in rows if r["score"] >= 0.5][: count // 2]
    wrong = [r for r in rows if r["score"] < 0.5][: count - len(right)]
    picked = (right + wrong + [r for r in rows if r not in right and r not in wrong])[:count]
    return [{k: r.get(k) for k in ("id", "input", "output", "gold", "extracted", "score")} for r in picked]


def answer(by_id: dict, columns: list[str], tested: list[str], singles: list[str], ceilings: list[str],
           names: list[str]) -> dict:
    """The report's lead: each tested method's gain over random switching, the untuned switcher and the best
    single model (paired over examples, all tasks pooled and per task), beside the oracle ceiling."""

    def pooled(name: str, cols: list[str]) -> dict[str, float]:
        return {f"{c}|{i}": v for c in cols for i, v in by_id.get(name, {}).get(c, {}).items()}

    def mean(name: str, cols: list[str]) -> Optional[float]:
        values = list(pooled(name, cols).values())
        return float(np.mean(values)) if values else None

    def references(cols: list[str]) -> list[tuple[str, str]]:
        refs = [(ref, ref) for ref in ("random", "untuned") if ref in names]
        present = [s for s in singles if pooled(s, cols)]
        if present:
            best = max(present, key=lambda s: mean(s, cols))
            refs.append((f"best single ({best})", best))
        return refs

    def gains(name: str, cols: list[str]) -> list[dict]:
        return [{"reference": label, "method": ref, **analysis.paired_gain(pooled(name, cols), pooled(ref, cols))}
                for label, ref in references(cols) if ref != name]

    ceiling = ceilings[0] if ceilings else None
    return {
        "oracle": mean(ceiling, columns) if ceiling else None,
        "rows": [{"method": n, "score": mean(n, columns), "gains": gains(n, columns)} for n in tested],
        "per_task": {n: {c: gains(n, [c]) for c in columns} for n in tested},
        "oracle_per_task": {c: mean(ceiling, [c]) for c in columns} if ceiling else {},
    }


def method_roles(summary: dict, rows: dict) -> dict:
    """The run's methods in the report's roles: columns in recipe order, tested methods, single models and the
    ceilings (computed methods such as the oracle: upper bounds, never baselines)."""
    methods = [m for m in summary["methods"] if any(k[0] == m["name"] for k in rows)]
    names = [m["name"] for m in methods]
    order = [column(t["name"], t["split"]) for t in summary.get("tasks", [])]
    present = {col for _, col in rows}
    ceilings = [m["name"] for m in methods if m.get("computed")]
    return {
        "methods": methods, "names": names, "ceilings": ceilings,
        "columns": [c for c in order if c in present] + sorted(present - set(order)),
        "singles": [m["name"] for m in methods if not m["collaborative"] and not m["ours"] and m["name"] not in ceilings],
        "tested": [m["name"] for m in methods if m["ours"]] or [m["name"] for m in methods if m["collaborative"]],
    }


def build_report(eval_dir: Path) -> dict:
    """Every number of the report, computed from the saved predictions."""
    summary, rows = load_results(eval_dir)
    pool = summary["pool"]
    n_models = len(pool)
    labels = model_labels(pool)
    roles = method_roles(summary, rows)
    methods, names, columns = roles["methods"], roles["names"], roles["columns"]
    ceilings, singles, tested = roles["ceilings"], roles["singles"], roles["tested"]

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
    runnable = [n for n in names if n not in ceilings]
    best = {col: max((n for n in runnable if col in scores[n]), key=lambda n: scores[n][col]["mean"])
            for col in columns}
    average = {n: float(np.mean([scores[n][c]["mean"] for c in columns])) for n in names if all(c in scores[n] for c in columns)}

    collaborative = [m["name"] for m in methods if m["collaborative"]]

    significance = []
    for name in tested:
        for col in columns:
            others = [n for n in runnable if n not in tested and col in scores[n]]
            if col not in scores[name] or not others:
                continue
            base = max(others, key=lambda n: scores[n][col]["mean"])
            test = analysis.paired_test(by_id[name][col], by_id[base][col])
            lo, hi = analysis.bootstrap_ci(analysis.paired_diffs(by_id[name][col], by_id[base][col]))
            significance.append({"method": name, "column": col, "baseline": base, **test,
                                 "stars": analysis.stars(test["p"]), "diff_ci95": [lo, hi]})

    headline = answer(by_id, columns, tested, singles, ceilings, names)

    new_skills = {n: {c: analysis.new_skills(by_id[n][c], {s: by_id[s][c] for s in singles if c in by_id[s]})
                      for c in columns if c in by_id[n]}
                  for n in runnable if n not in singles and len(singles) > 1}

    p_metrics = {}
    roles = {f"single:{c['name']}": c["role"] for c in pool}
    pre = [s for s in singles if roles.get(s) == "pretrained"]
    rest = [s for s in singles if s in roles and roles[s] != "pretrained"]
    if pre and rest:
        for n in collaborative + [t for t in tested if t not in collaborative]:
            p_metrics[n] = {c: analysis.p_metrics(scores[pre[0]][c]["mean"], [scores[s][c]["mean"] for s in rest],
                                                  scores[n][c]["mean"])
                            for c in columns if all(c in scores[s] for s in pre + rest + [n])}

    switching, sequences, positions, share, first_patch = {}, {}, {}, {}, {}
    for n in collaborative:
        first_patch[n] = {c: analysis.answer_in_first_patch(rows[(n, c)]) for c in columns if (n, c) in rows}
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

    cost = {n: analysis.cost_per_query([r for c in columns for r in rows.get((n, c), [])])
            for n in names if n not in ceilings}  # a ceiling's rows are copies: it has no cost of its own
    aligned = next((f"single:{c['name']}" for c in reversed(pool) if c["role"] == "aligned"), None)
    reference = cost.get(aligned) if aligned else None
    for n, summary_cost in cost.items():  # relative to the aligned model alone, over the same columns
        if summary_cost:  # quality beside it: the mean over every example of every column, with its CI
            pooled = [v for c in columns for v in by_id[n].get(c, {}).values()]
            summary_cost["score"] = float(np.mean(pooled)) if pooled else None
            summary_cost["score_ci95"] = list(analysis.bootstrap_ci(pooled)) if pooled else None
        if summary_cost and reference:
            summary_cost["x_aligned_tokens"] = summary_cost["tokens"] / reference["tokens"] if reference["tokens"] else None
            summary_cost["x_aligned_passes"] = summary_cost["passes"] / reference["passes"] if reference["passes"] else None

    shown = tested[0] if tested else runnable[0]
    examples = {c: scoring_examples(rows.get((shown, c), [])) for c in columns}

    return {
        "recipe": summary.get("recipe"), "pool": pool, "labels": labels, "columns": columns, "examples": examples,
        "answer": headline,
        "examples_method": shown,
        "methods": methods, "tested": tested, "singles": singles, "ceilings": ceilings,
        "scores": dict(scores), "average": average, "best": best, "significance": significance,
        "new_skills": new_skills, "p_metrics": p_metrics, "switching": switching, "sequences": sequences,
        "positions": positions, "model_share": share, "first_patch": first_patch,
        "sweep": sweep.curve(methods, rows, scores, columns, n_models),
        "cost": cost, "cost_reference": aligned,
        "not_applicable": summary.get("not_applicable") or {},
    }


def report_command(run_dir: str, overwrite: bool = False) -> Path:
    """Write ``report.md``, ``report.json`` and the PNG plots under ``<eval dir>/report``; return that folder.

    The folder is written as a whole: an earlier report (a view of the saved predictions) is replaced; a
    ``report`` folder that holds something else is an error unless ``overwrite``."""
    import matplotlib

    matplotlib.use("Agg")
    eval_dir = find_eval_dir(run_dir)
    out = eval_dir / "report"
    check_output(out, overwrite=overwrite, ours=(out / "report.json").is_file())
    rep = build_report(eval_dir)
    with atomic_path(out, overwrite=out.exists()) as tmp:  # check_output has vetted what is there
        tmp.mkdir()
        plots = [name for name, plot in PLOTS.items() if plot(rep, tmp / name)]
        write_json_atomic(tmp / "report.json", rep)
        write_text_atomic(tmp / "report.md", render_markdown(rep, plots))
    print(f"report: {out / 'report.md'}")
    return out


def pooled_answer(run_dirs: list[str]) -> dict:
    """The answer of each run and of all runs pooled (e.g. one recipe with different seeds): examples are paired
    within their run, and the pooled gains resample (run, example) pairs. The runs must share methods and columns."""
    per_run, pooled, first = [], defaultdict(lambda: defaultdict(dict)), None
    for k, run_dir in enumerate(run_dirs):
        summary, rows = load_results(find_eval_dir(run_dir))
        roles = method_roles(summary, rows)
        first = first or roles
        if (roles["names"], roles["columns"]) != (first["names"], first["columns"]):
            raise InputError(f"{run_dir}: its methods or tasks differ from {run_dirs[0]}'s: pool only runs of one recipe")
        by_id = defaultdict(dict)
        for (name, col), recs in rows.items():
            by_id[name][col] = analysis.mean_by_id(recs)
            pooled[name][col].update({f"{k}:{i}": v for i, v in by_id[name][col].items()})
        args = (first["columns"], first["tested"], first["singles"], first["ceilings"], first["names"])
        per_run.append({"run": str(run_dir), **answer(by_id, *args)})
    return {"runs": per_run, "pooled": answer(pooled, *args)}


def pooled_report_command(runs: str, out: str, overwrite: bool = False) -> Path:
    """``toolkit report runs=A,B,C out=DIR``: write ``answer.md`` and ``answer.json`` with each run's answer and
    the answer pooled over the runs."""
    from .report_markdown import render_pooled

    run_dirs = [r for r in runs.split(",") if r]
    if len(run_dirs) < 2:
        raise InputError(f"runs={runs}: give two or more run folders, separated by commas")
    out_dir = Path(out)
    check_output(out_dir, overwrite=overwrite, ours=(out_dir / "answer.json").is_file())
    result = pooled_answer(run_dirs)
    with atomic_path(out_dir, overwrite=out_dir.exists()) as tmp:
        tmp.mkdir()
        write_json_atomic(tmp / "answer.json", result)
        write_text_atomic(tmp / "answer.md", render_pooled(result))
    print(f"report: {out_dir / 'answer.md'}")
    return out_dir
