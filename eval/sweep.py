"""Sweeps of a switcher setting (``eval.sweep=switcher.aligned_bias:-2,-1,0,1,2``) and the cost–quality curve.

``toolkit eval`` runs each of the toolkit's switch methods (``switch``, ``switch-global``, ``switch-task``) once
per value, as a method of its own named by its setting (``switch[aligned_bias=-2]``), with its own cached,
fingerprinted cells; the baselines run once. The report draws each swept method's quality against the share of
patches written by each model, one point per setting, beside the other methods (:func:`curve`): the RouteLLM-style
cost–quality curve, for switching.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Optional

import numpy as np

from switchkit.config import ConfigError, Recipe, parse_sweep, validate

from . import analysis
from .methods import Method

SETTING = re.compile(r"^(?P<base>.+)\[(?P<key>\w+)=(?P<value>[^\]]+)\]$")  # switch[aligned_bias=-2]


def sweep_methods(recipe: Recipe, methods: list[Method]) -> list[Method]:
    """``methods`` with every switch method replaced by one variant per value of ``eval.sweep`` (unchanged
    without a sweep)."""
    if not recipe.eval.sweep:
        return methods
    key, values = parse_sweep(recipe.eval.sweep)
    out = []
    for method in methods:
        if not (method.ours and method.collaborative):
            out.append(method)
            continue
        for value in values:
            variant = copy.copy(method)
            try:
                variant.recipe = validate(replace(method.recipe, switcher=replace(method.recipe.switcher, **{key: value}),
                                                  eval=replace(method.recipe.eval, sweep=None)))
            except ConfigError as exc:
                raise ConfigError(f"eval.sweep={recipe.eval.sweep}: {exc}") from None
            variant.setting = f"[{key}={value:g}]"
            out.append(variant)
    return out


def curve(methods: list[dict], rows: dict, scores: dict, columns: list[str], n_models: int) -> Optional[dict]:
    """The points of a sweep's cost–quality curve (None when the run has no sweep).

    ``lines``: per swept method, one point per setting, sorted by value; ``reference``: every other method.
    A point has the score (mean over the columns; its 95% CI when there is one column) and ``share``, the share
    of all patches written by each model.
    """
    swept: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for m in methods:
        match = SETTING.match(m["name"])
        if match:
            swept.setdefault((match["base"], match["key"]), []).append((float(match["value"]), m["name"]))
    if not swept:
        return None

    def point(name: str) -> dict:
        cols = [c for c in columns if c in scores[name]]
        recs = [r for c in cols for r in rows.get((name, c), [])]
        return {"method": name, "score": float(np.mean([scores[name][c]["mean"] for c in cols])),
                "ci95": scores[name][cols[0]]["ci95"] if len(cols) == 1 else None,
                "share": analysis.model_share(recs, n_models)}

    present = [m["name"] for m in methods if m["name"] in scores]
    return {
        "lines": [{"method": base, "key": key, "points": [{"value": v, **point(name)} for v, name in sorted(points)
                                                          if name in scores]}
                  for (base, key), points in swept.items()],
        "reference": [point(name) for name in present if not SETTING.match(name)],
    }
