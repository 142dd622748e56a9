"""Benchmark the switch generation engine against (a) one model's plain generation and (b) a naive engine, per backend.

Pool: ``--candidates`` copies of one model (``--model DIR``: a real HF folder such as the demo's cached SmolLM2;
default: a tiny random Llama built with ``switchkit.testing``), so every candidate is its own slot with its own
cache. Policy (``--policy``): the untuned switcher (the aligned candidate given the v1 prompt, sharing its
weights; top-p 0.7), or uniform random switching (no decision cost: the engine's own switching overhead);
writers decode greedily. EOS is ignored everywhere, so every variant writes exactly ``--max-new`` tokens per query.

For each backend in ``--backend`` (``hf``, ``vllm`` or ``hf,vllm`` for both in one run) and each batch B in
``--batches``:

- ``ratio_vs_single[B]``: switch-generation tokens/s over B queries divided by the tokens/s of the aligned model
  alone writing the same tokens for the same B queries with the backend's own plain generation (HF
  ``model.generate``; vLLM one ``LLM.generate`` call);
- ``ratio_vs_single_equal_per_call[B]``: the same, with switch generation over n x B queries, so each model call
  sees about B sequences, as plain generation does. With n writers each model sees about 1/n of the batch, and
  where decoding is memory-bound a forward pass costs about the same at any batch: switching at an equal batch has
  a ceiling near 1/(active writers); this ratio shows the engine's own efficiency apart from that structure;
- ``writers_ratio_vs_single_equal_per_call[B]`` and ``decision_share_equal_per_call[B]``: the same run split in
  two, the writers' tokens/s over plain generation's with the switcher's decisions (``id_logprobs``) taken out, and
  the decisions' share of the time. Each decision reads the new patch plus the prompt's closing question (the v1
  format) with the aligned model: where a forward pass costs per token (compute-bound, as on a CPU) that reading
  costs about as much as the tokens written; where decoding is memory-bound (GPUs) prefill is far cheaper;
- ``sequences_per_model_call[B]``: the mean batch of the engine's writes;
- ``speedup_vs_naive`` (at the smallest B): the engine's time divided into that of a naive engine that, like
  public reference code, re-encodes the whole context for every patch (vLLM: prefix cache reset before each call)
  and picks the writer by generating 50 tokens with the switcher and searching them for a digit.

Times are this process's CPU time by default (``--clock wall`` for wall-clock) with ``--threads`` compute threads
(default 1, for torch and for vLLM's CPU workers): on a shared machine other jobs do not inflate CPU time the way
they inflate wall time. The variants run interleaved, ``--repeats`` times, and the fastest of each counts. The vLLM
prefix cache is reset before every timed run.

Usage: ``python bench/engine.py [--backend hf,vllm] [--model DIR] [--quick]``. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from switchkit.config import CandidateConfig, GenerationConfig, PoolConfig, VLLMConfig
from switchkit.engine import SwitchEngine
from switchkit.models import encode_query, load_pool
from switchkit.policies import RandomPolicy, SinglePolicy, SwitcherPolicy
from switchkit.prompt import build_prompt, get_format
from switchkit.testing import build_tokenizer, save_tiny_model

CLOCK = time.process_time  # --clock: cpu (this process's CPU time, default) or wall
POLICY = "untuned"  # --policy: untuned (the aligned model as switcher, one forward per decision) or random

QUERIES = [
    "What is the capital of France?", "What is the capital of Canada?", "Solve 12 + 30.",
    "Which model should generate the next segment?", "the quick brown fox jumps over the lazy dog",
    "Please respond with a number from 0 to 9.", "I cannot help with that request.", "What is 7 times 6?",
    "Name three primary colors.", "Write a haiku about the sea.", "Why is the sky blue?", "What is a prime number?",
]


def queries(n: int) -> list[str]:
    return [f"{QUERIES[i % len(QUERIES)]} ({i})" if i >= len(QUERIES) else QUERIES[i] for i in range(n)]


class Plain:
    """The backend's own plain generation of ``tokens`` greedy tokens per context, EOS ignored."""

    def __init__(self, engine: SwitchEngine, backend: str):
        self.engine, self.backend = engine, backend

    def reset(self) -> None:
        """Forget cached prefixes (vLLM), so every timed run starts cold."""
        if self.backend == "vllm":
            for e in self.engine.backend.engines:
                if e.llm is not None:
                    e.llm.reset_prefix_cache()

    @torch.inference_mode()
    def __call__(self, slot: int, contexts: list[list[int]], tokens: int, sample: bool = False) -> list[list[int]]:
        if self.backend == "vllm":
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(max_tokens=tokens, ignore_eos=True, detokenize=False,
                                    temperature=1.0 if sample else 0.0, top_p=0.7 if sample else 1.0, seed=0)
            outs = self.engine.backend._llm(slot).generate([TokensPrompt(prompt_token_ids=c) for c in contexts],
                                                          params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        cand = self.engine.pool[slot]
        pad = cand.tokenizer.pad_token_id
        width = max(map(len, contexts))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
        out = cand.model.generate(input_ids=ids.to(cand.model.device), attention_mask=mask.to(cand.model.device),
                                  max_new_tokens=tokens, min_new_tokens=tokens, do_sample=sample,
                                  top_p=0.7 if sample else None, pad_token_id=pad)
        return out[:, width:].tolist()


def single_generate(plain: Plain, qs: list[str], tokens: int) -> float:
    """Seconds for the aligned model alone to write ``tokens`` tokens per query in one plain generation."""
    pool = plain.engine.pool
    cand = pool[pool.aligned_index]
    contexts = [encode_query(cand.tokenizer, q, pool.plain_template) for q in qs]
    plain.reset()
    start = CLOCK()
    out = plain(cand.index, contexts, tokens)
    elapsed = CLOCK() - start
    assert all(len(o) == tokens for o in out)
    return elapsed


def naive_generate(plain: Plain, qs: list[str], patch: int, max_new: int, switch_tokens: int = 50) -> tuple[float, int]:
    """The reference-style engine: full re-encoding per patch, switcher decision by parsing generated text."""
    pool = plain.engine.pool
    aligned = pool[pool.aligned_index]
    n = len(pool)
    gen = torch.Generator().manual_seed(0)
    segments = [[] for _ in qs]  # (model, text, n_tokens)
    live = list(range(len(qs)))
    start = CLOCK()
    while live:
        choice = {}
        for i in live:
            if not segments[i] or sum(s[2] for s in segments[i]) + patch >= max_new:
                choice[i] = pool.aligned_index
        ask = [i for i in live if i not in choice]
        if ask:
            prompts = [aligned.tokenizer(build_prompt(qs[i], [(m, t) for m, t, _ in segments[i]], n))["input_ids"]
                       for i in ask]
            plain.reset()
            for i, row in zip(ask, plain(aligned.index, prompts, switch_tokens, sample=True)):
                digits = [int(d) for d in re.findall(r"\d", aligned.tokenizer.decode(row)) if int(d) < n]
                choice[i] = digits[0] if digits else int(torch.randint(n, (1,), generator=gen))
        for model in sorted(set(choice.values())):
            group = [i for i in live if choice[i] == model]
            cand = pool[model]
            contexts = [encode_query(cand.tokenizer, qs[i], pool.plain_template)
                        + cand.tokenizer("".join(t for _, t, _ in segments[i]), add_special_tokens=False)["input_ids"]
                        for i in group]
            budget = min(patch, max_new - sum(s[2] for s in segments[group[0]]))
            plain.reset()
            for i, row in zip(group, plain(model, contexts, budget)):
                segments[i].append((model, cand.tokenizer.decode(row), budget))
        live = [i for i in live if sum(s[2] for s in segments[i]) < max_new]
    return CLOCK() - start, sum(s[2] for seg in segments for s in seg)


def switch_generate(plain: Plain, qs: list[str], policy=None) -> tuple[float, int, float, float]:
    """Seconds and tokens for the engine (default policy: ``--policy``); also the mean batch per write and the
    seconds spent in switcher decisions (the backend's ``id_logprobs``)."""
    engine = plain.engine
    aligned = engine.pool[engine.pool.aligned_index]
    if policy is None and POLICY == "random":
        policy = RandomPolicy()
    policy = policy or SwitcherPolicy(engine, aligned.index, aligned.tokenizer, get_format("v1"), top_p=0.7)
    batches, decisions = [], [0.0]
    write, id_logprobs = engine.write, engine.backend.id_logprobs

    def timed_id_logprobs(*args):
        start = CLOCK()
        try:
            return id_logprobs(*args)
        finally:
            decisions[0] += CLOCK() - start

    engine.write = lambda seqs, models: (batches.append(len(seqs)), write(seqs, models))
    engine.backend.id_logprobs = timed_id_logprobs
    try:
        seqs = engine.start(qs, list(range(len(qs))))
        plain.reset()
        start = CLOCK()
        engine.run(seqs, policy)
        elapsed = CLOCK() - start
    finally:
        engine.write, engine.backend.id_logprobs = write, id_logprobs
    return elapsed, sum(s.n_tokens for s in seqs), sum(batches) / len(batches), decisions[0]


def build_engine(backend: str, model_dir: str, n: int, patch: int, max_new: int, dtype: str,
                 device: str) -> SwitchEngine:
    roles = ["pretrained"] * (n - 1) + ["aligned"]
    pool = load_pool(PoolConfig(candidates=[CandidateConfig(source=model_dir, role=r, name=f"{r}-{i}")
                                            for i, r in enumerate(roles)], device=device, dtype=dtype), backend)
    engine = SwitchEngine(pool, GenerationConfig(patch_size=patch, max_new_tokens=max_new, temperature=0.0,
                                                 backend=backend, vllm=VLLMConfig(kv_cache_gb=1.0, max_model_len=2048)))
    engine.eos = [set() for _ in pool.candidates]  # every patch is written in full
    return engine


def bench_backend(backend: str, model_dir: str, args) -> dict:
    engine = build_engine(backend, model_dir, args.candidates, args.patch, args.max_new, args.dtype, args.device)
    plain, n = Plain(engine, backend), args.candidates
    switch_generate(plain, queries(2))  # warm-up (builds vLLM engines)
    single_generate(plain, queries(2), 8)
    single, switch, equal, per_call, per_call_equal = {}, {}, {}, {}, {}
    for _ in range(args.repeats):  # interleaved; the best of each
        for b in args.batches:
            single[b] = min(single.get(b, float("inf")), single_generate(plain, queries(b), args.max_new))
            t, tokens, calls, _ = switch_generate(plain, queries(b))
            switch[b] = min(switch.get(b, (float("inf"),))[0], t), tokens
            per_call[b] = calls
            t, tokens, calls, decide = switch_generate(plain, queries(n * b))
            if t < equal.get(b, (float("inf"),))[0]:
                equal[b] = t, tokens, decide
            per_call_equal[b] = calls
    b0 = min(args.batches)
    t_engine_single, _, _, _ = switch_generate(plain, queries(b0), SinglePolicy(engine.pool.aligned_index))
    t_naive, naive_tokens = naive_generate(plain, queries(b0), args.patch, args.max_new)
    single_tps = {b: b * args.max_new / single[b] for b in args.batches}
    result = {
        "ratio_vs_single": {b: round(switch[b][1] / switch[b][0] / single_tps[b], 3) for b in args.batches},
        "ratio_vs_single_equal_per_call": {b: round(equal[b][1] / equal[b][0] / single_tps[b], 3)
                                           for b in args.batches},
        # the same without the switcher's decisions: the writers' own efficiency, and the decisions' share of time
        "writers_ratio_vs_single_equal_per_call": {b: round(equal[b][1] / (equal[b][0] - equal[b][2]) / single_tps[b], 3)
                                                   for b in args.batches},
        "decision_share_equal_per_call": {b: round(equal[b][2] / equal[b][0], 3) for b in args.batches},
        "speedup_vs_naive": round((switch[b0][1] / switch[b0][0]) / (naive_tokens / t_naive), 3),
        "engine_single_model_ratio_vs_single": round(single[b0] / t_engine_single, 3),
        "sequences_per_model_call": {b: round(per_call[b], 2) for b in args.batches},
        "sequences_per_model_call_equal": {b: round(per_call_equal[b], 2) for b in args.batches},
        "single_tok_s": {b: round(single_tps[b], 1) for b in args.batches},
        "switch_tok_s": {b: round(switch[b][1] / switch[b][0], 1) for b in args.batches},
        "naive_tok_s": round(naive_tokens / t_naive, 1),
    }
    for b in args.batches:
        print(f"[{backend}] B={b}: single {single_tps[b]:.1f} tok/s, switch {result['switch_tok_s'][b]} tok/s "
              f"(x{result['ratio_vs_single'][b]}, {per_call[b]:.1f} seq/call), switch over {n}xB "
              f"x{result['ratio_vs_single_equal_per_call'][b]} ({per_call_equal[b]:.1f} seq/call)", flush=True)
    print(f"[{backend}] naive {result['naive_tok_s']} tok/s, engine x{result['speedup_vs_naive']} vs naive", flush=True)
    getattr(engine.backend, "close", lambda: None)()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", help="hf, vllm, or hf,vllm (both, in one run)")
    parser.add_argument("--model", default=None, help="an HF model folder (default: a tiny random Llama)")
    parser.add_argument("--candidates", type=int, default=2, help="copies of the model in the pool (n)")
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes B")
    parser.add_argument("--max-new", type=int, default=None, help="tokens per response (default 128; quick 48)")
    parser.add_argument("--patch", type=int, default=None, help="patch size (default 32; quick 16)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every candidate on it)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each variant; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="compute threads (torch and vLLM's CPU workers)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="CPU time of this process, or wall")
    parser.add_argument("--policy", choices=["untuned", "random"], default="untuned",
                        help="who writes: the untuned switcher (a forward pass per decision) or uniform random")
    parser.add_argument("--quick", action="store_true", help="short responses, batch 4 and 8, one repeat")
    args = parser.parse_args()
    global CLOCK, POLICY
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    POLICY = args.policy
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}" if args.threads > 1 else "0")
    args.max_new = args.max_new or (48 if args.quick else 128)
    args.patch = args.patch or (16 if args.quick else 32)
    args.batches = [4, 8] if args.quick and args.batches == "8,32" else [int(b) for b in args.batches.split(",")]
    args.repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:  # head size 64: vLLM's CPU attention needs 32 or more
            model_dir = str(save_tiny_model(Path(tmp) / "tiny", build_tokenizer(300), layers=6, hidden=256, heads=4))
        results = {b: bench_backend(b, model_dir, args) for b in args.backend.split(",")}
    print(json.dumps({**results, "settings": {
        "model": args.model or "tiny random Llama (6 layers, hidden 256)", "candidates": args.candidates,
        "max_new_tokens": args.max_new, "patch_size": args.patch, "batches": args.batches, "dtype": args.dtype,
        "device": args.device, "repeats": args.repeats, "threads": args.threads, "clock": args.clock,
        "policy": args.policy}}))


if __name__ == "__main__":
    main()
