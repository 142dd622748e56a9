"""Benchmark ``toolkit serve`` against ``toolkit generate``: throughput with 1, 4 and 16 concurrent clients.

One process, one run: the pool is loaded once; ``toolkit generate``'s path (the engine answering the prompts in
batches of ``generation.batch_size``) runs first, then the server (in a thread of this process, on a free port)
answers the same prompts, each once, to 1, 4 and 16 client threads using the official ``openai`` client. Prompt i
is asked with ``seed=i`` and generated with seed ``i * 1_000_003`` (what the server gives that request), so both
write the same responses (``same_outputs``) and the same number of tokens.

Pools: by default three tiny random same-tokenizer models (``switchkit.testing``) with the untuned switcher;
``--recipe demo`` is the demo pool on the capitals test questions, with its trained switcher when one is exported
(``switch``), else ``untuned``. Throughput is response tokens (each counted in its writer's tokenizer) per second
of wall time; ``cpu_ratio_vs_generate`` compares CPU time of this process instead, which other jobs on a shared
machine disturb less.

Usage: ``python bench/serve.py [--recipe demo [KEY=VALUE ...]] [--prompts N] [--quick]``. In bfloat16 (the demo's
default) a batch's shape changes sampled tokens, so ``same_outputs`` needs ``pool.dtype=float32``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from switchkit.config import CandidateConfig, GenerationConfig, PoolConfig, Recipe, load_recipe
from switchkit.engine import SwitchEngine
from switchkit.models import load_pool
from switchkit.runner import item_seed
from switchkit.serve import running, serving
from switchkit.tasks import load_tasks

CLIENTS = (1, 4, 16)
TINY_QUERIES = ["What is the capital of France?", "What is the capital of Canada?", "Solve 12 + 30.",
                "the quick brown fox jumps over the lazy dog", "Please respond with a number from 0 to 9.",
                "I cannot help with that request.", "What is 7 times 6?", "Which model should write next?"]


def tiny_setup(root: Path, prompts: int, quick: bool) -> tuple[Recipe, SwitchEngine, list[str]]:
    """bench/engine.py's tiny pool (EOS masked: every response is written to its full length)."""
    from engine import build_pool  # bench/engine.py, beside this script

    pool = build_pool(root, hidden=64 if quick else 256, layers=4)
    recipe = Recipe(name="bench-serve", run_dir=str(root / "run"),
                    pool=PoolConfig(candidates=[CandidateConfig(source=c.source, role=c.role, name=c.name)
                                                for c in pool.candidates], device="cpu"),
                    generation=GenerationConfig(patch_size=8, max_new_tokens=32 if quick else 64, temperature=0.7,
                                                batch_size=8))
    return recipe, SwitchEngine(pool, recipe.generation), [TINY_QUERIES[i % len(TINY_QUERIES)] + f" ({i})"
                                                          for i in range(prompts)]


def recipe_setup(name: str, prompts: int, overrides: list[str]) -> tuple[Recipe, SwitchEngine, list[str]]:
    recipe = load_recipe(name, [f"eval.limit={prompts}", *overrides])
    tasks = load_tasks(recipe.eval.tasks or recipe.tasks, splits=recipe.eval.splits, limit=prompts)
    queries = [e.query for t in tasks for e in t.examples][:prompts]
    return recipe, SwitchEngine(load_pool(recipe.pool), recipe.generation), queries


def generate(engine: SwitchEngine, policy, queries: list[str]) -> tuple[list[dict], float, float]:
    """``toolkit generate``'s path: the engine, in batches of ``generation.batch_size``; (records, wall s, CPU s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    records = engine.generate(queries, policy, [item_seed(i, 0) for i in range(len(queries))])
    return records, time.perf_counter() - wall, time.process_time() - cpu


def serve(url: str, model: str, queries: list[str], clients: int) -> tuple[list[dict], float, float]:
    """Every prompt asked once (prompt i with seed i) by ``clients`` threads; (answers in prompt order, wall s, CPU s)."""
    todo: queue.Queue = queue.Queue()
    for i in range(len(queries)):
        todo.put(i)
    answers: list = [None] * len(queries)

    def client():
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": queries[i]}],
                                                seed=i)
            answers[i] = {"output": reply.choices[0].message.content, "segments": reply.choices[0].switchkit["segments"]}

    wall, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - wall, time.process_time() - cpu


def tokens(records: list[dict]) -> int:
    return sum(g["n_tokens"] for r in records for g in r["segments"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="a recipe (e.g. demo); default: three tiny random models")
    parser.add_argument("--prompts", type=int, default=None, help="prompts answered per variant (default 32; 16 "
                        "with --recipe)")
    parser.add_argument("--model", default=None, help="the served model (default: switch if exported, else untuned)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every variant")
    parser.add_argument("--quick", action="store_true", help="tiny pool: smaller models and responses")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (with --recipe), e.g. pool.dtype=float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe:
            recipe, engine, queries = recipe_setup(args.recipe, args.prompts or 16, args.overrides)
        else:
            recipe, engine, queries = tiny_setup(Path(tmp), args.prompts or 32, args.quick)
        with serving(recipe, engine) as (app, loop, catalog), running(app) as url:
            model = args.model or ("switch" if "switch" in catalog.policies else "untuned")
            policy = catalog.resolve(model)
            generate(engine, policy, queries[:2])  # warm-up
            serve(url, model, queries[:2], 2)
            records, t_gen, cpu_gen = generate(engine, policy, queries)
            results = {c: serve(url, model, queries, c) for c in CLIENTS}
    n = tokens(records)
    gen_tps = n / t_gen
    print(f"toolkit generate: {gen_tps:8.2f} tok/s ({n} tokens in {t_gen:.1f} s, batch {recipe.generation.batch_size})")
    for c, (answers, wall, _) in results.items():
        print(f"serve, {c:2d} clients: {tokens(answers) / wall:8.2f} tok/s ({tokens(answers)} tokens in {wall:.1f} s)")
    same = all([a["output"] for a in answers] == [r["output"] for r in records] for answers, _, _ in results.values())
    print(json.dumps({
        "ratio_vs_generate": {str(c): round(tokens(a) / wall / gen_tps, 3) for c, (a, wall, _) in results.items()},
        "cpu_ratio_vs_generate": {str(c): round((tokens(a) / cpu) / (n / cpu_gen), 3)
                                  for c, (a, _, cpu) in results.items()},
        "generate_tok_s": round(gen_tps, 2),
        "serve_tok_s": {str(c): round(tokens(a) / wall, 2) for c, (a, wall, _) in results.items()},
        "same_outputs": same,
        "settings": {"pool": args.recipe or "tiny", "model": model, "prompts": len(queries),
                     "max_new_tokens": recipe.generation.max_new_tokens, "patch_size": recipe.generation.patch_size,
                     "batch_size": recipe.generation.batch_size, "threads": args.threads, "quick": args.quick,
                     "overrides": args.overrides},
    }))


if __name__ == "__main__":
    main()
