"""Token-level mixtures: every pool model scores each next token, and a weighted sum of their log-probabilities
decides it: the ``logit-merge`` and ``proxy-tuning`` baselines, policies in :data:`switchkit.policies.POLICIES`
(so ``toolkit generate`` and ``toolkit eval`` both run them) that decode whole responses themselves
(:meth:`MixturePolicy.respond`) instead of choosing a writer per patch.

This is one decode loop over several models, each with its own KV cache and its own rendering of the query (its
chat template, or the plain template for a base model); the response tokens are shared, so the pool must share one
tokenizer (token-level mode). It lives here, beside the HF backend whose batched, left-padded prefill with
preallocated caches it reuses, rather than in the patch-level :class:`~switchkit.backends.Backend` interface: a
mixture chooses no writer, so the engine's per-writer segments do not describe it, and a new abstract backend
operation would ask every backend for something only two baselines use.

With weights that sum to 1 (both baselines' do), the weighted sum of log-probabilities differs from the same sum
of raw logits by a constant per position, so the sampled distribution is the paper's logit arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .backends import HFBackend, Sampling, sample_tokens
from .config import ConfigError, NotApplicable, PoolConfig, Recipe, candidate_name
from .cost import charge, empty_cost
from .engine import derive_seed
from .models import encode_query
from .policies import Policy, register_policy

if TYPE_CHECKING:  # pragma: no cover
    from .engine import SwitchEngine


def mix_logits(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_m weights[m] * log_softmax(logits[m])`` over the vocabulary all members share (the shortest)."""
    vocab = min(x.shape[-1] for x in logits)
    return sum(w * x[..., :vocab].float().log_softmax(-1) for w, x in zip(weights, logits))


def check_shared_tokenizer(pool: PoolConfig, method: str) -> None:
    """Before any model loads: a one-line error unless the pool's candidates share one tokenizer (read from the
    tokenizers alone; a GGUF candidate is converted to its cached HF copy first, as loading it would)."""
    from transformers import AutoTokenizer

    from .models import hf_source, tokenizers_match

    names = [candidate_name(c) for c in pool.candidates]
    try:
        toks = [AutoTokenizer.from_pretrained(hf_source(c, pool), trust_remote_code=pool.trust_remote_code,
                                              revision=c.revision) for c in pool.candidates]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"method {method}: cannot read the pool's tokenizers: {str(exc).splitlines()[0]}") from None
    odd = [name for name, tok in zip(names[1:], toks[1:]) if not tokenizers_match(toks[0], tok)]
    if odd:
        raise NotApplicable(f"method {method} mixes next-token logits, so the pool must share one tokenizer: "
                          f"{', '.join(odd)} tokenize differently from {names[0]} (a text-level pool)")


def check_mixable(engine: "SwitchEngine", method: str) -> None:
    """A one-line error unless the engine can run a token mixture: one shared tokenizer and the HF backend."""
    if engine.pool.mode != "token":
        raise NotApplicable(f"method {method} mixes next-token logits, so the pool must share one tokenizer; "
                          f"this pool is text-level ({', '.join(c.name for c in engine.pool.candidates)} use "
                          "different tokenizers)")
    if not isinstance(engine.backend, HFBackend):
        raise ConfigError(f"method {method} needs generation.backend=hf (got {engine.cfg.backend})")


