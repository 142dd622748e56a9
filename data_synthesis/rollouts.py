"""One synthesis chunk: traces, the divergent step, rollouts, scores and labels (paper §2).

For each record (a task query plus a seed):

1. Trace: random switching, paused at a length drawn by :func:`~.plan.trace_length`. If the trace finishes
   (EOS or a stop string) before that, it is cut at its last patch boundary before the end (the state there
   is kept while the trace grows); if it finished within its first patch, nothing is left to decide and the
   record is skipped (counted in stats).
2. Divergent step: the trace is forked n times (sharing its KV caches) and candidate i writes one patch on
   branch i.
3. Rollouts: each unfinished branch is forked k times and run to the end with random switching. Before each
   fork every model's KV cache is filled with the prefix once (:meth:`SwitchEngine.prefill`), so the forks share
   it; all traces, branches and rollouts of a chunk run together (one batch per model and patch).
4. Each finished response is scored by the task scorer; utility i is branch i's mean score and the label is the
   argmax (:func:`~.labels.choose_label`).
"""

from __future__ import annotations

import random
import statistics

from switchkit.config import Recipe
from switchkit.engine import derive_seed
from switchkit.policies import RandomPolicy
from switchkit.prompt import build_prompt

from .labels import choose_label
from .plan import Job, trace_length


def _trace_dicts(seq) -> list[dict]:
    return [{"model": int(s.model), "text": s.text, "n_tokens": int(s.n_tokens)} for s in seq.segments]


def run_chunk(engine, tasks, jobs: list[Job], recipe: Recipe) -> dict:
    """Make the records of one chunk: traces, divergent step, rollouts, scores and labels.

    With ``synthesis.max_in_flight`` the chunk's records run in groups of ``max_in_flight // (n k)`` (at least one)
    and each group's rollouts in waves of ``max_in_flight``, so no more sequences (and their caches) are alive at
    once; a finished sequence frees its caches at once. Records do not depend on the grouping.
    """
    limit = recipe.synthesis.max_in_flight
    if limit is None:
        return _run_group(engine, tasks, jobs, recipe, None)
    size = max(1, limit // (len(engine.pool) * recipe.synthesis.k))
    parts = [_run_group(engine, tasks, jobs[i:i + size], recipe, limit) for i in range(0, len(jobs), size)]
    # the order of an ungrouped chunk: by task, then by job
    order = {(tasks[job.task].name, job.index): (job.task, pos) for pos, job in enumerate(jobs)}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: order[r["task"], r["index"]])
    return {"records": records, "skipped": [s for p in parts for s in p["skipped"]],
            "tokens": sum(p["tokens"] for p in parts)}


def _run_group(engine, tasks, jobs: list[Job], recipe: Recipe, limit) -> dict:
    """The records of ``jobs``, with at most ``limit`` rollouts generated at once (None: all)."""
    n, k = len(engine.pool), recipe.synthesis.k
    patch = recipe.generation.patch_size
    examples = [tasks[job.task].examples[job.example] for job in jobs]
    targets = [trace_length(random.Random(job.seed), recipe) for job in jobs]
    seqs = engine.start([ex.query for ex in examples], seeds=[derive_seed(job.seed, "trace") for job in jobs],
                        query_ids=[ex.id for ex in examples])
    # Grow all traces together one patch at a time, keeping the state before each patch (a fork shares the
    # caches), so a trace that finishes early falls back to its last unfinished patch boundary.
    traces: list = [None] * len(jobs)
    for length in range(patch, max(targets) + 1, patch):
        live = [i for i in range(len(jobs)) if targets[i] >= length and not seqs[i].done]
        for i in live:
            traces[i] = engine.fork(seqs[i], seeds=[jobs[i].seed])[0] if length > patch else None
        engine.run([seqs[i] for i in live], RandomPolicy(), max_tokens=length)
    tokens = [seq.n_tokens for seq in seqs]
    skipped = []
    for i, seq in enumerate(seqs):
        if not seq.done:
            traces[i] = seq
        elif traces[i] is None:
            skipped.append({"task": tasks[jobs[i].task].name, "index": jobs[i].index,
                            "reason": "trace ended in its first patch", "tokens": tokens[i]})
    ready = [i for i in range(len(jobs)) if traces[i] is not None]
    if not ready:
        return {"records": [], "skipped": skipped, "tokens": sum(tokens)}

    # divergent step: candidate c writes one patch on branch c of every trace
    engine.prefill([traces[i] for i in ready])
    branches = {i: engine.fork(traces[i], seeds=[derive_seed(jobs[i].seed, "branch", c) for c in range(n)])
                for i in ready}
    engine.write([b for i in ready for b in branches[i]], model_ids=[c for _ in ready for c in range(n)])

    # rollouts: k continuations of each unfinished branch, all run as one batch (a finished branch is its
    # own only response)
    engine.prefill([b for i in ready for b in branches[i]])
    rollouts = {}
    for i in ready:
        for c, branch in enumerate(branches[i]):
            tokens[i] += branch.n_tokens - traces[i].n_tokens
            rollouts[i, c] = [branch] if branch.done else engine.fork(
                branch, seeds=[derive_seed(jobs[i].seed, "rollout", c, r) for r in range(k)])
    pending = [r for (i, c), rolls in rollouts.items() if not branches[i][c].done for r in rolls]
    wave = limit or max(len(pending), 1)
    for start in range(0, len(pending), wave):
        engine.run(pending[start:start + wave], RandomPolicy())
    for (i, c), rolls in rollouts.items():
        tokens[i] += sum(r.n_tokens - branches[i][c].n_tokens for r in rolls)

    records = []
    for t, task in enumerate(tasks):
        mine = [i for i in ready if jobs[i].task == t]
        if not mine:
            continue
        keys = [(i, c) for i in mine for c in range(n)]
        scores = task.score([examples[i] for i, c in keys for _ in rollouts[i, c]],
                            [r.text for key in keys for r in rollouts[key]])
        utils, pos = {}, 0
        for key in keys:
            utils[key] = statistics.fmean(scores[pos : pos + len(rollouts[key])])
            pos += len(rollouts[key])
        for i in mine:
            utilities = [float(utils[i, c]) for c in range(n)]
            label, tie = choose_label(utilities, recipe.synthesis.tie_rule, engine.pool.aligned_index, jobs[i].seed)
            segments = _trace_dicts(traces[i])
            records.append({
                "prompt": build_prompt(examples[i].query, [(s["model"], s["text"]) for s in segments], n),
                "label": -1 if label is None else label, "utilities": utilities, "k": k, "n": n, "tie": tie,
                "task": task.name, "query_id": examples[i].id, "index": jobs[i].index,
                "query": examples[i].query, "trace": segments, "seed": jobs[i].seed, "tokens": tokens[i],
            })
    return {"records": records, "skipped": skipped, "tokens": sum(tokens)}
