"""The distilled model against the aligned model and switch generation: the share of the gain recovered.

``toolkit distill`` trains the student (:mod:`switchkit.distill`) and then calls :func:`evaluate_distilled`,
which runs the three methods through the eval cells and writes ``<run_dir>/distill/report.json``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from switchkit.artifacts import distill_dir, distilled_model_dir, eval_dir, read_meta
from switchkit.config import Recipe, aligned_candidate, candidate_name
from switchkit.io import read_jsonl, write_json_atomic

from .methods import build_methods
from .run import eval_command


def model_forward_passes(row: dict, n_models: int, switcher_decisions: bool) -> int:
    """Forward passes one response cost: per patch, one prefill plus one per generated token (the last
    token of a patch is sampled from the previous pass), plus one switcher pass per switcher decision."""
    segments = row.get("segments") or []
    passes = sum(max(s["n_tokens"], 1) for s in segments)
    if switcher_decisions and n_models > 1:
        passes += len(segments)
    return passes


def switcher_shares_aligned(recipe: Recipe) -> bool:
    """Whether the trained switcher is a LoRA adapter on the aligned candidate (then it adds no model)."""
    folder = build_methods(recipe, ["switch"])[0].switcher_path(recipe.tasks[0].name if recipe.tasks else "")
    meta = read_meta(folder)
    return bool(meta and meta.adapter) and meta.base_model == aligned_candidate(recipe.pool.candidates).source


def gain_report(recipe: Recipe, summary: dict, aligned_method: str) -> dict:
    """Per task and on average: (distilled - aligned) / (switch - aligned), and the inference cost ratio."""
    means: dict[tuple[str, str], list[float]] = {}
    for cell in summary["cells"]:
        means.setdefault((cell["method"], f"{cell['task']}/{cell['split']}"), []).append(cell["mean"])
    tasks = sorted({task for _, task in means})
    folder = eval_dir(recipe)
    per_task = {}
    for task in tasks:
        score = {m: float(np.mean(means[(m, task)])) for m in (aligned_method, "switch", "distilled")}
        gain = score["switch"] - score[aligned_method]
        recovered = (score["distilled"] - score[aligned_method]) / gain if gain else None
        per_task[task] = {"aligned": score[aligned_method], "switch": score["switch"], "distilled": score["distilled"],
                          "switch_gain": gain, "share_recovered": recovered}
    shares = [v["share_recovered"] for v in per_task.values() if v["share_recovered"] is not None]
    n_models = len(recipe.pool.candidates)
    cost = {}
    for method in ("switch", "distilled"):
        rows = [r for c in summary["cells"] if c["method"] == method for r in read_jsonl(folder / c["path"])]
        cost[method] = float(np.mean([model_forward_passes(r, n_models, method == "switch") for r in rows]))
    return {
        "per_task": per_task,
        "mean_share_recovered": float(np.mean(shares)) if shares else None,
        "forward_passes_per_response": cost,
        "forward_pass_ratio_distilled_vs_switch": cost["distilled"] / cost["switch"] if cost["switch"] else None,
        "models_in_memory": {"switch": n_models + (0 if switcher_shares_aligned(recipe) else 1), "distilled": 1},
        "note": "share_recovered is None where switch generation does not beat the aligned model on that task",
    }


def evaluate_distilled(recipe: Recipe, overwrite: bool = False) -> dict:
    """Evaluate the distilled model beside the aligned model and switch generation, and write
    ``<run_dir>/distill/report.json``: the share of the switch-generation gain recovered and the cost ratio."""
    aligned_method = f"single:{candidate_name(aligned_candidate(recipe.pool.candidates))}"
    eval_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(
        recipe.eval, methods=[aligned_method, "switch", "distilled"]))
    # its own summary file: the run's results.json keeps every method of `toolkit eval` (cells are shared)
    summary = eval_command(eval_recipe, overwrite=overwrite, summary="distill_results.json")
    report = gain_report(recipe, summary, aligned_method)
    report["model"] = str(distilled_model_dir(recipe))
    path = distill_dir(recipe) / "report.json"
    write_json_atomic(path, report)
    for task, v in report["per_task"].items():
        share = "n/a" if v["share_recovered"] is None else f"{100 * v['share_recovered']:.1f}%"
        print(f"  {task:<24} aligned {v['aligned']:.3f}  switch {v['switch']:.3f}  distilled {v['distilled']:.3f}"
              f"  recovered {share}")
    mean = report["mean_share_recovered"]
    print(f"distill: mean share of gain recovered {'n/a' if mean is None else f'{100 * mean:.1f}%'}; "
          f"forward passes distilled/switch {report['forward_pass_ratio_distilled_vs_switch']:.2f}; "
          f"models in memory 1 vs {report['models_in_memory']['switch']}")
    print(f"distill: report -> {path}")
    return report