@torch.inference_mode()
def mixed_generate(backend: HFBackend, slots: Sequence[int], weights: Sequence[float],
                   contexts: Sequence[Sequence[list[int]]], max_new_tokens: int, seeds: Sequence[int],
                   sampling: Sampling, stop_ids: set[int], stop=None) -> list[list[int]]:
    """New tokens per sequence; ``contexts[m][r]`` is model ``slots[m]``'s context for sequence r.

    A sequence stops after a token in ``stop_ids`` (kept) or when ``stop(r, tokens)`` says so. Token t of
    sequence r is drawn with seed ``seeds[r] + t``.
    """
    n = len(contexts[0])
    runs = []
    for slot, ctx in zip(slots, contexts):
        logits, cache, mask, position = backend._prefill(backend._model(slot), ctx, [None] * n, max_new_tokens - 1)
        runs.append([slot, logits, cache, mask, position])
    out: list[list[int]] = [[] for _ in range(n)]
    active = list(range(n))
    tokens = torch.zeros((n, 1), dtype=torch.long)
    step = 0
    while active:
        mixed = mix_logits([run[1][active].cpu() for run in runs], weights)
        picked = sample_tokens(mixed, [seeds[r] + step for r in active], sampling)
        still = []
        for r, tok in zip(active, picked):
            out[r].append(tok)
            tokens[r, 0] = tok
            if tok not in stop_ids and len(out[r]) < max_new_tokens and not (stop and stop(r, out[r])):
                still.append(r)
        active = still
        if not active:
            break
        step += 1
        for run in runs:
            slot, _, cache, mask, position = run
            net = backend._model(slot)
            run[3] = mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            run[4] = position = position + 1
            run[1] = net(input_ids=tokens.to(net.device), attention_mask=mask, position_ids=position,
                         past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return out


def mixed_records(engine: "SwitchEngine", weights: dict[int, float], queries: list[str], seeds: list[int]) -> list[dict]:
    """Generation records (output, empty segments, cost) of the mixture ``{pool index: weight}`` for ``queries``.

    Each response has the engine's length budget (``max_new_tokens // patch_size`` patches) and ends at EOS (any
    member's) or at a stop string, in batches of ``generation.batch_size``.
    """
    pool, cfg = engine.pool, engine.cfg
    members = sorted(weights)
    tokenizer = pool[members[0]].tokenizer
    budget = engine.patches * cfg.patch_size
    stop_ids = set().union(*(pool[m].eos_token_ids for m in members))

    def stopped(r: int, out: list[int]) -> bool:
        tail = tokenizer.decode(out[-(engine.stop_len + 8):])
        return any(s in tail for s in cfg.stop)

    records = []
    for first in range(0, len(queries), cfg.batch_size):
        batch, batch_seeds = queries[first:first + cfg.batch_size], seeds[first:first + cfg.batch_size]
        contexts = [[encode_query(pool[m].tokenizer, q, pool.plain_template) for q in batch] for m in members]
        outs = mixed_generate(engine.backend, members, [weights[m] for m in members], contexts, budget,
                              [derive_seed(s, "mix") for s in batch_seeds], engine.sampling, stop_ids,
                              stopped if cfg.stop else None)
        for r, (query, seed, out) in enumerate(zip(batch, batch_seeds, outs)):
            ids = out[:-1] if out and out[-1] in stop_ids else out
            text = tokenizer.decode(ids)
            hits = [i for s in cfg.stop if s and (i := text.find(s)) >= 0]
            cost = empty_cost()
            for m, ctx in zip(members, contexts):
                charge(cost, pool[m].name, passes=len(out), prompt_tokens=len(ctx[r]), generated_tokens=len(out))
            records.append({"input": query, "output": text[: min(hits)] if hits else text, "segments": [],
                            "switch_probs": [], "seed": seed, "cost": cost})
    return records


class MixturePolicy(Policy):
    """A token-level mixture ``{pool index: weight}``: it writes whole responses (:meth:`respond`, which
    :meth:`SwitchEngine.generate <switchkit.engine.SwitchEngine.generate>` calls) and chooses no writer."""

    explicit = True

    def __init__(self, weights: dict[int, float]):
        self.weights = dict(weights)

    @classmethod
    def check(cls, recipe: Recipe, arg: Optional[str] = None) -> None:
        check_shared_tokenizer(recipe.pool, cls.name)

    def choose(self, engine, seqs):
        raise ConfigError(f"policy {self.name} mixes next-token logits: it writes whole responses "
                          "(toolkit generate, toolkit eval) and cannot choose the writer of a patch")

    def respond(self, engine: "SwitchEngine", queries: list[str], seeds: list[int]) -> list[dict]:
        """Generation records for ``queries`` (:func:`mixed_records`)."""
        check_mixable(engine, self.name)
        return mixed_records(engine, self.weights, queries, seeds)


@register_policy("logit-merge")
class LogitMerge(MixturePolicy):
    """Every candidate's next-token log-probabilities averaged with weight 1/n."""

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        if arg is not None:
            raise ConfigError(f"policy logit-merge takes no argument, got logit-merge:{arg}")
        n = len(engine.pool)
        return cls({m: 1.0 / n for m in range(n)})


def proxy_weights(best: int, worst: int) -> dict[int, float]:
    """Proxy tuning as the paper applies it: best + (best - worst), i.e. weights 2 and -1."""
    if best == worst:
        raise ConfigError("proxy-tuning needs two different models as its best and worst")
    return {best: 2.0, worst: -1.0}


def proxy_pair(recipe: Recipe, arg: Optional[str] = None) -> Optional[tuple[int, int]]:
    """The (best, worst) pool indices from ``proxy-tuning:BEST,WORST`` or ``baselines.proxy_models`` (candidate
    names or indices); None when neither names them (``toolkit eval`` then ranks the models on each task's dev)."""
    names = [candidate_name(c) for c in recipe.pool.candidates]
    given = arg.split(",") if arg else list(recipe.baselines.proxy_models or [])
    if not given:
        return None
    where = f"proxy-tuning:{arg}" if arg else "baselines.proxy_models"
    if len(given) != 2:
        raise ConfigError(f"{where}: name two candidates, the best and the worst (BEST,WORST)")
    pair = []
    for item in given:
        item = str(item).strip()
        if item in names:
            pair.append(names.index(item))
        elif item.lstrip("-").isdigit() and -len(names) <= int(item) < len(names):
            pair.append(int(item) % len(names))
        else:
            raise ConfigError(f"{where}: {item!r} names no candidate: allowed are {', '.join(names)} "
                              f"or 0..{len(names) - 1}")
    return pair[0], pair[1]


@register_policy("proxy-tuning")
class ProxyTuning(MixturePolicy):
    """best + (best - worst) over the pool's logits: the models named by ``proxy-tuning:BEST,WORST`` or
    ``baselines.proxy_models`` (``toolkit eval`` ranks them on each task's dev split when neither is set)."""

    @classmethod
    def check(cls, recipe, arg=None):
        cls.named_pair(recipe, arg)
        super().check(recipe, arg)

    @staticmethod
    def named_pair(recipe: Recipe, arg: Optional[str] = None) -> tuple[int, int]:
        """The (best, worst) the recipe names; an error when it names none."""
        pair = proxy_pair(recipe, arg)
        if pair is None:
            raise ConfigError("policy proxy-tuning needs its best and worst models: set "
                              "baselines.proxy_models=[BEST,WORST] (`toolkit eval` ranks them on each task's dev split)")
        return pair

    @classmethod
    def from_recipe(cls, recipe, engine, arg=None):
        return cls(proxy_weights(*cls.named_pair(recipe, arg)))
