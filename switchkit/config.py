"""Typed recipes: YAML files checked against dataclass schemas, plus ``key=value`` overrides.

A recipe is one YAML file (shipped in ``switchkit.recipes`` or given as a path). It is merged onto the
:class:`Recipe` schema with OmegaConf, so an unknown key, a wrong type or a value outside its allowed set
fails with a :class:`ConfigError` that names the key. Range checks that types cannot express live in
:func:`validate`. The module is longer than most because the whole schema has this one home.
"""

from __future__ import annotations

import re
import string
import typing
from dataclasses import dataclass, field, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TASK_TYPES = ("exact_match", "multiple_choice", "f1_match", "noncompliance", "reward_model", "judge", "abstain",
              "randomness", "diversity", "coverage")
MAX_MODELS = 10  # a switcher reads its decision from the single-digit tokens "0".."9"


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is one line naming the key."""


class NotApplicable(ConfigError):
    """A method cannot run on this pool (a token mixture over different tokenizers, a weight merge across
    architectures): ``eval.skip_inapplicable`` leaves it out with this message as its reason."""


@dataclass
class CandidateConfig:
    """One checkpoint of the pool. ``source`` is a hub id, a local HF dir, a ``.gguf`` file or ``demo:NAME``."""

    source: str = "???"
    role: Literal["pretrained", "finetuned", "aligned", "expert"] = "aligned"
    name: Optional[str] = None
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    device: Optional[str] = None  # this candidate's device (cpu, cuda:N); null: pool.device
    memory: Optional[float] = None  # vllm: share of its GPU's memory for this candidate's engine; null: even split


def candidate_name(cand: CandidateConfig) -> str:
    """A candidate's display name: ``name``, else the last part of its source (``demo:x`` -> ``x``)."""
    return cand.name or Path(cand.source.split(":")[-1]).name


def aligned_index(roles: list[str]) -> int:
    """The aligned candidate: the last one whose role is ``aligned``, else the last one."""
    aligned = [i for i, role in enumerate(roles) if role == "aligned"]
    return aligned[-1] if aligned else len(roles) - 1


def aligned_candidate(candidates: list[CandidateConfig]) -> CandidateConfig:
    """The aligned candidate's config (see :func:`aligned_index`)."""
    if not candidates:
        raise ConfigError("pool.candidates is empty: give at least one candidate")
    return candidates[aligned_index([c.role for c in candidates])]


@dataclass
class PoolConfig:
    candidates: list[CandidateConfig] = field(default_factory=list)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False
    plain_template: str = "Question: {query}\nAnswer:"


@dataclass
class VLLMConfig:
    """Engine settings of the vLLM backend (one engine per candidate; placement is ``pool.candidates.N.device``)."""

    kv_cache_gb: float = 1.0  # CPU: KV cache of each engine, in GiB
    max_model_len: int = 4096
    block_size: Optional[int] = None  # KV block size (null: 32 on CPU, vLLM's default on GPU)
    enforce_eager: Optional[bool] = None  # null: eager on CPU, CUDA graphs on GPU
    max_num_seqs: Optional[int] = None
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM argument


@dataclass
class GenerationConfig:
    patch_size: int = 50
    max_new_tokens: int = 512
    aligned_first_last: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    batch_size: int = 8
    seed: int = 0
    backend: str = "hf"  # a name in switchkit.backends.BACKENDS
    # a query that leaves a candidate less than max_new_tokens of its context: an error, or cut from the left
    long_inputs: Literal["error", "truncate"] = "error"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class SwitcherConfig:
    policy: str = "trained"  # a name in switchkit.policies.POLICIES
    path: Optional[str] = None
    top_p: float = 0.7
    greedy: bool = False
    forced: list[int] = field(default_factory=list)
    single: int = -1
    # a name in switchkit.prompt.FORMATS; null: the exported switcher's own (switchkit.json), else v1-chat for a
    # plain HF switcher with a chat template and v1 without one; training uses v1 when null
    prompt_format: Optional[str] = None
    # apply a switcher exported for another number of models (paper §5, unseen-model settings)
    allow_n_mismatch: bool = False
    # the cost knob: added to the aligned model's id logit before the softmax (> 0: more aligned patches)
    aligned_bias: float = 0.0


