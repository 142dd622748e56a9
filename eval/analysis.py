"""Analyses of saved generation logs (paper §5 and appendix A) and significance tests.

Every function takes plain prediction records, as the eval runner saves them (one dict per response with
``score`` and ``segments`` = ``[{"model", "text", "n_tokens"}, ...]``, one segment per patch), so the
report can recompute everything from disk without a model.

Definitions used throughout:

- *patch sequence*: the writer of each segment, in order (``[2, 0, 0, 2]``).
- *switching sequence*: the patch sequence with consecutive repeats merged (``[2, 0, 2]``): the order in which
  models take turns. A length-L pattern (e.g. ``0>2``) is *employed* by a response when it occurs as a
  contiguous run of its switching sequence.
- *frequency* of a pattern: the share of responses that employ it.
- *treatment effect* of a pattern: mean score of the responses that employ it minus mean score of those that
  do not (None when either group is empty).
- *position*: a response of m patches is split in thirds; patch j (0-based) falls in third
  ``floor(3 * (j + 0.5) / m)`` (its centre), so the first and last patches are always "begin" and "end".
- *correct*: score >= ``threshold`` (default 0.5), for the new-skills table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

POSITIONS = ("begin", "middle", "end")


def patch_sequence(record: Mapping) -> list[int]:
    """The model id of every segment (patch) of a response, in order."""
    return [int(s["model"]) for s in record.get("segments") or []]


def switching_sequence(record: Mapping) -> list[int]:
    """The patch sequence with consecutive repeats merged: who took turns, in order."""
    seq = []
    for model in patch_sequence(record):
        if not seq or seq[-1] != model:
            seq.append(model)
    return seq


def pattern_key(pattern: Sequence[int]) -> str:
    """A pattern as a string key, e.g. ``(0, 2)`` -> ``"0>2"``."""
    return ">".join(str(m) for m in pattern)


def _patterns(seq: Sequence[int], length: int) -> set[tuple[int, ...]]:
    return {tuple(seq[i:i + length]) for i in range(len(seq) - length + 1)}


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def sequence_effects(records: Sequence[Mapping], length: int) -> list[dict]:
    """Frequency and treatment effect of every length-``length`` switching pattern seen in ``records``.

    Sorted by frequency (then by key). Each row: pattern, frequency, effect, n_with, n_without, mean_with,
    mean_without.
    """
    used = [_patterns(switching_sequence(r), length) for r in records]
    scores = [float(r["score"]) for r in records]
    rows = []
    for pattern in sorted(set().union(*used) if used else set()):
        with_ = [s for s, u in zip(scores, used) if pattern in u]
        without = [s for s, u in zip(scores, used) if pattern not in u]
        mean_with, mean_without = _mean(with_), _mean(without)
        rows.append({
            "pattern": pattern_key(pattern),
            "frequency": len(with_) / len(records),
            "effect": None if mean_without is None else mean_with - mean_without,
            "n_with": len(with_),
            "n_without": len(without),
            "mean_with": mean_with,
            "mean_without": mean_without,
        })
    return sorted(rows, key=lambda r: (-r["frequency"], r["pattern"]))


def position_usage(records: Sequence[Mapping], n_models: int) -> dict:
    """Share of the patches in the begin / middle / end third of responses written by each model.

    Returns ``{"begin": [share per model], "middle": [...], "end": [...], "patches": {position: count}}``;
    the shares of one position sum to 1 (or are all 0 when no patch falls there).
    """
    counts = {p: [0] * n_models for p in POSITIONS}
    for record in records:
        seq = patch_sequence(record)
        for j, model in enumerate(seq):
            third = min(2, math.floor(3 * (j + 0.5) / len(seq)))
            counts[POSITIONS[third]][model] += 1
    out: dict = {"patches": {p: sum(c) for p, c in counts.items()}}
    for p, c in counts.items():
        total = sum(c)
        out[p] = [x / total if total else 0.0 for x in c]
    return out


def model_share(records: Sequence[Mapping], n_models: int) -> list[float]:
    """Share of all patches written by each model."""
    counts = [0] * n_models
    for record in records:
        for model in patch_sequence(record):
            counts[model] += 1
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def switching_frequency(records: Sequence[Mapping]) -> dict:
    """How often the writer changes: per response, per patch boundary, and the share of responses with a switch."""
    switches, boundaries, with_switch = [], 0, 0
    for record in records:
        seq = patch_sequence(record)
        n = sum(a != b for a, b in zip(seq, seq[1:]))
        switches.append(n)
        boundaries += max(len(seq) - 1, 0)
        with_switch += n > 0
    total = sum(switches)
    return {
        "responses": len(records),
        "switches_per_response": total / len(records) if records else 0.0,
        "switches_per_boundary": total / boundaries if boundaries else 0.0,
        "responses_with_switch": with_switch / len(records) if records else 0.0,
        "patches_per_response": (boundaries + len(records)) / len(records) if records else 0.0,
    }


def answer_in_first_patch(records: Sequence[Mapping]) -> dict:
    """How often the answer was already fixed in the first patch (by default the aligned model's): the share of
    responses whose extracted answer occurs in their first segment, overall and among those scored right."""
    from switchkit.scorers import normalize_answer

    def fixed(r: Mapping) -> bool:
        segments, answer = r.get("segments") or [], normalize_answer(r.get("extracted") or "")
        return bool(answer and segments) and f" {answer} " in f" {normalize_answer(segments[0]['text'])} "

    right = [r for r in records if float(r["score"]) >= 0.5]
    return {"responses": len(records),
            "in_first_patch": sum(map(fixed, records)) / len(records) if records else 0.0,
            "right_and_in_first_patch": sum(map(fixed, right)) / len(right) if right else 0.0}


def mean_by_id(records: Iterable[Mapping]) -> dict[str, float]:
    """Mean score per example id (averaging over seeds)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        groups[str(record["id"])].append(float(record["score"]))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def new_skills(collab: Mapping[str, float], singles: Mapping[str, Mapping[str, float]], threshold: float = 0.5) -> dict:
    """Paper Table 5: collaboration correctness against how many single models were correct, per example.

    ``collab`` and each ``singles[name]`` map example id -> score; only ids present everywhere count.
    Rows: all singles correct / some correct / all wrong; columns: collaboration correct / wrong; cells are
    shares of the examples. ``new`` = all singles wrong but the collaboration correct; ``lost`` = at least one
    single correct but the collaboration wrong; ``net`` = new - lost.
    """
    ids = set(collab)
    for scores in singles.values():
        ids &= set(scores)
    ids = sorted(ids)
    table = {row: {"correct": 0, "wrong": 0} for row in ("all_correct", "some_correct", "all_wrong")}
    for i in ids:
        right = sum(scores[i] >= threshold for scores in singles.values())
        row = "all_correct" if right == len(singles) else "all_wrong" if right == 0 else "some_correct"
        table[row]["correct" if collab[i] >= threshold else "wrong"] += 1
    n = len(ids)
    shares = {row: {col: (c / n if n else 0.0) for col, c in cols.items()} for row, cols in table.items()}
    new = shares["all_wrong"]["correct"]
    lost = shares["all_correct"]["wrong"] + shares["some_correct"]["wrong"]
    return {"n": n, "threshold": threshold, "counts": table, "shares": shares, "new": new, "lost": lost,
            "net": new - lost}


def p_metrics(pretrained: float, others: Sequence[float], collab: float) -> dict:
    """P-performance and P-helpfulness of the pretrained model for one task (paper §5, Figure 4).

    With B = max(F, A), the best individual score among the non-pretrained models:
    ``P-performance = (P - B) / B`` (< 0: the pretrained model is not the best alone) and
    ``P-helpfulness = (C(P, F, A) - B) / B`` (> 0: the collaboration that includes it beats every other model).
    The absolute differences ``P - B`` and ``C - B`` are returned too.
    """
    best = max(others)
    return {
        "p_performance": (pretrained - best) / best if best else None,
        "p_helpfulness": (collab - best) / best if best else None,
        "p_performance_abs": pretrained - best,
        "p_helpfulness_abs": collab - best,
        "best_other": best,
    }


def paired_test(ours: Mapping[str, float], baseline: Mapping[str, float]) -> dict:
    """One-tailed paired t-test (``scipy.stats.ttest_rel``, H1: ``ours`` > ``baseline``) over the shared example ids.

    A paired test fits both 0/1 accuracy and graded scores and removes per-example difficulty. When every
    difference is equal the statistic is undefined and the one-sided p is 0, 1/2 or 1.
    """
    ids = sorted(set(ours) & set(baseline))
    a = np.array([ours[i] for i in ids], dtype=float)
    b = np.array([baseline[i] for i in ids], dtype=float)
    d = a - b
    n = len(d)
    if n < 2:
        return {"n": n, "diff": float(d.mean()) if n else None, "t": None, "p": None}
    mean = float(d.mean())
    if np.all(d == d[0]):
        return {"n": n, "diff": mean, "t": None, "p": 0.0 if mean > 0 else 1.0 if mean < 0 else 0.5}
    res = stats.ttest_rel(a, b, alternative="greater")
    return {"n": n, "diff": mean, "t": float(res.statistic), "p": float(res.pvalue)}


def stars(p: Optional[float]) -> str:
    """The paper's marks: * p < 0.1, ** p < 0.05, *** p < 0.01."""
    if p is None:
        return ""
    return "***" if p < 0.01 else "**" if p < 0.05 else "*" if p < 0.1 else ""


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap confidence interval of the mean (scipy.stats.bootstrap)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return (float(data[0]), float(data[0])) if len(data) else (None, None)
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    res = stats.bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_gain(ours: Mapping[str, float], reference: Mapping[str, float]) -> dict:
    """The mean per-example gain of ``ours`` over ``reference`` on their shared examples, with a paired
    bootstrap 95% CI (resampling examples) and the one-tailed paired t-test's p-value (H1: gain > 0)."""
    test = paired_test(ours, reference)
    lo, hi = bootstrap_ci(paired_diffs(ours, reference))
    return {"n": test["n"], "gain": test["diff"], "ci95": [lo, hi], "p": test["p"]}


def paired_diffs(ours: Mapping[str, float], baseline: Mapping[str, float]) -> list[float]:
    """Per-example score differences ours - baseline over the shared ids (for a CI of the gain)."""
    return [ours[i] - baseline[i] for i in sorted(set(ours) & set(baseline))]


def cost_per_query(records: Sequence[Mapping]) -> Optional[dict]:
    """Mean cost of one response (:mod:`switchkit.cost`): tokens read and written and forward passes over every
    model, the switcher's passes, and ``tokens`` = read + written; None when no record carries a cost."""
    from switchkit.cost import totals

    costs = [r["cost"] for r in records if r.get("cost")]
    if not costs:
        return None
    summed = [totals(c) for c in costs]
    out = {key: float(np.mean([s[key] for s in summed])) for key in ("prompt_tokens", "generated_tokens", "passes")}
    out["switcher_passes"] = float(np.mean([c["switcher"]["passes"] for c in costs]))
    out["tokens"] = out["prompt_tokens"] + out["generated_tokens"]
    return out
