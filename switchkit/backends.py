"""Generation backends: the model-facing half of the switch generation engine.

The engine only talks to a :class:`Backend`. A backend runs one model over many sequences at once and
keeps an opaque per-sequence state between calls (for :class:`HFBackend`, the KV cache and the token ids
it covers). Each call gets every sequence's full context; the backend reuses the longest cached prefix
and computes only the rest, so callers never track what is cached. A vLLM backend can implement the same
two methods with vLLM's prefix caching and return ``None`` states.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers.cache_utils import Cache, StaticLayer

# sample(logits [k, vocab], rows) -> one token id per row; ``rows`` index the call's sequences.
Sampler = Callable[[torch.Tensor, list[int]], list[int]]


@dataclass(frozen=True)
class KVState:
    """One sequence's KV cache: the token ids it covers and one (keys, values) pair per layer.

    The tensors are never modified in place, so forked sequences can share them.
    """

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


class Backend(ABC):
    """Runs model ``model`` (an index the backend understands) over a batch of sequences."""

    @abstractmethod
    def write(self, model: int, contexts: Sequence[list[int]], states: Sequence[Optional[object]],
              budgets: Sequence[int], sample: Sampler, eos: set[int]) -> tuple[list[list[int]], list[object]]:
        """Generate up to ``budgets[r]`` tokens after each context (stopping at an ``eos`` token).

        Returns the new tokens per sequence (an EOS token included) and the new states.
        """

    @abstractmethod
    def next_logits(self, model: int, contexts: Sequence[list[int]],
                    states: Sequence[Optional[object]]) -> tuple[torch.Tensor, list[object]]:
        """The next-token logits ``[batch, vocab]`` after each context, and the new states."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _adapter_modules(model: torch.nn.Module) -> list:
    """The peft tuner layers injected into ``model`` (empty when it has no adapter)."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextmanager
def adapters_enabled(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run with the model's peft adapters (if any) switched on or off, restoring them afterwards.

    This is how a LoRA switcher shares its base weights with the aligned candidate: the switcher runs
    with the adapter on, the aligned candidate writes with it off.
    """
    modules = _adapter_modules(model)
    if not modules:
        yield
        return
    for m in modules:
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        for m in modules:
            m.enable_adapters(True)


class HFBackend(Backend):
    """Hugging Face transformers backend: batched forward passes over left-padded per-sequence KV caches.

    Per call, each sequence keeps the longest prefix of its context that its cache covers and feeds the
    rest. The batch is laid out with pure left padding (the cached parts are padded to one length, the
    new tokens to another; a sequence with fewer new tokens re-feeds a few cached ones instead of
    leaving a gap), so the model's own padding-mask handling applies. Afterwards each sequence's cache is
    sliced back out of the batch.
    """

    def __init__(self, get_model: Callable[[int], torch.nn.Module], adapters: bool = False):
        self.get_model = get_model
        self.adapters = adapters

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

    @torch.inference_mode()
    def next_logits(self, model, contexts, states):
        net = self.get_model(model)
        with adapters_enabled(net, self.adapters):
            logits, cache, mask, _ = self._prefill(net, contexts, states)
        end = mask.shape[1]
        new_states = [self._slice(cache, r, end - len(c), end, c) for r, c in enumerate(contexts)]
        return logits.float(), new_states

    @torch.inference_mode()
    def write(self, model, contexts, states, budgets, sample, eos):
        net = self.get_model(model)
        n = len(contexts)
        out: list[list[int]] = [[] for _ in range(n)]
        active = [r for r in range(n) if budgets[r] > 0]
        with adapters_enabled(net, self.adapters):
            logits, cache, mask, position = self._prefill(net, contexts, states, max([*budgets, 1]) - 1)
            start = mask.shape[1]
            tokens = torch.zeros((n, 1), dtype=torch.long)
            while active:
                picked = sample(logits[active], active)
                still = []
                for r, tok in zip(active, picked):
                    out[r].append(tok)
                    tokens[r, 0] = tok
                    if tok not in eos and len(out[r]) < budgets[r]:
                        still.append(r)
                active = still
                if not active:
                    break
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                position = position + 1
                logits = net(input_ids=tokens.to(net.device), attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        new_states = []
        for r, ctx in enumerate(contexts):
            covered = list(ctx) + out[r][:-1]
            new_states.append(self._slice(cache, r, start - len(ctx), start + max(len(out[r]) - 1, 0), covered))
        return out, new_states
