"""Artifacts: the one home of the run-directory layout, the ``switchkit.json`` schema and the dataset features.

Run directory (``run_dir``, default ``runs/<recipe name>``); a recipe's ``*.output`` key moves one part::

    synthesis/      data.parquet | data.jsonl, stats.json, work/ (resumable chunks)   synthesis.output
    switcher/       the exported global switcher                                     train.output
    task_switchers/ one exported switcher per task (<task>/)                          train.output/<task>
    router/         the trained router (RouteLLM-style baseline), router_data.parquet its training records
    merged/         weight-merged baselines: <method>/ or <method>/<task>/ (HF), each with merge.json
    checkpoints/    switcher/, task_switchers/<task>/, router/, distill/: last.ckpt, fingerprint.json, logs/
    eval/           cells/, results.json, report/                                    eval.output
    distill/        generations/ (resumable), report.json
    distilled/      the distilled model (HF)                                        distill.output
    generations.jsonl                                                                toolkit generate output=
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import datasets

from .config import MAX_MODELS, ConfigError, Recipe
from .io import InputError, atomic_path, path_hash

# ---------------------------------------------------------------- run-directory layout


def _under(recipe: Recipe, explicit: Optional[str], name: str) -> Path:
    return Path(explicit) if explicit else Path(recipe.run_dir) / name


def synthesis_dir(recipe: Recipe) -> Path:
    """The synthesis folder: ``synthesis.output`` or ``<run_dir>/synthesis``."""
    return _under(recipe, recipe.synthesis.output, "synthesis")


def synthesis_data(recipe: Recipe, directory: Optional[Path] = None) -> Path:
    """The dataset of a full synthesis run (``data.parquet`` or ``data.jsonl``)."""
    return (directory or synthesis_dir(recipe)) / f"data.{recipe.synthesis.format}"


def synthesis_shard_data(recipe: Recipe) -> Path:
    """The data file this run writes: the full dataset, or ``shard-i-of-N.<format>`` for a shard."""
    s = recipe.synthesis
    if s.num_shards == 1:
        return synthesis_data(recipe)
    return synthesis_dir(recipe) / f"shard-{s.shard}-of-{s.num_shards}.{s.format}"


def stats_file(data_file: Path) -> Path:
    """The statistics beside a data file: ``stats.json`` for ``data.*``, ``<shard>.stats.json`` for a shard."""
    return data_file.parent / ("stats.json" if data_file.stem == "data" else f"{data_file.stem}.stats.json")


def switcher_dir(recipe: Recipe, task: Optional[str] = None) -> Path:
    """The global switcher (``train.output`` or ``<run_dir>/switcher``), or the one trained for ``task``
    (``train.output/<task>`` or ``<run_dir>/task_switchers/<task>``)."""
    if task is None:
        return _under(recipe, recipe.train.output, "switcher")
    return _under(recipe, recipe.train.output, "task_switchers") / task


def router_dir(recipe: Recipe) -> Path:
    """The trained router (``toolkit train-router``): ``<run_dir>/router``."""
    return Path(recipe.run_dir) / "router"


def router_data(recipe: Recipe) -> Path:
    """The router's training records (first decisions of synthesis): ``<run_dir>/router_data.parquet``."""
    return Path(recipe.run_dir) / "router_data.parquet"


def merged_dir(recipe: Recipe, method: str, task: Optional[str] = None) -> Path:
    """A weight-merged baseline model: ``<run_dir>/merged/<method>[/<task>]``."""
    folder = Path(recipe.run_dir) / "merged" / method
    return folder / task if task else folder


def checkpoint_dir(recipe: Recipe, kind: str, task: Optional[str] = None) -> Path:
    """Lightning checkpoints of a fit: ``<run_dir>/checkpoints/<kind>`` (kind: switcher, router, distill), or
    ``<run_dir>/checkpoints/task_<kind>s/<task>`` for one task's (beside, not inside, the global fit's folder)."""
    folder = Path(recipe.run_dir) / "checkpoints"
    return folder / f"task_{kind}s" / task if task else folder / kind


def eval_dir(recipe: Recipe) -> Path:
    """The evaluation folder: ``eval.output`` or ``<run_dir>/eval``."""
    return _under(recipe, recipe.eval.output, "eval")


def distill_dir(recipe: Recipe) -> Path:
    """Distillation's working folder (generations, report)."""
    return Path(recipe.run_dir) / "distill"


