"""The chunk store: finished chunks under ``<synthesis dir>/work/``, the manifest that ties them to a recipe,
the final sorted dataset (with ``stats.json``), and the merge of shard folders.

Each finished chunk is written atomically to ``work/chunk-NNNNNN.json``; a rerun skips finished chunks. The
manifest holds the recipe's fingerprint: work from another recipe is refused, never mixed in. The dataset
(``data.parquet`` or ``data.jsonl``, :mod:`switchkit.artifacts` features) is sorted by (task, index), so a merge
of shards equals a single run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from switchkit.artifacts import stats_file, synthesis_data, synthesis_dir, write_records
from switchkit.config import ConfigError, Recipe, to_dict
from switchkit.io import InputError, atomic_path, write_json_atomic
from switchkit.tasks import load_tasks

from .labels import compute_stats
from .plan import plan

FORMAT_VERSION = 2


def fingerprint(recipe: Recipe) -> str:
    """A hash of everything that determines the records (pool, generation, tasks, synthesis settings)."""
    cfg = to_dict(recipe)
    synthesis = {k: v for k, v in cfg["synthesis"].items()
                 if k not in ("shard", "num_shards", "output", "format", "max_in_flight", "executor")}
    pool = {k: v for k, v in cfg["pool"].items() if k != "cache_dir"}
    generation = {k: v for k, v in cfg["generation"].items() if k != "vllm"}  # engine settings, not results
    key = {"version": FORMAT_VERSION, "pool": pool, "generation": generation, "tasks": cfg["tasks"],
           "synthesis": synthesis}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _work(directory: Path) -> Path:
    return directory / "work"


def chunk_file(directory: Path, chunk: int) -> Path:
    return _work(directory) / f"chunk-{chunk:06d}.json"


def check_manifest(directory: Path, recipe: Recipe, n_chunks: int) -> None:
    manifest = _work(directory) / "manifest.json"
    expected = {"fingerprint": fingerprint(recipe), "chunks": n_chunks, "version": FORMAT_VERSION}
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            found = None
        if found != expected:
            raise ConfigError(f"{directory} holds synthesis work from a different recipe: set synthesis.output to "
                              f"a new folder or delete {_work(directory)}")
    else:
        write_json_atomic(manifest, expected)


def read_chunks(directory: Path, chunks: list[int]) -> list[dict]:
    results = []
    for c in chunks:
        path = chunk_file(directory, c)
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read work chunk ({exc}); delete it to redo the chunk") from None
    return results


def finalize(directory: Path, recipe: Recipe, chunks: list[int], out: Path) -> dict:
    """Write the sorted dataset and ``stats.json`` from the given finished chunks; returns the stats."""
    results = read_chunks(directory, chunks)
    records = [r for res in results for r in res["records"]]
    records.sort(key=lambda r: (r["task"], r["index"]))
    kept = [r for r in records if r["label"] >= 0]
    write_records(out, kept)
    stats = compute_stats(records, [s for res in results for s in res["skipped"]],
                          sum(res["tokens"] for res in results), recipe)
    stats["data"] = str(out)
    write_json_atomic(stats_file(out), stats)
    return stats


def merge_shards(recipe: Recipe, dirs: list[str]) -> Path:
    """Merge shard folders into the recipe's synthesis folder; the result equals a single run's."""
    directory = synthesis_dir(recipe)
    tasks = load_tasks(recipe.tasks, trust_remote_code=recipe.pool.trust_remote_code)
    n_chunks = len(plan(recipe, [len(t.examples) for t in tasks]))
    check_manifest(directory, recipe, n_chunks)
    for source in map(Path, dirs):
        if not (_work(source) / "manifest.json").is_file():
            raise InputError(f"{source}: not a synthesis folder (no work/manifest.json)")
        if source.resolve() != directory.resolve():
            check_manifest(source, recipe, n_chunks)
            for c in range(n_chunks):
                src, dst = chunk_file(source, c), chunk_file(directory, c)
                if src.is_file() and not dst.is_file():
                    with atomic_path(dst) as tmp:
                        shutil.copyfile(src, tmp)
    missing = [c for c in range(n_chunks) if not chunk_file(directory, c).is_file()]
    if missing:
        raise InputError(f"merge: {len(missing)} of {n_chunks} chunks are missing (e.g. chunk {missing[0]}): "
                         "run the missing shards first")
    out = synthesis_data(recipe, directory)
    finalize(directory, recipe, list(range(n_chunks)), out)
    return out
