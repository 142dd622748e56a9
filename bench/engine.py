"""Benchmark the switch generation engine against (a) one model's plain ``generate`` and (b) a naive engine.

Pool: three tiny random same-tokenizer Llamas (pretrained with a plain template, finetuned, aligned),
built with ``switchkit.testing`` and loaded through ``from_pretrained``. Policy: the untuned switcher
(the aligned model given the v1 prompt, sharing its weights), top-p 0.7. EOS is masked out (a bias on
the LM head) so that every variant writes exactly the same number of tokens.

(a) ``throughput_ratio_vs_single``: switch-generation tokens/s divided by the tokens/s of the aligned
    model alone writing the same number of tokens for the same batch with ``model.generate``.
(b) ``speedup_vs_naive``: the engine's time divided into the time of a naive engine written below, which
    works like public reference code: every patch it renders the whole context as text, re-encodes it and
    calls ``generate`` without any cache; it picks the writer by letting the switcher generate 50 tokens
    of text and searching them for a digit. It batches sequences per model like the engine does.
Diagnostic: ``engine_single_model_ratio_vs_single`` runs the engine with no switching (the aligned model
writes every patch), which separates the engine's own overhead from the cost of switching. Times are CPU
time of this process with one torch thread by default (see ``CLOCK``).

Usage: ``python bench/engine.py [--quick]``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from switchkit.config import CandidateConfig, GenerationConfig, PoolConfig
from switchkit.engine import SwitchEngine
from switchkit.models import encode_query, load_pool
from switchkit.policies import SinglePolicy, SwitcherPolicy
from switchkit.prompt import build_prompt, get_format
from switchkit.testing import build_tokenizer, save_tiny_model

# CPU time of this process: with one torch thread it is the work done, and other jobs on a shared machine
# do not inflate it the way they inflate wall time.
CLOCK = time.process_time

QUERIES = [
    "What is the capital of France?", "What is the capital of Canada?", "Solve 12 + 30.",
    "Which model should generate the next segment?", "the quick brown fox jumps over the lazy dog",
    "Please respond with a number from 0 to 9.", "I cannot help with that request.", "What is 7 times 6?",
]


def build_pool(root: Path, hidden: int, layers: int):
    """Save and load three tiny same-tokenizer models; mask EOS so every run writes all its tokens."""
    tok = build_tokenizer(300)
    plain = build_tokenizer(300, chat_template=False)
    roles = [("pretrained", plain), ("finetuned", tok), ("aligned", tok)]
    for seed, (role, t) in enumerate(roles):
        save_tiny_model(root / role, t, layers=layers, hidden=hidden, heads=4, seed=seed)
    pool = load_pool(PoolConfig(candidates=[CandidateConfig(source=str(root / r), role=r) for r, _ in roles],
                                device="cpu", dtype="float32"))
    for cand in pool.candidates:
        head = cand.model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        biased.weight = head.weight
        with torch.no_grad():
            biased.bias.zero_()
            biased.bias[list(cand.eos_token_ids)] = -1e4
        cand.model.lm_head = biased
    return pool


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


@torch.inference_mode()
def single_generate(pool, queries, tokens: int) -> float:
    """Seconds for the aligned model alone to write ``tokens`` tokens per query with plain ``generate``."""
    cand = pool[pool.aligned_index]
    ids, mask = left_pad([encode_query(cand.tokenizer, q, pool.plain_template) for q in queries],
                         cand.tokenizer.pad_token_id)
    start = CLOCK()
    out = cand.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=cand.tokenizer.pad_token_id)
    elapsed = CLOCK() - start
    assert out.shape[1] - ids.shape[1] == tokens
    return elapsed


@torch.inference_mode()
def naive_generate(pool, queries, patch: int, max_new: int, switch_tokens: int = 50) -> tuple[float, int]:
    """The reference-style engine: full re-encoding per patch, switcher decision by parsing generated text."""
    aligned = pool[pool.aligned_index]
    n = len(pool)
    gen = torch.Generator().manual_seed(0)
    segments = [[] for _ in queries]  # (model, text, n_tokens)
    live = list(range(len(queries)))
    start = CLOCK()
    while live:
        choice = {}
        first_or_last = [i for i in live if not segments[i] or sum(s[2] for s in segments[i]) + patch >= max_new]
        for i in first_or_last:
            choice[i] = pool.aligned_index
        ask = [i for i in live if i not in choice]
        if ask:
            prompts = [build_prompt(queries[i], [(m, t) for m, t, _ in segments[i]], n) for i in ask]
            ids, mask = left_pad([aligned.tokenizer(p)["input_ids"] for p in prompts], aligned.tokenizer.pad_token_id)
            out = aligned.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=switch_tokens,
                                         min_new_tokens=switch_tokens, do_sample=True, top_p=0.7,
                                         pad_token_id=aligned.tokenizer.pad_token_id)
            for i, row in zip(ask, out[:, ids.shape[1]:]):
                digits = [int(d) for d in re.findall(r"\d", aligned.tokenizer.decode(row)) if int(d) < n]
                choice[i] = digits[0] if digits else int(torch.randint(n, (1,), generator=gen))
        for model in sorted(set(choice.values())):
            group = [i for i in live if choice[i] == model]
            cand = pool[model]
            contexts = [encode_query(cand.tokenizer, queries[i], pool.plain_template)
                        + cand.tokenizer("".join(t for _, t, _ in segments[i]), add_special_tokens=False)["input_ids"]
                        for i in group]
            budget = [min(patch, max_new - sum(s[2] for s in segments[i])) for i in group]
            ids, mask = left_pad(contexts, cand.tokenizer.pad_token_id)
            out = cand.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budget),
                                      min_new_tokens=max(budget), do_sample=False,
                                      pad_token_id=cand.tokenizer.pad_token_id)
            for i, row, b in zip(group, out[:, ids.shape[1]:], budget):
                segments[i].append((model, cand.tokenizer.decode(row[:b]), b))
        live = [i for i in live if sum(s[2] for s in segments[i]) < max_new]
    return CLOCK() - start, sum(s[2] for seg in segments for s in seg)


def switch_generate(pool, queries, patch: int, max_new: int, policy=None) -> tuple[float, int, float]:
    """Seconds and tokens for the engine (default policy: the untuned switcher); also the mean batch per model call."""
    engine = SwitchEngine(pool, GenerationConfig(patch_size=patch, max_new_tokens=max_new, temperature=0.0,
                                                 batch_size=len(queries)))
    aligned = pool[pool.aligned_index]
    policy = policy or SwitcherPolicy(engine, aligned.index, aligned.tokenizer, get_format("v1"), top_p=0.7)
    batches = []
    write = engine.write
    engine.write = lambda seqs, models: (batches.append(len(seqs)), write(seqs, models))
    seqs = engine.start(queries, list(range(len(queries))))
    start = CLOCK()
    engine.run(seqs, policy)
    elapsed = CLOCK() - start
    return elapsed, sum(s.n_tokens for s in seqs), sum(batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and a smaller model (< 60 s)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings stable on a shared 2-core machine)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of (a); the best of each is kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    max_new, patch, batch = (256, 50, 8) if args.quick else (512, 50, 8)
    hidden = args.hidden or (128 if args.quick else 256)
    layers = args.layers or 6
    queries = QUERIES[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        pool = build_pool(Path(tmp), hidden, layers)
        switch_generate(pool, queries[:2], 8, 16)  # warm-up
        single_generate(pool, queries[:2], 8)
        t_single = t_switch = t_engine_single = float("inf")
        for _ in range(args.repeats):  # interleaved; the best of each
            t_single = min(t_single, single_generate(pool, queries, max_new))
            t_run, n_switch, batch_per_call = switch_generate(pool, queries, patch, max_new)
            t_switch = min(t_switch, t_run)
            # diagnostic: the engine with no switching (the aligned model writes every patch)
            t_run, _, _ = switch_generate(pool, queries, patch, max_new, SinglePolicy(pool.aligned_index))
            t_engine_single = min(t_engine_single, t_run)
        t_naive, n_naive = naive_generate(pool, queries, patch, max_new)
    single_tps = batch * max_new / t_single
    switch_tps = n_switch / t_switch
    naive_tps = n_naive / t_naive
    print(f"single generate: {single_tps:8.1f} tok/s  ({t_single:.2f} s)")
    print(f"switch engine:   {switch_tps:8.1f} tok/s  ({t_switch:.2f} s, "
          f"{batch_per_call:.2f} sequences per model call)")
    print(f"engine, one model: {batch * max_new / t_engine_single:6.1f} tok/s  ({t_engine_single:.2f} s)")
    print(f"naive engine:    {naive_tps:8.1f} tok/s  ({t_naive:.2f} s)")
    print(json.dumps({
        "throughput_ratio_vs_single": round(switch_tps / single_tps, 3),
        "speedup_vs_naive": round(switch_tps / naive_tps, 3),
        "single_tok_s": round(single_tps, 1), "switch_tok_s": round(switch_tps, 1), "naive_tok_s": round(naive_tps, 1),
        "sequences_per_model_call": round(batch_per_call, 2),
        "engine_single_model_ratio_vs_single": round(t_single / t_engine_single, 3),
        "settings": {"max_new_tokens": max_new, "patch_size": patch, "batch": batch, "hidden": hidden,
                     "layers": layers, "models": 3, "threads": args.threads, "quick": args.quick,
                     "clock": "process_time"},
    }))


if __name__ == "__main__":
    main()
