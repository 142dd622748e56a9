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

from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from switchkit.artifacts import checkpoint_dir, distill_dir, distilled_model_dir, switcher_dir
from switchkit.config import ConfigError, Recipe, aligned_candidate
from switchkit.engine import SwitchEngine
from switchkit.io import InputError, read_jsonl
from switchkit.models import load_pool
from switchkit.policies import make_policy
from switchkit.runner import engine_generate, fingerprint, is_finished, run_items, scored, task_items
from switchkit.tasks import content_hash, load_task, load_tasks
from switchkit.trainer.base import export_model, fit_module, load_backbone

from .data import DistillDataModule
from .module import DistillModule


def generate_pairs(recipe: Recipe) -> list[dict]:
    """Stage 1: scored switch-generation rows (``input``, ``output``, ``score``, ...) for the training inputs."""
    tasks = load_tasks(recipe.tasks, trust_remote_code=recipe.pool.trust_remote_code)
    folder = distill_dir(recipe) / "generations"
    plans = []
    for task in tasks:
        switcher = switcher_dir(recipe, task.name if recipe.train.per_task else None)
        if not switcher.exists():
            raise ConfigError(f"distillation needs the trained switcher {switcher}: run `toolkit train-switcher "
                              f"recipe={recipe.name}` first (or set distill.generations)")
        plans.append((task, switcher, folder / f"{task.name}.jsonl",
                      fingerprint(recipe, task=content_hash(task), switcher=str(switcher))))
    engine, rows = None, []
    with tqdm(total=sum(len(t) for t in tasks), desc="distill: switch generation", unit="ex") as bar:
        for task, switcher, out, expected in plans:
            policy = generate = None
            if not is_finished(out, expected):  # the pool loads only when something is left to generate
                engine = engine or SwitchEngine(load_pool(recipe.pool, recipe.generation.backend), recipe.generation)
                policy = make_policy(recipe, engine, "trained", str(switcher))
                generate = scored(task, engine_generate(engine, policy))
            rows += [{**r, "task": task.name} for r in run_items(
                out, task_items(task), generate, seed=recipe.generation.seed,
                batch_size=recipe.generation.batch_size, expected=expected, bar=bar)]
            if policy is not None:
                policy.close()
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
    cfg = recipe.distill
    if not pairs:
        raise ConfigError("no generations left to train on: lower distill.min_score or add training inputs")
    model, tokenizer = load_backbone(recipe, aligned_candidate(recipe.pool.candidates), cfg, "distill")
    module = DistillModule(model, tokenizer, lr=cfg.lr)
    data = DistillDataModule([(r["input"], r["output"]) for r in pairs], tokenizer,
                             plain_template=recipe.pool.plain_template, max_length=cfg.max_length,
                             micro_batch_size=cfg.micro_batch_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    trainer = fit_module(module, data, cfg, "distill", checkpoint_dir(recipe, "distill"), progress)
    return export_model(module, trainer, cfg, distilled_model_dir(recipe), merge=True)


def distill_command(recipe: Recipe) -> Path:
    """Stages 1-4: generate (or read), filter, train and export; returns the distilled model's folder."""
    cfg = recipe.distill
    rows = read_generations(recipe, cfg.generations) if cfg.generations else generate_pairs(recipe)
    pairs = keep(rows, cfg.min_score)
    print(f"distill: {len(pairs)} of {len(rows)} generations kept"
          + (f" (score >= {cfg.min_score})" if cfg.min_score is not None else ""))
    out = train_student(recipe, pairs)
    print(f"distill: distilled model -> {out}")
    return out
