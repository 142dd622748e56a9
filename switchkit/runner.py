"""The resumable generation runner: ``toolkit generate``, every eval cell and distillation's generations.

An output is one JSONL file with one row per item, in item order. While it is being made, finished batches sit
in ``<file>.parts/`` (one atomic JSONL per batch); a rerun after a kill generates only the items without a
saved row, so nothing is lost or duplicated. Everything that decides the rows (models, generation settings,
policy, inputs, seed, code version) is the output's *fingerprint*, stored in ``<file>.parts/fingerprint.json``
while it runs and in ``<file>.fingerprint.json`` once finished. Saved rows are reused only under the same
fingerprint; a different one is an error that names what changed.

Item ``i`` is generated with seed ``seed * 1_000_003 + i``, whatever batch it falls in, so a resumed run
writes what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from .config import ConfigError, Recipe, to_dict
from .io import (InputError, check_output, check_writable, clear_output, path_hash, read_jsonl, write_json_atomic,
                 write_jsonl_atomic)
from .tasks import Task

RUNNER_VERSION = 4  # bump when the rows a runner writes change for the same inputs


@dataclass(frozen=True)
class Item:
    """One query to answer: a stable id and the query text."""

    id: str
    query: str


# generate(items, seeds) -> one row per item (at least "output")
Generate = Callable[[list[Item], list[int]], list[dict]]


def engine_generate(engine, policy) -> Generate:
    """Switch generation of ``engine`` under ``policy`` as a :data:`Generate`."""
    return lambda items, seeds: engine.generate([it.query for it in items], policy, seeds)


def task_items(task: Task) -> list[Item]:
    """The items of a task split: its examples' ids and queries."""
    return [Item(e.id, e.query) for e in task.examples]


