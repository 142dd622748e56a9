"""Backend conformance: one suite, run against every backend (hf; vllm where vLLM is installed) on tiny models.

- greedy single-model output is token-identical to an HF forward-pass reference;
- switcher probabilities (id-token log-probabilities) match HF within tolerance, also through a LoRA adapter;
- per-sequence seeds reproduce, whatever else shares the batch;
- a LoRA switcher works on the aligned candidate's weights (n models, not n+1), and base writes stay base writes,
  also in a batch that mixes adapter and base requests (vLLM's CPU LoRA guard);
- ``toolkit generate`` writes the same records under both backends (greedy).

Models: hidden 64 with 2 heads (vLLM's CPU attention needs a head size of 32 or more), weights scaled so greedy
choices are far from ties; fp32 (bf16 is not token-identical across implementations).
"""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from switchkit.backends import Sampling
from switchkit.config import CandidateConfig, GenerationConfig, PoolConfig, VLLMConfig, load_recipe
from switchkit.engine import SwitchEngine
from switchkit.models import encode_query, load_pool
from switchkit.policies import SinglePolicy, load_switcher
from switchkit.prompt import build_prompt, get_format
from switchkit.runner import generate_command
from switchkit.testing import build_tokenizer, save_tiny_model
from switchkit.vllm_backend import vllm_installed

# SWITCHKIT_REQUIRE_VLLM=1 (tests/vllm_cpu.sh sets it): run the vLLM cases even where vLLM seems absent, so a broken
# install fails them instead of skipping them
needs_vllm = pytest.mark.skipif(not vllm_installed() and not os.environ.get("SWITCHKIT_REQUIRE_VLLM"),
                                reason="vLLM not installed")
BACKENDS = ["hf", pytest.param("vllm", marks=needs_vllm)]
QUERIES = ["What is the capital of France?", "Solve 12 + 30.", "the quick brown fox jumps over the lazy dog, twice",
           "Which model should generate the next segment?"]
VLLM = VLLMConfig(kv_cache_gb=0.125, max_model_len=512)
TOL = 1e-4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two same-tokenizer tiny models (base without a chat template, aligned) and a LoRA adapter on the aligned one."""
    root = tmp_path_factory.mktemp("backends")
    tok, plain = build_tokenizer(300), build_tokenizer(300, chat_template=False)
    size = dict(hidden=64, heads=2, init_scale=10.0)
    dirs = {"base": save_tiny_model(root / "base", plain, seed=1, **size),
            "aligned": save_tiny_model(root / "aligned", tok, seed=2, **size)}
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(dirs["aligned"]),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(root / "switcher")
    dirs["switcher"] = root / "switcher"
    return dirs


def pool_config(dirs):
    return PoolConfig(candidates=[CandidateConfig(source=str(dirs["base"]), role="pretrained"),
                                  CandidateConfig(source=str(dirs["aligned"]), role="aligned")],
                      device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(dirs):
    """HF reference models: the pool's two candidates and the aligned one with the LoRA adapter."""
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return {"base": load(dirs["base"]), "aligned": load(dirs["aligned"]),
            "switcher": PeftModel.from_pretrained(load(dirs["aligned"]), dirs["switcher"]).eval()}


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, dirs):
    name = request.param
    pool = load_pool(pool_config(dirs), name)
    if name == "vllm":
        assert all(c.model is None for c in pool.candidates)  # the HF weights are not loaded a second time
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=16, backend=name, vllm=VLLM))
    yield engine
    getattr(engine.backend, "close", lambda: None)()


@torch.inference_mode()
def greedy_reference(model, ids, n, stop=()):
    """Greedy decoding that recomputes the whole context for every token (stop token included)."""
    ids, out = list(ids), []
    for _ in range(n):
        tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        if tok in stop:
            break
        ids.append(tok)
    return out


@torch.inference_mode()
def id_logprobs_reference(model, contexts, ids):
    return torch.stack([model(torch.tensor([c])).logits[0, -1, ids].float().log_softmax(-1) for c in contexts])


def contexts_of(engine, model):
    return [encode_query(engine.pool[model].tokenizer, q, engine.pool.plain_template) for q in QUERIES]


