"""Eval: analyses on hand-made logs with known answers, the method registry, and the cached eval runner."""

import json
import shutil

import pytest

from switchkit.config import ConfigError, load_recipe
from switchkit.eval import analysis
from switchkit.eval.methods import REGISTRY, Method, build_methods, register
from switchkit.eval.run import eval_command
from switchkit.io import InputError, read_jsonl
from switchkit.testing import save_tiny_switcher


def rec(models, score, id_=None):
    return {"id": id_, "score": score, "segments": [{"model": m, "text": "x", "n_tokens": 4} for m in models]}


LOGS = [rec([1, 0, 1], 1.0), rec([1, 1], 0.0), rec([1, 0, 0, 1], 1.0), rec([0, 1], 0.5)]


def test_sequence_frequency_and_treatment_effect():
    two = {r["pattern"]: r for r in analysis.sequence_effects(LOGS, 2)}
    assert set(two) == {"0>1", "1>0"}
    # 1>0 is used by responses 1 and 3 (scores 1, 1); the others score 0 and 0.5
    assert two["1>0"]["frequency"] == 0.5
    assert two["1>0"]["effect"] == pytest.approx(1.0 - 0.25)
    assert two["0>1"]["frequency"] == 0.75
    assert two["0>1"]["effect"] == pytest.approx(2.5 / 3 - 0.0)
    three = analysis.sequence_effects(LOGS, 3)
    assert [(r["pattern"], r["n_with"], r["effect"]) for r in three] == [("1>0>1", 2, pytest.approx(0.75))]
    # a pattern every response uses has no "without" group, so no effect
    assert analysis.sequence_effects(LOGS[:1], 2)[0]["effect"] is None


def test_position_shares_and_switching_frequency():
    pos = analysis.position_usage(LOGS, 2)
    # begin: 1,1,1,0 -> model 0 has 1 of 4; middle: patches 0 (r1), 0, 0 (r3) -> all model 0; end: all model 1
    assert pos["begin"] == [0.25, 0.75] and pos["middle"] == [1.0, 0.0] and pos["end"] == [0.0, 1.0]
    assert pos["patches"] == {"begin": 4, "middle": 3, "end": 4}
    freq = analysis.switching_frequency(LOGS)
    assert freq["switches_per_response"] == 5 / 4
    assert freq["switches_per_boundary"] == 5 / 7
    assert freq["responses_with_switch"] == 3 / 4
    assert analysis.model_share(LOGS, 2) == [4 / 11, 7 / 11]


def test_new_skills_counts():
    singles = {"a": {"e1": 1, "e2": 0, "e3": 1, "e4": 0}, "b": {"e1": 1, "e2": 0, "e3": 0, "e4": 1}}
    collab = {"e1": 0, "e2": 1, "e3": 1, "e4": 0, "e5": 1}  # e5 has no single-model score: ignored
    t = analysis.new_skills(collab, singles)
    assert t["n"] == 4
    assert t["counts"] == {"all_correct": {"correct": 0, "wrong": 1}, "some_correct": {"correct": 1, "wrong": 1},
                           "all_wrong": {"correct": 1, "wrong": 0}}
    assert (t["new"], t["lost"], t["net"]) == (0.25, 0.5, -0.25)


def test_p_metrics_and_significance():
    pm = analysis.p_metrics(0.2, [0.4, 0.5], 0.6)
    assert pm["p_performance"] == pytest.approx(-0.6) and pm["p_helpfulness"] == pytest.approx(0.2)
    ids = [str(i) for i in range(200)]
    base = {i: float(int(i) % 2) for i in ids}  # 50 %
    better = {i: 1.0 if int(i) % 4 else 0.0 for i in ids}  # 75 %, a superset of the base's right answers
    test = analysis.paired_test(better, base)
    assert test["diff"] == pytest.approx(0.25) and test["t"] > 5 and test["p"] < 1e-6
    assert analysis.stars(test["p"]) == "***"
    assert analysis.paired_test(base, better)["p"] > 0.99  # one-tailed: worse is not significant
    assert analysis.paired_test(base, base) == {"n": 200, "diff": 0.0, "t": None, "p": 0.5}
    lo, hi = analysis.bootstrap_ci(list(better.values()))
    assert lo < 0.75 < hi and hi - lo < 0.2


