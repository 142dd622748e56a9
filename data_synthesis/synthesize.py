"""``toolkit synthesize``: switcher training data from rollouts (paper §2-3), resumable and shardable.

:mod:`.plan` fixes the records and chunks, :mod:`.rollouts` makes one chunk, :mod:`.labels` turns utilities into
labels and statistics, :mod:`.store` keeps finished chunks and writes the dataset. Outputs are bit-identical
across reruns, resumes and shard merges for a given ``generation.seed``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from switchkit.artifacts import stats_file, synthesis_dir, synthesis_shard_data
from switchkit.config import ConfigError, Recipe
from switchkit.io import write_json_atomic
from switchkit.engine import SwitchEngine
from switchkit.models import check_sources, load_pool
from switchkit.tasks import load_tasks

from .labels import format_stats
from .plan import plan
from .rollouts import run_chunk
from .store import check_work, chunk_file, finalize, manifest, merge_shards, start_work


def run_synthesis(recipe: Recipe, progress: bool = True, overwrite: bool = False) -> Path:
    """Synthesize this run's records (all, or one shard) and return the data file; resumes finished chunks.

    Before the pool loads: the tasks, the models' sources and the synthesis folder are checked (another job's
    work, or a folder that is not a synthesis folder, is an error unless ``overwrite``)."""
    directory = synthesis_dir(recipe)
    out = synthesis_shard_data(recipe)
    if len(recipe.pool.candidates) < 2:
        raise ConfigError(f"pool.candidates has {len(recipe.pool.candidates)} models: synthesis needs at least 2")
    if recipe.generation.max_new_tokens < 2 * recipe.generation.patch_size:
        raise ConfigError(f"generation.max_new_tokens={recipe.generation.max_new_tokens} leaves no room for a trace "
                          f"and a divergent patch: synthesis needs at least 2 x generation.patch_size tokens")
    tasks = load_tasks(recipe.tasks, trust_remote_code=recipe.pool.trust_remote_code)
    chunks = plan(recipe, [len(t.examples) for t in tasks])
    check_sources(recipe.pool)
    expected = manifest(recipe, tasks, len(chunks))
    state = check_work(directory, expected, overwrite)
    s = recipe.synthesis
    mine = [c for c in range(len(chunks)) if c % s.num_shards == s.shard]
    todo = [c for c in mine if not (state == "resume" and chunk_file(directory, c).is_file())]
    if todo:
        pool = load_pool(recipe.pool)
        engine = SwitchEngine(pool, recipe.generation)
        engine.check_queries([e.query for t in tasks for e in t.examples], [e.id for t in tasks for e in t.examples])
        start_work(directory, expected, state)
        total = sum(len(chunks[c]) for c in mine)
        bar = tqdm(total=total, initial=total - sum(len(chunks[c]) for c in todo), unit="record",
                   desc=f"synthesize{f' shard {s.shard}/{s.num_shards}' if s.num_shards > 1 else ''}",
                   disable=not progress)
        generated = 0
        for c in todo:
            result = run_chunk(engine, tasks, chunks[c], recipe)
            write_json_atomic(chunk_file(directory, c), {"chunk": c, **result})
            generated += result["tokens"]
            bar.update(len(chunks[c]))
            bar.set_postfix(tokens=generated)
        bar.close()
    elif out.is_file():
        return out
    finalize(directory, recipe, mine, out)
    return out


def synthesize_command(recipe: Recipe, merge: Optional[str] = None, overwrite: bool = False) -> None:
    """CLI entry: synthesize (or merge shard folders with ``merge=dir1,dir2``) and print statistics."""
    start = time.perf_counter()
    if merge is not None:
        dirs = [d for d in merge.split(",") if d]
        if not dirs:
            raise ConfigError("merge= needs a comma-separated list of shard folders")
        out = merge_shards(recipe, dirs, overwrite)
    else:
        out = run_synthesis(recipe, overwrite=overwrite)
    stats = json.loads(stats_file(out).read_text())
    print(format_stats(stats))
    print(f"time: {time.perf_counter() - start:.1f}s")
