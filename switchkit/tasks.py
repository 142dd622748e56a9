"""Tasks: load examples from the hub, a local file or the package, render their queries, score responses.

Sources (``TaskConfig.source``):

- ``paper:NAME``: one of the paper's 18 tasks (:mod:`switchkit.suite`): its task type and scorer settings,
  data from ``$SWITCHKIT_DATA/<file>`` (default ``data/``) in the ``{task_type, dev, test}`` format.
- ``builtin:NAME``: a short-answer task shipped with the package as ``switchkit/data/NAME.json`` in the
  ``{task_type, dev, test}`` format (disjoint splits, at least 200 test queries): ``capitals`` (countries and
  first-level regions; the base model leads, with largest-city traps), ``plurals`` (irregular nouns among
  them; the instruct model leads), ``antonyms``, ``city_country`` and ``past_tense``. The facts are
  general knowledge; the text is ours.
- a local ``.json`` / ``.jsonl`` / ``.parquet`` file. A ``.json`` file holding one object
  ``{"task_type", "dev", "test"}`` (the MoCo format) is read unchanged: ``split`` picks the list and the
  file's ``task_type`` picks the scorer. Any other file is a list of rows (all rows are the split).
- anything else is a hub dataset id, read with ``datasets.load_dataset(source, hub_config, split=split)``.

Rows are mapped to the fields each task type needs (:data:`FIELDS`); ``TaskConfig.fields`` renames
them, e.g. ``{"input": "question", "output": "answer"}``. A missing field or a malformed row is an
:class:`~switchkit.io.InputError` naming the file, the row and the key.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from .config import TASK_TYPES, ConfigError, TaskConfig
from .io import InputError, read_jsonl

from .scorers import Scored, accepted_answers, get_scorer

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase

# task type -> (required fields, optional fields) of a row
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "exact_match": (("input", "output"), ("id",)),
    "f1_match": (("input", "output"), ("id",)),
    "multiple_choice": (("question", "choices", "answer"), ("id",)),
    "noncompliance": (("input",), ("id", "category")),
    "reward_model": (("input",), ("id", "output")),
    "judge": (("input",), ("id", "output")),
    "abstain": (("question", "choices", "answer"), ("id",)),
    "randomness": (("input", "low", "high"), ("id",)),
    "diversity": (("input", "references"), ("id",)),
    "coverage": (("input", "perspectives"), ("id",)),
}
CHOICE_TYPES = ("multiple_choice", "abstain")  # rows with lettered choices
LIST_GOLDS = {"diversity": "references", "coverage": "perspectives"}  # a non-empty list of texts is the gold
ABSTAIN_NOTE = "If you are not confident that your answer is right, say \"I abstain\" after it."


@dataclass
class Example:
    """One query of a task: a stable id, the rendered query, the gold answer and everything else."""

    id: str
    query: str
    gold: Any
    meta: dict = field(default_factory=dict)


class Task:
    """A loaded task split with its scorer."""

    def __init__(self, name: str, type: str, split: str, examples: list[Example], scorer, scorer_key: str = ""):
        self.name, self.type, self.split, self.examples = name, type, split, examples
        self.scorer = scorer
        self.scorer_key = scorer_key  # what decides the scores beyond the type (reward model or judge, and its weights)

    def judge(self, examples: list[Example], responses: list[str]) -> list[Scored]:
        """The :class:`~switchkit.scorers.Scored` of ``responses[i]`` to ``examples[i]``: score and what was extracted (batched)."""
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        return list(self.scorer(examples, responses)) if examples else []

    def score(self, examples: list[Example], responses: list[str]) -> list[float]:
        """Scores in [0, 1] of ``responses[i]`` to ``examples[i]`` (batched)."""
        return [float(s.score) for s in self.judge(examples, responses)]

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, type={self.type!r}, split={self.split!r}, {len(self.examples)} examples)"


# ---------------------------------------------------------------- rendering


def render_choices(choices: Any, where: str) -> dict[str, str]:
    """Choices as ``{letter: text}`` from a mapping or a list (lettered A, B, ...)."""
    if isinstance(choices, dict):
        out = {str(k).strip().upper(): str(v).strip() for k, v in choices.items()}
    elif isinstance(choices, (list, tuple)) and 0 < len(choices) <= len(LETTERS):
        out = {LETTERS[i]: str(c).strip() for i, c in enumerate(choices)}
    else:
        raise InputError(f"{where}: field 'choices' must be a mapping letter->text or a list of 1..{len(LETTERS)} texts")
    if not out or not all(len(k) == 1 and k in LETTERS for k in out):
        raise InputError(f"{where}: field 'choices' must use the letters {LETTERS[0]}..{LETTERS[-1]}, got {list(out)}")
    return out


def render_query(task_type: str, row: dict) -> str:
    """The query text the candidates see: the input as is, or the question with its lettered choices."""
    if task_type in CHOICE_TYPES:
        lines = [str(row["question"]).strip(), ""]
        lines += [f"{letter}. {text}" for letter, text in row["choices"].items()]
        lines += ["", "Answer with the letter of the correct choice."]
        if task_type == "abstain":
            lines[-1] += " " + ABSTAIN_NOTE
        return "\n".join(lines)
    return str(row["input"])


def _gold(task_type: str, row: dict, where: str) -> Any:
    if task_type == "randomness":
        low, high = row["low"], row["high"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or low >= high:
            raise InputError(f"{where}: fields 'low' and 'high' must be integers with low < high, got {low!r}, {high!r}")
        return [low, high]
    if task_type in LIST_GOLDS:
        key = LIST_GOLDS[task_type]
        texts = row[key]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError(f"{where}: field {key!r} must be a non-empty list of non-empty strings")
        return texts
    if task_type in CHOICE_TYPES:
        answer = row["answer"]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(row["choices"]):
            answer = LETTERS[answer]
        answer = str(answer).strip().strip("()").upper()
        if not answer:
            raise InputError(f"{where}: field 'answer' is empty")
        if answer not in row["choices"]:
            raise InputError(f"{where}: field 'answer'={row['answer']!r} is not one of the choices {list(row['choices'])}")
        return answer
    if task_type == "f1_match":
        gold = accepted_answers(row["output"])
    elif task_type == "exact_match":
        gold = row["output"] if isinstance(row["output"], list) else str(row["output"])
    else:
        return row.get("output")
    if not any(str(g).strip() for g in (gold if isinstance(gold, list) else [gold])):
        raise InputError(f"{where}: field 'output' is empty")
    return gold


def make_example(task: str, split: str, index: int, task_type: str, raw: Any, fields: dict[str, str],
                 where: str) -> Example:
    """Map one raw row to an :class:`Example` (``where`` names the file and row in errors)."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected an object with fields, got {type(raw).__name__}")
    required, optional = FIELDS[task_type]
    row = {}
    for name in required + optional:
        key = fields.get(name, name)
        if key in raw and raw[key] is not None:
            row[name] = raw[key]
        elif name in required:
            hint = f" (mapped from task field {name!r})" if key != name else ""
            raise InputError(f"{where}: missing field {key!r}{hint}")
    if task_type in CHOICE_TYPES:
        row["choices"] = render_choices(row["choices"], where)
    else:
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise InputError(f"{where}: field {fields.get('input', 'input')!r} must be a non-empty string")
    gold = _gold(task_type, row, where)
    meta = {k: v for k, v in raw.items() if k not in {fields.get(n, n) for n in required}}
    if task_type in CHOICE_TYPES:
        meta["choices"] = row["choices"]
    return Example(id=f"{task}/{split}/{index}", query=render_query(task_type, row), gold=gold, meta=meta)