def distilled_model_dir(recipe: Recipe) -> Path:
    """The distilled model: ``distill.output`` or ``<run_dir>/distilled``."""
    return _under(recipe, recipe.distill.output, "distilled")


def generations_file(recipe: Recipe, output: Optional[str] = None) -> Path:
    """Where ``toolkit generate`` writes: ``output=`` or ``<run_dir>/generations.jsonl``."""
    return _under(recipe, output, "generations.jsonl")


# ---------------------------------------------------------------- switchkit.json

META_FILE = "switchkit.json"
META_VERSION = 2
ROLES = ("pretrained", "finetuned", "aligned", "expert")


@dataclass
class SwitcherMeta:
    """What an exported switcher folder says about itself (written beside its weights as ``switchkit.json``).

    ``base_model`` is the pool candidate a LoRA adapter was trained on (null: not an adapter); ``max_length``
    is the prompt length it was trained with, used again at inference.
    """

    prompt_format: str
    n: int
    candidates: list[dict]  # {"index", "name", "source", "role"} per pool member, in pool order
    adapter: bool
    base_model: Optional[str]
    model_id_tokens: list[int]
    max_length: Optional[int]
    metrics: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    format_version: int = META_VERSION


def write_meta(folder: Path, meta: SwitcherMeta) -> None:
    """Write ``switchkit.json`` into ``folder`` (a folder being assembled: callers make the folder atomic)."""
    (Path(folder) / META_FILE).write_text(json.dumps(asdict(meta), indent=2, ensure_ascii=False) + "\n")


def read_meta(folder: str | Path) -> Optional[SwitcherMeta]:
    """An exported switcher's checked ``switchkit.json``; None for a folder without one (a plain HF switcher)."""
    from .prompt import FORMATS

    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: malformed JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    if raw.get("format_version") != META_VERSION:
        raise InputError(f"{path}: format_version={raw.get('format_version')!r} is unknown: allowed is {META_VERSION} "
                         "(re-export the switcher with this version of switchkit)")
    names = {f.name for f in fields(SwitcherMeta)}
    for key in names - {"metrics", "recipe"}:
        if key not in raw:
            raise InputError(f"{path}: missing key {key!r}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}: allowed are {', '.join(sorted(names))}")
    meta = SwitcherMeta(**raw)
    for key, kind in (("candidates", list), ("model_id_tokens", list), ("metrics", dict), ("recipe", dict),
                      ("adapter", bool)):
        if not isinstance(getattr(meta, key), kind):
            raise InputError(f"{path}: {key} must be a JSON {'list' if kind is list else 'object' if kind is dict else 'boolean'}")
    if meta.prompt_format not in FORMATS:
        raise InputError(f"{path}: prompt_format={meta.prompt_format!r} is unknown: allowed are {', '.join(FORMATS)}")
    if not isinstance(meta.n, int) or not 1 <= meta.n <= MAX_MODELS:
        raise InputError(f"{path}: n={meta.n!r} is out of range: allowed is 1..{MAX_MODELS}")
    if len(meta.model_id_tokens) != meta.n or len(meta.candidates) != meta.n:
        raise InputError(f"{path}: model_id_tokens and candidates must list n={meta.n} entries")
    for i, cand in enumerate(meta.candidates):
        if not isinstance(cand, dict) or cand.get("role") not in ROLES or "source" not in cand:
            raise InputError(f"{path}: candidates.{i} needs a source and a role in {', '.join(ROLES)}")
    return meta


def artifact_stamp(path: Optional[str | Path]) -> str:
    """A switcher's or model's identity for a fingerprint: the content hash of a local file or folder, else the
    name as given (a hub id), or "" for none."""
    if not path:
        return ""
    local = Path(path).expanduser()
    return f"sha256:{path_hash(local)}" if local.exists() else str(path)


