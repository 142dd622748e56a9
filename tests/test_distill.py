"""Distillation: response-only loss masking, a tiny-pool end-to-end run, plain-transformers export, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchkit.config import load_recipe
from switchkit.distill.data import IGNORE, collate, encode_pair
from switchkit.distill.module import DistillModule
from switchkit.distill.pipeline import distill_command, read_generations
from switchkit.eval.distilled import evaluate_distilled
from switchkit.io import InputError, read_jsonl, write_jsonl_atomic
from switchkit.prompt import build_prompt
from switchkit.trainer.pipeline import train_switcher

COUNTRIES = [("France", "Paris"), ("Canada", "Ottawa"), ("Nigeria", "Abuja"), ("Japan", "Tokyo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo")]


def test_prompt_tokens_contribute_nothing(tiny_pool_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_pool_dirs[2])
    model = AutoModelForCausalLM.from_pretrained(tiny_pool_dirs[2])
    row = encode_pair(tok, "What is the capital of France?", "Paris.", "Q: {query}\nA:", max_length=64)
    n_answer = len(tok("Paris.", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert row["labels"][-n_answer:] == row["input_ids"][-n_answer:]
    assert row["labels"][:-n_answer] == [IGNORE] * (len(row["input_ids"]) - n_answer)
    batch = collate([row, encode_pair(tok, "Hi?", "Hello there.", "{query}", 64)], tok.pad_token_id)
    module = DistillModule(model, tok, lr=1e-4)
    loss = module(**batch)
    # the same loss from response positions only, computed by hand
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    manual = F.cross_entropy(logits[target != IGNORE], target[target != IGNORE])
    assert torch.allclose(loss, manual, atol=1e-5)
    # exactly the response tokens (and their EOS) of both rows are counted
    second = len(tok("Hello there.", add_special_tokens=False)["input_ids"]) + 1
    assert int((target != IGNORE).sum()) == n_answer + second


def _recipe(tmp_path, pool_dirs, **distill):
    task = {"task_type": "exact_match",
            "dev": [{"input": f"What is the capital of {c}?", "output": a} for c, a in COUNTRIES],
            "test": [{"input": f"What is the capital of {c}?", "output": a} for c, a in COUNTRIES[:4]]}
    (tmp_path / "capitals.json").write_text(json.dumps(task))
    cands = [{"source": str(pool_dirs[0]), "role": "pretrained", "name": "base"},
             {"source": str(pool_dirs[2]), "role": "aligned", "name": "aligned"}]
    recipe = {
        "name": "d", "run_dir": str(tmp_path / "run"), "pool": {"candidates": cands},
        "generation": {"patch_size": 4, "max_new_tokens": 8, "batch_size": 4},
        "tasks": [{"name": "capitals", "type": "exact_match", "source": str(tmp_path / "capitals.json"), "split": "dev"}],
        "train": {"lora": {"enabled": False}, "epochs": 1, "batch_size": 4, "micro_batch_size": 4, "val_fraction": 0.0},
        "eval": {"splits": ["test"]},
        "distill": {"epochs": 1, "batch_size": 4, "micro_batch_size": 2, "max_length": 64, "val_fraction": 0.25,
                    "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, **distill},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return load_recipe(str(path))


def test_tiny_pool_end_to_end(tmp_path, tiny_pool_dirs):
    recipe = _recipe(tmp_path, tiny_pool_dirs)
    records = [{"prompt": build_prompt(f"What is the capital of {c}?", [], 2), "label": i % 2, "utilities": [1.0 - i % 2, i % 2],
                "task": "capitals"} for i, (c, _) in enumerate(COUNTRIES)]
    write_jsonl_atomic(tmp_path / "records.jsonl", records)
    train_switcher(recipe, [tmp_path / "records.jsonl"], progress=False)
    distill_command(recipe)
    report = evaluate_distilled(recipe)
    assert set(report["per_task"]) == {"capitals/test"}
    assert report["forward_passes_per_response"]["distilled"] > 0
    saved = json.loads((tmp_path / "run" / "distill" / "report.json").read_text())
    assert saved["per_task"] == report["per_task"]
    # the LoRA run exports a merged model that plain transformers loads (no peft adapter files)
    out = tmp_path / "run" / "distilled"
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    # generations are cached: a second run reuses them and the eval cells
    gen_files = list((tmp_path / "run" / "distill" / "generations").rglob("*.jsonl"))
    assert [len(read_jsonl(f)) for f in gen_files] == [len(COUNTRIES)]
    mtime = gen_files[0].stat().st_mtime_ns
    distill_command(recipe)
    assert gen_files[0].stat().st_mtime_ns == mtime


def test_generations_file_must_match_recipe_tasks(tmp_path, tiny_pool_dirs):
    recipe = _recipe(tmp_path, tiny_pool_dirs, min_score=0.5)
    wrong_task = tmp_path / "wrong_task.jsonl"
    write_jsonl_atomic(wrong_task, [{"input": "What is the capital of France?", "output": "Paris", "task": "gsm8k"}])
    with pytest.raises(InputError, match="record 1 has task 'gsm8k', which the recipe does not have"):
        read_generations(recipe, str(wrong_task))
    unknown_input = tmp_path / "unknown_input.jsonl"
    write_jsonl_atomic(unknown_input, [{"input": "What is 2 + 2?", "output": "4"}])
    with pytest.raises(InputError, match="record 1: its input matches no example"):
        read_generations(recipe, str(unknown_input))
    ok = tmp_path / "ok.jsonl"
    write_jsonl_atomic(ok, [{"input": "What is the capital of France?", "output": "The answer is Paris"}])
    assert read_generations(recipe, str(ok))[0]["score"] == 1.0
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "x", "output": "y"}\n{oops\n')
    with pytest.raises(InputError, match="broken.jsonl:2: malformed JSON"):
        read_generations(recipe, str(broken))