def test_unknown_method_lists_the_registered_ones(tmp_path):
    recipe = load_recipe("demo", ["eval.methods=[single,routing]"])
    with pytest.raises(ConfigError, match=r"unknown method 'routing': registered are .*random.*switch-task"):
        build_methods(recipe)
    with pytest.raises(ConfigError, match="single:llama names no candidate: allowed are gemma-3-270m"):
        build_methods(recipe, ["single:llama"])
    names = [m.name for m in build_methods(recipe, ["single", "single:1", "random"])]
    assert names == ["single:gemma-3-270m", "single:smollm2-135m-instruct", "random"]


def test_missing_artifact_names_path_and_command(tmp_path):
    recipe = load_recipe("demo", [f"run_dir={tmp_path}/run", "eval.methods=[switch-task]"])
    with pytest.raises(ConfigError, match=r"task_switchers/capitals/switchkit.json, which does not exist: "
                                          r"run `toolkit train-switcher recipe=demo train.per_task=true`"):
        eval_command(recipe)
    recipe = load_recipe("demo", [f"run_dir={tmp_path}/run", "eval.methods=[distilled]"])
    with pytest.raises(ConfigError, match=r"run/distilled/config.json, which does not exist: run `toolkit distill"):
        eval_command(recipe)


def test_unknown_task_is_a_clear_error(tmp_path):
    recipe = load_recipe("demo", [f"run_dir={tmp_path}", "eval.methods=[random]",
                                  "eval.tasks.0.source=builtin:nope"])
    with pytest.raises(InputError, match="unknown builtin task 'builtin:nope'"):
        eval_command(recipe)


def count_calls(monkeypatch, fail_after=None):
    """Count Method.generate calls (one per batch), optionally failing after some calls."""
    calls = []
    original = Method.generate

    def counted(self, ctx, task, queries, seeds):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append((self.name, len(queries)))
        return original(self, ctx, task, queries, seeds)

    monkeypatch.setattr(Method, "generate", counted)
    return calls


def test_eval_end_to_end_resumes_and_never_recomputes(tiny_recipe, monkeypatch):
    recipe = load_recipe(str(tiny_recipe))
    eval_dir = tiny_recipe.parent / "run" / "eval"
    # interrupted after 4 batches: single:base finished (3 batches), single:sft has 1 batch saved
    calls = count_calls(monkeypatch, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        eval_command(recipe)
    assert (eval_dir / "cells/single_base/qa/test/seed0.jsonl").is_file()
    assert len(list((eval_dir / "cells/single_sft/qa/test/seed0.jsonl.parts").glob("0*.jsonl"))) == 1
    monkeypatch.undo()

    calls = count_calls(monkeypatch)
    summary = eval_command(recipe)
    # resumed: single:sft regenerates only its 3 missing examples; then aligned, random, untuned in full
    assert calls[0] == ("single:sft", 2) and sum(n for m, n in calls if m == "single:sft") == 3
    assert {m for m, _ in calls} == {"single:sft", "single:aligned", "random", "untuned"}
    assert [c["method"] for c in summary["cells"]] == ["single:base", "single:sft", "single:aligned", "random", "untuned"]
    assert not list(eval_dir.rglob("*.parts"))
    rows = read_jsonl(eval_dir / "cells/untuned/qa/test/seed0.jsonl")
    assert [r["id"] for r in rows] == [f"qa/test/{i}" for i in range(5)]
    assert all(0 <= r["score"] <= 1 and r["segments"] and r["segments"][0]["model"] == 2 for r in rows)
    assert all(len(r["switch_probs"][0]) == 3 for r in rows if r["switch_probs"])
    single = read_jsonl(eval_dir / "cells/single_sft/qa/test/seed0.jsonl")
    assert all({s["model"] for s in r["segments"]} == {1} for r in single)
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["pool"][0]["role"] == "pretrained" and len(results["cells"]) == 5

    # a finished run is never recomputed
    monkeypatch.undo()
    calls = count_calls(monkeypatch)
    mtimes = {p: p.stat().st_mtime_ns for p in eval_dir.rglob("seed0.jsonl")}
    eval_command(recipe)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in eval_dir.rglob("seed0.jsonl")} == mtimes

    # cached cells are never reused under other settings: a smaller task or another patch size is an error
    with pytest.raises(ConfigError, match=r"seed0.jsonl was made with other settings \(task changed\)"):
        eval_command(load_recipe(str(tiny_recipe), ["eval.limit=3"]))
    with pytest.raises(ConfigError, match=r"generation.patch_size changed"):
        eval_command(load_recipe(str(tiny_recipe), ["generation.patch_size=2"]))


