"""Switcher trainer: learning, export/reload parity, resume, strategies, recipes and release (tiny models, CPU)."""

import csv
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchkit.artifacts import load_records, read_meta
from switchkit.config import ConfigError, load_recipe
from switchkit.io import InputError, write_jsonl_atomic
from switchkit.prompt import build_prompt, get_format
from switchkit.trainer import strategies
from switchkit.trainer.export import export_switcher
from switchkit.trainer.pipeline import fit_switcher, train_switcher, train_switcher_command
from switchkit.trainer.release import release_command

WORDS = ["France", "Canada", "Nigeria"]
FILLER = ["the quick brown fox", "lazy dog", "Paris is", "Ottawa", "the capital city"]


def records(count, n=2, tasks=("t",), seed=0):
    """A separable set: the label is the index of the country named in the query."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = i % n
        segs = [(rng.randrange(n), rng.choice(FILLER)) for _ in range(rng.randrange(3))]
        utils = [0.1 * rng.random() for _ in range(n)]
        utils[label] = 1.0
        rows.append({"prompt": build_prompt(f"What is the capital of {WORDS[label]}?", segs, n), "label": label,
                     "utilities": utils, "n": n, "k": 4, "task": tasks[i % len(tasks)], "query_id": str(i),
                     "trace": [{"model": m, "text": t, "n_tokens": 3} for m, t in segs], "seed": 0, "tie": False})
    return rows


def recipe_file(tmp_path, pool_dirs, n=2, **train):
    """A recipe over the tiny pool (the last dir is the aligned candidate) with ``train`` overrides."""
    train = {"lora": {"enabled": False}, "epochs": 8, "lr": 1e-2, "batch_size": 8, "micro_batch_size": 8,
             "val_fraction": 0.25, **train}
    roles = ["pretrained", "finetuned", "aligned"][-n:]
    cands = [{"source": str(d), "role": r} for d, r in zip(pool_dirs[-n:], roles)]
    recipe = {"name": "t", "run_dir": str(tmp_path / "run"), "pool": {"candidates": cands},
              "tasks": [{"name": "a", "source": "x.json"}, {"name": "b", "source": "y.json"}], "train": train}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl_atomic(path, records(96))
    return path


def step_losses(run_dir):
    rows = list(csv.DictReader(open(next((run_dir / "checkpoints" / "switcher").glob("logs/version_*/metrics.csv")))))
    return [float(r["train_loss"]) for r in rows if r.get("train_loss")]


@pytest.mark.parametrize("soft", [False, True])
def test_loss_falls_and_accuracy_passes_90(tmp_path, tiny_pool_dirs, data_file, soft):
    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, soft_targets=soft, soft_temperature=0.1))
    out, metrics = train_switcher(recipe, [data_file], progress=False)
    losses = step_losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert metrics["accuracy"] > 0.9
    assert metrics["utility_regret"] < 0.05
    assert len(metrics["per_class_accuracy"]) == 2 and 0 <= metrics["calibration_error"] <= 1
    assert metrics["val_records"] == 24 and metrics["train_records"] == 72
    assert 0 <= metrics["majority_accuracy"] <= 1
    meta = read_meta(out)
    assert meta.n == 2 and meta.prompt_format == "v1" and meta.adapter is False
    assert meta.metrics["accuracy"] == metrics["accuracy"]
    assert [c["role"] for c in meta.candidates] == ["finetuned", "aligned"]


def full_logit_probs(model, tokenizer, meta, prompts, max_length):
    """Probabilities the way an engine reads them: full next-token logits, then the n id tokens."""
    fmt = get_format(meta.prompt_format)
    vocab = fmt.vocab(tokenizer, meta.n)
    assert list(vocab.token_ids) == meta.model_id_tokens
    out = []
    for prompt in prompts:
        ids = torch.tensor([fmt.encode(tokenizer, vocab, prompt, max_length)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        out.append(logits[list(vocab.token_ids)].softmax(-1))
    return torch.stack(out)


def test_export_reloads_with_matching_probabilities(tmp_path, tiny_pool_dirs, data_file):
    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, epochs=2, lr=5e-3, max_length=48,
                                     lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    module, metrics, trainer = fit_switcher(recipe, [data_file], progress=False)
    prompts = [r["prompt"] for r in records(6, seed=3)]
    prompts.append("What is the capital of France?" + " <model 0 begins> the lazy dog <model 0 ends>" * 20
                   + build_prompt("", [], 2))  # longer than max_length: middle-truncated
    module_probs = module.decide_probs(prompts)

    adapter_dir = export_switcher(module, trainer, recipe, metrics, str(tiny_pool_dirs[-1]), tmp_path / "adapter")
    meta = read_meta(adapter_dir)
    assert meta.adapter and meta.base_model == str(tiny_pool_dirs[-1]) and meta.max_length == 48
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(meta.base_model, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    adapter_probs = full_logit_probs(reloaded, tokenizer, meta, prompts, recipe.train.max_length)
    torch.testing.assert_close(adapter_probs, module_probs, atol=1e-5, rtol=1e-4)

    recipe.train.merge_lora = True
    merged_dir = export_switcher(module, trainer, recipe, metrics, str(tiny_pool_dirs[-1]), tmp_path / "merged")
    assert not read_meta(merged_dir).adapter
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_probs = full_logit_probs(merged, tokenizer, meta, prompts, recipe.train.max_length)
    torch.testing.assert_close(merged_probs, module_probs, atol=1e-5, rtol=1e-4)


def test_exported_switcher_loads_in_engine(tmp_path, tiny_pool_dirs, data_file):
    from switchkit.engine import Segment, SwitchEngine, SwitchSequence
    from switchkit.models import load_pool
    from switchkit.policies import load_switcher

    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, epochs=2, lr=5e-3,
                                     lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}))
    module, metrics, trainer = fit_switcher(recipe, [data_file], progress=False)
    out = export_switcher(module, trainer, recipe, metrics, recipe.pool.candidates[-1].source, tmp_path / "switcher")
    engine = SwitchEngine(load_pool(recipe.pool), recipe.generation)
    policy = load_switcher(engine, str(out))
    seqs, prompts = [], []
    for i, (country, segs) in enumerate([("France", []), ("Canada", [(0, "Ottawa")]),
                                         ("France", [(1, "the lazy dog"), (0, "Paris is")])]):
        seq = SwitchSequence(f"What is the capital of {country}?", str(i), 0, [])
        seq.segments = [Segment(m, t, 2) for m, t in segs]
        seqs.append(seq)
        prompts.append(build_prompt(seq.query, segs, 2))
    engine_probs = policy.logprobs(seqs).softmax(-1)
    torch.testing.assert_close(engine_probs, module.decide_probs(prompts), atol=1e-5, rtol=1e-4)


def test_resume_continues_the_run(tmp_path, tiny_pool_dirs, data_file, capsys):
    path = recipe_file(tmp_path, tiny_pool_dirs, epochs=1)
    train_switcher(load_recipe(path), [data_file], progress=False)
    last = tmp_path / "run" / "checkpoints" / "switcher" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    train_switcher(load_recipe(path, ["train.epochs=3"]), [data_file], progress=False)
    second = torch.load(last, weights_only=True)
    assert "resuming from" in capsys.readouterr().out
    assert (first["epoch"], second["epoch"]) == (0, 2)  # saved at each epoch's end: the index of the finished epoch
    assert second["global_step"] == 3 * first["global_step"]
    # checkpoints hold trainable weights only; with full fine-tuning that is every weight
    assert all(k.startswith("model.") for k in second["state_dict"])


def test_lora_checkpoint_holds_only_adapter(tmp_path, tiny_pool_dirs, data_file):
    path = recipe_file(tmp_path, tiny_pool_dirs, epochs=1, lora={"enabled": True, "r": 4})
    train_switcher(load_recipe(path), [data_file], progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "switcher" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)


def test_command_trains_one_switcher_per_task(tmp_path, tiny_pool_dirs, capsys):
    data = tmp_path / "data.jsonl"
    write_jsonl_atomic(data, records(64, tasks=("a", "b")))
    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, epochs=1, per_task=True, data=[str(data)]))
    train_switcher_command(recipe)
    printed = capsys.readouterr().out
    for task in ("a", "b"):
        out = tmp_path / "run" / "task_switchers" / task
        assert read_meta(out).metrics["train_records"] == 24
        assert f"switcher for task {task}: {out}" in printed


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1", "train.lr"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("train.batch_size=10", "train.batch_size"),
    ("train.strategy=fsdp", "train.strategy"),
    ("train.precision=fp8", "train.precision"),
    ("train.val_fraction=1.0", "train.val_fraction"),
    ("train.soft_temperature=0", "train.soft_temperature"),
    ("train.lora.r=0", "train.lora.r"),
    ("train.bogus=1", "train.bogus"),
])
def test_bad_recipe_values_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe("demo", [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_records_name_file_and_row(tmp_path):
    rows = records(4)
    rows[2]["label"] = 5
    path = tmp_path / "bad.jsonl"
    write_jsonl_atomic(path, rows)
    with pytest.raises(InputError, match=r"bad.jsonl: row 2: field 'label'=5 is out of range"):
        load_records([path], n=2)
    write_jsonl_atomic(path, [{k: v for k, v in r.items() if k != "utilities"} for r in records(4)])
    with pytest.raises(InputError, match="missing field 'utilities'"):
        load_records([path], n=2)
    with pytest.raises(InputError, match="file not found"):
        load_records([tmp_path / "missing.parquet"], n=2)


def test_bad_lora_targets_are_a_config_error(tmp_path, tiny_pool_dirs, data_file):
    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, lora={"enabled": True, "target_modules": ["nope"]}))
    with pytest.raises(ConfigError, match="train.lora.target_modules"):
        fit_switcher(recipe, [data_file], progress=False)


def test_packaged_recipes_carry_the_paper_defaults():
    for name in ("global", "task"):
        r = load_recipe(name)
        assert [c.source for c in r.pool.candidates] == [
            "meta-llama/Llama-3.1-8B", "allenai/Llama-3.1-Tulu-3-8B-SFT", "allenai/Llama-3.1-Tulu-3-8B"]
        assert r.pool.candidates[-1].role == "aligned" and r.train.init is None
        assert (r.synthesis.k, r.synthesis.records_per_task) == (32, 10000)
        assert (r.train.epochs, r.train.lr, r.train.batch_size) == (5, 2e-4, 32)
        assert (r.generation.patch_size, r.switcher.top_p, r.generation.max_new_tokens) == (50, 0.7, 512)
        assert r.train.per_task == (name == "task")


def test_deepspeed_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe("demo", ["train.strategy=deepspeed_stage_2", "train.precision=bf16-mixed"])
    with pytest.raises(ConfigError, match="train.strategy=deepspeed_stage_2 needs CUDA"):
        strategies.resolve_strategy(recipe.train, "train")
    with pytest.raises(ConfigError, match="needs CUDA"):
        train_switcher_command(recipe)  # fails before any synthesis or model loading


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_strategy_resolves(monkeypatch, stage):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    recipe = load_recipe("global", [f"train.strategy=deepspeed_stage_{stage}"])
    strategy = strategies.resolve_strategy(recipe.train, "train")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.config["bf16"] == {"enabled": True}
    assert strategy.exclude_frozen_parameters == recipe.train.lora.enabled
    assert ("stage3_gather_16bit_weights_on_model_save" in strategy.config["zero_optimization"]) == (stage == 3)
    assert strategies.accumulation_steps(recipe.train) == 32 // (4 * 4)
    assert strategies.backbone_dtype(recipe.train) == torch.bfloat16
    with pytest.raises(ConfigError, match="bf16"):
        strategies.resolve_strategy(load_recipe("global", ["train.precision=32-true"]).train, "train")


def test_release_writes_a_model_card(tmp_path, tiny_pool_dirs, data_file):
    recipe = load_recipe(recipe_file(tmp_path, tiny_pool_dirs, epochs=1, lora={"enabled": True, "r": 4}))
    out, metrics = train_switcher(recipe, [data_file], progress=False)
    release = tmp_path / "release"
    release_command(ckpt=str(out), out=str(release))
    card = (release / "README.md").read_text()
    assert "| metric | value |" in card and f"| {metrics['accuracy']:.4f} |" in card
    assert "| 1 |" in card and "aligned" in card and "## Intended use" in card and "## Limits" in card
    assert (release / "adapter_model.safetensors").is_file() and read_meta(release).n == 2
    with pytest.raises(InputError, match="folder not found"):
        release_command(ckpt=str(tmp_path / "nope"), out=str(tmp_path / "r2"))
    with pytest.raises(InputError, match="not an exported switcher"):
        release_command(ckpt=str(tmp_path), out=str(tmp_path / "r3"))
