"""Switching policies: who writes the next patch (switcher LM, random, forced, single model).

A policy returns, for each sequence asked, the chosen model id and the n probabilities it chose from.
Random and switcher choices draw from each sequence's own ``torch.Generator``, so a sequence's choices do
not depend on which other sequences share its batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from .backends import HFBackend
from .config import CandidateConfig, ConfigError, Recipe
from .models import Pool, default_cache_dir, load_causal_lm, resolve_device, resolve_source
from .prompt import META_FILE, build_prompt, encode_prompt, read_switcher_meta, switcher_vocab

if TYPE_CHECKING:
    from .engine import SwitchEngine, SwitchSequence



def one_hot(n: int, i: int) -> list[float]:
    """A probability vector putting all mass on model ``i``."""
    return [1.0 if j == i else 0.0 for j in range(n)]


class Policy:
    """Decides which model writes the next patch of each unfinished sequence.

    ``explicit`` policies (forced, single) name every writer themselves, so the engine's aligned-first/last
    rule does not override them.
    """

    explicit = False

    def choose(self, engine: "SwitchEngine", seqs: list["SwitchSequence"]) -> list[tuple[int, list[float]]]:
        """One (model id, n probabilities) per sequence."""
        raise NotImplementedError


class RandomPolicy(Policy):
    """Uniform over the pool, drawn from each sequence's own generator."""

    def choose(self, engine, seqs):
        n = len(engine.pool)
        return [(int(torch.randint(n, (1,), generator=s.generator)), [1.0 / n] * n) for s in seqs]


class ForcedPolicy(Policy):
    """Patch ``j`` is written by ``ids[j]``; the last id repeats."""

    explicit = True

    def __init__(self, ids: list[int]):
        if not ids:
            raise ConfigError("switcher.forced is empty: give one model id per patch")
        self.ids = list(ids)

    def choose(self, engine, seqs):
        n = len(engine.pool)
        out = []
        for s in seqs:
            model = self.ids[min(len(s.segments), len(self.ids) - 1)]
            if not 0 <= model < n:
                raise ConfigError(f"forced model id {model} is out of range: allowed is 0..{n - 1}")
            out.append((model, one_hot(n, model)))
        return out


class SinglePolicy(Policy):
    """Always model ``index`` (negative counts from the end, as in Python)."""

    explicit = True

    def __init__(self, index: int):
        self.index = index

    def choose(self, engine, seqs):
        n = len(engine.pool)
        if not -n <= self.index < n:
            raise ConfigError(f"switcher.single={self.index} is out of range: allowed is {-n}..{n - 1}")
        model = self.index % n
        return [(model, one_hot(n, model)) for _ in seqs]


class SwitcherPolicy(Policy):
    """An LM switcher: the v1 prompt, one forward pass, a softmax over the n model-id logits, then top-p.

    Each sequence keeps the switcher's KV cache between decisions, so a decision only computes the
    tokens that changed since the previous one (the new segment and the closing question).
    """

    def __init__(self, model, tokenizer, n: int, *, top_p: float = 0.7, greedy: bool = False,
                 max_length: Optional[int] = None, adapters: bool = False):
        try:
            self.vocab = switcher_vocab(tokenizer, n)
        except ValueError as exc:
            raise ConfigError(f"switcher tokenizer: {exc}") from None
        if not 0 < top_p <= 1:
            raise ConfigError(f"switcher.top_p={top_p} is out of range: allowed is a float in (0, 1]")
        self.model = model
        self.tokenizer = tokenizer
        self.n = n
        self.top_p = top_p
        self.greedy = greedy
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        self.backend = HFBackend(lambda _: model, adapters=adapters)

    def probabilities(self, seqs: list["SwitchSequence"]) -> torch.Tensor:
        """The switcher's ``[batch, n]`` model-id logits per sequence (softmax them for the probabilities).

        Updates each sequence's switcher cache.
        """
        contexts = []
        for s in seqs:
            prompt = build_prompt(s.query, [(g.model, g.text) for g in s.segments], self.n)
            contexts.append(encode_prompt(self.tokenizer, self.vocab, prompt, self.max_length))
        logits, states = self.backend.next_logits(0, contexts, [s.states.get(self) for s in seqs])
        for s, st in zip(seqs, states):
            s.states[self] = st
        return logits[:, list(self.vocab.token_ids)].cpu()

    def choose(self, engine, seqs):
        if len(engine.pool) != self.n:
            raise ConfigError(f"the switcher is set up for n={self.n} models, but the pool has {len(engine.pool)}")
        logits = self.probabilities(seqs) if seqs else torch.empty(0, self.n)
        probs = logits.softmax(-1)
        if self.greedy:
            return [(int(p.argmax()), p.tolist()) for p in probs]
        kept = TopPLogitsWarper(self.top_p)(None, logits).softmax(-1)
        return [(int(torch.multinomial(k, 1, generator=s.generator)), p.tolist())
                for s, k, p in zip(seqs, kept, probs)]


