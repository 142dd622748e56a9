"""The report renders from hand-made saved predictions: tables, plots, JSON, and re-runs change nothing."""

import json

import pytest

from switchkit.eval.report import report_command
from switchkit.eval.run import cell_path
from switchkit.io import InputError, write_json_atomic, write_jsonl_atomic

POOL = [
    {"index": 0, "name": "base", "role": "pretrained", "source": "b"},
    {"index": 1, "name": "chat", "role": "aligned", "source": "c"},
]
METHODS = [
    {"name": "single:base", "kind": "single", "ours": False, "collaborative": False},
    {"name": "single:chat", "kind": "single", "ours": False, "collaborative": False},
    {"name": "switch", "kind": "switch", "ours": True, "collaborative": True},
]
# per example: (base score, chat score, switch score, switch patch sequence)
EXAMPLES = [
    (1, 1, 1, [1, 0, 1]),
    (0, 0, 1, [1, 0, 1]),
    (1, 0, 1, [1, 0, 0, 1]),
    (0, 1, 0, [1, 1]),
    (0, 1, 1, [1, 0, 1]),
    (0, 0, 0, [1, 1, 1]),
]


def make_eval_dir(root):
    """An eval folder as `toolkit eval` leaves it, for one task split and one seed."""
    cells = []
    for m, method in enumerate(METHODS):
        rows = []
        for i, ex in enumerate(EXAMPLES):
            seq = ex[3] if method["collaborative"] else [m] * 2
            rows.append({"id": f"qa/test/{i}", "input": f"q{i}", "output": "x | y", "gold": "y", "score": float(ex[m]),
                         "extracted": "y" if ex[m] else "x",
                         "segments": [{"model": k, "text": "t", "n_tokens": 4} for k in seq], "switch_probs": [],
                         "seed": 0})
        path = cell_path(root, method["name"], "qa", "test", 0)
        write_jsonl_atomic(path, rows)
        cells.append({"method": method["name"], "task": "qa", "split": "test", "seed": 0, "n": len(rows),
                      "path": str(path.relative_to(root))})
    write_json_atomic(root / "results.json", {
        "recipe": "hand", "pool": POOL, "methods": METHODS, "tasks": [{"name": "qa", "type": "exact_match",
                                                                       "split": "test", "n": 6}],
        "seeds": [0], "cells": cells})
    return root


def test_report_renders_tables_plots_and_json(tmp_path):
    run_dir = tmp_path / "run"
    make_eval_dir(run_dir / "eval")
    out = report_command(str(run_dir))  # the run folder holding eval/
    md = (out / "report.md").read_text()
    for heading in ("## Methods x tasks", "## Significance against the best baseline", "## New skills",
                    "## P-performance and P-helpfulness", "## Switching frequency", "## Model use by position",
                    "## Switching sequences", "## How responses were scored (switch)", "## The answer"):
        assert heading in md
    # the lead: switch 4/6 vs the best single (chat, 3/6), paired over the six examples
    lead = json.loads((out / "report.json").read_text())["answer"]
    gain = lead["rows"][0]["gains"][0]
    assert gain["reference"] == "best single (single:chat)" and gain["gain"] == pytest.approx(1 / 6)
    assert gain["ci95"][0] <= 1 / 6 <= gain["ci95"][1] and 0 < gain["p"] < 1
    assert "- **switch** scores 66.7; gain over best single (single:chat) 16.7 [" in md
    # a few predictions per task with what the scorer extracted: two right, two wrong
    assert "| qa/test | q0 | x \\| y | y | y | 1.00 |" in md and "| qa/test | q3 | x \\| y | y | x | 0.00 |" in md
    # switch scores 4/6 = 66.67, the best single (chat) 3/6 = 50.00: switch is bold in the methods x tasks table
    assert "| switch | **66.67** | **66.67** |" in md
    assert "| single:chat | 50.00 | 50.00 |" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["best"] == {"qa/test": "switch"}
    sig = rep["significance"][0]
    assert sig["baseline"] == "single:chat" and sig["diff"] == pytest.approx(1 / 6)
    skills = rep["new_skills"]["switch"]["qa/test"]
    assert skills["counts"]["all_wrong"] == {"correct": 1, "wrong": 1}
    assert skills["new"] == pytest.approx(1 / 6) and skills["lost"] == pytest.approx(1 / 6)
    # P = 2/6, B = chat 3/6, C = 4/6
    pm = rep["p_metrics"]["switch"]["qa/test"]
    assert pm["p_performance"] == pytest.approx(-1 / 3) and pm["p_helpfulness"] == pytest.approx(1 / 3)
    assert rep["sequences"]["switch"]["2"][0]["label"] in ("A>P", "P>A")
    for png in ("gain_per_task.png", "position_usage.png", "sequences.png", "p_metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_report_rerun_reads_only_saved_predictions(tmp_path):
    eval_dir = make_eval_dir(tmp_path / "eval")
    cells = sorted((eval_dir / "cells").rglob("*.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    first = (report_command(str(eval_dir)) / "report.json").read_text()
    second = (report_command(str(eval_dir)) / "report.json").read_text()
    assert first == second
    assert {p: p.stat().st_mtime_ns for p in cells} == before


def test_report_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="no results.json"):
        report_command(str(tmp_path))
    eval_dir = make_eval_dir(tmp_path / "eval")
    next((eval_dir / "cells").rglob("seed0.jsonl")).write_text('{"id": "x"\n')
    with pytest.raises(InputError, match=r"seed0.jsonl:1: malformed JSON"):
        report_command(str(eval_dir))


def test_pooled_answer_over_runs(tmp_path):
    from switchkit.eval.report import pooled_report_command

    runs = [make_eval_dir(tmp_path / f"s{k}" / "eval") for k in range(2)]
    out = pooled_report_command(",".join(str(r.parent) for r in runs), str(tmp_path / "pooled"))
    result = json.loads((out / "answer.json").read_text())
    assert [r["run"] for r in result["runs"]] == [str(r.parent) for r in runs]
    single_run = result["runs"][0]["rows"][0]["gains"][0]
    pooled = result["pooled"]["rows"][0]["gains"][0]
    # switch beats the best single model (chat) on 2 of 6 examples and loses 1: +1/6 in each run and pooled
    assert single_run["reference"] == pooled["reference"] == "best single (single:chat)"
    assert single_run["gain"] == pytest.approx(1 / 6) and pooled["gain"] == pytest.approx(1 / 6)
    assert single_run["n"] == 6 and pooled["n"] == 12
    assert "## All runs pooled" in (out / "answer.md").read_text()
    with pytest.raises(InputError, match="exists"):
        pooled_report_command(",".join(str(r.parent) for r in runs), str(tmp_path / "s0"))
