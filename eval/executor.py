"""``eval.executor=ray``: the eval cells still to generate, each as a Ray task (:mod:`switchkit.executors`).

A task rebuilds its cell from the recipe and runs it through the core runner into the cell's file, exactly as
``toolkit eval`` would (resumable, fingerprinted); the driver then reads the finished cells like cached ones, so
the results equal a single-process run's.
"""

from __future__ import annotations

from switchkit.config import Recipe
from switchkit.executors import run_on_ray


def run_cells_on_ray(recipe: Recipe, cells: list[tuple[str, str, str, int]], overwrite: bool = False) -> None:
    """Generate the cells named (method, task, split, seed), one Ray task each (``overwrite``: as ``toolkit eval``'s,
    a cell saved under other settings is replaced)."""
    run_on_ray(recipe.ray, run_cell, [(recipe, *cell, overwrite) for cell in cells], "eval")


def run_cell(recipe: Recipe, method: str, task: str, split: str, seed: int, overwrite: bool = False) -> None:
    """Generate one cell (a Ray task)."""
    from switchkit.artifacts import eval_dir
    from switchkit.runner import run_items, task_items

    from .methods import Context
    from .run import _generate, cell_fingerprint, cell_path, eval_methods, eval_tasks

    chosen = next(m for m in eval_methods(recipe) if m.name == method)
    data = next(t for t in eval_tasks(recipe) if t.name == task and t.split == split)
    ctx = Context(recipe, sorted({(e.id, e.query) for e in data.examples}))
    try:
        run_items(cell_path(eval_dir(recipe), method, task, split, seed), task_items(data),
                  _generate(ctx, chosen, data), seed=seed, batch_size=recipe.generation.batch_size,
                  expected=cell_fingerprint(recipe, chosen, data, seed), overwrite=overwrite)
    finally:
        ctx.hold("", lambda: None)  # closes the policy
