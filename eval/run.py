"""``toolkit eval``: run methods x tasks x splits x seeds, one cached cell at a time.

Layout under the eval folder (``eval.output``, default ``<run_dir>/eval``)::

    cells/<method>/<task>/<split>/seed<seed>.jsonl         a finished cell: one prediction per example
    cells/<method>/<task>/<split>/seed<seed>.parts/*.jsonl  batches of an unfinished cell
    results.json                                            the run's summary, rewritten after each cell

A finished cell is never recomputed. An interrupted cell resumes from its saved batches: only examples
without a saved prediction are generated. Every file is written atomically. The pool is loaded once, and
only if some cell still needs generating.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from switchkit.config import ConfigError, Recipe, run_path, to_dict
from switchkit.io import read_jsonl, write_json_atomic, write_jsonl_atomic

from .methods import Context, Method, build_methods, candidate_names
from switchkit.tasks import Task, load_task

PREDICTION_FIELDS = ("id", "input", "output", "gold", "score", "segments")


def slug(name: str) -> str:
    """A method, task or split name as a folder name (``single:gemma`` -> ``single_gemma``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cell_path(eval_dir: Path, method: str, task: str, split: str, seed: int) -> Path:
    """Where the finished predictions of one (method, task, split, seed) cell live."""
    return Path(eval_dir) / "cells" / slug(method) / slug(task) / slug(split) / f"seed{seed}.jsonl"


def load_tasks(recipe: Recipe) -> list[Task]:
    """Every (task, split) of the eval, examples limited to ``eval.limit``."""
    cfgs = recipe.eval.tasks or recipe.tasks
    if not cfgs:
        raise ConfigError("eval.tasks is empty and so is tasks: give at least one task")
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.tasks: task names must be unique, {', '.join(dup)} repeats")
    if not recipe.eval.splits or not recipe.eval.seeds:
        raise ConfigError("eval.splits and eval.seeds must each name at least one entry")
    return [load_task(cfg, split=split, limit=recipe.eval.limit, trust_remote_code=recipe.pool.trust_remote_code)
            for cfg in cfgs for split in recipe.eval.splits]


def _check_ids(rows: list[dict], expected: list[str], path: Path) -> None:
    got = [str(r["id"]) for r in rows]
    if got != expected:
        raise ConfigError(
            f"{path} holds predictions for other examples than the task now has (did eval.limit or the task "
            f"change?): delete it, or set eval.output to a new folder"
        )


def run_cell(ctx: Context, method: Method, task: Task, seed: int, path: Path, bar: tqdm) -> list[dict]:
    """Generate and score the examples of one cell that have no saved prediction; return all predictions."""
    parts = path.with_suffix(".parts")
    done = {}
    for part in sorted(parts.glob("*.jsonl")) if parts.is_dir() else []:
        done.update((str(r["id"]), r) for r in read_jsonl(part, required=PREDICTION_FIELDS))
    bar.update(sum(e.id in done for e in task.examples))
    todo = [(i, e) for i, e in enumerate(task.examples) if e.id not in done]
    size = ctx.recipe.generation.batch_size
    n_parts = len(list(parts.glob("*.jsonl"))) if parts.is_dir() else 0
    for start in range(0, len(todo), size):
        batch = todo[start:start + size]
        examples = [e for _, e in batch]
        # The batch seed depends on the cell seed and the first example's position only, so a resumed
        # cell generates what an uninterrupted one would have.
        records = method.generate(ctx, task.name, [e.query for e in examples], seed=seed * 1_000_003 + batch[0][0])
        scores = task.score(examples, [r["output"] for r in records])
        rows = [{
            "id": e.id, "input": e.query, "output": r["output"], "gold": e.gold, "score": s,
            "segments": r.get("segments", []), "switch_probs": r.get("switch_probs", []),
            "method": method.name, "task": task.name, "split": task.split, "seed": seed,
        } for e, r, s in zip(examples, records, scores)]
        write_jsonl_atomic(parts / f"{n_parts:05d}.jsonl", rows)
        n_parts += 1
        done.update((row["id"], row) for row in rows)
        bar.update(len(batch))
    rows = [done[e.id] for e in task.examples]
    write_jsonl_atomic(path, rows)
    shutil.rmtree(parts, ignore_errors=True)
    return rows


def _summary(recipe: Recipe, methods: list[Method], tasks: list[Task], cells: list[dict]) -> dict:
    roles = [c.role for c in recipe.pool.candidates]
    return {
        "recipe": recipe.name,
        "pool": [{"index": i, "name": n, "role": r, "source": c.source}
                 for i, (n, r, c) in enumerate(zip(candidate_names(recipe), roles, recipe.pool.candidates))],
        "generation": to_dict(recipe)["generation"],
        "methods": [{"name": m.name, "kind": m.kind, "ours": m.ours, "collaborative": m.collaborative} for m in methods],
        "tasks": [{"name": t.name, "type": t.type, "split": t.split, "n": len(t)} for t in tasks],
        "seeds": list(recipe.eval.seeds),
        "cells": cells,
    }


def eval_command(recipe: Recipe) -> dict:
    """Run every (method, task, split, seed) cell of ``recipe.eval`` not cached yet; return the summary.

    Raises :class:`ConfigError` for an unknown method or a missing artifact (before generating anything).
    """
    methods = build_methods(recipe)
    tasks = load_tasks(recipe)
    eval_dir = run_path(recipe, recipe.eval.output, "eval")
    plan = [(m, t, seed, cell_path(eval_dir, m.name, t.name, t.split, seed))
            for m in methods for t in tasks for seed in recipe.eval.seeds]
    pending = [cell for cell in plan if not cell[3].is_file()]
    for method, task, _, _ in pending:
        method.check(task.name)

    ctx = Context(recipe)
    cells = []
    with tqdm(total=sum(len(t) for _, t, _, _ in pending), desc="eval", unit="ex", disable=not pending) as bar:
        for method, task, seed, path in plan:
            if path.is_file():
                rows = read_jsonl(path, required=PREDICTION_FIELDS)
                _check_ids(rows, [e.id for e in task.examples], path)
            else:
                bar.set_description(f"eval {method.name} {task.name}/{task.split} seed{seed}")
                rows = run_cell(ctx, method, task, seed, path, bar)
            cells.append({
                "method": method.name, "task": task.name, "split": task.split, "seed": seed, "n": len(rows),
                "mean": float(np.mean([r["score"] for r in rows])) if rows else None,
                "path": str(path.relative_to(eval_dir)),
            })
            write_json_atomic(eval_dir / "results.json", _summary(recipe, methods, tasks, cells))
    print(f"eval: {len(plan) - len(pending)} cached and {len(pending)} new cells; results in {eval_dir / 'results.json'}")
    return _summary(recipe, methods, tasks, cells)