# ---------------------------------------------------------------- loaders


def builtin_tasks() -> list[str]:
    """The names of the built-in tasks (``builtin:NAME``)."""
    return sorted(p.name[: -len(".json")] for p in resources.files("switchkit").joinpath("data").iterdir()
                  if p.name.endswith(".json"))


def _json_rows(path: Path, split: str) -> tuple[list[Any], Optional[str], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if isinstance(data, list):
        return data, None, f"{path} row {{}}"
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a list of rows or an object with dev/test lists")
    splits = [k for k, v in data.items() if isinstance(v, list)]
    if split not in data or not isinstance(data[split], list):
        raise InputError(f"{path}: no split {split!r}: the file has {', '.join(splits) or 'no lists'}")
    file_type = data.get("task_type")
    if file_type is not None and file_type not in TASK_TYPES:
        raise InputError(f"{path}: task_type={file_type!r} is unknown: allowed are {', '.join(TASK_TYPES)}")
    return data[split], file_type, f"{path} [{split}] row {{}}"


def _jsonl_lines(path: Path) -> list[int]:
    """The 1-based line number of each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [lineno for lineno, line in enumerate(f, 1) if line.strip()]


def _local_rows(path: Path, split: str) -> tuple[list[Any], Optional[str], Callable[[int], str]]:
    """(rows, the file's task_type or None, where(row index) for error messages)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows, file_type, where = _json_rows(path, split)
        return rows, file_type, where.format
    if suffix == ".jsonl":
        rows, lines = read_jsonl(path), _jsonl_lines(path)
        return rows, None, lambda i: f"{path}:{lines[i]}"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise InputError(f"{path}: cannot read Parquet ({str(exc).splitlines()[0]})") from None
        return rows, None, lambda i: f"{path} row {i}"
    raise InputError(f"{path}: unsupported file type {suffix!r}: use .json, .jsonl or .parquet")


def _hub_rows(cfg: TaskConfig, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, cfg.hub_config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise InputError(f"task {cfg.name}: cannot load hub dataset {cfg.source!r} split {split!r}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return ds.to_list()


def _is_local(source: str) -> bool:
    return source.lower().endswith((".json", ".jsonl", ".parquet")) or Path(source).exists()


def load_task(cfg: TaskConfig, split: Optional[str] = None, limit: Optional[int] = None,
              trust_remote_code: bool = False) -> Task:
    """Load a task split (``split`` overrides ``cfg.split``; ``limit`` or ``cfg.limit`` keeps the first rows).

    ``trust_remote_code`` only matters for a reward model (pass the pool's setting); a judge never trusts remote code."""
    if cfg.source.startswith("paper:"):
        from .suite import paper_task_config

        cfg = paper_task_config(cfg)
    split = split or cfg.split
    limit = limit if limit is not None else cfg.limit
    task_type = cfg.type
    if cfg.source.startswith("builtin:") or _is_local(cfg.source):
        if cfg.source.startswith("builtin:"):
            name = cfg.source.split(":", 1)[1]
            if name not in builtin_tasks():
                raise InputError(f"unknown builtin task 'builtin:{name}': allowed are "
                                 f"{', '.join('builtin:' + b for b in builtin_tasks())}")
            path = Path(str(resources.files("switchkit").joinpath("data", f"{name}.json")))
        else:
            path = Path(cfg.source)
        rows, file_type, row_where = _local_rows(path, split)
        if file_type and file_type != task_type:
            log.info("task %s: %s declares task_type=%s; it picks the scorer (recipe type %s ignored)",
                     cfg.name, path, file_type, task_type)
            task_type = file_type
    else:
        rows = _hub_rows(cfg, split)
        row_where = lambda i: f"hub dataset {cfg.source} [{split}] row {i}"  # noqa: E731
    if limit is not None:
        rows = rows[:limit]
    examples = [make_example(cfg.name, split, i, task_type, raw, cfg.fields, f"task {cfg.name}: {row_where(i)}")
                for i, raw in enumerate(rows)]
    if task_type == "reward_model" and not cfg.reward_model:
        raise ConfigError(f"task {cfg.name}: type reward_model needs reward_model: a hub id or local directory")
    scorer = get_scorer(task_type, cfg.reward_model, judge=cfg.judge, task=cfg.name, scorer_model=cfg.scorer_model,
                        trust_remote_code=trust_remote_code)
    return Task(cfg.name, task_type, split, examples, scorer, _scorer_key(task_type, cfg))


def _scorer_key(task_type: str, cfg: TaskConfig) -> str:
    """The scorer's identity for fingerprints: a reward model's or judge's weights and settings."""
    from dataclasses import asdict

    from .config import CandidateConfig
    from .models import source_identity

    if task_type == "reward_model" and cfg.reward_model:
        return source_identity(CandidateConfig(source=cfg.reward_model))
    if task_type == "judge" and cfg.judge.model:
        return json.dumps([source_identity(CandidateConfig(source=cfg.judge.model)), asdict(cfg.judge)], sort_keys=True)
    if task_type in ("coverage", "diversity") and cfg.scorer_model:
        return source_identity(CandidateConfig(source=cfg.scorer_model))
    return ""



def load_tasks(cfgs: list[TaskConfig], *, splits: Optional[list[str]] = None, limit: Optional[int] = None,
               trust_remote_code: bool = False) -> list[Task]:
    """Every task on each of ``splits`` (default: each task's own split), each checked non-empty.

    Task names must be unique; ``limit`` overrides each task's own ``limit``.
    """
    if not cfgs:
        raise ConfigError("no tasks given: list at least one under tasks (or eval.tasks)")
    names = [c.name for c in cfgs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task names must be unique: {', '.join(dup)} repeats")
    if splits is not None and not splits:
        raise ConfigError("eval.splits is empty: name at least one split")
    tasks = [load_task(cfg, split=split, limit=limit, trust_remote_code=trust_remote_code)
             for cfg in cfgs for split in (splits or [None])]
    for task in tasks:
        if not task.examples:
            raise InputError(f"task {task.name}: split {task.split!r} has no rows")
    return tasks


def content_hash(task: Task) -> str:
    """A hash of what a task asks and expects (type, scorer, ids, queries, golds), for fingerprints of saved outputs."""
    import hashlib

    body = json.dumps([task.type, task.scorer_key, [(e.id, e.query, e.gold) for e in task.examples]], sort_keys=True,
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]
