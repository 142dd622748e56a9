"""Benchmark: synthesis rollout throughput vs plain batched ``generate`` with the same models, in one run.

Synthesis (traces, divergent step, k rollouts per branch, with random switching and shared prefixes)
runs over one chunk of queries; its generated tokens per second are compared with Hugging Face
``model.generate`` producing the same number of tokens from the same queries, split evenly over the
same models, with one batch per model as wide as a model's share of the rollouts. Both sample with
the same temperature and top-p. For reference it also times the engine's own random switch generation
(as wide as the rollouts, about the same number of tokens): switching costs every writer a catch-up
prefill of the others' patches, which plain generation never pays. Variants run interleaved and the
fastest of ``--repeats`` counts, so a busy machine affects all of them alike. Models are tiny random Llamas from :mod:`switchkit.testing` (same
tokenizer, so the token-level path), saved to a temp dir and loaded through ``from_pretrained``.

    python bench/synthesis.py [--quick] [--repeats 3] [--device cpu]

The last line printed is JSON with ``ratio_vs_plain_generation`` (synthesis tok/s / plain tok/s).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from switchkit.config import CandidateConfig, PoolConfig, Recipe, SynthesisConfig, TaskConfig
from switchkit.config import GenerationConfig, validate
from switchkit.data_synthesis.plan import plan
from switchkit.data_synthesis.rollouts import run_chunk
from switchkit.engine import SwitchEngine
from switchkit.models import encode_query, load_pool
from switchkit.policies import RandomPolicy
from switchkit.tasks import load_tasks
from switchkit.testing import build_tokenizer, save_tiny_model

QUERIES = ["What is the capital of France?", "What is the capital of Canada?", "Solve 12 + 30.",
           "Which model should generate the next segment?", "What is the capital of Canada? Be brief.",
           "Please respond with a number from 0 to 9.", "the quick brown fox", "What is 6 times 7?"]


def make_recipe(root: Path, quick: bool) -> Recipe:
    """Three tiny same-tokenizer models and a small local task."""
    tok = build_tokenizer(300)
    size = dict(layers=2, hidden=512, heads=8) if quick else dict(layers=4, hidden=512, heads=8)
    roles = ["pretrained", "finetuned", "aligned"]
    cands = [CandidateConfig(source=str(save_tiny_model(root / r, tok, seed=i, **size)), role=r)
             for i, r in enumerate(roles)]
    task = root / "qa.jsonl"
    task.write_text("".join(json.dumps({"input": q, "output": "Paris"}) + "\n" for q in QUERIES))
    queries = 4 if quick else 8
    return validate(Recipe(
        name="bench", run_dir=str(root / "run"),
        pool=PoolConfig(candidates=cands, device="cpu", dtype="float32", cache_dir=str(root / "cache")),
        generation=GenerationConfig(patch_size=8, max_new_tokens=32 if quick else 64, temperature=1.0, top_p=0.95),
        tasks=[TaskConfig(name="qa", type="f1_match", source=str(task))],
        synthesis=SynthesisConfig(k=4 if quick else 8, records_per_task=queries, chunk_size=queries),
    ))


def plain_generation(pool, recipe: Recipe, tokens: int) -> tuple[int, float]:
    """``model.generate`` of about ``tokens`` new tokens, split over the pool; returns (tokens, seconds)."""
    n, k = len(pool), recipe.synthesis.k
    width = recipe.synthesis.chunk_size * k  # one model's share of the rollouts
    length = max(1, math.ceil(tokens / (n * width)))
    made, start = 0, time.perf_counter()
    for i, cand in enumerate(pool.candidates):
        tok = cand.tokenizer
        tok.padding_side = "left"
        prompts = [encode_query(tok, QUERIES[r % len(QUERIES)], pool.plain_template) for r in range(width)]
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        torch.manual_seed(i)
        with torch.inference_mode():
            out = cand.model.generate(**batch, do_sample=True, temperature=recipe.generation.temperature,
                                      top_p=recipe.generation.top_p, top_k=0, max_new_tokens=length,
                                      min_new_tokens=length, pad_token_id=tok.pad_token_id)
        made += (out.shape[1] - batch["input_ids"].shape[1]) * width
    return made, time.perf_counter() - start


def switch_generation(engine: SwitchEngine, recipe: Recipe, tokens: int) -> tuple[int, float]:
    """The engine's own random switch generation of about ``tokens`` tokens, as wide as the rollouts."""
    n, k, patch = len(engine.pool), recipe.synthesis.k, recipe.generation.patch_size
    width = recipe.synthesis.chunk_size * k * n
    length = min(recipe.generation.max_new_tokens, patch * max(1, math.ceil(tokens / (width * patch))))
    start = time.perf_counter()
    seqs = engine.start([QUERIES[r % len(QUERIES)] for r in range(width)], seeds=list(range(width)))
    engine.run(seqs, RandomPolicy(), max_tokens=length)
    return sum(s.n_tokens for s in seqs), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer queries and rollouts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per variant (the fastest counts)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = make_recipe(Path(tmp), args.quick)
        recipe.pool.device = args.device
        pool = load_pool(recipe.pool)
        tasks = load_tasks(recipe.tasks)
        chunk = plan(recipe, [len(t.examples) for t in tasks])[0]
        engine = SwitchEngine(pool, recipe.generation)
        run_chunk(engine, tasks, chunk[:1], recipe)  # warm-up
        plain_generation(pool, recipe, 64)
        synth_s, plain_s, switch_s = [], [], []
        for _ in range(max(1, args.repeats)):  # interleaved, so all variants see the same machine load
            start = time.perf_counter()
            result = run_chunk(engine, tasks, chunk, recipe)
            synth_s.append(time.perf_counter() - start)
            plain_tokens, seconds = plain_generation(pool, recipe, result["tokens"])
            plain_s.append(seconds)
            switch_tokens, seconds = switch_generation(engine, recipe, result["tokens"])
            switch_s.append(seconds)
    synth_tokens = result["tokens"]
    synth_tps, plain_tps = synth_tokens / min(synth_s), plain_tokens / min(plain_s)
    switch_tps = switch_tokens / min(switch_s)
    print(f"synthesis: {len(result['records'])} records, k={recipe.synthesis.k}, n={len(pool)}: {synth_tokens} tokens, "
          f"best of {len(synth_s)}: {min(synth_s):.2f}s = {synth_tps:.0f} tok/s (all: "
          + ", ".join(f"{t:.2f}" for t in synth_s) + ")")
    print(f"plain generate: {plain_tokens} tokens, best of {len(plain_s)}: {min(plain_s):.2f}s = {plain_tps:.0f} tok/s "
          "(all: " + ", ".join(f"{t:.2f}" for t in plain_s) + ")")
    print(f"random switch generation (engine): {switch_tokens} tokens, best of {len(switch_s)}: {min(switch_s):.2f}s = "
          f"{switch_tps:.0f} tok/s (all: " + ", ".join(f"{t:.2f}" for t in switch_s) + ")")
    print(json.dumps({"synthesis_tokens_per_s": round(synth_tps, 1), "plain_tokens_per_s": round(plain_tps, 1),
                      "switch_generation_tokens_per_s": round(switch_tps, 1),
                      "ratio_vs_switch_generation": round(synth_tps / switch_tps, 3),
                      "synthesis_tokens": synth_tokens, "plain_tokens": plain_tokens,
                      "ratio_vs_plain_generation": round(synth_tps / plain_tps, 3)}))


if __name__ == "__main__":
    main()
