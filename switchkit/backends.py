"""Generation backends: the model-facing half of the switch generation engine (registry :data:`BACKENDS`).

The engine only talks to a :class:`Backend`, at patch granularity: write up to m tokens after each of many
contexts, or read the log-probabilities of the switcher's model-id tokens after each of many contexts. A
backend runs *slots*: the pool's candidates are slots ``0..n-1``; switchers are added as more slots (a full
model, or a LoRA adapter on a candidate's weights, so the pool stays at n models).

Each call gets every sequence's full context and an opaque per-sequence state from the previous call; the
backend reuses what it can (:class:`HFBackend`: the longest cached prefix of its KV cache) and computes only
the rest, so callers never track what is cached. Sampling is seeded per sequence and call, so a sequence's
tokens do not depend on which other sequences share its batch. ``generation.backend`` picks the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from transformers.cache_utils import Cache, StaticLayer

from .registry import registrar

if TYPE_CHECKING:  # pragma: no cover
    from .models import Pool


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: greedy at temperature 0, else temperature and top-p sampling."""

    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class KVState:
    """One sequence's KV cache: the token ids it covers and one (keys, values) pair per layer.

    The tensors are never modified in place, so forked sequences can share them.
    """

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Backend(ABC):
    """Runs the pool's models and the switchers added to it over batches of sequences."""

    name = ""

    @abstractmethod
    def write(self, slot: int, contexts: Sequence[list[int]], states: Sequence[Optional[object]],
              budgets: Sequence[int], seeds: Sequence[int], sampling: Sampling,
              stop_ids: set[int]) -> tuple[list[list[int]], list[object]]:
        """Generate up to ``budgets[r]`` tokens after each context, stopping after a token in ``stop_ids``.

        ``seeds[r]`` seeds sequence r's draws in this call. Returns the new tokens per sequence (a stop token
        included) and the new states.
        """

    @abstractmethod
    def id_logprobs(self, slot: int, contexts: Sequence[list[int]], states: Sequence[Optional[object]],
                    token_ids: Sequence[int]) -> tuple[torch.Tensor, list[object]]:
        """Log-probabilities ``[batch, len(token_ids)]`` of the next token, renormalised over ``token_ids``."""

    @abstractmethod
    def prefill(self, slot: int, contexts: Sequence[list[int]],
                states: Sequence[Optional[object]]) -> list[object]:
        """Bring each sequence's state up to its context (so forks of it share the work); the new states."""

    @abstractmethod
    def add_model(self, source: str, gguf_file: Optional[str] = None):
        """Load a switcher model as a new slot; returns (slot, tokenizer)."""

    @abstractmethod
    def add_adapter(self, base: int, folder: Path) -> int:
        """Attach the peft LoRA adapter in ``folder`` to slot ``base``'s weights as a new slot."""

    @abstractmethod
    def remove(self, slot: int) -> None:
        """Drop a slot added by :meth:`add_model` or :meth:`add_adapter` (an adapter is unloaded)."""


BACKENDS: dict[str, type[Backend]] = {}
# @register_backend("name"): the class (built from the pool) becomes generation.backend=name
register_backend = registrar(BACKENDS, "name")