def test_a_new_baseline_is_one_small_class(tiny_recipe, monkeypatch, tmp_path):
    """A policy registered once in the core is an eval method and a `toolkit generate` policy alike."""
    from switchkit import policies
    from switchkit.runner import generate_command

    monkeypatch.setitem(policies.POLICIES, "alternate", None)  # removed from the registry after the test

    @policies.register_policy("alternate")
    class Alternate(policies.Policy):
        explicit = True

        def choose(self, engine, seqs):
            return [(m, policies.one_hot(3, m)) for m in ([2, 0, 1][len(s.segments) % 3] for s in seqs)]

    recipe = load_recipe(str(tiny_recipe), ["eval.methods=[alternate]", "eval.limit=2"])
    eval_command(recipe)
    rows = read_jsonl(tiny_recipe.parent / "run/eval/cells/alternate/qa/test/seed0.jsonl")
    assert [s["model"] for s in rows[0]["segments"]] == [2, 0, 1][: len(rows[0]["segments"])]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input": "What is the capital of Peru?"}) + "\n")
    generate_command(load_recipe(str(tiny_recipe), ["switcher.policy=alternate"]), input=str(src),
                     output=str(tmp_path / "out.jsonl"))
    assert [s["model"] for s in read_jsonl(tmp_path / "out.jsonl")[0]["segments"]][:2] == [2, 0]

    # an eval-only method is one small class too
    monkeypatch.setitem(REGISTRY, "echo", None)  # removed from the registry after the test

    @register("echo")
    class Echo(Method):
        collaborative = False

        def generate(self, ctx, task, queries, seeds):
            return [{"output": q, "segments": []} for q in queries]

    summary = eval_command(load_recipe(str(tiny_recipe), ["eval.methods=[echo]", "eval.limit=2"]))
    assert summary["cells"][0]["mean"] == 0.0


def test_switch_and_distilled_use_their_run_dir_artifacts(tiny_recipe, tiny_pool_dirs):
    run = tiny_recipe.parent / "run"
    # a switcher export (HF weights + switchkit.json) and a distilled HF folder, as the trainer and distiller leave them
    save_tiny_switcher(run / "switcher", tiny_pool_dirs[2], ["base", "sft", "aligned"])
    shutil.copytree(tiny_pool_dirs[1], run / "distilled")
    recipe = load_recipe(str(tiny_recipe), ["eval.methods=[switch,distilled]", "eval.limit=2"])
    summary = eval_command(recipe)
    assert [(c["method"], c["n"]) for c in summary["cells"]] == [("switch", 2), ("distilled", 2)]
    assert all(m["ours"] for m in summary["methods"])
    rows = read_jsonl(run / "eval/cells/switch/qa/test/seed0.jsonl")
    assert all(len(p) == 3 and sum(p) == pytest.approx(1, abs=1e-4) for r in rows for p in r["switch_probs"])


