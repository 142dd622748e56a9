"""Switcher data synthesis on tiny random models: records, determinism, resume after a kill, shards + merge."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from switchkit.config import CandidateConfig, load_recipe
from switchkit.artifacts import load_records, synthesis_dir
from switchkit.data_synthesis.labels import choose_label
from switchkit.data_synthesis.plan import decision_points, trace_length
from switchkit.data_synthesis.store import merge_shards
from switchkit.data_synthesis.synthesize import run_synthesis, synthesize_command
from switchkit.io import InputError
from switchkit.prompt import build_prompt

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Canada?", "Ottawa"),
             ("Solve 12 + 30.", "42"), ("What is the capital of Canada? Answer briefly.", "Ottawa"),
             ("Which model should generate the next segment?", "model 0")]


def _tiny_reward_model(path, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_pool_dirs, tiny_tokenizer):
    """A recipe over three tiny same-tokenizer models and a small local task scored by a tiny reward model
    (random text would score 0 on every rule-based task; a reward model gives distinct utilities)."""
    root = tmp_path_factory.mktemp("synth")
    reward = _tiny_reward_model(root / "rm", tiny_tokenizer)
    task = root / "qa.jsonl"
    task.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QUESTIONS))
    roles = ["pretrained", "finetuned", "aligned"]
    cands = "\n".join(f"    - {{source: '{d}', role: {r}}}" for d, r in zip(tiny_pool_dirs, roles))
    path = root / "recipe.yaml"
    path.write_text(f"""name: synth-test
run_dir: {root / 'run'}
pool:
  candidates:
{cands}
  device: cpu
  cache_dir: {root / 'cache'}
generation: {{patch_size: 4, max_new_tokens: 16, temperature: 1.0, top_p: 1.0, batch_size: 64, seed: 3}}
tasks:
  - {{name: qa, type: reward_model, source: '{task}', split: dev, reward_model: '{reward}'}}
