"""Which cost knob moves the aligned model's share of patches more smoothly: a bias or a threshold?

Reads the switcher's decisions from an eval cell run with the knob at 0 (each row's ``switch_probs``; the one-hot
entries of the aligned-first/last rule are left out) and computes, per decision, the chance that the aligned
model writes the next patch

- under ``switcher.aligned_bias = b``: the bias added to the aligned model's log-probability, then the
  switcher's softmax and top-p draw (as :class:`switchkit.policies.SwitcherPolicy` does), and
- under a threshold ``t``: the aligned model iff its probability is at least ``t``.

Averaged over decisions, this is the share of switcher-decided patches the aligned model writes, as a function of
the knob, over 2001 settings spanning each knob's range (bias -10..10, threshold 0..1). ``largest_share_jump`` is
the largest change of that share between neighbouring settings: the part of the curve a user cannot reach. It is
a first-order estimate (the decisions are those of the knob-0 trajectories; a real sweep also changes what comes
after each decision).

Usage: ``python bench/cost_knob.py CELL.jsonl --aligned INDEX [--top-p 0.7]``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

from switchkit.io import read_jsonl
from switchkit.policies import shift_aligned, top_p_probs

SETTINGS = 2001


def decisions(rows: list[dict]) -> torch.Tensor:
    """``[decisions, n]`` probabilities of the switcher's own decisions (one-hot rule entries left out)."""
    probs = [p for r in rows for p in r["switch_probs"] if max(p) < 1.0]
    if not probs:
        raise SystemExit("no switcher decisions in this cell: give a cell of a switcher method")
    return torch.tensor(probs, dtype=torch.float64)


def share_with_bias(probs: torch.Tensor, aligned: int, bias: float, top_p: float) -> float:
    """The aligned model's expected share of decisions at ``bias``, sampled as SwitcherPolicy.choose does."""
    logprobs = shift_aligned(probs.clamp_min(1e-30).log().log_softmax(-1), aligned, bias)
    return float(top_p_probs(logprobs, top_p)[:, aligned].mean())


def share_with_threshold(probs: torch.Tensor, aligned: int, threshold: float) -> float:
    return float((probs[:, aligned] >= threshold).double().mean())


def largest_jump(shares: list[float]) -> float:
    return max(abs(b - a) for a, b in zip(shares, shares[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="an eval cell (JSONL) of a switcher method run with the knob at 0")
    parser.add_argument("--aligned", type=int, required=True, help="the aligned model's index in the pool")
    parser.add_argument("--top-p", type=float, default=0.7, help="switcher.top_p of the run")
    args = parser.parse_args()
    probs = decisions(read_jsonl(args.cell, required=("switch_probs",)))
    biases = [-10 + 20 * i / (SETTINGS - 1) for i in range(SETTINGS)]
    thresholds = [i / (SETTINGS - 1) for i in range(SETTINGS)]
    by_bias = [share_with_bias(probs, args.aligned, b, args.top_p) for b in biases]
    by_threshold = [share_with_threshold(probs, args.aligned, t) for t in thresholds]
    jump_bias, jump_threshold = largest_jump(by_bias), largest_jump(by_threshold)
    print(f"{len(probs)} decisions; aligned probability: mean {float(probs[:, args.aligned].mean()):.3f}")
    print(json.dumps({
        "largest_share_jump_bias": round(jump_bias, 4),
        "largest_share_jump_threshold": round(jump_threshold, 4),
        "jump_ratio_threshold_vs_bias": round(jump_threshold / jump_bias, 2) if jump_bias else None,
        "share_at_bias": {f"{b:g}": round(share_with_bias(probs, args.aligned, b, args.top_p), 4)
                          for b in (-2, -1, 0, 1, 2)},
        "share_at_threshold": {f"{t:g}": round(share_with_threshold(probs, args.aligned, t), 4)
                               for t in (0.1, 0.3, 0.5, 0.7, 0.9)},
        "decisions": len(probs), "top_p": args.top_p,
    }))


if __name__ == "__main__":
    main()