def make_backend(name: str, pool: "Pool") -> Backend:
    """The backend ``name`` over ``pool``."""
    from .config import ConfigError

    if name not in BACKENDS:
        raise ConfigError(f"generation.backend={name!r} is unknown: allowed are {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](pool)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


NUCLEUS_K = 64  # top-p looks at the K most likely tokens first; a row whose nucleus is larger is sorted in full


def _inverse_cdf(weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per row, the index where the row's draw in [0, 1) falls on the cumulative (unnormalised) weights."""
    cdf = weights.cumsum(-1)
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True)
    return picked.clamp(max=weights.shape[-1] - 1).squeeze(-1)


def _nucleus(probs: torch.Tensor, draws: torch.Tensor, top_p: float, k: int) -> torch.Tensor:
    """Top-p sampling among each row's ``k`` most likely tokens: a token stays while the mass ranked above it is
    below ``top_p`` (the rule of transformers' ``TopPLogitsWarper``)."""
    top, index = probs.topk(k, dim=-1)
    top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    return index.gather(-1, _inverse_cdf(top, draws)[:, None]).squeeze(-1)


def sample_tokens(logits: torch.Tensor, seeds: Sequence[int], sampling: Sampling) -> list[int]:
    """One token per row: argmax at temperature 0, else a draw seeded by the row's seed (temperature, top-p).

    Exact and vectorised: one uniform draw per row, inverse-CDF sampling; top-p first looks among the
    :data:`NUCLEUS_K` most likely tokens (enough unless a row's nucleus is larger; such rows are sorted in full),
    so a large vocabulary is never sorted or scanned by ``multinomial`` row by row.
    """
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = (logits.float() / sampling.temperature).softmax(-1).cpu()
    draws = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    if sampling.top_p >= 1:
        return _inverse_cdf(probs, draws).tolist()
    k = min(NUCLEUS_K, probs.shape[-1])
    picked = _nucleus(probs, draws, sampling.top_p, k)
    wide = probs.topk(k, dim=-1).values.sum(-1) < sampling.top_p
    if wide.any():
        picked[wide] = _nucleus(probs[wide], draws[wide], sampling.top_p, probs.shape[-1])
    return picked.tolist()


@register_backend("hf")
class HFBackend(Backend):
    """Hugging Face transformers: batched forward passes over left-padded per-sequence KV caches.

    Per call, each sequence keeps the longest prefix of its context that its cache covers and feeds the
    rest. The batch is laid out with pure left padding (the cached parts are padded to one length, the
    new tokens to another; a sequence with fewer new tokens re-feeds a few cached ones instead of
    leaving a gap), so the model's own padding-mask handling applies. Afterwards each sequence's cache is
    sliced back out of the batch. A LoRA switcher is a named peft adapter on its base slot's model, switched
    on only while that slot runs.
    """

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.slots: dict[int, tuple[torch.nn.Module, Optional[str]]] = {
            c.index: (c.model, None) for c in pool.candidates}
        self._next = len(pool)

    def _model(self, slot: int) -> torch.nn.Module:
        """The slot's model, with its own adapter active and every other adapter off.

        This goes through peft's tuner layers: transformers' own adapter switches ask for a newer peft than PyPI has.
        """
        model, adapter = self.slots[slot]
        if getattr(model, "_hf_peft_config_loaded", False):
            from peft.tuners.tuners_utils import BaseTunerLayer

            for layer in model.modules():
                if isinstance(layer, BaseTunerLayer):
                    layer.enable_adapters(adapter is not None)
                    if adapter is not None:
                        layer.set_adapter(adapter, inference_mode=True)
        return model

    def add_model(self, source, gguf_file=None):
        from .models import load_causal_lm

        aligned = self.pool[self.pool.aligned_index].model
        param = next(aligned.parameters())
        model, tokenizer = load_causal_lm(source, gguf_file=gguf_file, dtype=param.dtype, device=param.device)
        return self._add(model, None), tokenizer

    def add_adapter(self, base, folder):
        model = self.slots[base][0]
        name = f"switcher-{self._next}"
        model.load_adapter(str(folder), adapter_name=name)
        return self._add(model, name)

    def _add(self, model, adapter):
        slot, self._next = self._next, self._next + 1
        self.slots[slot] = (model, adapter)
        return slot

    def remove(self, slot):
        model, adapter = self.slots.pop(slot)
        if adapter is None:
            return
        # peft's own deletion (transformers' delete_adapter wraps it but asks for a newer peft than PyPI has)
        from peft.functional import delete_adapter

        delete_adapter(model, adapter_name=adapter, prefix=f"{model.peft_config[adapter].peft_type.value.lower()}_")
        del model.peft_config[adapter]
        if not model.peft_config:
            del model.peft_config
            model._hf_peft_config_loaded = False

    def _prefill(self, model, contexts, states, extra: int = 0):
        n = len(contexts)
        reuse = []
        for ctx, st in zip(contexts, states):
            if not ctx:
                raise ValueError("a context must hold at least one token")
            reuse.append(min(common_prefix(st.ids, ctx), len(ctx) - 1) if st is not None else 0)
        new = max(len(c) - k for c, k in zip(contexts, reuse))
        keep = [max(len(c) - new, 0) for c in contexts]
        past = max(keep)
        device = model.device
        ids = torch.zeros((n, new), dtype=torch.long)  # padding positions are masked out
        mask = torch.zeros((n, past + new), dtype=torch.long)
        for r, ctx in enumerate(contexts):
            fed = ctx[keep[r]:]
            ids[r, new - len(fed):] = torch.tensor(fed)
            mask[r, past + new - len(ctx):] = 1
        # Preallocated (static) layers: decoding writes in place instead of concatenating every step.
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        cache = Cache(layers=[StaticLayer(max_cache_len=past + new + extra) for _ in range(layers)])
        if past:
            ref = next(st for st, k in zip(states, keep) if k).layers
            for li, (k0, v0) in enumerate(ref):
                keys = k0.new_zeros((n, k0.shape[1], past, k0.shape[3]))
                values = v0.new_zeros((n, v0.shape[1], past, v0.shape[3]))
                for r, st in enumerate(states):
                    if keep[r]:
                        k, v = st.layers[li]
                        keys[r, :, past - keep[r]:] = k[0, :, :keep[r]]
                        values[r, :, past - keep[r]:] = v[0, :, :keep[r]]
                cache.layers[li].update(keys, values)
        mask = mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions[:, past:],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache, mask, positions[:, -1:]

    @staticmethod
    def _slice(cache: Cache, r: int, start: int, stop: int, ids: list[int]) -> KVState:
        layers = tuple((layer.keys[r:r + 1, :, start:stop], layer.values[r:r + 1, :, start:stop])
                       for layer in cache.layers)
        return KVState(tuple(ids), layers)

    def _forward(self, slot, contexts, states):
        logits, cache, mask, _ = self._prefill(self._model(slot), contexts, states)
        end = mask.shape[1]
        return logits, [self._slice(cache, r, end - len(c), end, c) for r, c in enumerate(contexts)]

    @torch.inference_mode()
    def prefill(self, slot, contexts, states):
        return self._forward(slot, contexts, states)[1]

    @torch.inference_mode()
    def id_logprobs(self, slot, contexts, states, token_ids):
        logits, new_states = self._forward(slot, contexts, states)
        return logits[:, list(token_ids)].float().log_softmax(-1).cpu(), new_states

    @torch.inference_mode()
    def write(self, slot, contexts, states, budgets, seeds, sampling, stop_ids):
        net = self._model(slot)
        n = len(contexts)
        out: list[list[int]] = [[] for _ in range(n)]
        active = [r for r in range(n) if budgets[r] > 0]
        logits, cache, mask, position = self._prefill(net, contexts, states, max([*budgets, 1]) - 1)
        start = mask.shape[1]
        tokens = torch.zeros((n, 1), dtype=torch.long)
        step = 0
        while active:
            picked = sample_tokens(logits[active], [seeds[r] + step for r in active], sampling)
            still = []
            for r, tok in zip(active, picked):
                out[r].append(tok)
                tokens[r, 0] = tok
                if tok not in stop_ids and len(out[r]) < budgets[r]:
                    still.append(r)
            active = still
            if not active:
                break
            step += 1
            mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
            position = position + 1
            logits = net(input_ids=tokens.to(net.device), attention_mask=mask, position_ids=position,
                         past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        new_states = []
        for r, ctx in enumerate(contexts):
            covered = list(ctx) + out[r][:-1]
            new_states.append(self._slice(cache, r, start - len(ctx), start + max(len(out[r]) - 1, 0), covered))
        return out, new_states
