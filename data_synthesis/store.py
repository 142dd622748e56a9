"""The chunk store: finished chunks under ``<synthesis dir>/work/``, the manifest that ties them to a recipe,
the final sorted dataset (with ``stats.json``), and the merge of shard folders.

Each finished chunk is written atomically to ``work/chunk-NNNNNN.json``; a rerun skips finished chunks. The
manifest holds the job's fingerprint (models, settings, task contents): work from another job is refused with
an error naming what changed (``overwrite=true`` replaces it), never mixed in. The dataset
(``data.parquet`` or ``data.jsonl``, :mod:`switchkit.artifacts` features) is sorted by (task, index), so a merge
of shards equals a single run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from switchkit.artifacts import stats_file, synthesis_data, synthesis_dir, write_records
from switchkit.config import Recipe, to_dict
from switchkit.io import InputError, atomic_path, check_output, clear_output, write_json_atomic
from switchkit.runner import fingerprint as runner_fingerprint, same_job
from switchkit.tasks import Task, content_hash, load_tasks

from .labels import compute_stats
from .plan import plan

FORMAT_VERSION = 3


def fingerprint(recipe: Recipe, tasks: list[Task]) -> dict:
    """Everything that determines the records: the pool (settings and weights), the generation settings, the task
    configs and contents, the synthesis settings and the code's format versions (as :func:`switchkit.runner.fingerprint`)."""
    cfg = to_dict(recipe)
    synthesis = {k: v for k, v in cfg["synthesis"].items() if k not in ("shard", "num_shards", "output", "format")}
    return runner_fingerprint(recipe, switcher=False, format=FORMAT_VERSION, tasks=cfg["tasks"],
                              task_content=[content_hash(t) for t in tasks], synthesis=synthesis)


def _work(directory: Path) -> Path:
    return directory / "work"


def chunk_file(directory: Path, chunk: int) -> Path:
    return _work(directory) / f"chunk-{chunk:06d}.json"


def manifest(recipe: Recipe, tasks: list[Task], n_chunks: int) -> dict:
    """What ties a synthesis folder's work to a recipe: the fingerprint and the number of chunks."""
    return {**fingerprint(recipe, tasks), "chunks": n_chunks}


def check_work(directory: Path, expected: dict, overwrite: bool = False) -> str:
    """Before loading: ``"resume"`` when ``directory`` holds this job's work, ``"new"`` when it is absent or empty,
    ``"replace"`` when it holds other work or is not a synthesis folder and ``overwrite`` is set; an error naming
    it (and what changed) without ``overwrite``."""
    if same_job(_work(directory) / "manifest.json", expected, directory, overwrite):
        return "resume"
    return "replace" if check_output(directory, overwrite=overwrite) else "new"


def start_work(directory: Path, expected: dict, state: str) -> None:
    """Before the first chunk: replace what :func:`check_work` allowed to, and write the manifest."""
    if state == "replace":
        clear_output(directory)
    if state != "resume":
        write_json_atomic(_work(directory) / "manifest.json", expected)


def read_chunks(directory: Path, chunks: list[int]) -> list[dict]:
    results = []
    for c in chunks:
        path = chunk_file(directory, c)
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read work chunk ({_first_line(exc)}); delete it to redo the chunk") from None
        if not isinstance(result, dict) or not {"records", "skipped", "tokens"} <= set(result):
            raise InputError(f"{path}: not a work chunk (needs records, skipped, tokens); delete it to redo the chunk")
        results.append(result)
    return results


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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


def merge_shards(recipe: Recipe, dirs: list[str], overwrite: bool = False) -> Path:
    """Merge shard folders into the recipe's synthesis folder; the result equals a single run's."""
    directory = synthesis_dir(recipe)
    tasks = load_tasks(recipe.tasks, trust_remote_code=recipe.pool.trust_remote_code)
    expected = manifest(recipe, tasks, len(plan(recipe, [len(t.examples) for t in tasks])))
    n_chunks = expected["chunks"]
    sources = [Path(d) for d in dirs if Path(d).resolve() != directory.resolve()]
    for source in sources:
        if not (_work(source) / "manifest.json").is_file():
            raise InputError(f"{source}: not a synthesis folder (no work/manifest.json)")
        same_job(_work(source) / "manifest.json", expected, source)
    start_work(directory, expected, check_work(directory, expected, overwrite))
    for source in sources:
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
