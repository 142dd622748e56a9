"""``toolkit train-router``: the trained-router baseline (RouteLLM's causal-LM classifier), from synthesis.

A router picks one model for the whole response from the query alone. Its labels come for free from the
switcher data: the *first-decision* records of synthesis (trace = the first patch only, which under the
aligned-first/last rule is the aligned model's opening) say which model's continuation scored best from the
start of the response (label = argmax of the utilities, with k random rollouts after it). Each becomes a
router record whose prompt is the switcher prompt with no segments (the query alone), and the switcher trainer
fits it as usual. The router is exported to ``<run_dir>/router`` and used by the ``trained-router`` policy.
"""

from __future__ import annotations

import datasets

from switchkit.artifacts import FEATURES, checkpoint_dir, load_records, router_data, router_dir, write_records
from switchkit.config import Recipe
from switchkit.io import InputError, check_output
from switchkit.prompt import build_prompt

from .pipeline import dataset_files, train_switcher


def first_decisions(data: datasets.Dataset, n: int) -> list[dict]:
    """Router records: the records whose trace is one patch, with the query alone as the prompt."""
    missing = [c for c in ("query", "trace") if c not in data.column_names]
    if missing:
        raise InputError(f"the switcher records lack {', '.join(missing)}: the router needs records written by "
                         "`toolkit synthesize`")
    rows = []
    for row in data:
        if len(row["trace"] or []) == 1:  # every record field, those the file lacks as null
            rows.append({**{key: row.get(key) for key in FEATURES}, "prompt": build_prompt(row["query"], [], n)})
    if not rows:
        raise InputError("no first-decision records (trace of one patch) in the switcher data: synthesize with "
                         "synthesis.trace_min_frac=0 or more records")
    return rows


def train_router_command(recipe: Recipe, overwrite: bool = False) -> None:
    """Synthesize if needed, keep the first decisions as router records, train and export the router.

    Like ``train-switcher``: a rerun continues the router's checkpoint (nothing to do once exported); checkpoints
    or a router folder of another job are an error unless ``overwrite``."""
    from .strategies import check_strategy

    check_strategy(recipe.train, "train")
    if not (checkpoint_dir(recipe, "router") / "fingerprint.json").is_file():
        check_output(checkpoint_dir(recipe, "router"), overwrite=overwrite)
        check_output(router_dir(recipe), overwrite=overwrite)
    n = len(recipe.pool.candidates)
    files = dataset_files(recipe, overwrite)
    rows = first_decisions(load_records(files, n), n)
    data_file = router_data(recipe)
    write_records(data_file, rows)
    print(f"router data: {len(rows)} first-decision records -> {data_file}")
    out, metrics = train_switcher(recipe, [data_file], output=router_dir(recipe), overwrite=overwrite, kind="router")
    acc = metrics.get("accuracy")
    print(f"router: {out}" + (f" (val accuracy {acc:.3f}, majority-class {metrics['majority_accuracy']:.3f})"
                              if acc is not None else ""))