def test_per_task_lora_switchers_and_the_global_one_in_one_run(tmp_path, tiny_pool_dirs):
    """recipe=task with LoRA: one switcher per task, then both and the global switcher evaluated in one run
    (each LoRA switcher is its own named adapter on the aligned weights, unloaded when the next one loads)."""
    from switchkit.prompt import build_prompt
    from switchkit.trainer.pipeline import train_switcher_command

    files = {}
    for task, countries in {"a": ["France", "Peru", "Chile"], "b": ["Kenya", "Japan", "Egypt"]}.items():
        files[task] = tmp_path / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps({"input": f"What is the capital of {c}?", "output": c}) + "\n"
                                       for c in countries))
    records = [{"prompt": build_prompt(f"What is the capital of {c}?", [], 3), "label": i % 3,
                "utilities": [float(i % 3 == j) for j in range(3)], "task": t, "query_id": f"{t}/{c}"}
               for t, cs in {"a": ["France", "Peru", "Chile"], "b": ["Kenya", "Japan", "Egypt"]}.items()
               for i, c in enumerate(cs * 2)]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    base, sft, aligned = tiny_pool_dirs
    recipe = {
        "name": "task", "run_dir": str(tmp_path / "run"),
        "pool": {"candidates": [{"source": str(base), "role": "pretrained"}, {"source": str(sft), "role": "finetuned"},
                                {"source": str(aligned), "role": "aligned"}], "device": "cpu"},
        "generation": {"patch_size": 3, "max_new_tokens": 9, "temperature": 0.7, "batch_size": 4},
        "tasks": [{"name": t, "type": "f1_match", "source": str(f)} for t, f in files.items()],
        "train": {"per_task": True, "data": [str(data)], "epochs": 1, "batch_size": 4, "micro_batch_size": 4,
                  "val_fraction": 0.0, "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["q_proj"]}},
        "eval": {"methods": ["switch-task", "switch-global"], "splits": ["dev"]},
    }
    path = tmp_path / "task.yaml"
    path.write_text(json.dumps(recipe))
    train_switcher_command(load_recipe(str(path)))
    train_switcher_command(load_recipe(str(path), ["train.per_task=false"]))
    assert all((tmp_path / "run" / "task_switchers" / t / "adapter_model.safetensors").is_file() for t in "ab")
    summary = eval_command(load_recipe(str(path)))
    assert [(c["method"], c["task"], c["n"]) for c in summary["cells"]] == [
        ("switch-task", "a", 3), ("switch-task", "b", 3), ("switch-global", "a", 3), ("switch-global", "b", 3)]
    for cell in summary["cells"]:
        rows = read_jsonl(tmp_path / "run" / "eval" / cell["path"])
        assert all(len(p) == 3 for r in rows for p in r["switch_probs"])


def test_oracle_is_the_per_example_best_single_and_never_a_baseline(tiny_recipe):
    recipe = load_recipe(str(tiny_recipe), ["eval.methods=[oracle, random]", "eval.limit=3"])
    summary = eval_command(recipe)
    assert [c["method"] for c in summary["cells"]] == [
        "single:base", "single:sft", "single:aligned", "random", "oracle"]  # oracle brings the singles, runs last
    cells = {c["method"]: read_jsonl(tiny_recipe.parent / "run" / "eval" / c["path"]) for c in summary["cells"]}
    for i, row in enumerate(cells["oracle"]):
        assert row["score"] == max(cells[f"single:{n}"][i]["score"] for n in ("base", "sft", "aligned"))
    from switchkit.eval.report import build_report

    rep = build_report(tiny_recipe.parent / "run" / "eval")
    assert rep["ceilings"] == ["oracle"] and "oracle" not in rep["singles"]
    assert all(s["baseline"] != "oracle" for s in rep["significance"]) and rep["best"]["qa/test"] != "oracle"


def test_answer_in_first_patch():
    rows = [{"score": 1, "extracted": "Paris", "segments": [{"text": "The capital is Paris"}, {"text": "."}]},
            {"score": 1, "extracted": "Ottawa", "segments": [{"text": "The capital of"}, {"text": " Canada is Ottawa"}]},
            {"score": 0, "extracted": None, "segments": [{"text": "x"}]}]
    assert analysis.answer_in_first_patch(rows) == {"responses": 3, "in_first_patch": 1 / 3,
                                                    "right_and_in_first_patch": 0.5}