def _check_meta(meta: dict, where: Path, n: int, allow_n_mismatch: bool) -> None:
    if meta.get("prompt_format", "v1") != "v1":
        raise ConfigError(f"{where / META_FILE}: prompt_format={meta['prompt_format']!r} is unknown: allowed is v1")
    if "n" in meta and meta["n"] != n and not allow_n_mismatch:
        raise ConfigError(
            f"switcher {where} was exported for n={meta['n']} models, but the pool has {n} candidates "
            "(set switcher.allow_n_mismatch=true to apply it to a pool of another size)"
        )


def load_switcher(path_or_id: str, pool: Pool, *, top_p: float = 0.7, greedy: bool = False,
                  device: Optional[str] = None, allow_n_mismatch: bool = False) -> SwitcherPolicy:
    """Load a switcher: a trainer export, a peft adapter dir, or any HF causal LM (an untuned switcher).

    An adapter whose base is the pool's aligned candidate (``base_model`` equal to its source, or null
    because the switcher was initialised from it) is attached to that candidate's model, so the pool
    holds n models, not n+1; the aligned candidate then writes with the adapter switched off.
    A switcher exported for another number of models is refused unless ``allow_n_mismatch`` (the paper's
    unseen-model settings apply a 3-model switcher to pools of 2 or 4: the prompt then names the pool's n).
    """
    n = len(pool)
    folder = Path(path_or_id).expanduser()
    meta = read_switcher_meta(folder) if folder.is_dir() else {}
    _check_meta(meta, folder, n, allow_n_mismatch)
    aligned = pool[pool.aligned_index]
    param = next(aligned.model.parameters())
    dev = resolve_device(device) if device else param.device
    max_length = (meta.get("recipe") or {}).get("train", {}).get("max_length")
    if (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        base = meta.get("base_model") or config.get("base_model_name_or_path")
        if base == aligned.source or (meta and meta.get("base_model") is None):
            model, tokenizer = aligned.model, aligned.tokenizer
        else:
            source, gguf_file = resolve_source(CandidateConfig(source=base), default_cache_dir())
            model, tokenizer = load_causal_lm(source, gguf_file=gguf_file, dtype=param.dtype, device=dev)
        try:
            model.load_adapter(str(folder), adapter_name="switcher")
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load switcher adapter {folder}: {str(exc).splitlines()[0]}") from None
        return SwitcherPolicy(model, tokenizer, n, top_p=top_p, greedy=greedy, max_length=max_length, adapters=True)
    model, tokenizer = load_causal_lm(str(path_or_id), dtype=param.dtype, device=dev)
    return SwitcherPolicy(model, tokenizer, n, top_p=top_p, greedy=greedy, max_length=max_length)


def make_policy(recipe: Recipe, pool: Pool) -> Policy:
    """The policy a recipe's ``switcher`` section asks for."""
    cfg = recipe.switcher
    if cfg.policy == "random":
        return RandomPolicy()
    if cfg.policy == "forced":
        return ForcedPolicy(cfg.forced)
    if cfg.policy == "single":
        return SinglePolicy(cfg.single)
    if cfg.path:
        return load_switcher(cfg.path, pool, top_p=cfg.top_p, greedy=cfg.greedy, allow_n_mismatch=cfg.allow_n_mismatch)
    if cfg.policy == "trained":
        raise ConfigError("switcher.path is required for switcher.policy=trained: give a switcher checkpoint")
    aligned = pool[pool.aligned_index]
    return SwitcherPolicy(aligned.model, aligned.tokenizer, len(pool), top_p=cfg.top_p, greedy=cfg.greedy)
