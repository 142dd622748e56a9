"""``toolkit eval``: run methods x tasks x splits x seeds, one cached, resumable cell at a time.

Layout under the eval folder (:func:`switchkit.artifacts.eval_dir`)::

    cells/<method>/<task>/<split>/seed<seed>.jsonl   a finished cell: one prediction per example
    results.json                                     the run's summary, rewritten after each cell
    distill_results.json                             the same for the methods `toolkit distill` evaluates

Each cell is an output of the core runner (:mod:`switchkit.runner`): resumable batch by batch after a kill,
fingerprinted (models, generation settings, task content, method and its artifact, seed), and reused only
under the same fingerprint. The pool is loaded once, and only if some cell still needs generating. Computed
methods (the oracle) are derived from the other cells last.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from switchkit.artifacts import eval_dir
from switchkit.config import NotApplicable, Recipe, candidate_name, to_dict
from switchkit.io import check_output, clear_output, read_jsonl, write_json_atomic, write_jsonl_atomic
from switchkit.models import check_sources
from switchkit.runner import fingerprint, is_finished, run_items, scored, task_items
from switchkit.tasks import Task, content_hash, load_tasks

from .methods import Context, Method, Oracle, build_methods
from .sweep import sweep_methods

PREDICTION_FIELDS = ("id", "input", "output", "gold", "score", "segments")


def slug(name: str) -> str:
    """A method, task or split name as a folder name (``single:gemma`` -> ``single_gemma``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cell_path(folder: Path, method: str, task: str, split: str, seed: int) -> Path:
    """Where the predictions of one (method, task, split, seed) cell live."""
    return Path(folder) / "cells" / slug(method) / slug(task) / slug(split) / f"seed{seed}.jsonl"


def eval_methods(recipe: Recipe) -> list[Method]:
    """Every method of ``eval.methods``, the switch methods once per ``eval.sweep`` value."""
    return sweep_methods(recipe, build_methods(recipe))


def eval_tasks(recipe: Recipe) -> list[Task]:
    """Every (task, split) of the eval (``eval.tasks``, else ``tasks``), examples limited to ``eval.limit``."""
    return load_tasks(recipe.eval.tasks or recipe.tasks, splits=recipe.eval.splits, limit=recipe.eval.limit,
                      trust_remote_code=recipe.pool.trust_remote_code)


def cell_fingerprint(recipe: Recipe, method: Method, task: Task, seed: int) -> dict:
    """What decides a cell's rows."""
    return fingerprint(method.recipe, switcher=method.collaborative, method=method.name, stamp=method.stamp(task.name),
                       task=content_hash(task), split=task.split, seed=seed)


def _generate(ctx: Context, method: Method, task: Task):
    def run(items, seeds):
        records = method.generate(ctx, task.name, [it.query for it in items], seeds)
        return [{**r, "method": method.name, "task": task.name, "split": task.split} for r in records]

    return scored(task, run)


def _summary(recipe: Recipe, methods: list[Method], tasks: list[Task], cells: list[dict],
             skipped: dict[str, str]) -> dict:
    return {
        "recipe": recipe.name,
        "pool": [{"index": i, "name": candidate_name(c), "role": c.role, "source": c.source}
                 for i, c in enumerate(recipe.pool.candidates)],
        "generation": to_dict(recipe)["generation"],
        "methods": [{"name": m.name, "kind": m.kind, "ours": m.ours, "collaborative": m.collaborative,
                     "computed": m.computed} for m in methods],
        "tasks": [{"name": t.name, "type": t.type, "split": t.split, "n": len(t)} for t in tasks],
        "seeds": list(recipe.eval.seeds),
        "cells": cells,
        "not_applicable": skipped,
    }


def eval_command(recipe: Recipe, overwrite: bool = False, summary: str = "results.json") -> dict:
    """Run every (method, task, split, seed) cell of ``recipe.eval``; return the summary.

    Raises :class:`ConfigError` for an unknown method, a missing artifact, a cell saved under other settings or
    an eval folder that is not one (the last two unless ``overwrite``), before anything loads.
    """
    methods = eval_methods(recipe)
    tasks = eval_tasks(recipe)
    folder = eval_dir(recipe)
    check_sources(recipe.pool)
    ours = (folder / "results.json").is_file() or (folder / "cells").is_dir()
    replace = check_output(folder, overwrite=overwrite, ours=ours)  # a folder that is not an eval folder
    plan = [(m, t, seed, cell_path(folder, m.name, t.name, t.split, seed), cell_fingerprint(recipe, m, t, seed))
            for m in methods for t in tasks for seed in recipe.eval.seeds]
    generated = [cell for cell in plan if not cell[0].computed]
    pending = [cell for cell in generated if not is_finished(cell[3], cell[4], overwrite)]
    skipped: dict[str, str] = {}  # eval.skip_inapplicable: method -> why this pool cannot run it
    checked: set[tuple[str, str]] = set()
    for method, task, *_ in pending:
        if method.name in skipped or (method.name, task.name) in checked:  # once per method and task, not per seed
            continue
        checked.add((method.name, task.name))
        try:
            method.check(task.name)
        except NotApplicable as exc:  # never has a finished cell, so every rerun checks it again
            if not recipe.eval.skip_inapplicable:
                raise
            skipped[method.name] = str(exc)
            print(f"eval: leaving out {method.name}: {exc}")
    if skipped:
        methods = [m for m in methods if m.name not in skipped]
        plan, generated, pending = ([c for c in part if c[0].name not in skipped] for part in (plan, generated, pending))
    if replace:
        clear_output(folder)
    if recipe.eval.executor == "ray" and pending:  # generate them as Ray tasks; the loop below reads them back
        from .executor import run_cells_on_ray

        run_cells_on_ray(recipe, [(m.name, t.name, t.split, seed) for m, t, seed, *_ in pending], overwrite)
        pending = [cell for cell in generated if not is_finished(cell[3], cell[4])]
    queries = {(e.id, e.query) for _, task, *_ in pending for e in task.examples}
    ctx, cells, rows_of = Context(recipe, sorted(queries)), [], {}
    todo = {cell[3] for cell in pending}
    with tqdm(total=sum(len(t) for _, t, *_ in pending), desc="eval", unit="ex", disable=not pending) as bar:
        for method, task, seed, path, expected in generated + [cell for cell in plan if cell[0].computed]:
            bar.set_description(f"eval {method.name} {task.name}/{task.split} seed{seed}")
            if method.computed:
                singles = [rows_of[(m.name, task.name, task.split, seed)] for m in methods if m.kind == "single"]
                rows = Oracle.combine(singles)
                write_jsonl_atomic(path, rows)
            else:
                rows = run_items(path, task_items(task), _generate(ctx, method, task), seed=seed,
                                 batch_size=recipe.generation.batch_size, expected=expected,
                                 bar=bar if path in todo else None, overwrite=overwrite)
            rows_of[(method.name, task.name, task.split, seed)] = rows
            cells.append({"method": method.name, "task": task.name, "split": task.split, "seed": seed,
                          "n": len(rows), "mean": float(np.mean([r["score"] for r in rows])) if rows else None,
                          "path": str(path.relative_to(folder))})
            write_json_atomic(folder / summary, _summary(recipe, methods, tasks, cells, skipped))
    ctx.hold("", lambda: None)  # closes the last policy
    print(f"eval: {len(generated) - len(pending)} cached and {len(pending)} new cells; results in "
          f"{folder / summary}")
    return _summary(recipe, methods, tasks, cells, skipped)