@dataclass
class JudgeConfig:
    """The LM judge of a ``type: judge`` task. ``model`` takes the sources of a pool candidate; ``rubric`` is a
    prompt with ``{response}`` (and optionally ``{query}``, ``{reference}``) that ends where the rating goes;
    ``ratings`` are the rating tokens, worst first."""

    model: Optional[str] = None
    rubric: Optional[str] = None
    ratings: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5"])
    batch_size: int = 8
    max_length: int = 2048


RUBRIC_FIELDS = ("query", "response", "reference")


def rubric_fields(rubric: str) -> set[str]:
    """The ``{placeholders}`` of a judge rubric (``{{`` and ``}}`` are literal braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(rubric) if name is not None}


def judge_problem(judge: JudgeConfig) -> Optional[str]:
    """What is wrong with a judge config, as ``judge.KEY ...`` for a one-line error, or None."""
    if not judge.model:
        return "judge.model is missing: give a hub id, HF dir, .gguf file or demo:NAME (the sources of a pool candidate)"
    if not judge.rubric or not judge.rubric.strip():
        return "judge.rubric is missing: give a rating prompt with {response} (and {query}) that ends where the rating goes"
    try:
        names = rubric_fields(judge.rubric)
    except ValueError as exc:
        return f"judge.rubric is not a valid template ({exc}): write literal braces as {{{{ and }}}}"
    if "response" not in names or not names <= set(RUBRIC_FIELDS):
        return (f"judge.rubric has the placeholders {sorted(names)}: allowed are {{query}}, {{response}} (required) "
                "and {reference}")
    if len(judge.ratings) < 2 or len(set(judge.ratings)) != len(judge.ratings) or not all(judge.ratings):
        return f"judge.ratings={list(judge.ratings)} is not allowed: give at least 2 distinct ratings, worst first"
    if judge.batch_size < 1:
        return f"judge.batch_size={judge.batch_size} is out of range: allowed is an integer > 0"
    if judge.max_length < 16:
        return f"judge.max_length={judge.max_length} is out of range: allowed is an integer >= 16"
    return None


@dataclass
class TaskConfig:
    """A task: ``source`` is a hub dataset id, a local JSON/JSONL/Parquet file, ``builtin:NAME`` or ``paper:NAME``
    (one of the paper's 18 tasks, :mod:`switchkit.suite`). ``scorer_model`` is the model of a ``coverage`` (NLI)
    or ``diversity`` (embeddings) scorer."""

    name: str = "???"
    type: Literal["exact_match", "multiple_choice", "f1_match", "noncompliance", "reward_model", "judge", "abstain",
                  "randomness", "diversity", "coverage"] = "exact_match"
    source: str = "???"
    split: str = "dev"
    fields: dict[str, str] = field(default_factory=dict)
    limit: Optional[int] = None
    reward_model: Optional[str] = None
    hub_config: Optional[str] = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    scorer_model: Optional[str] = None


@dataclass
class SynthesisConfig:
    k: int = 32
    records_per_task: int = 10000
    trace_min_frac: float = 0.1
    trace_max_frac: float = 0.9
    tie_rule: Literal["random", "lowest", "aligned", "drop"] = "random"
    shard: int = 0
    num_shards: int = 1
    output: Optional[str] = None
    format: Literal["parquet", "jsonl"] = "parquet"
    chunk_size: int = 8  # records per work chunk: the unit of batching, resume and sharding
    max_in_flight: Optional[int] = None  # sequences generated at once (null: a whole chunk); bounds cache memory
    executor: Literal["local", "ray"] = "local"  # ray: every shard of synthesis.num_shards as a Ray task, merged


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class FitConfig:
    """Settings shared by every Lightning fit: the switcher trainer and distillation."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: int = 5
    lr: float = 2e-4
    batch_size: int = 32
    micro_batch_size: int = 8
    max_length: int = 1024
    val_fraction: float = 0.1
    strategy: Literal["auto", "deepspeed_stage_2", "deepspeed_stage_3"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    devices: str = "auto"
    num_nodes: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: bool = True
    output: Optional[str] = None


@dataclass
class TrainConfig(FitConfig):
    init: Optional[str] = None
    per_task: bool = False
    soft_targets: bool = False
    soft_temperature: float = 1.0
    data: list[str] = field(default_factory=list)  # synthesized datasets to train on; empty: the synthesis output
    merge_lora: bool = False


@dataclass
class EvalConfig:
    methods: list[str] = field(default_factory=lambda: ["single", "random", "switch"])
    tasks: list[TaskConfig] = field(default_factory=list)
    splits: list[str] = field(default_factory=lambda: ["test"])
    limit: Optional[int] = None
    seeds: list[int] = field(default_factory=lambda: [0])
    output: Optional[str] = None
    # "switcher.KEY:V1,V2,...": the trained-switcher methods run once per value (see parse_sweep)
    sweep: Optional[str] = None
    executor: Literal["local", "ray"] = "local"  # ray: every cell to generate as a Ray task
    # a method that cannot run on this pool (NotApplicable) is left out, its reason in results.json and the report
    skip_inapplicable: bool = False


@dataclass
class RayConfig:
    """Where and how ``executor: ray`` runs its tasks."""

    address: Optional[str] = None  # a running cluster (e.g. auto); null: start a local one
    num_gpus: float = 0.0  # GPUs per task (a whole pool per task: e.g. 3 for three candidates on cuda:0..2)
    num_cpus: float = 1.0  # CPUs per task


@dataclass
class BaselinesConfig:
    """The paper's collaboration baselines that are eval methods (:mod:`switchkit.eval.baselines`)."""

    rounds: int = 2  # text-collaborate and debate: rounds of exchange after the first responses
    dev_limit: Optional[int] = None  # dev examples that rank the candidates (greedy-soup, proxy-tuning); null: all
    merge_density: float = 0.5  # dare-ties: share of each task vector kept
    merge_base: Optional[str] = None  # dare-ties base (a candidate name); null: the pretrained one, else the first
    proxy_models: Optional[list[str]] = None  # proxy-tuning [best, worst] (names or indices); null: ranked on dev


@dataclass
class DistillConfig(FitConfig):
    generations: Optional[str] = None
    min_score: Optional[float] = None
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 8
    micro_batch_size: int = 4


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    run_dir: str = "runs/${name}"
    pool: PoolConfig = field(default_factory=PoolConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    switcher: SwitcherConfig = field(default_factory=SwitcherConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


# (key, check, what is allowed); keys use "*" for any list index.
_RANGES: list[tuple[str, Any, str]] = [
    ("generation.patch_size", lambda v: v > 0, "an integer > 0"),
    ("generation.max_new_tokens", lambda v: v > 0, "an integer > 0"),
    ("generation.temperature", lambda v: v >= 0, "a float >= 0 (0 is greedy)"),
    ("generation.top_p", lambda v: 0 < v <= 1, "a float in (0, 1]"),
    ("generation.batch_size", lambda v: v > 0, "an integer > 0"),
    ("switcher.top_p", lambda v: 0 < v <= 1, "a float in (0, 1]"),
    ("synthesis.k", lambda v: v > 0, "an integer > 0"),
    ("synthesis.records_per_task", lambda v: v > 0, "an integer > 0"),
    ("synthesis.trace_min_frac", lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    ("synthesis.trace_max_frac", lambda v: 0 <= v <= 1, "a float in [0, 1]"),
    ("synthesis.num_shards", lambda v: v > 0, "an integer > 0"),
    ("synthesis.shard", lambda v: v >= 0, "an integer >= 0"),
    ("synthesis.chunk_size", lambda v: v > 0, "an integer > 0"),
    ("synthesis.max_in_flight", lambda v: v is None or v > 0, "null or an integer > 0"),
    ("generation.vllm.kv_cache_gb", lambda v: v > 0, "a float > 0"),
    ("generation.vllm.max_model_len", lambda v: v >= 16, "an integer >= 16"),
    ("pool.candidates.*.memory", lambda v: v is None or 0 < v <= 1, "null or a float in (0, 1]"),
    ("ray.num_gpus", lambda v: v >= 0, "a float >= 0"),
    ("ray.num_cpus", lambda v: v >= 0, "a float >= 0"),
    *[(f"{section}.{key}", check, allowed) for section in ("train", "distill") for key, check, allowed in [
        ("epochs", lambda v: v > 0, "an integer > 0"),
        ("lr", lambda v: v > 0, "a float > 0"),
        ("batch_size", lambda v: v > 0, "an integer > 0"),
        ("micro_batch_size", lambda v: v > 0, "an integer > 0"),
        ("max_length", lambda v: v >= 16, "an integer >= 16"),
        ("val_fraction", lambda v: 0 <= v < 1, "a float in [0, 1)"),
        ("num_nodes", lambda v: v > 0, "an integer > 0"),
        ("lora.r", lambda v: v > 0, "an integer > 0"),
        ("lora.alpha", lambda v: v > 0, "an integer > 0"),
        ("lora.dropout", lambda v: 0 <= v < 1, "a float in [0, 1)"),
        ("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
        ("devices", lambda v: re.fullmatch(r"auto|-1|\d+|\d+(,\d+)*,?", v) is not None,
         "auto, -1, a count such as 2, or device ids such as 0,1"),
    ]],
    ("train.soft_temperature", lambda v: v > 0, "a float > 0"),
    ("distill.min_score", lambda v: v is None or 0 <= v <= 1, "null or a float in [0, 1]"),
    ("tasks.*.limit", lambda v: v is None or v > 0, "null or an integer > 0"),
    ("eval.tasks.*.limit", lambda v: v is None or v > 0, "null or an integer > 0"),
    ("eval.limit", lambda v: v is None or v > 0, "null or an integer > 0"),
    ("generation.seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("eval.seeds.*", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("baselines.rounds", lambda v: v >= 0, "an integer >= 0"),
    ("baselines.dev_limit", lambda v: v is None or v > 0, "null or an integer > 0"),
    ("baselines.merge_density", lambda v: 0 < v <= 1, "a float in (0, 1]"),
]


def _lookup(cfg: Any, parts: list[str], prefix: str = ""):
    """Yield (full_key, value) for a dotted key whose parts may contain '*' for list indices."""
    if not parts:
        yield prefix, cfg
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        for i, item in enumerate(cfg):
            yield from _lookup(item, rest, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield from _lookup(getattr(cfg, head), rest, f"{prefix}.{head}" if prefix else head)


def validate(recipe: Recipe) -> Recipe:
    """Check ranges and cross-field rules that the types cannot express."""
    for key, ok, allowed in _RANGES:
        for full_key, value in _lookup(recipe, key.split(".")):
            if not ok(value):
                raise ConfigError(f"{full_key}={value!r} is out of range: allowed is {allowed}")
    if not recipe.eval.seeds:
        raise ConfigError("eval.seeds is empty: give at least one seed")
    if recipe.synthesis.shard >= recipe.synthesis.num_shards:
        raise ConfigError(
            f"synthesis.shard={recipe.synthesis.shard} is out of range: allowed is 0..{recipe.synthesis.num_shards - 1}"
        )
    for section in ("train", "distill"):
        fit = getattr(recipe, section)
        if fit.batch_size % fit.micro_batch_size:
            raise ConfigError(f"{section}.batch_size={fit.batch_size} must be a multiple of "
                              f"{section}.micro_batch_size={fit.micro_batch_size}")
    if recipe.generation.max_new_tokens < recipe.generation.patch_size:
        raise ConfigError(f"generation.max_new_tokens={recipe.generation.max_new_tokens} is below generation.patch_size="
                          f"{recipe.generation.patch_size}: a response has max_new_tokens // patch_size patches")
    if recipe.synthesis.trace_min_frac > recipe.synthesis.trace_max_frac:
        raise ConfigError("synthesis.trace_min_frac must be <= synthesis.trace_max_frac")
    n = len(recipe.pool.candidates)
    if n > MAX_MODELS:
        raise ConfigError(f"pool.candidates has {n} entries: allowed is at most {MAX_MODELS}")
    for i, cand in enumerate(recipe.pool.candidates):
        if cand.source in ("", "???"):
            raise ConfigError(f"pool.candidates.{i}.source is missing: give a hub id, HF dir, .gguf file or demo:NAME")
    for j, model_id in enumerate(recipe.switcher.forced):
        if not 0 <= model_id < max(n, 1):
            raise ConfigError(f"switcher.forced.{j}={model_id} is out of range: allowed is 0..{n - 1}")
    if n and not -n <= recipe.switcher.single < n:
        raise ConfigError(f"switcher.single={recipe.switcher.single} is out of range: allowed is {-n}..{n - 1}")
    for i, task in enumerate(recipe.tasks):
        for attr in ("name", "source"):
            if getattr(task, attr) in ("", "???"):
                raise ConfigError(f"tasks.{i}.{attr} is missing")
    for key, tasks in (("tasks", recipe.tasks), ("eval.tasks", recipe.eval.tasks)):
        for i, task in enumerate(tasks):
            problem = judge_problem(task.judge) if task.type == "judge" else None
            if problem:
                raise ConfigError(f"{key}.{i}.{problem}")
    if recipe.eval.sweep is not None:
        parse_sweep(recipe.eval.sweep)
    _check_registered(recipe)
    return recipe


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``eval.sweep``: ``switcher.KEY:V1,V2,...`` as (KEY, values); KEY is a float setting of ``switcher``."""
    key, _, values = text.partition(":")
    name = key[len("switcher."):] if key.startswith("switcher.") else None
    floats = [f.name for f in SwitcherConfig.__dataclass_fields__.values() if f.type in ("float", float)]
    if name not in floats:
        raise ConfigError(f"eval.sweep={text!r}: give switcher.KEY:V1,V2,... with KEY one of {', '.join(floats)} "
                          "(e.g. switcher.aligned_bias:-2,-1,0,1,2)")
    try:
        parsed = [float(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"eval.sweep={text!r}: the values after the colon must be comma-separated numbers") from None
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"eval.sweep={text!r}: a value repeats")
    return name, parsed


def _check_registered(recipe: Recipe) -> None:
    """Names that pick a registered policy, backend or prompt format."""
    from .backends import BACKENDS
    from .policies import POLICIES
    from .prompt import FORMATS

    for key, value, registry in (("switcher.policy", recipe.switcher.policy, POLICIES),
                                 ("generation.backend", recipe.generation.backend, BACKENDS),
                                 ("switcher.prompt_format", recipe.switcher.prompt_format, FORMATS)):
        if value is not None and value not in registry:
            raise ConfigError(f"{key}={value!r} is unknown: allowed are {', '.join(sorted(registry))}")


def list_recipes() -> list[str]:
    """Names of the recipes shipped in the package (``generalization/x`` for nested ones)."""
    root = resources.files("switchkit.recipes")
    names = []

    def walk(node, prefix):
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith("__"):
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                names.append(prefix + child.name[: -len(".yaml")])

    walk(root, "")
    return sorted(names)


def _recipe_text(name: str) -> tuple[str, str]:
    path = Path(name)
    if name.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {name!r} does not exist")
        return path.read_text(), str(path)
    node = resources.files("switchkit.recipes").joinpath(*f"{name}.yaml".split("/"))
    if not node.is_file():
        raise ConfigError(f"unknown recipe {name!r}: allowed are {', '.join(list_recipes())} or a path to a .yaml file")
    return node.read_text(), f"recipe {name}"


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=.*$", re.S)


def _describe(exc: OmegaConfBaseException, where: str, key: str = "") -> str:
    key = key or re.sub(r"\[(\d+)\]", r".\1", getattr(exc, "full_key", None) or "")
    msg = str(exc).splitlines()[0]
    if "Key '" in msg and "not in" in msg or "is not in struct" in msg:
        return _unknown_message(key, where)
    return f"bad value for {key!r} in {where}: {msg}"


def _unknown_message(key: str, where: str) -> str:
    parent = _existing_parent(key)
    allowed = _allowed_keys(parent)
    return f"unknown key {key!r} in {where}: allowed keys{' under ' + repr(parent) if parent else ''} are {allowed}"


def _unknown_key(node: Any, schema: Any, prefix: str = "") -> Optional[str]:
    """The full dotted path of the first key of a loaded recipe that the schema lacks (list items included,
    e.g. ``pool.candidates.0.bogus``), or None."""
    if not isinstance(node, dict):
        return None
    hints = typing.get_type_hints(schema)
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in hints:
            return full
        kind = hints[key]
        if is_dataclass(kind):
            found = _unknown_key(value, kind, full + ".")
        elif typing.get_origin(kind) is list and typing.get_args(kind) and is_dataclass(typing.get_args(kind)[0]) \
                and isinstance(value, list):
            found = next(filter(None, (_unknown_key(item, typing.get_args(kind)[0], f"{full}.{i}.")
                                       for i, item in enumerate(value))), None)
        else:
            found = None
        if found:
            return found
    return None


def _existing_parent(key: str) -> str:
    """The longest prefix of a dotted key that names a node of the schema."""
    parts = key.split(".")[:-1]
    while parts and _node(".".join(parts)) is None:
        parts.pop()
    return ".".join(parts)


def _node(dotted: str) -> Any:
    node: Any = Recipe(pool=PoolConfig(candidates=[CandidateConfig()]), tasks=[TaskConfig()],
                       eval=EvalConfig(tasks=[TaskConfig()]))
    for part in filter(None, dotted.split(".")):
        if isinstance(node, list):
            node = node[0] if part.isdigit() and node else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _allowed_keys(parent: str) -> str:
    fields = getattr(_node(parent), "__dataclass_fields__", {})
    return ", ".join(fields) or "(none: it is a value, not a section)"


def _parse_value(text: str) -> Any:
    return OmegaConf.create({"v": None} if text == "" else f"v: {text}")["v"] if text else ""


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a packaged or file recipe, apply ``key=value`` overrides, type-check and range-check it."""
    text, where = _recipe_text(name)
    schema = OmegaConf.structured(Recipe)
    try:
        loaded = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except yaml.MarkedYAMLError as exc:  # YAML syntax: keep where
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"cannot parse {where}: {at}{exc.problem or exc.context}") from None
    except Exception as exc:  # other YAML or OmegaConf errors
        raise ConfigError(f"cannot parse {where}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{where} must be a mapping of keys, got {type(loaded).__name__}")
    unknown = _unknown_key(OmegaConf.to_container(loaded), Recipe)
    if unknown:
        raise ConfigError(_unknown_message(unknown, where))
    try:
        cfg = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where)) from None
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = _parse_value(raw)
            OmegaConf.update(cfg, key, value, merge=False, force_add=False)
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, "overrides", key)) from None
        except Exception as exc:
            raise ConfigError(f"bad override {item!r}: {str(exc).splitlines()[0]}") from None
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, where)) from None
    return validate(recipe)


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``toolkit show-recipe`` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain Python containers (for JSON metadata)."""
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)
