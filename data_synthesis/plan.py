"""The synthesis plan: which records to make, in which fixed chunks, with which seeds and trace lengths.

Records are made ``records_per_task`` times per task, cycling over the task's examples (record j uses
example j mod len(examples); each pass draws a new trace). Every random choice of a record comes from a seed
derived from (generation.seed, task, record index), so shards and resumed runs reproduce it. Chunks of
``synthesis.chunk_size`` records are the unit of batching, resume and sharding; shard i of N does the chunks
whose number is i mod N.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from switchkit.config import Recipe
from switchkit.engine import derive_seed


@dataclass
class Job:
    """One record to make: task position, record index and the example it uses."""

    task: int
    index: int
    example: int
    seed: int


def plan(recipe: Recipe, sizes: list[int]) -> list[list[Job]]:
    """All jobs of all tasks, cut into fixed chunks (``sizes[t]`` = number of examples of task t)."""
    jobs = []
    for t, (task_cfg, size) in enumerate(zip(recipe.tasks, sizes)):
        for j in range(recipe.synthesis.records_per_task):
            jobs.append(Job(t, j, j % size, derive_seed(recipe.generation.seed, task_cfg.name, j)))
    size = recipe.synthesis.chunk_size
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def decision_points(recipe: Recipe) -> tuple[int, int]:
    """The first and last number of traced patches a record may have: the decision points between
    ``trace_min_frac`` and ``trace_max_frac`` of the response's patches, always including the first one (right
    after the aligned model's first patch) and never the rule-fixed last patch."""
    g, s = recipe.generation, recipe.synthesis
    patches = max(g.max_new_tokens // g.patch_size, 2)
    last = patches - 2 if g.aligned_first_last else patches - 1  # the divergent patch must be a real decision
    lo = max(1, min(math.floor(s.trace_min_frac * patches), last))
    hi = max(lo, min(math.floor(s.trace_max_frac * patches), last))
    return lo, hi


def trace_length(rng: random.Random, recipe: Recipe) -> int:
    """A trace length in tokens: a whole number of patches drawn uniformly from :func:`decision_points`."""
    lo, hi = decision_points(recipe)
    return recipe.generation.patch_size * rng.randint(lo, hi)