def scored(task: Task, generate: Generate) -> Generate:
    """``generate`` plus each row's ``gold``, ``score`` and what the scorer ``extracted`` (batched)."""
    by_id = {e.id: e for e in task.examples}

    def run(items: list[Item], seeds: list[int]) -> list[dict]:
        records = generate(items, seeds)
        examples = [by_id[it.id] for it in items]
        judged = task.judge(examples, [r["output"] for r in records])
        return [{**r, "gold": e.gold, "score": j.score, "extracted": j.extracted}
                for r, e, j in zip(records, examples, judged)]

    return run


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of an output generated with ``seed``."""
    return seed * 1_000_003 + index


def generation_fingerprint(recipe: Recipe) -> dict:
    """The generation settings that decide generated text (not ``batch_size`` or the vLLM engine settings)."""
    return {k: v for k, v in to_dict(recipe.generation).items() if k not in ("batch_size", "vllm")}


def fingerprint(recipe: Recipe, switcher: bool = True, **extra) -> dict:
    """What decides generated rows: the pool (settings and each model's weights, see
    :func:`switchkit.models.source_identity`), the generation settings, the switcher settings (unless the rows
    do not depend on them, e.g. a single model's), the code's format version, and ``extra`` (inputs, task
    content, method, switcher weights, seed)."""
    from .models import source_identity

    cfg = to_dict(recipe)
    pool = {k: v for k, v in cfg["pool"].items() if k != "cache_dir"}
    return {"version": RUNNER_VERSION, "pool": pool, "models": [source_identity(c) for c in recipe.pool.candidates],
            "generation": generation_fingerprint(recipe), "switcher": cfg["switcher"] if switcher else None, **extra}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def same_job(stored: Path, expected: dict, out: Path, overwrite: bool = False) -> bool:
    """Whether the fingerprint file ``stored`` holds ``expected``, so that ``out`` may be reused or continued.

    False when there is no such file, or when it differs and ``overwrite`` is set (the caller then replaces
    ``out``); a difference without ``overwrite`` is a :class:`ConfigError` naming what changed.
    """
    if not stored.is_file():
        return False
    try:
        found = json.loads(stored.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        found = None
    expected = json.loads(json.dumps(expected))  # as it reads back
    if found == expected:
        return True
    if overwrite:
        return False
    if not isinstance(found, dict):
        raise ConfigError(f"{out}: its fingerprint {stored} is unreadable, so it cannot be reused: set "
                          "overwrite=true to recompute it, or write elsewhere")
    changed = ", ".join(_diff(found, expected)[:4]) or "the fingerprint"
    raise ConfigError(f"{out} was made with other settings ({changed} changed): set overwrite=true to recompute "
                      "it, or write elsewhere")


def parts_dir(out: Path) -> Path:
    """The folder of an unfinished output's saved batches."""
    return out.with_name(out.name + ".parts")


def fingerprint_file(out: Path) -> Path:
    """The fingerprint beside a finished output."""
    return out.with_name(out.name + ".fingerprint.json")


def is_finished(out: Path, expected: dict, overwrite: bool = False) -> bool:
    """Whether ``out`` is a finished output with the expected fingerprint.

    Also checks, before anything is loaded and without changing anything, that whatever lies at ``out`` is this
    job's: a finished output or saved batches with another fingerprint, or a file this job did not write, is an
    error naming it unless ``overwrite`` (then :func:`run_items` replaces it). The saved batches of a finished
    output (a kill came after its fingerprint, before they were removed) are removed: the output holds them all.
    """
    out = Path(out)
    check_writable(out)
    parts = parts_dir(out)
    if out.is_file() and same_job(fingerprint_file(out), expected, out, overwrite):
        if parts.is_dir() and same_job(parts / "fingerprint.json", expected, out, overwrite=True):
            shutil.rmtree(parts, ignore_errors=True)
        return True
    resumable = same_job(parts / "fingerprint.json", expected, out, overwrite)
    if resumable:
        _saved_rows(parts)  # a damaged batch is an error now, not after the models load
    else:
        check_output(parts, overwrite=overwrite)
    # with saved batches of this job, a file at out was written from them (a kill came before its fingerprint)
    check_output(out, overwrite=overwrite, folder=False, ours=resumable)
    return False


def _saved_rows(parts: Path) -> list[dict]:
    rows = []
    for part in sorted(parts.glob("*.jsonl")):
        try:
            rows += read_jsonl(part, required=("id",))
        except InputError as exc:
            raise InputError(f"{exc} (a saved batch: delete {part} to generate it again)") from None
    return rows


def run_items(out: Path, items: list[Item], generate: Generate, *, seed: int, batch_size: int, expected: dict,
              bar: Optional[tqdm] = None, overwrite: bool = False) -> list[dict]:
    """Rows for ``items`` in order, written to ``out``; reuses a finished output and resumes saved batches.

    Anything else at ``out`` is an error (see :func:`is_finished`), or with ``overwrite`` is replaced.
    """
    out = Path(out)
    if is_finished(out, expected, overwrite):
        rows = read_jsonl(out, required=("id",))
        if [str(r["id"]) for r in rows] != [it.id for it in items]:
            raise ConfigError(f"{out} holds rows for other items than asked: set overwrite=true to recompute it, "
                              "or write elsewhere")
        if bar is not None:
            bar.update(len(items))
        return rows
    parts = parts_dir(out)
    if not same_job(parts / "fingerprint.json", expected, out, overwrite=True):
        clear_output(parts)  # stale work that is_finished let overwrite replace
    clear_output(fingerprint_file(out))  # so that a kill never pairs a stale fingerprint with new rows
    if out.is_dir():
        clear_output(out)
    done = {str(r["id"]): r for r in _saved_rows(parts)}
    if bar is not None:
        bar.update(sum(it.id in done for it in items))
    todo = [(i, it) for i, it in enumerate(items) if it.id not in done]
    n_parts = len(list(parts.glob("*.jsonl")))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        rows = generate([it for _, it in batch], [item_seed(seed, i) for i, _ in batch])
        rows = [{"id": it.id, **row} for (_, it), row in zip(batch, rows)]
        if not parts.is_dir():  # created with the first saved batch: a failed first batch leaves nothing
            parts.mkdir(parents=True)
            write_json_atomic(parts / "fingerprint.json", expected)
        write_jsonl_atomic(parts / f"{n_parts:05d}.jsonl", rows)
        n_parts += 1
        done.update((row["id"], row) for row in rows)
        if bar is not None:
            bar.update(len(batch))
    rows = [done[it.id] for it in items]
    write_jsonl_atomic(out, rows)
    write_json_atomic(fingerprint_file(out), expected)
    shutil.rmtree(parts, ignore_errors=True)
    return rows


def read_items(path: str) -> list[Item]:
    """Items of a JSONL file of ``{"input": ...[, "id": ...]}`` lines (id: the line's position when absent)."""
    rows = read_jsonl(path, required=("input",))
    if not rows:
        raise InputError(f"{path}: no lines: give one {{\"input\": ...}} object per line")
    lines = [n for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    items = []
    for i, (row, lineno) in enumerate(zip(rows, lines)):
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise InputError(f"{path}:{lineno}: field 'input' must be a non-empty string")
        items.append(Item(str(row.get("id", i)), row["input"]))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError(f"{path}: field 'id' repeats: each line needs its own id")
    return items


def generate_command(recipe: Recipe, input: Optional[str] = None, output: Optional[str] = None,
                     overwrite: bool = False) -> None:
    """``toolkit generate``: switch-generate one record per ``{"input": ...}`` line; resumable, written atomically.

    Everything is checked before the pool loads: the input file, the policy's switcher, and the output (a
    finished output of the same job is up to date, saved batches of the same job are resumed, anything else is
    an error unless ``overwrite``)."""
    from .artifacts import generations_file
    from .engine import SwitchEngine
    from .models import check_sources, load_pool
    from .policies import check_policy, make_policy

    if not input:
        raise ConfigError("input=FILE.jsonl is required: one {\"input\": ...} object per line")
    items = read_items(input)
    out = generations_file(recipe, output)
    check_sources(recipe.pool)
    expected = fingerprint(recipe, input=path_hash(input), switcher_model=check_policy(recipe))
    if is_finished(out, expected, overwrite):
        print(f"generate: {out} is up to date")
        return
    engine = SwitchEngine(load_pool(recipe.pool, recipe.generation.backend), recipe.generation)
    engine.check_queries([it.query for it in items], [it.id for it in items])
    policy = make_policy(recipe, engine)
    with tqdm(total=len(items), unit="query", desc="generate") as bar:
        run_items(out, items, engine_generate(engine, policy), seed=recipe.generation.seed,
                  batch_size=recipe.generation.batch_size, expected=expected, bar=bar, overwrite=overwrite)
    print(f"generate: {out}")