def check_switcher(folder: str | Path, n: int, allow_n_mismatch: bool = False) -> Optional[SwitcherMeta]:
    """Before loading: a local switcher folder holds consistent files for a pool of ``n`` models (a checked
    ``switchkit.json`` when it has one, safetensors weights, an adapter config for an adapter). Returns its meta."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"switcher {folder}: {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    meta = read_meta(folder)
    adapter = (folder / "adapter_config.json").is_file()
    if meta is not None and meta.adapter != adapter:
        raise InputError(f"switcher {folder}: {META_FILE} says adapter={str(meta.adapter).lower()}, but "
                         f"adapter_config.json is {'present' if adapter else 'missing'}")
    if not adapter and not (folder / "config.json").is_file():
        raise InputError(f"switcher {folder}: no config.json or adapter_config.json: not a model folder")
    if not list(folder.glob("*.safetensors")):
        raise InputError(f"switcher {folder}: no .safetensors weights in the folder")
    if meta is not None and meta.n != n and not allow_n_mismatch:
        raise ConfigError(f"switcher {folder} was exported for n={meta.n} models, but the pool has {n} candidates "
                         "(set switcher.allow_n_mismatch=true to apply it to a pool of another size)")
    return meta


# ---------------------------------------------------------------- the switcher dataset

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
REQUIRED = ("prompt", "label", "utilities")  # what training needs; files written elsewhere may hold only these


def write_records(path: Path, records: list[dict]) -> None:
    """Write synthesized records atomically as Parquet or JSONL (by the file's suffix)."""
    ds = datasets.Dataset.from_list(records, features=FEATURES)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            ds.to_parquet(str(tmp))
        else:
            ds.to_json(str(tmp), lines=True, force_ascii=False)


def _read_file(file: Path) -> datasets.Dataset:
    if not file.is_file():
        raise InputError(f"{file}: file not found")
    if file.suffix not in (".parquet", ".jsonl", ".json"):
        raise InputError(f"{file}: unknown data format: use .parquet or .jsonl")
    quiet = not datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # reading a file is quick: no bar before a possible error line
    try:
        if file.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(file), keep_in_memory=True)
        return datasets.Dataset.from_json(str(file), keep_in_memory=True)
    except Exception as exc:  # pyarrow / datasets raise several types for a malformed file
        raise InputError(f"{file}: cannot read records ({str(exc).strip().splitlines()[0]})") from None
    finally:
        if not quiet:
            datasets.utils.logging.enable_progress_bar()


def records_hash(records: datasets.Dataset) -> str:
    """A content hash of what training reads from synthesized records (prompt, label, utilities, query_id)."""
    import hashlib

    columns = [c for c in (*REQUIRED, "query_id") if c in records.column_names]
    digest = hashlib.sha256()
    for batch in records.select_columns(columns).iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_records(paths: str | Path | Sequence[str | Path], n: Optional[int] = None,
                 task: Optional[str] = None) -> datasets.Dataset:
    """Read and check synthesized records (files, or synthesis folders holding ``data.*``), optionally one task.

    Every row needs a non-empty ``prompt``, a ``label`` in ``0..n-1`` and ``n`` ``utilities`` (``n`` defaults to
    the first row's number of utilities). An error names the file, the row and the key.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = []
    for file in map(Path, paths):
        if file.is_dir():
            found = [p for p in (file / "data.parquet", file / "data.jsonl") if p.is_file()]
            if not found:
                raise InputError(f"{file}: no data.parquet or data.jsonl (run `toolkit synthesize` first)")
            file = found[0]
        ds = _read_file(file)
        for key in REQUIRED:
            if key not in ds.column_names:
                raise InputError(f"{file}: missing field {key!r} (columns are {', '.join(ds.column_names)})")
        if n is None and len(ds):
            n = len(ds[0]["utilities"] or [])
        for row, (label, utils, prompt) in enumerate(zip(ds["label"], ds["utilities"], ds["prompt"])):
            where = f"{file}: row {row}"
            if not isinstance(prompt, str) or not prompt:
                raise InputError(f"{where}: field 'prompt' must be a non-empty string")
            if not isinstance(label, int) or not 0 <= label < n:
                raise InputError(f"{where}: field 'label'={label!r} is out of range: allowed is 0..{n - 1}")
            if not isinstance(utils, list) or len(utils) != n:
                raise InputError(f"{where}: field 'utilities' must be a list of {n} numbers (one per model)")
        if task is not None:
            if "task" not in ds.column_names:
                raise InputError(f"{file}: missing field 'task' (needed to train one switcher per task)")
            ds = ds.filter(lambda t: t == task, input_columns="task", keep_in_memory=True)
        parts.append(ds)
    if not parts:
        raise InputError("no record files given")
    columns = sorted(set.intersection(*(set(p.column_names) for p in parts)))
    data = datasets.concatenate_datasets([p.select_columns(columns) for p in parts])
    if len(data) == 0:
        raise InputError(f"no records{' for task ' + repr(task) if task else ''} in {', '.join(map(str, paths))}")
    return data
