"""Switcher training step vs the usual causal-LM SFT step (TRL SFTTrainer style), same model, same data.

- ``switcher``: :class:`SwitcherModule` loss: decoder only, final hidden state x the n id-token rows of the head.
- ``full_vocab_sft``: the prompt plus the label digit as one sequence, ``labels = input_ids`` (padding masked),
  so the LM head and the cross-entropy run over the full vocabulary at every position.

Both use the recipe's backbone (default: the demo's aligned candidate, SmolLM2-135M-Instruct, vocab 49152),
the recipe's LoRA settings, AdamW, the same micro-batches. Both variants run in this one process, one
after the other: before each, freed memory is handed back to the OS (``malloc_trim``) and the peak
resident set size is reset (``/proc/self/clear_refs``), so a variant's memory is its peak RSS (VmHWM)
minus the resident size at its start, i.e. the extra memory its training steps need (activations,
logits, gradients, optimizer state). Speed is samples/s over the timed steps
after one warm-up step (``--speed cpu``: samples per process CPU-second instead, which other jobs on a
shared host disturb far less than wall time). With ``--rounds`` > 1 the variants alternate and the medians are compared.

    python bench/train.py [--quick] [--recipe demo] [--steps N --micro-batch B --max-length L --rounds R]

The last line is JSON: ``speed_ratio_vs_full_vocab_sft`` (switcher samples/s / SFT samples/s) and
``memory_ratio_vs_full_vocab_sft`` (switcher step memory / SFT step memory; < 1 means the switcher needs less).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("switcher", "full_vocab_sft")
WORDS = "the model writes a short answer about the capital city and then explains why it is right".split()


def prompts(count: int, n: int, seed: int = 0) -> list[str]:
    """Switcher prompts with a query and a few random segments (same for both variants)."""
    from switchkit.prompt import build_prompt

    rng = random.Random(seed)
    out = []
    for i in range(count):
        segs = [(rng.randrange(n), " ".join(rng.choice(WORDS) for _ in range(40))) for _ in range(4)]
        out.append(build_prompt(f"Question {i}: what is the capital of country number {i}?", segs, n))
    return out


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(variant: str, recipe_name: str, steps: int, micro_batch: int, max_length: int) -> dict:
    """Time ``steps`` training steps of one variant in this process; return samples/s and step memory."""
    from switchkit.config import load_recipe
    from switchkit.trainer.data import collate
    from switchkit.trainer.pipeline import build_module

    torch.manual_seed(0)
    recipe = load_recipe(recipe_name, [f"train.max_length={max_length}", "train.precision=32-true",
                                       "train.strategy=auto", "train.lora.dropout=0.0"])
    module = build_module(recipe)
    model, tok, vocab = module.model, module.tokenizer, module.vocab
    rng = random.Random(1)
    rows = []
    for p in prompts(micro_batch * (steps + 1), module.n):
        label = rng.randrange(module.n)
        ids = module.format.encode(tok, vocab, p, max_length)
        if variant == "full_vocab_sft":
            ids = ids + [vocab.token_ids[label]]
        rows.append({"input_ids": ids, "label": label, "utilities": [0.0] * module.n})
    batches = [collate(rows[i:i + micro_batch], tok.pad_token_id) for i in range(0, len(rows), micro_batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: dict) -> None:
        if variant == "switcher":
            loss = F.cross_entropy(module(batch["input_ids"], batch["attention_mask"], batch["last_index"]),
                                   batch["labels"])
        else:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by an earlier variant back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base_kb = _rss_kb("VmRSS")
    step(batches[0])  # warm-up (allocates optimizer state)
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches[1:]:
        step(batch)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"variant": variant, "samples_per_s": steps * micro_batch / seconds,
            "samples_per_cpu_s": steps * micro_batch / cpu_seconds,
            "step_memory_mb": (_rss_kb("VmHWM") - base_kb) / 1024,
            "tokens_per_sample": sum(len(r["input_ids"]) for r in rows) / len(rows),
            "vocab_size": module.lm.config.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps of 4 x 128 tokens, one round (about 2 min)")
    parser.add_argument("--recipe", default="demo", help="recipe whose backbone and LoRA settings are used")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--speed", choices=("wall", "cpu"), default="wall",
                        help="speed basis: wall-clock samples/s, or samples per process CPU-second (on a shared host)")
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 3)
    args.micro_batch = args.micro_batch or (4 if args.quick else 8)
    args.max_length = args.max_length or (128 if args.quick else 256)
    results = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds or 1):
        for variant in VARIANTS:
            result = run_variant(variant, args.recipe, steps, args.micro_batch, args.max_length)
            print(json.dumps({"round": rnd, **result}), flush=True)
            results[variant].append(result)
    keys = ("samples_per_s", "samples_per_cpu_s", "step_memory_mb")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in results.items()}
    speed = "samples_per_s" if args.speed == "wall" else "samples_per_cpu_s"
    print(json.dumps({
        "speed_ratio_vs_full_vocab_sft": round(med["switcher"][speed] / med["full_vocab_sft"][speed], 3),
        "speed_basis": speed,
        "memory_ratio_vs_full_vocab_sft": round(med["switcher"]["step_memory_mb"] / med["full_vocab_sft"]["step_memory_mb"], 3),
        "switcher": med["switcher"], "full_vocab_sft": med["full_vocab_sft"],
        "micro_batch": args.micro_batch, "max_length": args.max_length, "timed_steps": steps,
    }))


if __name__ == "__main__":
    main()
