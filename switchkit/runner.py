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

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from .config import ConfigError, Recipe, to_dict
from .io import InputError, read_jsonl, write_json_atomic, write_jsonl_atomic
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


def fingerprint(recipe: Recipe, switcher: bool = True, **extra) -> dict:
    """What decides generated rows: the pool, the generation settings, the switcher settings (unless the rows
    do not depend on them, e.g. a single model's), and ``extra``."""
    cfg = to_dict(recipe)
    pool = {k: v for k, v in cfg["pool"].items() if k != "cache_dir"}
    generation = {k: v for k, v in cfg["generation"].items() if k != "batch_size"}
    return {"version": RUNNER_VERSION, "pool": pool, "generation": generation,
            "switcher": cfg["switcher"] if switcher else None, **extra}


def file_hash(path: str | Path) -> str:
    """A content hash of a file (inputs and task files go into fingerprints by content, not by name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def _check(stored: Path, expected: dict, out: Path) -> bool:
    """Whether ``stored`` holds ``expected``; False when it does not exist; an error naming what changed."""
    if not stored.is_file():
        return False
    try:
        found = json.loads(stored.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        found = {}
    expected = json.loads(json.dumps(expected))  # as it reads back
    if found == expected:
        return True
    changed = ", ".join(_diff(found, expected)[:4]) or "the fingerprint file"
    raise ConfigError(f"{out} was made with other settings ({changed} changed): delete it or write elsewhere")


def parts_dir(out: Path) -> Path:
    """The folder of an unfinished output's saved batches."""
    return out.with_name(out.name + ".parts")


def fingerprint_file(out: Path) -> Path:
    """The fingerprint beside a finished output."""
    return out.with_name(out.name + ".fingerprint.json")


def is_finished(out: Path, expected: dict) -> bool:
    """Whether ``out`` is a finished output with the expected fingerprint (an error when it has another)."""
    return out.is_file() and _check(fingerprint_file(out), expected, out)


def run_items(out: Path, items: list[Item], generate: Generate, *, seed: int, batch_size: int, expected: dict,
              bar: Optional[tqdm] = None) -> list[dict]:
    """Rows for ``items`` in order, written to ``out``; reuses a finished output and resumes saved batches."""
    out = Path(out)
    if is_finished(out, expected):
        rows = read_jsonl(out, required=("id",))
        if [str(r["id"]) for r in rows] != [it.id for it in items]:
            raise ConfigError(f"{out} holds rows for other items than asked: delete it or write elsewhere")
        if bar is not None:
            bar.update(len(items))
        return rows
    parts = parts_dir(out)
    done: dict[str, dict] = {}
    if not _check(parts / "fingerprint.json", expected, out):
        if out.is_file():
            raise ConfigError(f"{out} exists without a fingerprint: delete it or write elsewhere")
        parts.mkdir(parents=True, exist_ok=True)
        write_json_atomic(parts / "fingerprint.json", expected)
    saved = sorted(parts.glob("*.jsonl"))
    for part in saved:
        done.update((str(r["id"]), r) for r in read_jsonl(part, required=("id",)))
    if bar is not None:
        bar.update(sum(it.id in done for it in items))
    todo = [(i, it) for i, it in enumerate(items) if it.id not in done]
    n_parts = len(saved)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        rows = generate([it for _, it in batch], [item_seed(seed, i) for i, _ in batch])
        rows = [{"id": it.id, **row} for (_, it), row in zip(batch, rows)]
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


def generate_command(recipe: Recipe, input: Optional[str] = None, output: Optional[str] = None) -> None:
    """``toolkit generate``: switch-generate one record per ``{"input": ...}`` line; resumable, written atomically."""
    from .artifacts import generations_file
    from .engine import SwitchEngine
    from .models import load_pool
    from .policies import make_policy

    if not input:
        raise ConfigError("input=FILE.jsonl is required: one {\"input\": ...} object per line")
    items = read_items(input)
    out = generations_file(recipe, output)
    expected = fingerprint(recipe, input=file_hash(input))
    if is_finished(out, expected):
        print(f"generate: {out} is up to date")
        return
    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
    policy = make_policy(recipe, engine)
    with tqdm(total=len(items), unit="query", desc="generate") as bar:
        run_items(out, items, engine_generate(engine, policy), seed=recipe.generation.seed,
                  batch_size=recipe.generation.batch_size, expected=expected, bar=bar)
    print(f"generate: {out}")