def test_greedy_write_is_token_identical_to_hf(engine, hf):
    for model, name in enumerate(["base", "aligned"]):
        contexts = contexts_of(engine, model)
        full = [greedy_reference(hf[name], c, 12) for c in contexts]
        stop = {full[0][5]}  # a stop id inside row 0's continuation: the patch ends after it
        budgets = [12, 3, 0, 12]
        expected = [greedy_reference(hf[name], c, b, stop) if b else [] for c, b in zip(contexts, budgets)]
        got, states = engine.backend.write(model, contexts, [None] * 4, budgets, [0] * 4, Sampling(), stop)
        assert got == expected
        # two patches of 6 continue exactly like one of 12 (the cached prefix is reused)
        first, states = engine.backend.write(model, contexts, [None] * 4, [6] * 4, [0] * 4, Sampling(), set())
        second, _ = engine.backend.write(model, [c + p for c, p in zip(contexts, first)], states, [6] * 4, [0] * 4,
                                         Sampling(), set())
        assert [a + b for a, b in zip(first, second)] == full


def test_single_model_generation_matches_hf_greedy(engine, hf):
    records = engine.generate(QUERIES, SinglePolicy(1), seeds=[0, 1, 2, 3])
    tok = engine.pool[1].tokenizer
    for q, record in zip(QUERIES, records):
        ids = encode_query(tok, q, engine.pool.plain_template)
        expected = greedy_reference(hf["aligned"], ids, 16, engine.eos[1])
        expected = expected[:-1] if expected and expected[-1] in engine.eos[1] else expected
        assert sum(s["n_tokens"] for s in record["segments"]) == len(expected)
        assert record["output"] == tok.decode(expected)


def test_id_logprobs_match_hf(engine, hf):
    tok = engine.pool[1].tokenizer
    fmt = get_format("v1")
    vocab = fmt.vocab(tok, 2)
    prompts = [fmt.encode(tok, vocab, build_prompt(q, [(1, "Paris is"), (0, " the capital.")], 2), None)
               for q in QUERIES]
    got, _ = engine.backend.id_logprobs(1, prompts, [None] * 4, vocab.token_ids)
    expected = id_logprobs_reference(hf["aligned"], prompts, vocab.token_ids)
    assert got.shape == (4, 2) and torch.allclose(got.exp().sum(-1), torch.ones(4), atol=1e-5)
    assert float((got - expected).abs().max()) < TOL


def test_seeds_reproduce_whatever_shares_the_batch(engine):
    contexts = contexts_of(engine, 1)
    sampling = Sampling(temperature=1.0, top_p=0.9)

    def sample(rows, seeds):
        return engine.backend.write(1, [contexts[r] for r in rows], [None] * len(rows), [10] * len(rows), seeds,
                                    sampling, set())[0]

    seeds = [11, 2**62 + 12, 13, 14]  # derived seeds are 63-bit
    first = sample([0, 1, 2, 3], seeds)
    assert sample([0, 1, 2, 3], seeds) == first
    assert sample([2, 0], [seeds[2], seeds[0]]) == [first[2], first[0]]
    assert sample([1, 1, 3], [seeds[1], 99, seeds[3]])[::2] == [first[1], first[3]]
    assert sample([0, 1, 2, 3], [21, 22, 23, 24]) != first


def test_lora_switcher_on_the_aligned_weights(engine, hf, dirs):
    contexts = contexts_of(engine, 1)
    policy = load_switcher(engine, str(dirs["switcher"]), prompt_format="v1")
    try:
        # an adapter on candidate 1's weights (HF: its model; vLLM: its engine): n models, not n+1
        assert engine.backend.slots[policy.slot][0] in (engine.pool[1].model, 1)
        assert len(engine.backend.slots) == 3
        fmt = get_format("v1")
        prompts = [fmt.encode(policy.tokenizer, policy.vocab, build_prompt(q, [(1, "Paris")], 2), None)
                   for q in QUERIES]
        got, _ = engine.backend.id_logprobs(policy.slot, prompts, [None] * 4, policy.vocab.token_ids)
        with_adapter = id_logprobs_reference(hf["switcher"], prompts, policy.vocab.token_ids)
        without = id_logprobs_reference(hf["aligned"], prompts, policy.vocab.token_ids)
        assert float((with_adapter - without).abs().max()) > 100 * TOL  # the adapter matters
        assert float((got - with_adapter).abs().max()) < TOL
        # the candidate itself still writes as the base model
        written, _ = engine.backend.write(1, contexts, [None] * 4, [8] * 4, [0] * 4, Sampling(), set())
        assert written == [greedy_reference(hf["aligned"], c, 8) for c in contexts]
        # a switch-generation run through the adapter completes and records the switcher's probabilities
        records = engine.generate(QUERIES[:2], policy, seeds=[0, 1])
        assert all(len(p) == 2 and abs(sum(p) - 1) < 1e-5 for r in records for p in r["switch_probs"])
    finally:
        policy.close()
    assert policy.slot not in engine.backend.slots


