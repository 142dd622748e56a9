"""Switching policies: who writes the next patch. One registry (:data:`POLICIES`) serves every command.

``switcher.policy`` in a recipe, ``toolkit generate``, ``toolkit serve``, distillation and the eval methods all
build policies through :func:`make_policy`, so a new baseline registered here is usable everywhere::

    @register_policy("my-baseline")
    class MyPolicy(Policy):
        def choose(self, engine, seqs):
            return [(0, one_hot(len(engine.pool), 0)) for _ in seqs]

A policy returns, for each sequence asked, the chosen model id and the n probabilities it chose from. Random
choices draw from each sequence's own ``torch.Generator``, so a sequence's choices do not depend on which
other sequences share its batch. A policy that added something to the backend (a switcher) frees it in
:meth:`Policy.close`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from .artifacts import artifact_stamp, check_switcher, switcher_dir
from .config import CandidateConfig, ConfigError, Recipe
from .engine import one_hot
from .io import InputError
from .models import default_cache_dir, resolve_source
from .prompt import PromptFormat, build_prompt, default_format, get_format
from .registry import registrar

if TYPE_CHECKING:  # pragma: no cover
    from .engine import SwitchEngine, SwitchSequence

POLICIES: dict[str, type["Policy"]] = {}
# @register_policy("name"): the class becomes switcher.policy=name and an eval method
register_policy = registrar(POLICIES, "name")


class Policy:
    """Decides which model writes the next patch of each unfinished sequence.

    ``explicit`` policies (forced, single) name every writer themselves, so the engine's aligned-first/last
    rule does not override them. ``arg`` is the text after a colon in a method name (``single:2``). A policy that
    decodes whole responses itself (a token-level mixture, :mod:`switchkit.mixing`) also defines
    ``respond(engine, queries, seeds)``, which :meth:`SwitchEngine.generate` then calls instead of writing patches.
    """

    name = ""
    explicit = False

    @classmethod
    def from_recipe(cls, recipe: Recipe, engine: "SwitchEngine", arg: Optional[str] = None) -> "Policy":
        """The policy as the recipe's ``switcher`` section (and ``arg``) configure it."""
        if arg is not None:
            raise ConfigError(f"policy {cls.name!r} takes no argument, got {cls.name}:{arg}")
        return cls()

    @classmethod
    def check(cls, recipe: Recipe, arg: Optional[str] = None) -> None:
        """Before anything loads: raise a :class:`ConfigError` when the recipe's pool cannot run this policy."""

    @classmethod
    def artifact(cls, recipe: Recipe, arg: Optional[str] = None) -> Optional[str]:
        """The switcher this policy loads (a folder or a hub id), checked and fingerprinted before anything loads;
        None when it loads nothing."""
        return None

    def choose(self, engine: "SwitchEngine", seqs: list["SwitchSequence"]) -> list[tuple[int, list[float]]]:
        """One (model id, n probabilities) per sequence."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the policy added to the engine's backend."""


@register_policy("random")
class RandomPolicy(Policy):
    """Uniform over the pool, drawn from each sequence's own generator."""

    def choose(self, engine, seqs):
        n = len(engine.pool)
        return [(int(torch.randint(n, (1,), generator=s.generator)), [1.0 / n] * n) for s in seqs]


@register_policy("forced")
class ForcedPolicy(Policy):
    """Patch ``j`` is written by ``ids[j]``; the last id repeats (``switcher.forced`` or ``forced:0,1,1``)."""

    explicit = True

    def __init__(self, ids: list[int]):
        if not ids:
            raise ConfigError("switcher.forced is empty: give one model id per patch")
        self.ids = list(ids)

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        if arg is None:
            return cls(recipe.switcher.forced)
        try:
            ids = [int(x) for x in arg.split(",")]
        except ValueError:
            raise ConfigError(f"forced:{arg}: give comma-separated model ids such as forced:1,0,0") from None
        if not all(0 <= i < len(engine.pool) for i in ids):
            raise ConfigError(f"forced:{arg}: model ids must be in 0..{len(engine.pool) - 1}")
        return cls(ids)

    def choose(self, engine, seqs):
        n = len(engine.pool)
        return [(model, one_hot(n, model)) for model in (self.ids[min(len(s.segments), len(self.ids) - 1)]
                                                         for s in seqs)]


@register_policy("single")
class SinglePolicy(Policy):
    """Always model ``index`` (negative counts from the end; ``switcher.single``, or ``single:NAME|INDEX``)."""

    explicit = True

    def __init__(self, index: int):
        self.index = index

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        if arg is None:
            return cls(recipe.switcher.single)
        names = [c.name for c in engine.pool.candidates]
        if arg in names:
            return cls(names.index(arg))
        if arg.lstrip("-").isdigit() and -len(names) <= int(arg) < len(names):
            return cls(int(arg))
        raise ConfigError(f"single:{arg} names no candidate: allowed are {', '.join(names)} or 0..{len(names) - 1}")

    def choose(self, engine, seqs):
        n = len(engine.pool)
        model = self.index % n
        return [(model, one_hot(n, model)) for _ in seqs]


