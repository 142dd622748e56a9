"""What a response cost: forward passes and tokens each model processed (the one home of the ``cost`` format).

Every generation record carries ``cost = {"models": {NAME: USAGE, ...}, "switcher": USAGE}``, where a USAGE is
``{"passes": P, "prompt_tokens": R, "generated_tokens": G}``:

- ``prompt_tokens``: tokens the model read without writing them (its rendering of the query, then what others
  wrote since its last turn; what its KV cache already held is not counted again);
- ``generated_tokens``: tokens the model wrote (a token-level mixture counts every mixed token for every member);
- ``passes``: forward passes over this response: one per prefill and one per decoded token, so a write of G
  tokens is G passes. Batching shares a pass between responses; the count is per response, as if run alone.

``switcher`` is what switchers and routers read to decide (passes and prompt tokens). Methods with their own
decode loops (debate, token mixtures, merged models) charge the same fields, so costs compare across methods.
"""

from __future__ import annotations

from typing import Iterable, Optional

FIELDS = ("passes", "prompt_tokens", "generated_tokens")


def usage(passes: int = 0, prompt_tokens: int = 0, generated_tokens: int = 0) -> dict:
    """One USAGE entry."""
    return {"passes": passes, "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens}


def empty_cost() -> dict:
    """A cost with nothing charged yet."""
    return {"models": {}, "switcher": usage()}


def charge(cost: dict, model: Optional[str], passes: int = 0, prompt_tokens: int = 0,
           generated_tokens: int = 0) -> None:
    """Add to ``model``'s usage (``None``: the switcher's)."""
    entry = cost["switcher"] if model is None else cost["models"].setdefault(model, usage())
    entry["passes"] += passes
    entry["prompt_tokens"] += prompt_tokens
    entry["generated_tokens"] += generated_tokens


def combine(costs: Iterable[dict]) -> dict:
    """The sum of several costs (e.g. every round of a debate, for one query)."""
    out = empty_cost()
    for cost in costs:
        for name, entry in cost["models"].items():
            charge(out, name, **entry)
        charge(out, None, **cost["switcher"])
    return out


def totals(cost: dict) -> dict:
    """One USAGE summed over every model and the switcher."""
    out = usage()
    for entry in [*cost["models"].values(), cost["switcher"]]:
        for key in FIELDS:
            out[key] += entry[key]
    return out
