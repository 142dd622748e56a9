"""Weight merges through mergekit (the optional extra ``switchkit[merge]``), cached under the run directory.

A merge is described by its mergekit configuration (method, models and their parameters, base model, dtype) and
written atomically to its folder with that description in ``merge.json``. A folder is reused only when its
``merge.json`` says the same; otherwise it is an error that names the folder (nothing is deleted for the user).
The merged model reads queries as the aligned candidate does: its tokenizer (and chat template) is saved into
the folder, so a soup of a base and an aligned model still answers through the aligned chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from switchkit.config import CandidateConfig, ConfigError, NotApplicable, PoolConfig, candidate_name
from switchkit.io import atomic_path

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


def check_architectures(method: str, sources: list[str], names: list[str], trust_remote_code: bool = False) -> None:
    """A one-line error unless every source has one architecture (the keys of :data:`ARCHITECTURE_KEYS`)."""
    from transformers import AutoConfig

    shapes = []
    for source, name in zip(sources, names):
        try:
            cfg = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"method {method}: cannot read the config of {name}: {str(exc).splitlines()[0]}") from None
        cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        shapes.append({key: getattr(cfg, key, None) for key in ARCHITECTURE_KEYS})
    for name, shape in zip(names[1:], shapes[1:]):
        if shape != shapes[0]:
            diff = ", ".join(f"{k} {shapes[0][k]} vs {shape[k]}" for k in ARCHITECTURE_KEYS if shape[k] != shapes[0][k])
            raise NotApplicable(f"method {method} merges weights, so the candidates must share one architecture: "
                              f"{names[0]} and {name} differ ({diff})")


def pool_sources(pool: PoolConfig) -> tuple[list[str], list[str]]:
    """(HF directories or hub ids, names) of the pool's candidates; GGUF candidates are converted (cached)."""
    from switchkit.models import hf_source

    return [hf_source(c, pool) for c in pool.candidates], [candidate_name(c) for c in pool.candidates]


def merge_dtype(pool: PoolConfig) -> str:
    """The merged model's dtype: the pool's (``auto``: bfloat16 on CUDA, float32 on CPU)."""
    from switchkit.models import resolve_device, resolve_dtype

    return str(resolve_dtype(pool.dtype, resolve_device(pool.device))).replace("torch.", "")


def cached_merge(out: Path, key: dict) -> Optional[Path]:
    """``out`` when it holds a merge made for ``key``; None when it does not exist; an error when it was made
    for another key (nothing is deleted for the user)."""
    out = Path(out)
    stored = out / "merge.json"
    if stored.is_file():
        if json.loads(stored.read_text(encoding="utf-8")).get("key") == json.loads(json.dumps(key)):
            return out
        raise ConfigError(f"{out} was merged with other settings: delete it to merge again")
    if out.exists():
        raise ConfigError(f"{out} exists without merge.json: delete it or set run_dir elsewhere")
    return None


def merge(config: dict, out: Path, tokenizer_source: str, *, key: Optional[dict] = None, seed: int = 0,
          device: str = "cpu") -> Path:
    """Run the mergekit ``config`` into ``out`` atomically; ``merge.json`` records ``key`` (what decided the merge,
    default the config itself) and the config. A finished merge for the same key is reused."""
    key = config if key is None else key
    if cached_merge(out, key) is not None:
        return Path(out)
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        raise ConfigError("weight-merge baselines need mergekit: pip install 'switchkit[merge]'") from None
    from transformers import AutoTokenizer

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=seed,
                           device=device, safe_serialization=True)
    with atomic_path(Path(out)) as tmp:
        try:
            run_merge(MergeConfiguration.model_validate(config), str(tmp), options)
        except (RuntimeError, ValueError, KeyError) as exc:  # mergekit's own errors: shapes, duplicate inputs
            raise ConfigError(f"mergekit could not merge into {out}: {str(exc).strip().splitlines()[0]}") from None
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
        (tmp / "merge.json").write_text(json.dumps({"key": key, "mergekit": config}, indent=2) + "\n")
    return Path(out)


def linear_config(models: list[str], dtype: str) -> dict:
    """A uniform weight average (a soup) of ``models``."""
    return {"merge_method": "linear", "dtype": dtype,
            "models": [{"model": m, "parameters": {"weight": 1.0 / len(models)}} for m in models]}


def dare_ties_config(base: str, models: list[str], density: float, dtype: str) -> dict:
    """DARE-TIES of ``models`` onto ``base`` with uniform weights and the given density."""
    return {"merge_method": "dare_ties", "dtype": dtype, "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0 / len(models), "density": density}} for m in models]}


def base_index(roles: list[str], names: list[str], wanted: Optional[str]) -> int:
    """The DARE-TIES base: the candidate named ``wanted``, else the pretrained one, else the first."""
    if wanted is not None:
        if wanted not in names:
            raise ConfigError(f"baselines.merge_base={wanted!r} names no candidate: allowed are {', '.join(names)}")
        return names.index(wanted)
    return roles.index("pretrained") if "pretrained" in roles else 0


def merged_candidate(folder: Path, name: str) -> CandidateConfig:
    """A merged folder as a one-model pool's candidate."""
    return CandidateConfig(source=str(folder), role="aligned", name=name)
