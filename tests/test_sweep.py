"""eval.sweep: one cached method variant per setting of a switcher key, and the report's cost–quality curve."""

import json

import pytest

from switchkit.config import ConfigError, load_recipe
from switchkit.eval.methods import Method
from switchkit.eval.report_plots import plot_cost_quality
from switchkit.eval.report import report_command
from switchkit.eval.run import eval_command
from switchkit.io import read_jsonl
from switchkit.testing import save_tiny_switcher


SWEEP = ["eval.methods=[single:base,single:aligned,switch]", "eval.sweep=switcher.aligned_bias:-20,0,20"]


@pytest.fixture
def sweep_recipe(tiny_recipe, tiny_pool_dirs):
    """The tiny eval recipe with a trained-switcher export."""
    save_tiny_switcher(tiny_recipe.parent / "run" / "switcher", tiny_pool_dirs[2], ["base", "sft", "aligned"])
    return tiny_recipe


def count_calls(monkeypatch):
    calls = []
    original = Method.generate

    def counted(self, ctx, task, queries, seeds):
        calls.append(self.name)
        return original(self, ctx, task, queries, seeds)

    monkeypatch.setattr(Method, "generate", counted)
    return calls


def test_sweep_runs_each_setting_as_a_cached_method_and_reports_the_curve(sweep_recipe, monkeypatch):
    calls = count_calls(monkeypatch)
    summary = eval_command(load_recipe(str(sweep_recipe), SWEEP))
    names = [m["name"] for m in summary["methods"]]
    assert names == ["single:base", "single:aligned", "switch[aligned_bias=-20]", "switch[aligned_bias=0]",
                     "switch[aligned_bias=20]"]
    cells = sweep_recipe.parent / "run" / "eval" / "cells"
    toward = read_jsonl(cells / "switch_aligned_bias_20_" / "qa" / "test" / "seed0.jsonl")
    away = read_jsonl(cells / "switch_aligned_bias_-20_" / "qa" / "test" / "seed0.jsonl")
    assert all(g["model"] == 2 for r in toward for g in r["segments"])
    assert all(p[2] < 1e-6 for r in away for p in r["switch_probs"][1:-1])

    # cached per setting: a rerun generates nothing; a new value generates only its own cells
    calls.clear()
    eval_command(load_recipe(str(sweep_recipe), SWEEP))
    assert calls == []
    eval_command(load_recipe(str(sweep_recipe), [SWEEP[0], "eval.sweep=switcher.aligned_bias:-20,0,5,20"]))
    assert set(calls) == {"switch[aligned_bias=5]"}

    out = report_command(str(sweep_recipe.parent / "run"))
    rep = json.loads((out / "report.json").read_text())
    line = rep["sweep"]["lines"][0]
    assert (line["method"], line["key"]) == ("switch", "aligned_bias")
    assert [p["value"] for p in line["points"]] == [-20, 0, 5, 20]
    aligned = [p["share"][2] for p in line["points"]]
    assert aligned == sorted(aligned) and aligned[0] < aligned[-1] == 1.0
    assert [(p["method"], p["share"]) for p in rep["sweep"]["reference"]] == [("single:base", [1, 0, 0]),
                                                                              ("single:aligned", [0, 0, 1])]
    markdown = (out / "report.md").read_text()
    assert "## Cost–quality sweep" in markdown and "| switch | aligned_bias=-20 |" in markdown
    assert (out / "cost_quality.png").stat().st_size > 0 and "cost_quality.png" in markdown


def test_sweep_errors_name_the_key(sweep_recipe):
    for bad, message in [("generation.temperature:0,1", "give switcher.KEY:V1,V2"),
                         ("switcher.aligned_bias:low,high", "comma-separated numbers"),
                         ("switcher.aligned_bias:1,1", "a value repeats")]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(str(sweep_recipe), [SWEEP[0], f"eval.sweep={bad}"])
    with pytest.raises(ConfigError, match=r"eval.sweep=switcher.top_p:0,0.5: switcher.top_p=0.0 is out of range"):
        eval_command(load_recipe(str(sweep_recipe), [SWEEP[0], "eval.sweep=switcher.top_p:0,0.5"]))


def test_the_curve_over_several_tasks_has_no_ci_bars(tmp_path):
    """Over several tasks a point's score is a mean of task means, without a CI: the curve is drawn without bars."""
    point = lambda v, share: {"value": v, "method": f"switch[aligned_bias={v}]", "score": 0.5, "ci95": None,
                              "share": share}
    rep = {"pool": [{"name": "base", "role": "pretrained", "index": 0}, {"name": "chat", "role": "aligned", "index": 1}],
           "sweep": {"lines": [{"method": "switch", "key": "aligned_bias", "points": [point(-1, [0.6, 0.4]),
                                                                                        point(1, [0.1, 0.9])]}],
                     "reference": [{"method": "single:base", "score": 0.4, "ci95": None, "share": [1.0, 0.0]}]}}
    assert plot_cost_quality(rep, tmp_path / "cost_quality.png")
    assert (tmp_path / "cost_quality.png").stat().st_size > 0
