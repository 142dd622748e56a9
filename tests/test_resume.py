"""Kill-and-resume of the long jobs on the tiny pool: ``toolkit generate``, ``eval``, ``train-switcher`` and
``distill`` are killed with SIGKILL (a real process) once their first batch or checkpoint is saved, rerun with the
same command (in this process, to keep the suite fast), and end with the same bytes, weights and numbers as an
uninterrupted run. (``synthesize`` has its own in test_synthesis.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from switchkit.cli import distill_and_evaluate, main
from switchkit.config import load_recipe
from switchkit.eval.run import eval_command
from switchkit.io import write_jsonl_atomic
from switchkit.prompt import build_prompt
from switchkit.runner import generate_command
from switchkit.trainer.pipeline import train_switcher_command

COUNTRIES = [("France", "Paris"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Japan", "Tokyo"),
             ("Egypt", "Cairo")]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_pool_dirs):
    """A recipe over the tiny pool: LoRA switcher on 96 records, LoRA distillation on a 6-question task."""
    root = tmp_path_factory.mktemp("resume")
    (root / "qa.jsonl").write_text("".join(json.dumps({"input": f"What is the capital of {c}?", "output": [a]}) + "\n"
                                           for c, a in COUNTRIES))
    write_jsonl_atomic(root / "records.jsonl", [
        {"prompt": build_prompt(f"What is the capital of {COUNTRIES[i % 6][0]}?", [], 3), "label": i % 3,
         "utilities": [float(j == i % 3) for j in range(3)], "query_id": str(i % 24)} for i in range(96)])
    cands = "\n".join(f"    - {{source: '{d}', role: {r}}}" for d, r in
                      zip(tiny_pool_dirs, ["pretrained", "finetuned", "aligned"]))
    path = root / "recipe.yaml"
    path.write_text(f"""name: resume
pool:
  candidates:
{cands}
  device: cpu
generation: {{patch_size: 3, max_new_tokens: 9, temperature: 0.7, batch_size: 6}}
tasks: [{{name: qa, type: f1_match, source: '{root / 'qa.jsonl'}', split: dev}}]
train: {{data: ['{root / 'records.jsonl'}'], epochs: 8, lr: 0.01, batch_size: 8, micro_batch_size: 8,
        lora: {{r: 4}}}}
distill: {{epochs: 12, lr: 0.01, batch_size: 2, micro_batch_size: 2}}
eval: {{splits: [test]}}
""")
    return path


def kill_after_first_checkpoint(cmd, saved):
    """Run ``cmd`` and SIGKILL its process group as soon as the file ``saved`` exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and not saved.exists():
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def assert_same_weights(folder_a, folder_b, name):
    a, b = load_file(folder_a / name), load_file(folder_b / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory):
    """An uninterrupted run (in-process): the switcher, then distillation and its report."""
    run = tmp_path_factory.mktemp("reference") / "run"
    recipe = load_recipe(str(recipe_file), [f"run_dir={run}"])
    train_switcher_command(recipe)
    distill_and_evaluate(recipe)
    return run


def test_generate_killed_and_rerun_equals_uninterrupted(recipe_file, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"input": f"Name a city in {c}."}) + "\n" for c, _ in COUNTRIES * 2))
    args = [f"recipe={recipe_file}", f"input={inputs}", "switcher.policy=random", "generation.batch_size=1"]
    generate_command(load_recipe(str(recipe_file), args[2:]), input=str(inputs), output=str(tmp_path / "ref.jsonl"))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "switchkit.cli", "generate", *args, f"output={out}"]
    kill_after_first_checkpoint(cmd, out.with_name("out.jsonl.parts") / "00000.jsonl")
    saved = sorted(out.with_name("out.jsonl.parts").glob("0*.jsonl"))
    assert saved and len(saved) < 12 and not out.exists(), "the kill came too late"
    resumed = CliRunner().invoke(main, cmd[3:])
    assert resumed.exit_code == 0, resumed.output
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_eval_killed_and_rerun_equals_uninterrupted(recipe_file, tmp_path):
    args = [f"recipe={recipe_file}", "eval.methods=[single,random]", "generation.batch_size=2"]
    eval_command(load_recipe(str(recipe_file), [f"run_dir={tmp_path / 'ref'}", *args[1:]]))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "switchkit.cli", "eval", *args, f"run_dir={run}"]
    kill_after_first_checkpoint(cmd, run / "eval" / "cells" / "single_base" / "qa" / "test" / "seed0.jsonl")
    assert not (run / "eval" / "cells" / "random").exists(), "the kill came too late"
    resumed = CliRunner().invoke(main, cmd[3:])
    assert resumed.exit_code == 0, resumed.output
    cells = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("seed0.jsonl"))
    assert len(cells) == 4 and not list(run.rglob("*.parts"))
    for cell in cells:
        assert (run / cell).read_bytes() == (tmp_path / "ref" / cell).read_bytes()


def test_train_switcher_killed_and_rerun_equals_uninterrupted(recipe_file, reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "switchkit.cli", "train-switcher", f"recipe={recipe_file}", f"run_dir={run}"]
    kill_after_first_checkpoint(cmd, run / "checkpoints" / "switcher" / "last.ckpt")
    first = torch.load(run / "checkpoints" / "switcher" / "last.ckpt", weights_only=True)
    assert first["epoch"] < 7 and not (run / "switcher").exists(), "the kill came too late"
    resumed = CliRunner().invoke(main, cmd[3:])  # the same command, rerun in this process
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    assert torch.load(run / "checkpoints" / "switcher" / "last.ckpt", weights_only=True)["epoch"] == 7
    assert_same_weights(run / "switcher", reference / "switcher", "adapter_model.safetensors")
    ref_meta = json.loads((reference / "switcher" / "switchkit.json").read_text())
    meta = json.loads((run / "switcher" / "switchkit.json").read_text())
    # per key: pytest >= 9.2's approx takes no list nested in a dict
    assert meta["metrics"].keys() == ref_meta["metrics"].keys()
    assert all(meta["metrics"][k] == pytest.approx(v, rel=1e-5) for k, v in ref_meta["metrics"].items())
    # a third run of the same job finds it done and changes nothing
    mtime = (run / "switcher" / "adapter_model.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(main, cmd[3:])
    assert again.exit_code == 0 and "is up to date" in again.output
    assert (run / "switcher" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_distill_killed_and_rerun_equals_uninterrupted(recipe_file, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference / "switcher", run / "switcher")  # the trained switcher distillation starts from
    cmd = [sys.executable, "-m", "switchkit.cli", "distill", f"recipe={recipe_file}", f"run_dir={run}"]
    kill_after_first_checkpoint(cmd, run / "checkpoints" / "distill" / "last.ckpt")
    first = torch.load(run / "checkpoints" / "distill" / "last.ckpt", weights_only=True)
    assert first["epoch"] < 11 and not (run / "distilled").exists(), "the kill came too late"
    resumed = CliRunner().invoke(main, cmd[3:])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    assert_same_weights(run / "distilled", reference / "distilled", "model.safetensors")
    for path in ("distill/generations/qa.jsonl", "eval/cells/distilled/qa/test/seed0.jsonl"):
        assert (run / path).read_bytes() == (reference / path).read_bytes()
    report, ref_report = (json.loads((r / "distill" / "report.json").read_text()) for r in (run, reference))
    assert report["per_task"] == ref_report["per_task"]
