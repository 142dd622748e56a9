"""Switcher training data from rollouts (DESIGN.md §Learning the switcher; paper §2-3).

For each record (a task query plus a seed):

1. Trace: random switching, paused at a length L drawn uniformly from the patch multiples between
   ``trace_min_frac`` and ``trace_max_frac`` of ``max_new_tokens``.
   If the trace finishes (EOS or a stop string) before L, it is cut at its last patch boundary before the
   end (the state there is kept while the trace grows); if it finished within its first patch, nothing
   is left to decide and the record is skipped (counted in stats).
2. Divergent step: the trace is forked n times (sharing its KV caches) and candidate i writes one patch
   on branch i.
3. Rollouts: each unfinished branch is forked k times and run to the end with random switching.
   Before each fork every model's KV cache is filled with the prefix once (:meth:`SwitchEngine.prefill`), so the
   forks share it instead of each encoding it again; all traces, branches and rollouts of a chunk run
   together (one batch per model and patch).
4. Each finished response is scored by the task scorer; utility i is branch i's mean score and the label
   is the argmax. Ties follow ``synthesis.tie_rule``: ``random`` (seeded by the record), ``lowest`` id,
   ``aligned`` (the aligned model if tied, else the lowest), or ``drop`` (the record is left out).

Records are made ``records_per_task`` times per task, cycling over the task's examples (record j uses
example j mod len(examples); each pass draws a new trace). Every random choice of a record comes from
a seed derived from (generation.seed, task, record index), so shards and resumed runs reproduce it.

Work is done in fixed chunks of ``synthesis.chunk_size`` records (the same batches on every run, so
outputs are bit-identical). Each finished chunk is written atomically to ``<dir>/work/``; a rerun skips
finished chunks. Shard i of N does the chunks whose number is i mod N. The final dataset
(``data.parquet``, or ``data.jsonl``) is written with ``datasets``, sorted by (task, index).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
from tqdm.auto import tqdm

from switchkit.config import ConfigError, Recipe, to_dict
from switchkit.io import InputError, atomic_path, write_json_atomic
from switchkit.prompt import build_prompt

FORMAT_VERSION = 1

FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "label": datasets.Value("int64"),
    "utilities": [datasets.Value("float64")],
    "k": datasets.Value("int64"),
    "n": datasets.Value("int64"),
    "tie": datasets.Value("bool"),
    "task": datasets.Value("string"),
    "query_id": datasets.Value("string"),
    "index": datasets.Value("int64"),
    "query": datasets.Value("string"),
    "trace": [{"model": datasets.Value("int64"), "text": datasets.Value("string"),
               "n_tokens": datasets.Value("int64")}],
    "seed": datasets.Value("int64"),
    "tokens": datasets.Value("int64"),
})


# ---------------------------------------------------------------- layout and plan


def synthesis_dir(recipe: Recipe) -> Path:
    """The synthesis folder: ``synthesis.output`` or ``<run_dir>/synthesis``."""
    return Path(recipe.synthesis.output) if recipe.synthesis.output else Path(recipe.run_dir) / "synthesis"


def data_path(directory: Path, recipe: Recipe) -> Path:
    """The final data file of a full run (``data.parquet`` or ``data.jsonl``)."""
    return directory / f"data.{recipe.synthesis.format}"


def shard_data_path(directory: Path, recipe: Recipe) -> Path:
    """The data file this run writes: the full file, or ``shard-i-of-N.<format>`` for a shard."""
    s = recipe.synthesis
    if s.num_shards == 1:
        return data_path(directory, recipe)
    return directory / f"shard-{s.shard}-of-{s.num_shards}.{s.format}"


def stats_path(data_file: Path) -> Path:
    """The statistics beside a data file: ``stats.json`` for ``data.*``, ``<shard>.stats.json`` for a shard."""
    return data_file.parent / ("stats.json" if data_file.stem == "data" else f"{data_file.stem}.stats.json")


def fingerprint(recipe: Recipe) -> str:
    """A hash of everything that determines the records (pool, generation, tasks, synthesis settings)."""
    cfg = to_dict(recipe)
    synthesis = {k: v for k, v in cfg["synthesis"].items() if k not in ("shard", "num_shards", "output", "format")}
    pool = {k: v for k, v in cfg["pool"].items() if k != "cache_dir"}
    key = {"version": FORMAT_VERSION, "pool": pool, "generation": cfg["generation"], "tasks": cfg["tasks"],
           "synthesis": synthesis}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from its parts (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


def trace_length(rng: random.Random, recipe: Recipe) -> int:
    """A patch-aligned trace length, uniform over the patch multiples in [min_frac, max_frac] * max_new_tokens
    (clamped so that at least one patch is traced and one is left for the divergent step)."""
    g, s = recipe.generation, recipe.synthesis
    patch = g.patch_size
    top = math.ceil(g.max_new_tokens / patch) - 1
    lo = min(max(1, math.ceil(s.trace_min_frac * g.max_new_tokens / patch)), top)
    hi = max(min(math.floor(s.trace_max_frac * g.max_new_tokens / patch), top), lo)
    return patch * rng.randint(lo, hi)


# ---------------------------------------------------------------- labels


def choose_label(utilities: list[float], rule: str, aligned: int, seed: int) -> tuple[Optional[int], bool]:
    """(label, tie) for the utilities; the label is None when the rule is ``drop`` and there is a tie."""
    best = max(utilities)
    tied = [i for i, u in enumerate(utilities) if math.isclose(u, best, rel_tol=0, abs_tol=1e-9)]
    if len(tied) == 1:
        return tied[0], False
    if rule == "drop":
        return None, True
    if rule == "lowest":
        return tied[0], True
    if rule == "aligned":
        return (aligned if aligned in tied else tied[0]), True
    return random.Random(derive_seed(seed, "tie")).choice(tied), True


# ---------------------------------------------------------------- one chunk


def _trace_dicts(seq) -> list[dict]:
    return [{"model": int(s.model), "text": s.text, "n_tokens": int(s.n_tokens)} for s in seq.segments]


def run_chunk(engine, tasks, jobs: list[Job], recipe: Recipe) -> dict:
    """Make the records of one chunk: traces, divergent step, rollouts, scores and labels."""
    from switchkit.engine import RandomPolicy

    n, k = len(engine.pool), recipe.synthesis.k
    patch = recipe.generation.patch_size
    examples = [tasks[job.task].examples[job.example] for job in jobs]
    targets = [trace_length(random.Random(job.seed), recipe) for job in jobs]
    seqs = engine.start([ex.query for ex in examples], seeds=[derive_seed(job.seed, "trace") for job in jobs],
                        query_ids=[ex.id for ex in examples])
    # Grow all traces together one patch at a time, keeping the state before each patch (a fork shares the
    # caches), so a trace that finishes early falls back to its last unfinished patch boundary.
    traces: list = [None] * len(jobs)
    for length in range(patch, max(targets) + 1, patch):
        live = [i for i in range(len(jobs)) if targets[i] >= length and not seqs[i].done]
        for i in live:
            traces[i] = engine.fork(seqs[i], seeds=[jobs[i].seed])[0] if length > patch else None
        engine.run([seqs[i] for i in live], RandomPolicy(), max_tokens=length)
    tokens = [seq.n_tokens for seq in seqs]
    skipped = []
    for i, seq in enumerate(seqs):
        if not seq.done:
            traces[i] = seq
        elif traces[i] is None:
            skipped.append({"task": tasks[jobs[i].task].name, "index": jobs[i].index,
                            "reason": "trace ended in its first patch", "tokens": tokens[i]})
    ready = [i for i in range(len(jobs)) if traces[i] is not None]
    if not ready:
        return {"records": [], "skipped": skipped, "tokens": sum(tokens)}

    # divergent step: candidate c writes one patch on branch c of every trace
    engine.prefill([traces[i] for i in ready])
    branches = {i: engine.fork(traces[i], seeds=[derive_seed(jobs[i].seed, "branch", c) for c in range(n)])
                for i in ready}
    engine.write([b for i in ready for b in branches[i]], model_ids=[c for _ in ready for c in range(n)])

    # rollouts: k continuations of each unfinished branch, all run as one batch (a finished branch is its
    # own only response)
    engine.prefill([b for i in ready for b in branches[i]])
    rollouts = {}
    for i in ready:
        for c, branch in enumerate(branches[i]):
            tokens[i] += branch.n_tokens - traces[i].n_tokens
            rollouts[i, c] = [branch] if branch.done else engine.fork(
                branch, seeds=[derive_seed(jobs[i].seed, "rollout", c, r) for r in range(k)])
    engine.run([r for (i, c), rolls in rollouts.items() if not branches[i][c].done for r in rolls], RandomPolicy())
    for (i, c), rolls in rollouts.items():
        tokens[i] += sum(r.n_tokens - branches[i][c].n_tokens for r in rolls)

    records = []
    for t, task in enumerate(tasks):
        mine = [i for i in ready if jobs[i].task == t]
        if not mine:
            continue
        keys = [(i, c) for i in mine for c in range(n)]
        scores = task.score([examples[i] for i, c in keys for _ in rollouts[i, c]],
                            [r.text for key in keys for r in rollouts[key]])
        utils, pos = {}, 0
        for key in keys:
            utils[key] = statistics.fmean(scores[pos : pos + len(rollouts[key])])
            pos += len(rollouts[key])
        for i in mine:
            utilities = [float(utils[i, c]) for c in range(n)]
            label, tie = choose_label(utilities, recipe.synthesis.tie_rule, engine.pool.aligned_index, jobs[i].seed)
            segments = _trace_dicts(traces[i])
            records.append({
                "prompt": build_prompt(examples[i].query, [(s["model"], s["text"]) for s in segments], n,
                                       recipe.switcher.prompt_format),
                "label": -1 if label is None else label, "utilities": utilities, "k": k, "n": n, "tie": tie,
                "task": task.name, "query_id": examples[i].id, "index": jobs[i].index,
                "query": examples[i].query, "trace": segments, "seed": jobs[i].seed, "tokens": tokens[i],
            })
    return {"records": records, "skipped": skipped, "tokens": sum(tokens)}


# ---------------------------------------------------------------- run, merge, stats


def _work(directory: Path) -> Path:
    return directory / "work"


def _chunk_file(directory: Path, chunk: int) -> Path:
    return _work(directory) / f"chunk-{chunk:06d}.json"


def _check_manifest(directory: Path, recipe: Recipe, n_chunks: int) -> None:
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


def load_tasks(recipe: Recipe):
    """The recipe's tasks (each on its configured split)."""
    from switchkit.tasks import load_task

    if not recipe.tasks:
        raise ConfigError("tasks is empty: synthesis needs at least one task")
    names = [t.name for t in recipe.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks have duplicate names {names}: each task needs its own name")
    tasks = [load_task(cfg, trust_remote_code=recipe.pool.trust_remote_code) for cfg in recipe.tasks]
    for cfg, task in zip(recipe.tasks, tasks):
        if not task.examples:
            raise InputError(f"task {cfg.name}: {cfg.source} [{task.split}] has no rows")
    return tasks


def run_synthesis(recipe: Recipe, progress: bool = True) -> Path:
    """Synthesize this run's records (all, or one shard) and return the data file; resumes finished chunks."""
    directory = synthesis_dir(recipe)
    out = shard_data_path(directory, recipe)
    if len(recipe.pool.candidates) < 2:
        raise ConfigError(f"pool.candidates has {len(recipe.pool.candidates)} models: synthesis needs at least 2")
    if recipe.generation.max_new_tokens <= recipe.generation.patch_size:
        raise ConfigError(f"generation.max_new_tokens={recipe.generation.max_new_tokens} leaves no room for a trace "
                          f"and a divergent patch: synthesis needs more than generation.patch_size tokens")
    tasks = load_tasks(recipe)
    chunks = plan(recipe, [len(t.examples) for t in tasks])
    _check_manifest(directory, recipe, len(chunks))
    s = recipe.synthesis
    mine = [c for c in range(len(chunks)) if c % s.num_shards == s.shard]
    todo = [c for c in mine if not _chunk_file(directory, c).is_file()]
    if todo:
        from switchkit.engine import SwitchEngine
        from switchkit.models import load_pool

        pool = load_pool(recipe.pool)
        engine = SwitchEngine(pool, recipe.generation)
        total = sum(len(chunks[c]) for c in mine)
        bar = tqdm(total=total, initial=total - sum(len(chunks[c]) for c in todo), unit="record",
                   desc=f"synthesize{f' shard {s.shard}/{s.num_shards}' if s.num_shards > 1 else ''}",
                   disable=not progress)
        generated = 0
        for c in todo:
            result = run_chunk(engine, tasks, chunks[c], recipe)
            write_json_atomic(_chunk_file(directory, c), {"chunk": c, **result})
            generated += result["tokens"]
            bar.update(len(chunks[c]))
            bar.set_postfix(tokens=generated)
        bar.close()
    elif out.is_file():
        return out
    finalize(directory, recipe, mine, out)
    return out


def _read_chunks(directory: Path, chunks: list[int]) -> list[dict]:
    results = []
    for c in chunks:
        path = _chunk_file(directory, c)
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read work chunk ({exc}); delete it to redo the chunk") from None
    return results


def finalize(directory: Path, recipe: Recipe, chunks: list[int], out: Path) -> dict:
    """Write the sorted dataset and ``stats.json`` from the given finished chunks; returns the stats."""
    results = _read_chunks(directory, chunks)
    records = [r for res in results for r in res["records"]]
    records.sort(key=lambda r: (r["task"], r["index"]))
    kept = [r for r in records if r["label"] >= 0]
    ds = datasets.Dataset.from_list(kept, features=FEATURES)
    with atomic_path(out) as tmp:
        if recipe.synthesis.format == "parquet":
            ds.to_parquet(str(tmp))
        else:
            ds.to_json(str(tmp), lines=True, force_ascii=False)
    stats = compute_stats(records, [s for res in results for s in res["skipped"]],
                          sum(res["tokens"] for res in results), recipe)
    stats["data"] = str(out)
    write_json_atomic(stats_path(out), stats)
    return stats


def compute_stats(records: list[dict], skipped: list[dict], tokens: int, recipe: Recipe) -> dict:
    """Label distribution, tie rate, utility mean/spread and tokens generated."""
    n = records[0]["n"] if records else len(recipe.pool.candidates)
    kept = [r for r in records if r["label"] >= 0]
    labels = Counter(r["label"] for r in kept)
    utilities = [u for r in records for u in r["utilities"]]
    per_model = [[r["utilities"][c] for r in records] for c in range(n)]
    return {
        "records": len(kept),
        "made": len(records),
        "dropped_ties": len(records) - len(kept),
        "skipped_early_eos": len(skipped),
        "per_task": dict(sorted(Counter(r["task"] for r in kept).items())),
        "label_distribution": {str(c): labels.get(c, 0) for c in range(n)},
        "tie_rate": (sum(r["tie"] for r in records) / len(records)) if records else 0.0,
        "utility_mean": statistics.fmean(utilities) if utilities else 0.0,
        "utility_std": statistics.pstdev(utilities) if utilities else 0.0,
        "utility_mean_per_model": [statistics.fmean(u) if u else 0.0 for u in per_model],
        "utility_spread_mean": statistics.fmean(max(r["utilities"]) - min(r["utilities"]) for r in records)
        if records else 0.0,
        "tokens_generated": tokens,
        "k": recipe.synthesis.k,
        "tie_rule": recipe.synthesis.tie_rule,
    }


def merge_shards(recipe: Recipe, dirs: list[str]) -> Path:
    """Merge shard folders into the recipe's synthesis folder; the result equals a single run's."""
    directory = synthesis_dir(recipe)
    tasks = load_tasks(recipe)
    n_chunks = len(plan(recipe, [len(t.examples) for t in tasks]))
    _check_manifest(directory, recipe, n_chunks)
    for source in map(Path, dirs):
        if not (_work(source) / "manifest.json").is_file():
            raise InputError(f"{source}: not a synthesis folder (no work/manifest.json)")
        if source.resolve() != directory.resolve():
            _check_manifest(source, recipe, n_chunks)
            for c in range(n_chunks):
                src, dst = _chunk_file(source, c), _chunk_file(directory, c)
                if src.is_file() and not dst.is_file():
                    with atomic_path(dst) as tmp:
                        shutil.copyfile(src, tmp)
    missing = [c for c in range(n_chunks) if not _chunk_file(directory, c).is_file()]
    if missing:
        raise InputError(f"merge: {len(missing)} of {n_chunks} chunks are missing (e.g. chunk {missing[0]}): "
                         "run the missing shards first")
    out = data_path(directory, recipe)
    finalize(directory, recipe, list(range(n_chunks)), out)
    return out


def load_records(path: str | Path) -> datasets.Dataset:
    """Load a synthesized dataset (a data file, or a synthesis folder holding one)."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "data.parquet", path / "data.jsonl") if p.is_file()]
        if not found:
            raise InputError(f"{path}: no data.parquet or data.jsonl (run `toolkit synthesize` first)")
        path = found[0]
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path), features=FEATURES)
    if path.suffix == ".jsonl":
        return datasets.Dataset.from_json(str(path), features=FEATURES)
    raise InputError(f"{path}: unsupported synthesis file: use .parquet or .jsonl")


def format_stats(stats: dict) -> str:
    """A short human-readable summary of :func:`compute_stats`."""
    total = max(stats["records"], 1)
    labels = ", ".join(f"model {c}: {v} ({v / total:.0%})" for c, v in stats["label_distribution"].items())
    return "\n".join([
        f"records: {stats['records']} (made {stats['made']}, dropped ties {stats['dropped_ties']}, "
        f"skipped early EOS {stats['skipped_early_eos']})",
        f"labels: {labels}",
        f"tie rate: {stats['tie_rate']:.3f} (rule {stats['tie_rule']})",
        f"utilities: mean {stats['utility_mean']:.3f}, std {stats['utility_std']:.3f}, per model "
        + ", ".join(f"{u:.3f}" for u in stats["utility_mean_per_model"])
        + f", mean spread {stats['utility_spread_mean']:.3f}",
        f"tokens generated: {stats['tokens_generated']}",
        f"data: {stats['data']}",
    ])


def synthesize_command(recipe: Recipe, merge: Optional[str] = None) -> None:
    """CLI entry: synthesize (or merge shard folders with ``merge=dir1,dir2``) and print statistics."""
    start = time.perf_counter()
    if merge is not None:
        dirs = [d for d in merge.split(",") if d]
        if not dirs:
            raise ConfigError("merge= needs a comma-separated list of shard folders")
        out = merge_shards(recipe, dirs)
    else:
        out = run_synthesis(recipe)
    stats = json.loads(stats_path(out).read_text())
    print(format_stats(stats))
    print(f"time: {time.perf_counter() - start:.1f}s")