def shift_aligned(logprobs: torch.Tensor, aligned: int, bias: float) -> torch.Tensor:
    """``[batch, n]`` switcher log-probabilities with the aligned model's id shifted by ``bias`` and renormalised
    (``switcher.aligned_bias``, the cost knob); unchanged at 0."""
    if not bias:
        return logprobs
    logprobs = logprobs.clone()
    logprobs[:, aligned] += bias
    return logprobs.log_softmax(-1)


def top_p_probs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The distribution a decision is sampled from: ``logprobs`` cut to their top-p nucleus (``switcher.top_p``)."""
    return TopPLogitsWarper(top_p)(None, logprobs).softmax(-1)


class SwitcherPolicy(Policy):
    """An LM switcher: the selector prompt in its format, one forward pass, a softmax over the n model-id
    logits, then top-p (or greedy).

    The switcher runs as a backend slot: a pool candidate's own weights (untuned), a LoRA adapter on a
    candidate, or a model of its own. Each sequence keeps the switcher's state between decisions, so a
    decision only computes what changed since the previous one (the new segment and the closing question).
    """

    def __init__(self, engine: "SwitchEngine", slot: int, tokenizer, fmt: PromptFormat, *, top_p: float = 0.7,
                 greedy: bool = False, max_length: Optional[int] = None, owned: tuple[int, ...] = (),
                 aligned_bias: float = 0.0):
        n = len(engine.pool)
        try:
            self.vocab = fmt.vocab(tokenizer, n)
        except ValueError as exc:
            raise ConfigError(f"switcher tokenizer: {exc}") from None
        self.engine, self.slot, self.tokenizer, self.format, self.n = engine, slot, tokenizer, fmt, n
        self.top_p, self.greedy, self.max_length = top_p, greedy, max_length
        self.owned = owned
        self.aligned_bias = aligned_bias  # the cost knob (switcher.aligned_bias)

    def selector_text(self, seq: "SwitchSequence") -> str:
        """The text the switcher reads before deciding for ``seq``: the switcher prompt."""
        return build_prompt(seq.query, [(g.model, g.text) for g in seq.segments], self.n)

    def logprobs(self, seqs: list["SwitchSequence"]) -> torch.Tensor:
        """The switcher's ``[batch, n]`` log-probabilities over the model ids; updates each sequence's state."""
        contexts = [self.format.encode(self.tokenizer, self.vocab, self.selector_text(s), self.max_length)
                    for s in seqs]
        logprobs, states = self.engine.backend.id_logprobs(self.slot, contexts, [s.states.get(self) for s in seqs],
                                                           self.vocab.token_ids)
        for s, st, ctx in zip(seqs, states, contexts):
            s.states[self] = st
            s.charge_switcher(self, ctx)
        return logprobs

    def choose(self, engine, seqs):
        logprobs = self.logprobs(seqs) if seqs else torch.empty(0, self.n)
        # the probabilities recorded are the shifted ones
        logprobs = shift_aligned(logprobs, self.engine.pool.aligned_index, self.aligned_bias)
        probs = logprobs.softmax(-1)
        if self.greedy:
            return [(int(p.argmax()), p.tolist()) for p in probs]
        kept = top_p_probs(logprobs, self.top_p)
        return [(int(torch.multinomial(k, 1, generator=s.generator)), p.tolist()) for s, k, p in zip(seqs, kept, probs)]

    def close(self):
        for slot in self.owned:
            self.engine.backend.remove(slot)
        self.owned = ()


def _resolve_format(requested: Optional[str], stored: Optional[str], tokenizer, where: str) -> PromptFormat:
    if stored and requested and requested != stored:
        raise ConfigError(f"switcher.prompt_format={requested} but {where} was trained with {stored}: "
                          "leave switcher.prompt_format unset to use the switcher's own")
    try:
        return get_format(stored or requested or default_format(tokenizer))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_switcher(engine: "SwitchEngine", path_or_id: str, *, prompt_format: Optional[str] = None,
                  top_p: float = 0.7, greedy: bool = False, allow_n_mismatch: bool = False,
                  aligned_bias: float = 0.0, policy_class: type[SwitcherPolicy] = SwitcherPolicy) -> SwitcherPolicy:
    """Load a switcher into the engine's backend: a trainer export, a peft adapter dir, or any HF causal LM.

    An adapter whose base model is a pool candidate (its source) is attached to that candidate's weights, so
    the pool holds n models, not n+1. The prompt format is the one in ``switchkit.json``; a plain HF switcher
    gets ``prompt_format``, else v1-chat when it has a chat template. A switcher exported for another number
    of models is refused unless ``allow_n_mismatch`` (the paper's unseen-model settings: the prompt then names
    the pool's n). ``policy_class`` is the :class:`SwitcherPolicy` subclass to build (a router's).
    """
    pool, backend = engine.pool, engine.backend
    folder = Path(path_or_id).expanduser()
    meta = check_switcher(folder, len(pool), allow_n_mismatch) if folder.exists() else None
    owned: list[int] = []
    if (folder / "adapter_config.json").is_file():
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{folder / 'adapter_config.json'}: malformed JSON ({exc.msg})") from None
        base = meta.base_model if meta else config.get("base_model_name_or_path")
        sources = [c.source for c in pool.candidates]
        if base in sources:
            base_slot, tokenizer = sources.index(base), pool[sources.index(base)].tokenizer
        else:
            if not base:
                raise ConfigError(f"switcher adapter {folder} names no base model")
            source, gguf_file = resolve_source(CandidateConfig(source=base), default_cache_dir())
            base_slot, tokenizer = backend.add_model(source, gguf_file)
            owned.append(base_slot)
        try:
            owned.append(backend.add_adapter(base_slot, folder))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load switcher adapter {folder}: {str(exc).splitlines()[0]}") from None
    else:
        slot, tokenizer = backend.add_model(str(path_or_id))
        owned.append(slot)
    fmt = _resolve_format(prompt_format, meta.prompt_format if meta else None, tokenizer, str(folder))
    return policy_class(engine, owned[-1], tokenizer, fmt, top_p=top_p, greedy=greedy,
                        max_length=meta.max_length if meta else None, owned=tuple(owned), aligned_bias=aligned_bias)


@register_policy("trained")
class TrainedSwitcher(SwitcherPolicy):
    """A trained switcher: ``arg``, else ``switcher.path``, else the recipe's own export (``<run_dir>/switcher``)."""

    @classmethod
    def artifact(cls, recipe, arg=None):
        return arg or recipe.switcher.path or str(switcher_dir(recipe))

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        cfg = recipe.switcher
        path = cls.artifact(recipe, arg)
        if not Path(path).expanduser().exists() and (not arg and not cfg.path):
            raise ConfigError(f"switcher {path} does not exist: run `toolkit train-switcher recipe={recipe.name}` "
                              "or set switcher.path")
        return load_switcher(engine, path, prompt_format=cfg.prompt_format, top_p=cfg.top_p, greedy=cfg.greedy,
                             allow_n_mismatch=cfg.allow_n_mismatch, aligned_bias=cfg.aligned_bias)