@needs_vllm
def test_vllm_mixed_adapter_and_base_batch(dirs, hf):
    """vLLM's CPU LoRA ops give "no adapter" (-1) the last slot: the backend keeps that slot empty. A batch that
    mixes adapter and base requests is sent to the engine directly, after an adapter was removed and another added
    (slot reuse)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    pool = load_pool(pool_config(dirs), "vllm")
    engine = SwitchEngine(pool, GenerationConfig(patch_size=4, max_new_tokens=16, backend="vllm", vllm=VLLM))
    try:
        backend = engine.backend
        backend.remove(backend.add_adapter(1, dirs["switcher"]))
        slot = backend.add_adapter(1, dirs["switcher"])
        llm = backend._llm(slot)
        assert llm.llm_engine.vllm_config.lora_config.max_loras == 2  # one adapter + the empty slot
        contexts = contexts_of(engine, 1)
        request = backend.engines[1].adapters[slot]
        outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in contexts],
                            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False),
                            lora_request=[request, None, request, None], use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        models = [hf["switcher"], hf["aligned"], hf["switcher"], hf["aligned"]]
        assert got == [greedy_reference(m, c, 8) for m, c in zip(models, contexts)]
    finally:
        engine.backend.close()


@needs_vllm
def test_generate_writes_the_same_records_on_both_backends(dirs, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"""name: conformance
run_dir: {tmp_path / 'run'}
pool:
  candidates:
    - {{source: '{dirs['base']}', role: pretrained}}
    - {{source: '{dirs['aligned']}', role: aligned}}
  device: cpu
  dtype: float32
generation: {{patch_size: 4, max_new_tokens: 12, temperature: 0.0,
              vllm: {{kv_cache_gb: 0.125, max_model_len: 512}}}}
switcher: {{policy: random}}
""")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"input": q}) + "\n" for q in QUERIES))
    rows = {}
    for name in ("hf", "vllm"):
        out = tmp_path / f"{name}.jsonl"
        generate_command(load_recipe(str(recipe_file), [f"generation.backend={name}"]), input=str(inputs),
                         output=str(out))
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows["hf"] == rows["vllm"]  # greedy and the same seeds: the same records, field for field


def test_vllm_is_a_backend_name_without_vllm_installed(dirs, monkeypatch):
    """The name validates and the pool loads tokenizers only, with or without vLLM; without it, building the backend
    is a one-line error naming the install."""
    from switchkit.config import ConfigError, Recipe, validate
    from switchkit import vllm_backend

    validate(Recipe(generation=GenerationConfig(backend="vllm")))
    pool = load_pool(pool_config(dirs), "vllm")
    assert [c.model for c in pool.candidates] == [None, None] and pool[1].path == str(dirs["aligned"])
    assert pool[1].eos_token_ids == {pool[1].tokenizer.eos_token_id}
    monkeypatch.setattr(vllm_backend, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"needs vLLM, which is not installed: pip install"):
        SwitchEngine(pool, GenerationConfig(backend="vllm"))


def test_gpu_placement_follows_the_visible_devices(monkeypatch):
    from switchkit.config import ConfigError
    from switchkit.vllm_backend import physical_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_gpu(2) == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")  # e.g. a Ray task's three GPUs
    assert [physical_gpu(i) for i in range(3)] == ["3", "5", "6"]
    with pytest.raises(ConfigError, match="cuda:3 is not among the 3 visible GPUs"):
        physical_gpu(3)


@pytest.mark.parametrize("override, message", [
    ("synthesis.max_in_flight=0", "synthesis.max_in_flight=0 is out of range"),
    ("pool.candidates.1.memory=1.5", "pool.candidates.1.memory=1.5 is out of range"),
    ("generation.vllm.kv_cache_gb=0", "generation.vllm.kv_cache_gb=0.0 is out of range"),
    ("synthesis.executor=spark", "bad value for 'synthesis.executor'"),
    ("generation.backend=tgi", "generation.backend='tgi' is unknown: allowed are hf, vllm"),
])
def test_scale_settings_are_checked(override, message):
    from switchkit.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("demo", [override])
