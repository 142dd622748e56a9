"""Switch generation engine: candidates of a pool take turns writing patches of a response.

Each sequence keeps, per candidate, a *view*: the candidate's own context ids (its rendering of the
query, then the response so far in its tokenizer) and its KV cache state. When a candidate takes a
turn, the backend feeds only the part of its view that its cache does not cover yet, i.e. the tokens
written by others since its last turn.

- Token level (all candidates share one tokenizer): the response is one token list, appended to every
  view; nothing is re-tokenized.
- Text level (different tokenizers): the writer's patch is decoded to text; before a candidate's next
  turn, the text written since its previous turn is encoded in its own tokenizer and appended to its
  view (incremental encoding: its own earlier tokens are never re-tokenized, so its cache stays valid).
  Segment text is read off the writer's decoded view, so ``"".join(segment texts)`` is the response and
  nothing is inserted between patches. A multi-byte character cut by a patch boundary decodes as U+FFFD
  in this mode; in token mode the incomplete bytes are held back and join the next segment.

A response has ``max_new_tokens // patch_size`` patches (it ends sooner at EOS or a stop string). Sequences
assigned to the same model run as one batch. Each patch is drawn with a seed derived from the sequence's seed
and the patch number, so a sequence's text does not depend on its batch. The engine knows nothing about
training; policies (:mod:`switchkit.policies`) decide who writes, the backend (:mod:`switchkit.backends`) runs
the models.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from .backends import Backend, Sampling, common_prefix, make_backend
from .config import ConfigError, GenerationConfig
from .cost import charge, combine, empty_cost
from .io import InputError
from .models import Pool, encode_query

if TYPE_CHECKING:  # pragma: no cover
    from .policies import Policy

log = logging.getLogger(__name__)


SHARED_PREFIX_MIN = 8  # tokens: a shorter prefix common to a batch's prompts is not worth a pass of its own
SHARED_PREFIX_CACHE = 16  # shared-prefix states kept per engine


def one_hot(n: int, i: int) -> list[float]:
    """A probability vector putting all mass on model ``i``."""
    return [1.0 if j == i else 0.0 for j in range(n)]


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from its parts (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Segment:
    """One patch written by one model."""

    model: int
    text: str
    n_tokens: int


@dataclass
class View:
    """One candidate's view of a sequence: its context ids, how much response text they hold, its cache, and
    how many of its ids the model has read (for the cost)."""

    ids: list[int]
    prompt_len: int
    text_len: int = 0
    state: object = None
    read: int = 0


class SwitchSequence:
    """One response in progress.

    ``switch_probs`` holds one list of n probabilities per patch: the switcher's softmax, uniform for the
    random policy, one-hot for forced/single choices and for the aligned-first/last rule. ``states`` holds
    per-sequence policy state (the switcher's KV cache); ``generator`` serves the policy's random choices.
    ``cost`` counts what each model processed (:mod:`switchkit.cost`).
    """

    def __init__(self, query: str, query_id, seed: int, views: list[View]):
        self.query = query
        self.query_id = query_id
        self.seed = seed
        self.views = views
        self.segments: list[Segment] = []
        self.switch_probs: list[list[float]] = []
        self.done = False
        self.finish_reason: Optional[str] = None
        self.generator = torch.Generator().manual_seed(seed)
        self.states: dict = {}
        self.cost = empty_cost()

    @property
    def text(self) -> str:
        """The response so far."""
        return "".join(g.text for g in self.segments)

    @property
    def n_tokens(self) -> int:
        """Response tokens so far (each segment counted in its writer's tokenizer)."""
        return sum(g.n_tokens for g in self.segments)

    def charge_switcher(self, key, context: list[int]) -> None:
        """Count one switcher decision over ``context``: only what its cache (keyed by ``key``) did not hold."""
        previous = self.states.get(("context", key), ())
        charge(self.cost, None, passes=1, prompt_tokens=len(context) - common_prefix(previous, context))
        self.states[("context", key)] = list(context)

    def record(self) -> dict:
        """The output record: input, output, segments, switch_probs, seed, cost."""
        return {
            "input": self.query,
            "output": self.text,
            "segments": [{"model": g.model, "text": g.text, "n_tokens": g.n_tokens} for g in self.segments],
            "switch_probs": self.switch_probs,
            "seed": self.seed,
            "cost": self.cost,
        }


class SwitchEngine:
    """Patch-by-patch switch generation over a pool, batched, with per-model KV caches per sequence."""

    def __init__(self, pool: Pool, generation: GenerationConfig, backend: Optional[Backend] = None):
        self.pool = pool
        self.cfg = generation
        self.backend = backend or make_backend(generation.backend, pool, generation)
        self.token_level = pool.mode == "token"
        self.eos = [c.eos_token_ids for c in pool.candidates]
        self.stop_len = max((len(s) for s in generation.stop), default=0)
        self.sampling = Sampling(generation.temperature, generation.top_p)
        self._prefixes: dict = {}  # (model, prefix ids) -> cached state, see _shared_prefix

    @property
    def patches(self) -> int:
        """Patches per response: ``max_new_tokens // patch_size`` (a shorter tail is not written)."""
        return max(self.cfg.max_new_tokens // self.cfg.patch_size, 1)

    # -- sequences -------------------------------------------------------------------------------

    def start(self, queries: list[str], seeds: list[int], query_ids=None) -> list[SwitchSequence]:
        """New sequences, one per query, each with its own seeded generator; every model's view starts from the
        cached state of the prompt prefix the batch shares (:meth:`_shared_prefix`)."""
        query_ids = list(range(len(queries))) if query_ids is None else list(query_ids)
        if not len(queries) == len(seeds) == len(query_ids):
            raise ValueError("queries, seeds and query_ids must have the same length")
        prompts = [[self._encode_query(c, q, qid) for q, qid in zip(queries, query_ids)] for c in self.pool.candidates]
        shared = [self._shared_prefix(m, ids) for m, ids in enumerate(prompts)]
        return [SwitchSequence(query, qid, seed, [View(prompts[m][r], len(prompts[m][r]), state=shared[m])
                                                  for m in range(len(self.pool))])
                for r, (query, seed, qid) in enumerate(zip(queries, seeds, query_ids))]

    def _shared_prefix(self, model: int, prompts: list[list[int]]):
        """The cached state of the prefix that all ``prompts`` of a model share (a chat template's system turn, a
        few-shot template), computed once and kept for later batches; None when they share too little."""
        if len(prompts) < 2:
            return None
        length = min(min(map(len, prompts)) - 1, *(common_prefix(prompts[0], p) for p in prompts[1:]))
        if length < SHARED_PREFIX_MIN:
            return None
        key = (model, tuple(prompts[0][:length]))
        if key not in self._prefixes:
            if len(self._prefixes) >= SHARED_PREFIX_CACHE:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = self.backend.prefill(model, [list(key[1])], [None])[0]
        return self._prefixes[key]

    def check_queries(self, queries: list[str], query_ids: list) -> None:
        """Before generating anything: with ``generation.long_inputs=error``, every query fits every candidate's
        context beside the response (an :class:`InputError` naming the query and the model otherwise)."""
        if self.cfg.long_inputs == "error":
            for query, qid in zip(queries, query_ids):
                for c in self.pool.candidates:
                    self._encode_query(c, query, qid)

    def _encode_query(self, c, query: str, qid) -> list[int]:
        """Candidate ``c``'s ids of the query, which must leave room for the response in its context; a longer
        query is an error, or with ``generation.long_inputs=truncate`` loses its first tokens (with a warning)."""
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"query {qid!r} is empty: give a non-empty string")
        ids = encode_query(c.tokenizer, query, self.pool.plain_template)
        limit = c.context_length
        room = limit - self.patches * self.cfg.patch_size if limit else None
        if room is None or len(ids) <= room:
            return ids
        body = c.tokenizer(query, add_special_tokens=False)["input_ids"]
        cut = len(ids) - room
        while self.cfg.long_inputs == "truncate" and cut < len(body):
            ids = encode_query(c.tokenizer, c.tokenizer.decode(body[cut:]), self.pool.plain_template)
            if len(ids) <= room:
                log.warning("query %r: cut to its last %d tokens to fit candidate %s's context of %d tokens",
                            qid, len(body) - cut, c.name, limit)
                return ids
            cut += len(ids) - room
        raise InputError(f"query {qid!r} takes {len(ids)} tokens of candidate {c.name}'s context of {limit}, leaving "
                         f"less than the {limit - room} tokens of a response: shorten it, lower "
                         "generation.max_new_tokens, or set generation.long_inputs=truncate")

    def fork(self, seq: SwitchSequence, seeds: list[int]) -> list[SwitchSequence]:
        """Copies of ``seq`` that share its written prefix and caches; each gets its own generator."""
        copies = []
        for seed in seeds:
            views = [View(list(v.ids), v.prompt_len, v.text_len, v.state, v.read) for v in seq.views]
            copy = SwitchSequence(seq.query, seq.query_id, seed, views)
            copy.segments = [replace(g) for g in seq.segments]
            copy.switch_probs = [list(p) for p in seq.switch_probs]
            copy.done, copy.finish_reason = seq.done, seq.finish_reason
            copy.states = dict(seq.states)
            copy.cost = combine([seq.cost])
            copies.append(copy)
        return copies

    def prefill(self, seqs: list[SwitchSequence]) -> None:
        """Encode each unfinished sequence's response so far into every model's KV cache, one batch per model.

        Call it before :meth:`fork`: the copies then share those caches, instead of each copy encoding the
        prefix again on its model's first turn (k times per branch instead of once).
        """
        live = [s for s in seqs if not s.done]
        if not live:
            return
        for model in range(len(self.pool)):
            for seq in live:
                self.sync(seq, model)
            states = self.backend.prefill(model, [s.views[model].ids for s in live],
                                          [s.views[model].state for s in live])
            for seq, state in zip(live, states):
                view = seq.views[model]
                view.state = state
                charge(seq.cost, self.pool[model].name, passes=1, prompt_tokens=len(view.ids) - view.read)
                view.read = len(view.ids)

    # -- writing ---------------------------------------------------------------------------------

    def sync(self, seq: SwitchSequence, model: int) -> None:
        """Text level: encode the text written since ``model``'s last turn into its view."""
        view = seq.views[model]
        text = seq.text
        if not self.token_level and len(text) > view.text_len:
            tok = self.pool[model].tokenizer
            view.ids.extend(tok(text[view.text_len:], add_special_tokens=False)["input_ids"])
            view.text_len = len(text)

    def write(self, seqs: list[SwitchSequence], model_ids: list[int]) -> None:
        """Each unfinished sequence gets one patch from its model; sequences of the same model run together."""
        if len(seqs) != len(model_ids):
            raise ValueError("seqs and model_ids must have the same length")
        groups: dict[int, list[SwitchSequence]] = {}
        for seq, model in zip(seqs, model_ids):
            if not 0 <= model < len(self.pool):
                raise ConfigError(f"model id {model} is out of range: allowed is 0..{len(self.pool) - 1}")
            if not seq.done:
                groups.setdefault(model, []).append(seq)
        for model, group in groups.items():
            for seq in group:
                self.sync(seq, model)
            outs, states = self.backend.write(
                model, [s.views[model].ids for s in group], [s.views[model].state for s in group],
                [self.cfg.patch_size] * len(group), [derive_seed(s.seed, "patch", len(s.segments)) for s in group],
                self.sampling, self.eos[model],
            )
            for seq, out, state in zip(group, outs, states):
                view = seq.views[model]
                view.state = state
                charge(seq.cost, self.pool[model].name, passes=len(out), prompt_tokens=len(view.ids) - view.read,
                       generated_tokens=len(out))
                self._commit(seq, model, out)
                view.read = len(view.ids)  # its own patch is not read again as a prompt

    def _commit(self, seq: SwitchSequence, model: int, out: list[int]) -> None:
        """Append a written patch to the views and the segments; set done/finish_reason."""
        eos = bool(out) and out[-1] in self.eos[model]
        patch = out[:-1] if eos else out
        view = seq.views[model]
        for v in seq.views if self.token_level else [view]:
            v.ids.extend(patch)
        before = seq.text
        decoded = self.pool[model].tokenizer.decode(view.ids[view.prompt_len:])
        text = decoded[len(before):] if decoded.startswith(before) else decoded[common_prefix(decoded, before):]
        reason = "eos" if eos else "length" if len(seq.segments) + 1 >= self.patches else None
        if self.token_level and reason is None:
            text = text.rstrip("\ufffd")
        seq.segments.append(Segment(model, text, len(patch)))
        view.text_len = len(before) + len(text)
        if self.cfg.stop and self._cut_at_stop(seq, len(before)):
            reason = "stop"
        if reason:
            seq.done, seq.finish_reason = True, reason
            for v in seq.views:  # a finished sequence frees its caches at once
                v.state = None
            seq.states.clear()

    def _cut_at_stop(self, seq: SwitchSequence, searched: int) -> bool:
        """Cut the response before the first stop string (which may begin in an earlier segment)."""
        text = seq.text
        begin = max(0, searched - self.stop_len + 1)
        hits = [i for s in self.cfg.stop if s and (i := text.find(s, begin)) >= 0]
        if not hits:
            return False
        cut, total, kept = min(hits), 0, []
        for g in seq.segments:
            if total >= cut:
                break
            if total + len(g.text) > cut:
                g.text = g.text[: cut - total]
                g.n_tokens = len(self.pool[g.model].tokenizer(g.text, add_special_tokens=False)["input_ids"])
            kept.append(g)
            total += len(g.text)
        seq.segments = kept
        del seq.switch_probs[len(kept):]
        return True

    # -- policy loop -----------------------------------------------------------------------------

    def rule_choice(self, seq: SwitchSequence, policy: "Policy") -> Optional[int]:
        """The aligned-first/last rule: the aligned model writes the first and the last patch (not under
        explicit policies such as forced or single, which name every writer)."""
        if not self.cfg.aligned_first_last or policy.explicit:
            return None
        if len(seq.segments) in (0, self.patches - 1):
            return self.pool.aligned_index
        return None

    def decide(self, seqs: list[SwitchSequence], policy: "Policy") -> list[tuple[int, list[float]]]:
        """(model id, n probabilities) for each sequence: the first/last rule, else the policy (batched)."""
        chosen: list = [None] * len(seqs)
        ask = []
        for i, seq in enumerate(seqs):
            model = self.rule_choice(seq, policy)
            if model is None:
                ask.append(i)
            else:
                chosen[i] = (model, one_hot(len(self.pool), model))
        if ask:
            for i, choice in zip(ask, policy.choose(self, [seqs[i] for i in ask])):
                chosen[i] = choice
        return chosen

    def run(self, seqs: list[SwitchSequence], policy: "Policy", max_tokens: Optional[int] = None,
            progress: bool = False) -> list[SwitchSequence]:
        """Write until every sequence is done, or (with ``max_tokens``) has at least that many tokens (paused).

        Sequences do not move in lockstep: each sequence's next writer is decided as soon as its previous
        patch is written, and every round runs the model with the most sequences waiting for it. Fewer,
        larger batches per model; the same output, since every decision and sample of a sequence depends
        only on that sequence.
        """
        full = self.patches * self.cfg.patch_size
        limit = full if max_tokens is None else min(max_tokens, full)
        waiting: dict[int, tuple[int, list[float]]] = {}  # id(seq) -> its decided (model, probs)

        def pending():
            return [s for s in seqs if not s.done and (max_tokens is None or s.n_tokens < max_tokens)]

        with tqdm(total=limit * len(seqs), disable=not progress, unit="tok", desc="switch generation") as bar:
            while live := pending():
                undecided = [s for s in live if id(s) not in waiting]
                for seq, choice in zip(undecided, self.decide(undecided, policy)):
                    waiting[id(seq)] = choice
                sizes: dict[int, int] = {}
                for seq in live:
                    sizes[waiting[id(seq)][0]] = sizes.get(waiting[id(seq)][0], 0) + 1
                model = max(sizes, key=lambda m: (sizes[m], -m))
                group = [s for s in live if waiting[id(s)][0] == model]
                before = sum(min(s.n_tokens, limit) for s in group)
                for seq in group:
                    seq.switch_probs.append(list(waiting.pop(id(seq))[1]))
                self.write(group, [model] * len(group))
                bar.update(sum(limit if s.done else min(s.n_tokens, limit) for s in group) - before)
        return seqs

    def generate(self, queries: list[str], policy: "Policy", seeds: list[int], progress: bool = False) -> list[dict]:
        """One record per query (:meth:`SwitchSequence.record`), in batches of ``generation.batch_size``. A policy
        that decodes on its own (a token-level mixture, :mod:`switchkit.mixing`) writes the records itself."""
        if hasattr(policy, "respond"):
            return policy.respond(self, queries, seeds)
        records = []
        size = self.cfg.batch_size
        for first in range(0, len(queries), size):
            ids = list(range(first, min(first + size, len(queries))))
            seqs = self.start([queries[i] for i in ids], [seeds[i] for i in ids], ids)
            records += [s.record() for s in self.run(seqs, policy, progress=progress)]
        return records