synthesis: {{k: 3, records_per_task: 8, chunk_size: 2, tie_rule: lowest}}
""")
    return path


def _recipe(path, out, *overrides):
    return load_recipe(str(path), [f"synthesis.output={out}", *overrides])


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory):
    """One uninterrupted in-process run."""
    out = tmp_path_factory.mktemp("ref") / "synthesis"
    recipe = _recipe(recipe_file, out)
    path = run_synthesis(recipe, progress=False)
    return recipe, path, load_records(path).to_list()


def test_records_follow_the_design(reference):
    recipe, path, rows = reference
    stats = json.loads((path.parent / "stats.json").read_text())
    assert path.name == "data.parquet" and len(rows) == 8 - stats["skipped_early_eos"] >= 6
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows) and {r["task"] for r in rows} == {"qa"}
    n = 3
    for r in rows:
        assert r["k"] == 3 and r["n"] == n and len(r["utilities"]) == n
        assert all(0.0 <= u <= 1.0 for u in r["utilities"])
        # the prompt is exactly the v1 prompt rebuilt from the stored trace
        assert r["prompt"] == build_prompt(r["query"], [(s["model"], s["text"]) for s in r["trace"]], n)
        assert r["prompt"].endswith("Please respond with a number from 0 to 2. The answer is model ")
        trace_tokens = sum(s["n_tokens"] for s in r["trace"])
        assert trace_tokens % 4 == 0 and 4 <= trace_tokens <= 8  # whole patches, before the aligned last patch
        assert r["trace"][0]["model"] == 2  # the aligned model writes the first patch
        best = max(r["utilities"])
        assert r["utilities"][r["label"]] == best
        assert r["tie"] == (r["utilities"].count(best) > 1)
        if r["tie"]:  # tie_rule=lowest
            assert r["label"] == r["utilities"].index(best)
        assert r["tokens"] > trace_tokens
    by_index = {r["index"]: r for r in rows}
    if 0 in by_index and 5 in by_index:  # queries cycle over the examples, with fresh seeds
        assert by_index[0]["query_id"] == by_index[5]["query_id"] == "qa/dev/0"
        assert by_index[0]["seed"] != by_index[5]["seed"]
    assert len({r["label"] for r in rows}) > 1  # the labels carry signal
    assert sum(stats["label_distribution"].values()) == len(rows) == stats["records"]
    assert stats["tokens_generated"] >= sum(r["tokens"] for r in rows)  # plus skipped traces


def test_rerun_reuses_the_finished_dataset(reference):
    recipe, path, rows = reference
    mtime = path.stat().st_mtime_ns
    assert run_synthesis(recipe, progress=False) == path and path.stat().st_mtime_ns == mtime


def test_shards_plus_merge_equal_a_single_run(reference, recipe_file, tmp_path, capsys):
    _, _, rows = reference
    dirs = []
    for shard in range(2):
        dirs.append(tmp_path / f"shard{shard}")
        out = run_synthesis(_recipe(recipe_file, dirs[-1], f"synthesis.shard={shard}", "synthesis.num_shards=2"),
                            progress=False)
        assert out.name == f"shard-{shard}-of-2.parquet"
        assert 0 < len(load_records(out)) < len(rows)
    synthesize_command(_recipe(recipe_file, tmp_path / "merged"), merge=",".join(map(str, dirs)))
    assert "labels: model 0:" in capsys.readouterr().out
    assert load_records(tmp_path / "merged").to_list() == rows
    with pytest.raises(InputError, match="chunks are missing"):
        merge_shards(_recipe(recipe_file, tmp_path / "partial"), [str(dirs[0])])


def test_resume_after_kill_equals_uninterrupted_run(reference, recipe_file, tmp_path):
    _, ref_path, rows = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "switchkit.cli", "synthesize", f"recipe={recipe_file}", f"synthesis.output={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and not list((out / "work").glob("chunk-*.json")):
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = sorted((out / "work").glob("chunk-*.json"))
    assert done and len(done) < 4 and not (out / "data.parquet").exists(), "the kill came too late"
    for chunk in done:  # nothing partial was left behind
        json.loads(chunk.read_text())
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "labels:" in resumed.stdout and "tie rate:" in resumed.stdout and "tokens generated:" in resumed.stdout
    assert load_records(out / "data.parquet").to_list() == rows
    for chunk in sorted((ref_path.parent / "work").glob("chunk-*.json")):
        assert (out / "work" / chunk.name).read_bytes() == chunk.read_bytes()


def test_seed_changes_the_records(reference, recipe_file, tmp_path):
    _, _, rows = reference
    other = run_synthesis(_recipe(recipe_file, tmp_path / "s", "generation.seed=4", "synthesis.records_per_task=2"),
                          progress=False)
    assert [r["trace"] for r in load_records(other).to_list()] != [r["trace"] for r in rows[:2]]


def test_changed_recipe_refuses_old_work(reference, recipe_file):
    recipe, path, _ = reference
    from switchkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"made with other settings \(synthesis.k changed\)"):
        run_synthesis(_recipe(recipe_file, path.parent, "synthesis.k=5"), progress=False)


def test_malformed_task_row_names_file_and_row(recipe_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    recipe = _recipe(recipe_file, tmp_path / "o", f"tasks.0.source={bad}", "tasks.0.type=f1_match")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: missing field 'output'"):
        run_synthesis(recipe, progress=False)


def test_tie_rules():
    assert choose_label([0.2, 0.5, 0.1], "drop", 2, 0) == (1, False)
    assert choose_label([0.5, 0.5, 0.1], "lowest", 2, 0) == (0, True)
    assert choose_label([0.5, 0.2, 0.5], "aligned", 2, 0) == (2, True)
    assert choose_label([0.5, 0.5, 0.1], "aligned", 2, 0) == (0, True)
    assert choose_label([0.5, 0.5, 0.1], "drop", 2, 0) == (None, True)
    picks = {choose_label([1.0, 1.0, 1.0], "random", 2, seed)[0] for seed in range(30)}
    assert picks == {0, 1, 2}
    assert choose_label([1.0, 1.0, 1.0], "random", 2, 7) == choose_label([1.0, 1.0, 1.0], "random", 2, 7)


def test_trace_length_is_patch_aligned_and_in_range(recipe_file):
    # 100 // 8 = 12 patches; decisions after patch 1 (the first, right after the aligned patch) .. 10
    recipe = load_recipe(str(recipe_file), ["generation.max_new_tokens=100", "generation.patch_size=8"])
    rng = random.Random(0)
    lengths = {trace_length(rng, recipe) for _ in range(500)}
    assert lengths == {8 * j for j in range(1, 11)}
    # the paper's setting: 512 // 50 = 10 patches, the first decision point included, the aligned last one not
    assert decision_points(load_recipe("global")) == (1, 8)
    assert decision_points(load_recipe("global", ["generation.aligned_first_last=false"])) == (1, 9)


def test_synthesis_dir_default(recipe_file):
    recipe = load_recipe(str(recipe_file))
    assert synthesis_dir(recipe) == Path(recipe.run_dir) / "synthesis"


def test_text_level_pool_and_shared_prefix_caches(tmp_path, recipe_file):
    """Different tokenizers (text level): engine.prefill fills every model's cache with the prefix, and
    run_chunk makes well-formed records."""
    from switchkit.data_synthesis.plan import plan
    from switchkit.data_synthesis.rollouts import run_chunk
    from switchkit.engine import SwitchEngine
    from switchkit.models import load_pool
    from switchkit.policies import RandomPolicy
    from switchkit.tasks import load_tasks
    from switchkit.testing import build_tokenizer, save_tiny_model

    dirs = [save_tiny_model(tmp_path / "a", build_tokenizer(300), seed=1),
            save_tiny_model(tmp_path / "b", build_tokenizer(400), seed=2)]
    recipe = load_recipe(str(recipe_file), ["synthesis.records_per_task=2", "tasks.0.type=f1_match"])
    recipe.pool.candidates = [CandidateConfig(source=str(dirs[0]), role="pretrained"),
                              CandidateConfig(source=str(dirs[1]), role="aligned")]
    pool = load_pool(recipe.pool)
    assert pool.mode == "text"
    engine = SwitchEngine(pool, recipe.generation)
    seqs = engine.start(["What is the capital of France?"], seeds=[0])
    engine.run(seqs, RandomPolicy(), max_tokens=8)
    engine.prefill(seqs)
    for view in seqs[0].views:  # every model has encoded its whole view, so forks reuse it
        assert view.state.ids == tuple(view.ids) and view.text_len == len(seqs[0].text)
    tasks = load_tasks(recipe.tasks)
    result = run_chunk(engine, tasks, plan(recipe, [len(tasks[0].examples)])[0], recipe)
    assert len(result["records"]) + len(result["skipped"]) == 2
    for r in result["records"]:
        assert r["prompt"] == build_prompt(r["query"], [(s["model"], s["text"]) for s in r["trace"]], 2)
        assert len(r["utilities"]) == 2 and r["k"] == 3
