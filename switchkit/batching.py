"""Continuous batching: switch generation for sequences that join and leave at any time (``toolkit serve``).

:meth:`SwitchEngine.run <switchkit.engine.SwitchEngine.run>` answers a fixed list of sequences. A server must
also take requests that arrive while others are being written, report each patch as soon as it exists, and let
a request go at any moment. :class:`BatchLoop` does this with the engine's own pieces. One worker thread owns the
engine (only it touches the models). Work arrives as :class:`Job`\\ s (one per request: its queries, seeds, policy
and generation settings), and each round the loop

1. admits waiting jobs (up to ``max_live`` live sequences) and drops the sequences of cancelled ones;
2. decides the next writer of every live sequence that has none (``engine.decide``: the aligned-first/last rule,
   else the policy, one batch per policy);
3. writes one patch (``engine.write``) for the largest group waiting for the same model with the same settings,
   as ``run`` does, except that a group passed over as many rounds as there are groups goes first, so that no
   request waits for another to finish;
4. reports the patch to each sequence's job, and removes finished sequences and drops their caches.

Sequences whose settings (temperature, top_p, max_tokens, stop) differ never share a forward pass (a backend
call samples one way; the engine ends responses by its own settings), but they interleave round by round. Each
decision and sample of a sequence depends only on that sequence, so an answer does not depend on what else is
being served.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from .config import ConfigError, GenerationConfig
from .engine import SwitchEngine, SwitchSequence
from .io import InputError
from .policies import Policy

Event = dict  # what a job's ``emit`` receives, see BatchLoop


@dataclass(eq=False)
class Job:
    """One request: one sequence per query (``seeds[i]`` for query ``i``), a policy, generation settings, and
    ``emit``, called from the loop thread with each event of the job (it must not block)."""

    queries: list[str]
    seeds: list[int]
    policy: Policy
    settings: GenerationConfig
    emit: Callable[[Event], None]
    cancelled: bool = False


@dataclass(eq=False)
class _Live:
    """A live sequence: its job and choice index, its engine (the job's settings), what was reported so far."""

    job: Job
    index: int
    seq: SwitchSequence
    engine: SwitchEngine
    key: tuple
    sent: int = 0  # characters of the response reported to the job
    choice: Optional[tuple[int, list[float]]] = None  # the decided next writer and its probabilities
    passed: int = 0  # rounds passed over while decided
    prompt_tokens: int = 0


def settings_key(settings: GenerationConfig) -> tuple:
    """What must agree for sequences to share a forward pass."""
    return (settings.temperature, settings.top_p, settings.max_new_tokens, settings.patch_size,
            settings.aligned_first_last, tuple(settings.stop))


def _status(exc: Exception) -> int:
    return 400 if isinstance(exc, (InputError, ConfigError)) else 500


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BatchLoop:
    """The worker thread that writes every live sequence of every job, patch by patch, in shared batches.

    Events passed to ``job.emit`` (dicts):

    - a patch: ``index`` (the sequence's position in the job), ``model`` (its writer), ``probs`` (the decision's
      probabilities), ``text`` (response text that is final now; text that a stop string could still cut is
      held back), ``finish_reason`` (null, or ``eos`` / ``stop`` / ``length`` on the sequence's last event),
      ``record`` (on the last event: :meth:`SwitchSequence.record`) and ``prompt_tokens`` (the aligned model's
      prompt length);
    - an error: ``error`` (one line) and ``status`` (400 for bad input, 500 otherwise, 503 at shutdown); the job
      ends there.
    """

    def __init__(self, engine: SwitchEngine, max_live: int = 64):
        self.engine = engine  # its pool and backend serve every job; each job gets an engine with its own settings
        self.max_live = max_live
        self.live: list[_Live] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._held: weakref.WeakSet = weakref.WeakSet()  # every sequence object still in memory
        self._closing = False
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}  # sequences, by how they left
        self._thread = threading.Thread(target=self._serve, name="switchkit-batch-loop", daemon=True)
        self._thread.start()

    # -- called from any thread -----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; its events follow through ``job.emit``."""
        self._inbox.put(job)

    def cancel(self, job: Job) -> None:
        """Drop a job's sequences (and their caches) at the start of the next round."""
        job.cancelled = True
        self._inbox.put(None)

    def status(self) -> dict:
        """Live sequences, jobs waiting for a place, sequence objects still in memory, and sequences that left."""
        return {"live": len(self.live), "waiting": len(self._waiting) + self._inbox.qsize(), "held": len(self._held),
                **self.counts}

    def close(self) -> None:
        """Stop after the current round; unfinished jobs get a 503 error event."""
        self._closing = True
        self._inbox.put(None)
        self._thread.join()

    # -- the loop thread ------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            self._take(block=not self.live and not self._waiting)
            if self._closing:
                break
            self._admit()
            self._leave(lambda e: e.job.cancelled, "cancelled")
            if not self.live:
                continue
            try:
                self._round()
            except Exception as exc:  # the loop never dies: the round's jobs fail, the others go on
                self._fail({e.job for e in self.live}, exc)
        jobs = {e.job for e in self.live} | set(self._waiting)
        for job in jobs:
            self._emit(job, {"error": "the server is shutting down", "status": 503})
            job.cancelled = True
        self._leave(lambda e: True, "cancelled")
        self._waiting = deque()

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        while self._waiting and (not self.live or len(self.live) + len(self._waiting[0].queries) <= self.max_live):
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            try:
                engine = SwitchEngine(self.engine.pool, job.settings, self.engine.backend)
                seqs = engine.start(job.queries, job.seeds)  # a query too long for a model's context: InputError
            except Exception as exc:
                self._fail({job}, exc)
                continue
            key, aligned = settings_key(job.settings), engine.pool.aligned_index
            for i, seq in enumerate(seqs):
                self._held.add(seq)
                self.live.append(_Live(job, i, seq, engine, key, prompt_tokens=seq.views[aligned].prompt_len))

    def _round(self) -> None:
        undecided: dict[tuple, list[_Live]] = {}
        for e in self.live:
            if e.choice is None:
                undecided.setdefault((e.key, id(e.job.policy)), []).append(e)
        for group in undecided.values():
            try:
                choices = group[0].engine.decide([e.seq for e in group], group[0].job.policy)
            except Exception as exc:
                self._fail({e.job for e in group}, exc)
                continue
            for e, choice in zip(group, choices):
                e.choice = choice
        ready: dict[tuple, list[_Live]] = {}
        for e in self.live:
            if e.choice is not None:
                ready.setdefault((e.key, e.choice[0]), []).append(e)
        if not ready:
            return
        overdue = len(ready)
        pick = max(ready, key=lambda k: (max(e.passed for e in ready[k]) >= overdue, len(ready[k]), -k[1]))
        group = ready.pop(pick)
        for rest in ready.values():
            for e in rest:
                e.passed += 1
        model = pick[1]
        for e in group:
            e.seq.switch_probs.append(list(e.choice[1]))
            e.passed = 0
        try:
            group[0].engine.write([e.seq for e in group], [model] * len(group))
        except Exception as exc:
            self._fail({e.job for e in group}, exc)
            return
        events = [(e.job, self._event(e, model)) for e in group]
        self._leave(lambda e: e.seq.done, "finished")  # gone before its job hears
        for job, event in events:
            self._emit(job, event)

    @staticmethod
    def _event(e: _Live, model: int) -> Event:
        """The patch event of a sequence that was just written."""
        seq, probs = e.seq, e.choice[1]
        e.choice = None
        text = seq.text
        final = len(text) if seq.done else len(text) - max(e.engine.stop_len - 1, 0)
        delta = text[e.sent:final] if final > e.sent else ""
        e.sent = max(e.sent, final)
        return {"index": e.index, "model": model, "probs": list(probs), "text": delta,
                "finish_reason": seq.finish_reason if seq.done else None,
                "record": seq.record() if seq.done else None, "prompt_tokens": e.prompt_tokens}

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nobody waits for this job
            job.cancelled = True

    def _fail(self, jobs: set[Job], exc: Exception) -> None:
        status = _status(exc)
        if status >= 500:
            traceback.print_exception(exc, file=sys.stderr)
        for job in jobs:
            if not job.cancelled:
                self._emit(job, {"error": _one_line(exc), "status": status})
            job.cancelled = True
        self._leave(lambda e: e.job in jobs, "failed")

    def _leave(self, gone: Callable[[_Live], bool], outcome: str) -> None:
        """Remove the live sequences for which ``gone`` holds, dropping their caches (the models' and the
        switcher's); count them under ``outcome``."""
        keep = []
        for e in self.live:
            if gone(e):
                for view in e.seq.views:
                    view.state = None
                e.seq.states.clear()
                self.counts[outcome] += 1
            else:
                keep.append(e)
        self.live = keep

