"""Labels and statistics: from per-branch utilities to a switcher label, and what a dataset holds.

The label is the argmax of the utilities. Ties follow ``synthesis.tie_rule``: ``random`` (seeded by the record),
``lowest`` id, ``aligned`` (the aligned model if tied, else the lowest), or ``drop`` (the record is left out).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from typing import Optional

from switchkit.config import Recipe
from switchkit.engine import derive_seed


def choose_label(utilities: list[float], rule: str, aligned: int, seed: int) -> tuple[Optional[int], bool]:
    """(label, tie) for the utilities; the label is None when the rule is ``drop`` and there is a tie."""
    best = max(utilities)
    tied = [i for i, u in enumerate(utilities) if math.isclose(u, best, rel_tol=0, abs_tol=1e-9)]
    if len(tied) == 1:
        return tied[0], False
    if rule == "drop":
        return None, True
    if rule == "lowest":
        return tied[0], True
    if rule == "aligned":
        return (aligned if aligned in tied else tied[0]), True
    return random.Random(derive_seed(seed, "tie")).choice(tied), True


def compute_stats(records: list[dict], skipped: list[dict], tokens: int, recipe: Recipe) -> dict:
    """Label distribution, tie rate, utility mean/spread and tokens generated."""
    n = records[0]["n"] if records else len(recipe.pool.candidates)
    kept = [r for r in records if r["label"] >= 0]
    labels = Counter(r["label"] for r in kept)
    utilities = [u for r in records for u in r["utilities"]]
    per_model = [[r["utilities"][c] for r in records] for c in range(n)]
    return {
        "records": len(kept),
        "made": len(records),
        "dropped_ties": len(records) - len(kept),
        "skipped_early_eos": len(skipped),
        "per_task": dict(sorted(Counter(r["task"] for r in kept).items())),
        "label_distribution": {str(c): labels.get(c, 0) for c in range(n)},
        "tie_rate": (sum(r["tie"] for r in records) / len(records)) if records else 0.0,
        "utility_mean": statistics.fmean(utilities) if utilities else 0.0,
        "utility_std": statistics.pstdev(utilities) if utilities else 0.0,
        "utility_mean_per_model": [statistics.fmean(u) if u else 0.0 for u in per_model],
        "utility_spread_mean": statistics.fmean(max(r["utilities"]) - min(r["utilities"]) for r in records)
        if records else 0.0,
        "tokens_generated": tokens,
        "k": recipe.synthesis.k,
        "tie_rule": recipe.synthesis.tie_rule,
    }


def format_stats(stats: dict) -> str:
    """A short human-readable summary of :func:`compute_stats`."""
    total = max(stats["records"], 1)
    labels = ", ".join(f"model {c}: {v} ({v / total:.0%})" for c, v in stats["label_distribution"].items())
    return "\n".join([
        f"records: {stats['records']} (made {stats['made']}, dropped ties {stats['dropped_ties']}, "
        f"skipped early EOS {stats['skipped_early_eos']})",
        f"labels: {labels}",
        f"tie rate: {stats['tie_rate']:.3f} (rule {stats['tie_rule']})",
        f"utilities: mean {stats['utility_mean']:.3f}, std {stats['utility_std']:.3f}, per model "
        + ", ".join(f"{u:.3f}" for u in stats["utility_mean_per_model"])
        + f", mean spread {stats['utility_spread_mean']:.3f}",
        f"tokens generated: {stats['tokens_generated']}",
        f"data: {stats['data']}",
    ])
