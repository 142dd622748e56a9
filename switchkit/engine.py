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

Sequences assigned to the same model in one step run as one batch. The engine knows nothing about
training; policies live in :mod:`switchkit.policies` and are re-exported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import TopPLogitsWarper

from .backends import Backend, HFBackend, common_prefix
from .config import ConfigError, GenerationConfig, Recipe, run_path
from .io import InputError, read_jsonl, write_jsonl_atomic
from .models import Pool, encode_query, load_pool
from .policies import (ForcedPolicy, Policy, RandomPolicy, SinglePolicy, SwitcherPolicy, load_switcher,
                       make_policy, one_hot)

__all__ = [
    "Segment", "SwitchSequence", "SwitchEngine", "generate_command", "Policy", "RandomPolicy", "ForcedPolicy",
    "SinglePolicy", "SwitcherPolicy", "load_switcher", "make_policy",
]


@dataclass
class Segment:
    """One patch written by one model."""

    model: int
    text: str
    n_tokens: int


@dataclass
class View:
    """One candidate's view of a sequence: its context ids, how much response text they hold, its cache."""

    ids: list[int]
    prompt_len: int
    text_len: int = 0
    state: object = None


class SwitchSequence:
    """One response in progress.

    ``switch_probs`` holds one list of n probabilities per patch chosen through :meth:`SwitchEngine.step`:
    the switcher's softmax, uniform for the random policy, one-hot for forced/single choices and for the
    aligned-first/last rule. ``states`` holds per-sequence policy state (the switcher's KV cache).
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

    @property
    def text(self) -> str:
        """The response so far."""
        return "".join(g.text for g in self.segments)

    @property
    def n_tokens(self) -> int:
        """Response tokens so far (each segment counted in its writer's tokenizer)."""
        return sum(g.n_tokens for g in self.segments)

    def record(self) -> dict:
        """The output record: input, output, segments, switch_probs, seed."""
        return {
            "input": self.query,
            "output": self.text,
            "segments": [{"model": g.model, "text": g.text, "n_tokens": g.n_tokens} for g in self.segments],
            "switch_probs": self.switch_probs,
            "seed": self.seed,
        }


class SwitchEngine:
    """Patch-by-patch switch generation over a pool, batched, with per-model KV caches per sequence."""

    def __init__(self, pool: Pool, generation: GenerationConfig, backend: Optional[Backend] = None):
        if generation.patch_size <= 0:
            raise ConfigError(
                f"generation.patch_size={generation.patch_size} is out of range: allowed is an integer > 0")
        if generation.max_new_tokens <= 0:
            raise ConfigError(
                f"generation.max_new_tokens={generation.max_new_tokens} is out of range: allowed is an integer > 0")
        self.pool = pool
        self.cfg = generation
        self.backend = backend or HFBackend(lambda i: pool[i].model)
        self.token_level = pool.mode == "token"
        self.eos = [c.eos_token_ids for c in pool.candidates]
        self.stop_len = max((len(s) for s in generation.stop), default=0)

    # -- sequences -------------------------------------------------------------------------------

    def start(self, queries: list[str], seeds: list[int], query_ids=None) -> list[SwitchSequence]:
        """New sequences, one per query, each with its own seeded generator."""
        query_ids = list(range(len(queries))) if query_ids is None else list(query_ids)
        if not len(queries) == len(seeds) == len(query_ids):
            raise ValueError("queries, seeds and query_ids must have the same length")
        seqs = []
        for query, seed, qid in zip(queries, seeds, query_ids):
            if not isinstance(query, str) or not query.strip():
                raise InputError(f"query {qid!r} is empty: give a non-empty string")
            views = []
            for c in self.pool.candidates:
                ids = encode_query(c.tokenizer, query, self.pool.plain_template)
                views.append(View(ids, len(ids)))
            seqs.append(SwitchSequence(query, qid, seed, views))
        return seqs

    def fork(self, seq: SwitchSequence, seeds: list[int]) -> list[SwitchSequence]:
        """Copies of ``seq`` that share its written prefix and caches; each gets its own generator."""
        copies = []
        for seed in seeds:
            views = [View(list(v.ids), v.prompt_len, v.text_len, v.state) for v in seq.views]
            copy = SwitchSequence(seq.query, seq.query_id, seed, views)
            copy.segments = [replace(g) for g in seq.segments]
            copy.switch_probs = [list(p) for p in seq.switch_probs]
            copy.done, copy.finish_reason = seq.done, seq.finish_reason
            copy.states = dict(seq.states)
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
            _, states = self.backend.next_logits(model, [s.views[model].ids for s in live],
                                                 [s.views[model].state for s in live])
            for seq, state in zip(live, states):
                seq.views[model].state = state

    # -- writing ---------------------------------------------------------------------------------

    def _sampler(self, seqs: list[SwitchSequence]):
        temperature, top_p = self.cfg.temperature, self.cfg.top_p
        warp = TopPLogitsWarper(top_p) if top_p < 1 else None

        def sample(logits: torch.Tensor, rows: list[int]) -> list[int]:
            if temperature == 0:
                return logits.argmax(-1).tolist()
            scores = logits.float().cpu() / temperature
            if warp is not None:
                scores = warp(None, scores)
            probs = scores.softmax(-1)
            return [int(torch.multinomial(p, 1, generator=seqs[r].generator)) for p, r in zip(probs, rows)]

        return sample

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
            budgets = [min(self.cfg.patch_size, self.cfg.max_new_tokens - s.n_tokens) for s in group]
            outs, states = self.backend.write(
                model, [s.views[model].ids for s in group], [s.views[model].state for s in group], budgets,
                self._sampler(group), self.eos[model],
            )
            for seq, out, state in zip(group, outs, states):
                seq.views[model].state = state
                self._commit(seq, model, out)

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
        reason = "eos" if eos else "length" if seq.n_tokens + len(patch) >= self.cfg.max_new_tokens else None
        if self.token_level and reason is None:
            text = text.rstrip("\ufffd")
        seq.segments.append(Segment(model, text, len(patch)))
        view.text_len = len(before) + len(text)
        if self.cfg.stop and self._cut_at_stop(seq, len(before)):
            reason = "stop"
        if reason:
            seq.done, seq.finish_reason = True, reason

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

    def rule_choice(self, seq: SwitchSequence, policy: Policy) -> Optional[int]:
        """The aligned-first/last rule: the aligned model writes the first patch and the one hitting max tokens
        (not for explicit policies such as forced or single, which name every writer)."""
        if not self.cfg.aligned_first_last or policy.explicit:
            return None
        if not seq.segments or seq.n_tokens + self.cfg.patch_size >= self.cfg.max_new_tokens:
            return self.pool.aligned_index
        return None

    def decide(self, seqs: list[SwitchSequence], policy: Policy) -> list[tuple[int, list[float]]]:
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

    def step(self, seqs: list[SwitchSequence], policy: Policy) -> None:
        """One patch for every unfinished sequence: the first/last rule, else the policy, then write."""
        live = [s for s in seqs if not s.done]
        chosen = self.decide(live, policy)
        for seq, (_, probs) in zip(live, chosen):
            seq.switch_probs.append(list(probs))
        self.write(live, [model for model, _ in chosen])

    def run(self, seqs: list[SwitchSequence], policy: Policy, max_tokens: Optional[int] = None,
            progress: bool = False) -> list[SwitchSequence]:
        """Write until every sequence is done, or (with ``max_tokens``) has at least that many tokens (paused).

        Unlike :meth:`step`, sequences do not move in lockstep: each sequence's next writer is decided as
        soon as its previous patch is written, and every round runs the model with the most sequences
        waiting for it. Fewer, larger batches per model; the same output, since every decision and sample
        of a sequence depends only on that sequence.
        """
        limit = self.cfg.max_new_tokens if max_tokens is None else min(max_tokens, self.cfg.max_new_tokens)
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

    def generate(self, queries: list[str], policy: Policy, seed: int = 0, progress: bool = True) -> list[dict]:
        """Generate a record per query, in batches of ``generation.batch_size``; query i uses seed + i."""
        for i, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise InputError(f"query {i} is empty: give a non-empty string")
        records = []
        size = self.cfg.batch_size
        with tqdm(total=len(queries), disable=not progress, unit="query", desc="generate") as bar:
            for first in range(0, len(queries), size):
                ids = list(range(first, min(first + size, len(queries))))
                seqs = self.start([queries[i] for i in ids], [seed + i for i in ids], ids)
                records += [s.record() for s in self.run(seqs, policy)]
                bar.update(len(ids))
        return records


def read_queries(path: str) -> list[str]:
    """The ``input`` field of every line of a JSONL file; an empty or non-string query names its line."""
    rows = read_jsonl(path, required=("input",))
    lines = [n for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    for row, lineno in zip(rows, lines):
        if not isinstance(row["input"], str) or not row["input"].strip():
            raise InputError(f"{path}:{lineno}: field 'input' must be a non-empty string")
    return [row["input"] for row in rows]


def _read_partial(path: Path, queries: list[str]) -> list[dict]:
    """Records finished by an earlier, interrupted run (a torn last line is dropped)."""
    done = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if len(done) >= len(queries) or record.get("input") != queries[len(done)]:
                break
            done.append(record)
    return done


def generate_command(recipe: Recipe, input: Optional[str] = None, output: Optional[str] = None) -> None:
    """``toolkit generate``: switch-generate a record per ``{"input": ...}`` line; resumable, written atomically.

    Finished batches are appended to ``OUTPUT.partial``; a rerun after a kill continues from there.
    """
    if not input:
        raise ConfigError("input=FILE.jsonl is required: one {\"input\": ...} object per line")
    queries = read_queries(input)
    out = run_path(recipe, output, "generations.jsonl")
    partial = out.with_name(out.name + ".partial")
    done = _read_partial(partial, queries)
    pool = load_pool(recipe.pool)
    policy = make_policy(recipe, pool)
    engine = SwitchEngine(pool, recipe.generation)
    seed, size = recipe.generation.seed, recipe.generation.batch_size
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w", encoding="utf-8") as f, \
            tqdm(total=len(queries), initial=len(done), unit="query", desc="generate") as bar:
        for record in done:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for first in range(len(done), len(queries), size):
            ids = list(range(first, min(first + size, len(queries))))
            seqs = engine.run(engine.start([queries[i] for i in ids], [seed + i for i in ids], ids), policy)
            for seq in seqs:
                record = seq.record()
                done.append(record)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(ids))
    write_jsonl_atomic(out, done)
    partial.unlink()
