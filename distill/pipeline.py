"""``toolkit distill``: fold switch generation back into the aligned model.

Stages:
1. Generations: switch generation with the trained switcher over the recipe's training inputs
   (``tasks``, each with its own split and limit), through the evaluation runner's resumable cell cache
   (``<run_dir>/distill/generations/``); or an existing generations JSONL (``distill.generations``).
2. Filter: keep generations whose score is at least ``distill.min_score`` (tasks with gold answers).
3. Train: response-only SFT of the aligned candidate (LoRA or full; auto or DeepSpeed ZeRO-2/3).
4. Export (HF format; a LoRA run is merged so plain transformers loads it), then evaluate the distilled
   model alone against the aligned model and full switch generation on ``eval.tasks``, and report the
   share of the gain recovered and the inference cost ratio.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
from tqdm.auto import tqdm

from switchkit.config import ConfigError, Recipe, aligned_index, run_path
from switchkit.io import InputError, atomic_path, read_jsonl, write_json_atomic
from switchkit.models import load_source
from switchkit.prompt import read_switcher_meta

from .data import DistillDataModule
from .module import DistillModule


def _aligned(recipe: Recipe):
    cands = recipe.pool.candidates
    if not cands:
        raise ConfigError("pool.candidates is empty: distillation needs the pool and its aligned candidate")
    return cands[aligned_index([c.role for c in cands])]


def generate_pairs(recipe: Recipe) -> list[dict]:
    """Stage 1: switch-generation records (``input``, ``output``, ``score``, ``task``) for the training inputs."""
    from switchkit.eval.methods import Context, build_methods
    from switchkit.eval.run import cell_path, run_cell
    from switchkit.tasks import load_task

    if not recipe.tasks:
        raise ConfigError("tasks is empty: distillation generates over the recipe's training tasks")
    method = build_methods(recipe, ["switch"])[0]
    tasks = [load_task(cfg, limit=cfg.limit, trust_remote_code=recipe.pool.trust_remote_code) for cfg in recipe.tasks]
    for task in tasks:
        method.check(task.name)
    folder = Path(recipe.run_dir) / "distill" / "generations"
    ctx, rows = Context(recipe), []
    seed = recipe.generation.seed
    with tqdm(total=sum(len(t) for t in tasks), desc="distill: switch generation", unit="ex") as bar:
        for task in tasks:
            path = cell_path(folder, method.name, task.name, task.split, seed)
            rows += read_jsonl(path) if path.is_file() else run_cell(ctx, method, task, seed, path, bar)
    return rows


def read_generations(recipe: Recipe, path: str) -> list[dict]:
    """Stage 1 from a file: a JSONL of ``{"input", "output"[, "task", "score"]}`` matching the recipe's tasks.

    Records without ``score`` are scored by the task whose example has that input, when ``distill.min_score``
    is set. A record whose task is not in the recipe, or whose input no recipe task has, is an error."""
    from switchkit.tasks import load_task

    rows = read_jsonl(path, required=("input", "output"))
    names = {t.name for t in recipe.tasks}
    for lineno, row in enumerate(rows, 1):
        if "task" in row and row["task"] not in names:
            raise InputError(f"{path}: record {lineno} has task {row['task']!r}, which the recipe does not have "
                             f"(recipe tasks: {', '.join(sorted(names)) or 'none'})")
    if recipe.distill.min_score is None or all("score" in r for r in rows):
        return rows
    index = {}
    for cfg in recipe.tasks:
        task = load_task(cfg, trust_remote_code=recipe.pool.trust_remote_code)
        index.update({e.query: (task, e) for e in task.examples})
    for lineno, row in enumerate(rows, 1):
        if "score" not in row:
            if row["input"] not in index:
                raise InputError(f"{path}: record {lineno}: its input matches no example of the recipe's tasks "
                                 f"({', '.join(sorted(names)) or 'none'}), so it cannot be scored")
            task, example = index[row["input"]]
            row["score"] = task.score([example], [row["output"]])[0]
            row.setdefault("task", task.name)
    return rows


def keep(rows: list[dict], min_score: Optional[float]) -> list[dict]:
    """Stage 2: generations with a non-empty output and, if ``min_score`` is set, a score at or above it."""
    return [r for r in rows if r["output"].strip() and (min_score is None or r["score"] >= min_score)]


def train_student(recipe: Recipe, pairs: list[dict], progress: bool = True) -> Path:
    """Stage 3 and 4: fine-tune the aligned candidate on ``pairs`` and export it as a plain HF model."""
    from switchkit.trainer.module import apply_lora
    from switchkit.trainer.strategies import backbone_dtype, check_strategy, make_trainer

    cfg = recipe.distill
    if not pairs:
        raise ConfigError("no generations left to train on: lower distill.min_score or add training inputs")
    check_strategy(cfg)  # before loading anything
    L.seed_everything(cfg.seed, verbose=False)
    dtype = str(backbone_dtype(cfg)).replace("torch.", "")
    model, tokenizer = load_source(_aligned(recipe), dataclasses.replace(recipe.pool, dtype=dtype, device="cpu"))
    model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.train()  # loaded in eval mode; LoRA dropout needs train mode
    module = DistillModule(model, tokenizer, lr=cfg.lr)
    data = DistillDataModule([(r["input"], r["output"]) for r in pairs], tokenizer,
                             plain_template=recipe.pool.plain_template, max_length=cfg.max_length,
                             micro_batch_size=cfg.micro_batch_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    ckpt_dir = Path(recipe.run_dir) / "checkpoints" / "distill"
    trainer = make_trainer(cfg, ckpt_dir, progress)
    last = ckpt_dir / "last.ckpt"  # written by this run only (Lightning checkpoints are pickled)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if cfg.resume and last.exists() else None)
    out = run_path(recipe, cfg.output, "distilled")
    if trainer.is_global_zero:
        student = module.model.merge_and_unload() if cfg.lora.enabled else module.model
        student.config.use_cache = True
        with atomic_path(out) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return out


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
    from switchkit.eval.methods import build_methods

    folder = build_methods(recipe, ["switch"])[0].switcher_path(recipe.tasks[0].name if recipe.tasks else "")
    meta = read_switcher_meta(folder)
    return bool(meta.get("adapter")) and meta.get("base_model") in (None, _aligned(recipe).source)


def gain_report(recipe: Recipe, summary: dict, aligned_method: str) -> dict:
    """Per task and on average: (distilled - aligned) / (switch - aligned), and the inference cost ratio."""
    means: dict[tuple[str, str], list[float]] = {}
    for cell in summary["cells"]:
        means.setdefault((cell["method"], f"{cell['task']}/{cell['split']}"), []).append(cell["mean"])
    tasks = sorted({task for _, task in means})
    eval_dir = run_path(recipe, recipe.eval.output, "eval")
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
        rows = [r for c in summary["cells"] if c["method"] == method for r in read_jsonl(eval_dir / c["path"])]
        cost[method] = float(np.mean([model_forward_passes(r, n_models, method == "switch") for r in rows]))
    return {
        "per_task": per_task,
        "mean_share_recovered": float(np.mean(shares)) if shares else None,
        "forward_passes_per_response": cost,
        "forward_pass_ratio_distilled_vs_switch": cost["distilled"] / cost["switch"] if cost["switch"] else None,
        "models_in_memory": {"switch": n_models + (0 if switcher_shares_aligned(recipe) else 1), "distilled": 1},
        "note": "share_recovered is None where switch generation does not beat the aligned model on that task",
    }


def distill_command(recipe: Recipe) -> dict:
    """Run the four stages, evaluate, write ``<run_dir>/distill/report.json`` and print the summary."""
    from switchkit.eval.methods import candidate_names
    from switchkit.eval.run import eval_command

    cfg = recipe.distill
    rows = read_generations(recipe, cfg.generations) if cfg.generations else generate_pairs(recipe)
    pairs = keep(rows, cfg.min_score)
    print(f"distill: {len(pairs)} of {len(rows)} generations kept"
          + (f" (score >= {cfg.min_score})" if cfg.min_score is not None else ""))
    out = train_student(recipe, pairs)
    print(f"distill: distilled model -> {out}")
    aligned_method = f"single:{candidate_names(recipe)[recipe.pool.candidates.index(_aligned(recipe))]}"
    eval_recipe = dataclasses.replace(recipe, eval=dataclasses.replace(
        recipe.eval, methods=[aligned_method, "switch", "distilled"]))
    report = gain_report(recipe, eval_command(eval_recipe), aligned_method)
    report.update({"generations": len(rows), "kept": len(pairs), "model": str(out)})
    path = Path(recipe.run_dir) / "distill" / "report.json"
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
