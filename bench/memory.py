"""Benchmark: peak memory of synthesis as the records grow, with and without ``synthesis.max_in_flight``.

Each run is its own process (peak resident memory is the process's ``ru_maxrss``) synthesizing ``records`` records
of one task. Two set-ups:

- default: three tiny random same-tokenizer Llamas (``switchkit.testing``) with ``synthesis.chunk_size`` equal to
  the records, so one chunk holds every trace, branch and rollout, the worst case. Without a bound the sequences in
  flight (and their caches) grow with the records; with ``max_in_flight`` they do not.
- ``--recipe demo`` (or any recipe): the recipe as it is, at each ``--records`` count (``records_per_task``).

The JSON gives, per run, peak MiB, seconds, CPU seconds (one torch thread: other jobs on a shared machine do not
inflate it; model loading included) and generated tokens per CPU second, plus ``peak_ratio`` and
``throughput_ratio_as_records_grow`` (bounded runs: the most records over the fewest), ``peak_ratio_unbounded``,
and ``throughput_ratio_bounded_vs_unbounded`` (at the most records).

    python bench/memory.py [--quick]
    python bench/memory.py --recipe demo --records 200,2000 --max-in-flight 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    """One synthesis run in this process; prints its JSON line."""
    import torch

    from switchkit.config import load_recipe
    from switchkit.data_synthesis.synthesize import run_synthesis

    overrides = [f"synthesis.records_per_task={args.records}", f"run_dir={args.root}/run-{args.records}-{args.limit}"]
    if args.limit:
        overrides.append(f"synthesis.max_in_flight={args.limit}")
    if args.recipe is None:
        overrides.append(f"synthesis.chunk_size={args.records}")
    recipe = load_recipe(args.recipe or str(Path(args.root) / "recipe.yaml"), overrides + args.override)
    torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    out = run_synthesis(recipe, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = json.loads((out.parent / "stats.json").read_text())["tokens_generated"]
    print(json.dumps({"records": int(args.records), "max_in_flight": args.limit, "seconds": round(seconds, 1),
                      "cpu_seconds": round(cpu, 1), "tokens": tokens, "tokens_per_cpu_s": round(tokens / cpu, 1),
                      "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def tiny_recipe(root: Path, quick: bool) -> Path:
    from switchkit.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer(300)
    size = dict(layers=4, hidden=256, heads=4)
    dirs = [save_tiny_model(root / r, tok, seed=i, **size) for i, r in enumerate(["base", "sft", "aligned"])]
    task = root / "qa.jsonl"
    task.write_text("".join(json.dumps({"input": f"What is the capital of country {i}?", "output": "Paris"}) + "\n"
                            for i in range(16)))
    roles = ["pretrained", "finetuned", "aligned"]
    cands = "\n".join(f"    - {{source: '{d}', role: {r}}}" for d, r in zip(dirs, roles))
    path = root / "recipe.yaml"
    path.write_text(f"""name: memory-bench
pool:
  candidates:
{cands}
  device: cpu
  dtype: float32
generation: {{patch_size: 8, max_new_tokens: {32 if quick else 64}, temperature: 1.0, top_p: 1.0}}
tasks:
  - {{name: qa, type: f1_match, source: '{task}', split: dev}}
synthesis: {{k: {4 if quick else 8}, tie_rule: lowest}}
""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="a recipe (default: three tiny models, one chunk per run)")
    parser.add_argument("--records", type=str, default=None,
                        help="comma-separated records_per_task (default 8,32; quick 4,16)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="the bound (default 96; quick 24)")
    parser.add_argument("--no-unbounded", action="store_true", help="skip the runs without a bound")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU time is the clock)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("override", nargs="*", help="more recipe overrides key=value")
    args = parser.parse_args()
    if args.child:
        return child(args)
    records = [int(r) for r in (args.records or ("4,16" if args.quick else "8,32")).split(",")]
    bound = args.max_in_flight or (24 if args.quick else 96)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe is None:
            tiny_recipe(Path(tmp), args.quick)
        for r in records:
            for limit in ([bound] if args.no_unbounded else [None, bound]):
                cmd = [sys.executable, __file__, "--child", "--root", tmp, "--records", str(r),
                       "--threads", str(args.threads), *args.override]
                cmd += ["--recipe", args.recipe] if args.recipe else []
                cmd += ["--limit", str(limit)] if limit else []
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"run failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
    bounded = [x for x in runs if x["max_in_flight"]]
    unbounded = [x for x in runs if not x["max_in_flight"]]
    result = {"runs": runs, "max_in_flight": bound,
              "peak_ratio": round(bounded[-1]["peak_mib"] / bounded[0]["peak_mib"], 3),
              "throughput_ratio_as_records_grow": round(
                  bounded[-1]["tokens_per_cpu_s"] / bounded[0]["tokens_per_cpu_s"], 3)}
    if unbounded:
        result["peak_ratio_unbounded"] = round(unbounded[-1]["peak_mib"] / unbounded[0]["peak_mib"], 3)
        result["throughput_ratio_bounded_vs_unbounded"] = round(
            bounded[-1]["tokens_per_cpu_s"] / unbounded[-1]["tokens_per_cpu_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