@register_policy("untuned")
class UntunedSwitcher(SwitcherPolicy):
    """An LM that was never trained as a switcher: ``arg`` or ``switcher.path`` when the policy is ``untuned``,
    else the aligned candidate itself (its weights are shared, nothing is loaded)."""

    @classmethod
    def artifact(cls, recipe, arg=None):
        return arg or (recipe.switcher.path if recipe.switcher.policy == "untuned" else None)

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        cfg = recipe.switcher
        path = cls.artifact(recipe, arg)
        if path:
            return load_switcher(engine, path, prompt_format=cfg.prompt_format, top_p=cfg.top_p, greedy=cfg.greedy,
                                 aligned_bias=cfg.aligned_bias)
        aligned = engine.pool[engine.pool.aligned_index]
        fmt = _resolve_format(cfg.prompt_format, None, aligned.tokenizer, aligned.name)
        return SwitcherPolicy(engine, aligned.index, aligned.tokenizer, fmt, top_p=cfg.top_p, greedy=cfg.greedy,
                              aligned_bias=cfg.aligned_bias)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_policy(recipe: Recipe, name: Optional[str] = None, arg: Optional[str] = None) -> str:
    """Before loading: the switcher that policy ``name`` (default ``switcher.policy``) loads is a consistent folder
    for the pool (or a hub id); returns its stamp for fingerprints (:func:`switchkit.artifacts.artifact_stamp`)."""
    name = name or recipe.switcher.policy
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}: registered are {', '.join(sorted(POLICIES))}")
    POLICIES[name].check(recipe, arg)
    path = POLICIES[name].artifact(recipe, arg)
    if path and not Path(path).expanduser().exists():
        if HUB_ID.match(path) and (arg or recipe.switcher.path):
            return path  # a hub id, checked when it loads
        raise ConfigError(f"switcher {path} does not exist: run `toolkit train-switcher recipe={recipe.name}` "
                          "or set switcher.path")
    if path:
        allow = recipe.switcher.allow_n_mismatch and name == "trained"
        check_switcher(path, len(recipe.pool.candidates), allow)
    return artifact_stamp(path)


def make_policy(recipe: Recipe, engine: "SwitchEngine", name: Optional[str] = None,
                arg: Optional[str] = None) -> Policy:
    """The registered policy ``name`` (default ``switcher.policy``) configured by the recipe and ``arg``."""
    name = name or recipe.switcher.policy
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}: registered are {', '.join(sorted(POLICIES))}")
    return POLICIES[name].from_recipe(recipe, engine, arg)


from . import mixing, routers  # noqa: E402,F401  (register the baselines: prompt-route, trained-router, logit-merge, proxy-tuning)
