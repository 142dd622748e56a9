"""Does training the switcher on soft targets softmax(utility / tau) beat hard argmax labels?

A noisy synthetic switcher set where the truth is known: each query (a country) has a true utility per
model; a record observes each utility through k Bernoulli rollouts (as synthesis does), and its hard
label is the argmax of the observed means (ties broken at random). The same tiny random Llama is
trained on hard labels and on soft targets at two temperatures, over several seeds, in this process;
each is scored on held-out queries by the regret against the TRUE utilities (lower is better) and by
how often it picks the truly best model.

    python bench/soft_targets.py [--quick]

The last line is JSON with ``regret_ratio_soft_vs_hard`` (best soft temperature; < 1 means soft helps).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from switchkit.config import load_recipe
from switchkit.io import write_jsonl_atomic
from switchkit.prompt import build_prompt
from switchkit.testing import build_tokenizer, save_tiny_model
from switchkit.trainer.pipeline import fit_switcher

COUNTRIES = ["France", "Canada", "Nigeria", "Australia", "Brazil", "Japan", "Egypt", "Chile"]
N_MODELS, K = 3, 2


def true_utilities() -> dict[str, list[float]]:
    """A fixed true utility per (country, model)."""
    rngs = [random.Random(1000 + i) for i in range(len(COUNTRIES))]
    return {c: [rng.random() for _ in range(N_MODELS)] for c, rng in zip(COUNTRIES, rngs)}


def records(seed: int, count: int, truth: dict) -> list[dict]:
    """Records whose utilities are k-rollout estimates of the truth."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        country = rng.choice(COUNTRIES)
        observed = [sum(rng.random() < u for _ in range(K)) / K for u in truth[country]]
        best = max(observed)
        rows.append({"prompt": build_prompt(f"What is the capital of {country}?", [(rng.randrange(N_MODELS), "the lazy dog")],
                                            N_MODELS),
                     "label": rng.choice([j for j, o in enumerate(observed) if o == best]), "utilities": observed,
                     "country": country})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2]
    variants = {"hard": [], "soft_t0.1": ["train.soft_targets=true", "train.soft_temperature=0.1"],
                "soft_t0.3": ["train.soft_targets=true", "train.soft_temperature=0.3"]}
    truth = true_utilities()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = save_tiny_model(root / "model", build_tokenizer(), layers=2, hidden=64, heads=4)
        for seed in seeds:
            train, test = records(seed, 64, truth), records(100 + seed, 200, truth)
            write_jsonl_atomic(root / "train.jsonl", train)
            for name, overrides in variants.items():
                recipe = {"name": "soft", "run_dir": str(root / f"run-{name}-{seed}"),
                          "pool": {"candidates": [{"source": str(model_dir), "role": r}
                                                  for r in ("pretrained", "finetuned", "aligned")]},
                          "train": {"lora": {"enabled": False}, "epochs": 8, "lr": 3e-3, "batch_size": 8,
                                    "micro_batch_size": 8, "val_fraction": 0.0, "seed": seed}}
                (root / "recipe.yaml").write_text(json.dumps(recipe))
                module, _, _ = fit_switcher(load_recipe(str(root / "recipe.yaml"), overrides), [root / "train.jsonl"],
                                            progress=False)
                picks = module.decide_probs([r["prompt"] for r in test]).argmax(-1).tolist()
                utils = [truth[r["country"]] for r in test]
                regret = statistics.mean(max(u) - u[p] for u, p in zip(utils, picks))
                best = statistics.mean(float(u[p] == max(u)) for u, p in zip(utils, picks))
                results[name].append((regret, best))
                print(json.dumps({"variant": name, "seed": seed, "regret": round(regret, 4),
                                  "best_model_rate": round(best, 3)}), flush=True)
    mean = {name: {"regret": statistics.mean(r for r, _ in rs), "best_model_rate": statistics.mean(b for _, b in rs)}
            for name, rs in results.items()}
    soft = min((name for name in mean if name != "hard"), key=lambda name: mean[name]["regret"])
    print(json.dumps({"regret_ratio_soft_vs_hard": round(mean[soft]["regret"] / mean["hard"]["regret"], 3),
                      "best_soft": soft, "seeds": seeds,
                      **{name: {k: round(v, 4) for k, v in m.items()} for name, m in mean.items()}}))


if __name__ == "__main__":
    main()
