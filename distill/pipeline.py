"""``toolkit distill``: fold switch generation back into the aligned model.

Stages:
1. Generations: switch generation with the run's trained switcher over the recipe's training inputs (``tasks``,
   each with its own split and limit), through the core's resumable runner (``<run_dir>/distill/generations/``);
   or an existing generations JSONL (``distill.generations``).
2. Filter: keep generations whose score is at least ``distill.min_score`` (tasks with gold answers).
3. Train: response-only SFT of the aligned candidate (LoRA or full; auto or DeepSpeed ZeRO-2/3).
4. Export (HF format; a LoRA run is merged so plain transformers loads it).

The CLI then evaluates the distilled model against the aligned model and switch generation (``switchkit.eval``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from switchkit.artifacts import (artifact_stamp, check_switcher, checkpoint_dir, distill_dir, distilled_model_dir,
                                 switcher_dir)
from switchkit.config import ConfigError, Recipe, aligned_candidate
from switchkit.engine import SwitchEngine
from switchkit.io import InputError, check_output, read_jsonl
from switchkit.models import check_sources, load_pool
from switchkit.policies import make_policy
from switchkit.runner import engine_generate, fingerprint, is_finished, run_items, scored, task_items
from switchkit.tasks import content_hash, load_task, load_tasks
from switchkit.trainer.base import FitPlan, export_model, fit_fingerprint, fit_module, load_backbone, plan_fit
from switchkit.trainer.strategies import check_strategy

from .data import DistillDataModule
from .module import DistillModule


def generate_pairs(recipe: Recipe, overwrite: bool = False) -> list[dict]:
    """Stage 1: scored switch-generation rows (``input``, ``output``, ``score``, ...) for the training inputs.

    Each task's rows are a runner output fingerprinted with the switcher's weights and the task's content; the
    switchers, the models' sources and the saved rows are checked before the pool loads."""
    tasks = load_tasks(recipe.tasks, trust_remote_code=recipe.pool.trust_remote_code)
    check_sources(recipe.pool)
    folder = distill_dir(recipe) / "generations"
    plans = []
    for task in tasks:
        switcher = switcher_dir(recipe, task.name if recipe.train.per_task else None)
        if not switcher.exists():
            raise ConfigError(f"distillation needs the trained switcher {switcher}: run `toolkit train-switcher "
                              f"recipe={recipe.name}` first (or set distill.generations)")
        check_switcher(switcher, len(recipe.pool.candidates), recipe.switcher.allow_n_mismatch)
        out = folder / f"{task.name}.jsonl"
        expected = fingerprint(recipe, task=content_hash(task), switcher_model=artifact_stamp(switcher))
        plans.append((task, switcher, out, expected, is_finished(out, expected, overwrite)))
    engine, rows = None, []
    with tqdm(total=sum(len(t) for t in tasks), desc="distill: switch generation", unit="ex") as bar:
        for task, switcher, out, expected, finished in plans:
            policy = generate = None
            if not finished:  # the pool loads only when something is left to generate
                if engine is None:
                    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
                    engine.check_queries([e.query for t in tasks for e in t.examples],
                                         [e.id for t in tasks for e in t.examples])
                policy = make_policy(recipe, engine, "trained", str(switcher))
                generate = scored(task, engine_generate(engine, policy))
            rows += [{**r, "task": task.name} for r in run_items(
                out, task_items(task), generate, seed=recipe.generation.seed,
                batch_size=recipe.generation.batch_size, expected=expected, bar=bar, overwrite=overwrite)]
            if policy is not None:
                policy.close()
    return rows


def read_generations(recipe: Recipe, path: str) -> list[dict]:
    """Stage 1 from a file: a JSONL of ``{"input", "output"[, "task", "score"]}`` matching the recipe's tasks.

    Records without ``score`` are scored by the task whose example has that input, when ``distill.min_score``
    is set. A record whose task is not in the recipe, or whose input no recipe task has, is an error."""
    from switchkit.tasks import load_task

    rows = read_jsonl(path, required=("input", "output"))
    if not rows:
        raise InputError(f"{path}: no records: give one {{\"input\", \"output\"}} object per line")
    names = {t.name for t in recipe.tasks}
    for lineno, row in enumerate(rows, 1):
        for key in ("input", "output"):
            if not isinstance(row[key], str):
                raise InputError(f"{path}: record {lineno}: field {key!r} must be a string")
        score = row.get("score", 0.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InputError(f"{path}: record {lineno}: field 'score' must be a number")
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


def pairs_hash(pairs: list[dict]) -> str:
    """A content hash of the (input, output) pairs a student trains on."""
    body = json.dumps([(r["input"], r["output"]) for r in pairs], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def student_plan(recipe: Recipe, pairs: list[dict], overwrite: bool = False) -> FitPlan:
    """What the student's fit continues and replaces (checked before anything loads)."""
    expected = fit_fingerprint(recipe, "distill", aligned_candidate(recipe.pool.candidates), data=pairs_hash(pairs),
                               plain_template=recipe.pool.plain_template)
    return plan_fit(checkpoint_dir(recipe, "distill"), expected, recipe.distill, "distill", distilled_model_dir(recipe),
                    overwrite)


def train_student(recipe: Recipe, pairs: list[dict], progress: bool = True, overwrite: bool = False) -> Path:
    """Stage 3 and 4: fine-tune the aligned candidate on ``pairs`` and export it as a plain HF model (a rerun of
    the same job continues its checkpoint, and does nothing once it is exported)."""
    cfg = recipe.distill
    if not pairs:
        raise ConfigError("no generations left to train on: lower distill.min_score or add training inputs")
    plan = student_plan(recipe, pairs, overwrite)
    if plan.finished:
        print(f"distill: {plan.out} is up to date ({plan.epochs_done} epochs)")
        return plan.out
    model, tokenizer = load_backbone(recipe, aligned_candidate(recipe.pool.candidates), cfg, "distill")
    module = DistillModule(model, tokenizer, lr=cfg.lr)
    data = DistillDataModule([(r["input"], r["output"]) for r in pairs], tokenizer,
                             plain_template=recipe.pool.plain_template, max_length=cfg.max_length,
                             micro_batch_size=cfg.micro_batch_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    trainer = fit_module(module, data, cfg, "distill", plan, progress)
    return export_model(module, trainer, cfg, plan.out, merge=True, replace=plan.replace_out)


def distill_command(recipe: Recipe, overwrite: bool = False) -> Path:
    """Stages 1-4: generate (or read), filter, train and export; returns the distilled model's folder.

    Folders that no distillation of this recipe wrote (checkpoints, the distilled model) are checked before the
    pool loads; an existing one is an error unless ``overwrite``."""
    cfg = recipe.distill
    check_strategy(cfg, "distill")
    if not (checkpoint_dir(recipe, "distill") / "fingerprint.json").is_file():
        check_output(checkpoint_dir(recipe, "distill"), overwrite=overwrite)
        check_output(distilled_model_dir(recipe), overwrite=overwrite)
    rows = read_generations(recipe, cfg.generations) if cfg.generations else generate_pairs(recipe, overwrite)
    pairs = keep(rows, cfg.min_score)
    print(f"distill: {len(pairs)} of {len(rows)} generations kept"
          + (f" (score >= {cfg.min_score})" if cfg.min_score is not None else ""))
    out = train_student(recipe, pairs, overwrite=overwrite)
    print(f"distill: distilled model -> {out}")
    return out
