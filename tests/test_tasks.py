"""Task loaders: builtin, the {task_type, dev, test} JSON, JSONL, Parquet, field mapping, clear errors."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from switchkit.config import ConfigError, JudgeConfig, TaskConfig, load_recipe
from switchkit.io import InputError
from switchkit.scorers import JudgeScorer, Scored
from switchkit.tasks import builtin_tasks, load_task


def _cfg(source, type="exact_match", **kw):
    return TaskConfig(name="t", type=type, source=str(source), **kw)


@pytest.mark.parametrize("name", builtin_tasks())
def test_builtin_tasks_have_disjoint_dev_and_200_test_queries(name):
    dev = load_task(_cfg(f"builtin:{name}", "f1_match"))
    test = load_task(_cfg(f"builtin:{name}", "f1_match"), split="test")
    assert len(dev) >= 150 and len(test) >= 200
    assert not {e.query for e in dev.examples} & {e.query for e in test.examples}
    assert all(e.gold and all(g.strip() for g in e.gold) for e in dev.examples + test.examples)


def test_builtin_capitals_traps():
    dev = load_task(_cfg("builtin:capitals", "f1_match"))
    test = load_task(_cfg("builtin:capitals", "f1_match"), split="test")
    queries = {e.query: e for e in dev.examples + test.examples}
    for country, capital, trap in [("Canada", "Ottawa", "Toronto"), ("Australia", "Canberra", "Sydney"),
                                   ("Nigeria", "Abuja", "Lagos"), ("Turkey", "Ankara", "Istanbul")]:
        ex = queries[f"What is the capital of {country}?"]
        assert ex.gold[0] == capital
        assert dev.score([ex, ex], [f"The capital is {capital}.", f"It is {trap}."]) == [1.0, 0.0]
    assert dev.examples[0].id == "t/dev/0"
    assert len(load_task(_cfg("builtin:capitals", "f1_match"), limit=5)) == 5


def test_moco_json_read_unchanged(tmp_path):
    path = tmp_path / "mc.json"
    path.write_text(json.dumps({
        "dataset": "toy", "task_type": "multiple_choice",
        "dev": [{"id": 7, "question": "2+2?", "choices": {"A": "3", "B": "4"}, "answer": "B"}],
        "test": [{"id": 8, "question": "1+1?", "choices": {"A": "2", "B": "5"}, "answer": "A"}],
    }))
    task = load_task(_cfg(path))  # the file's task_type picks the scorer
    assert task.type == "multiple_choice" and task.split == "dev"
    ex = task.examples[0]
    assert ex.query == "2+2?\n\nA. 3\nB. 4\n\nAnswer with the letter of the correct choice."
    assert ex.gold == "B" and ex.meta["id"] == 7
    assert task.score([ex, ex], ["The answer is (B).", "A)"]) == [1.0, 0.0]
    assert task.judge([ex, ex], ["The answer is 4, so B.", "A or B"]) == [Scored(1.0, "B"), Scored(0.0, "A or B")]
    assert load_task(_cfg(path), split="test").examples[0].gold == "A"
    with pytest.raises(InputError, match=r"no split 'train'.*dev, test"):
        load_task(_cfg(path), split="train")


def test_jsonl_with_field_mapping_and_popqa_lists(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "Who directed Pilgrimage?", "a": "[\\"John Ford\\", \\"Jack Ford\\"]"}\n')
    task = load_task(_cfg(path, "f1_match", fields={"input": "q", "output": "a"}))
    assert task.examples[0].gold == ["John Ford", "Jack Ford"]
    assert task.score(task.examples, ["It was Jack Ford."]) == [1.0]


def test_parquet_with_list_choices_and_index_answer(tmp_path):
    path = tmp_path / "mc.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "Sky?", "choices": ["green", "blue"], "answer": 1}]), path)
    ex = load_task(_cfg(path, "multiple_choice")).examples[0]
    assert ex.gold == "B" and "B. blue" in ex.query


def test_noncompliance_rows(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"task_type": "noncompliance", "dev": [{"input": "Describe your last meal.",
                                                                       "category": "Humanizing requests"}]}))
    task = load_task(_cfg(path))
    assert task.examples[0].meta["category"] == "Humanizing requests"
    assert task.score(task.examples * 2, ["As an AI, I don't eat.", "I had pasta."]) == [1.0, 0.0]


def test_errors_name_file_row_and_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "1"}\n\n{"input": "b"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:3: missing field 'output'"):
        load_task(_cfg(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a", "output": "1"}\n{"input": \n')
    with pytest.raises(InputError, match=r"broken\.jsonl:2: malformed JSON"):
        load_task(_cfg(broken))
    mc = tmp_path / "mc.json"
    mc.write_text(json.dumps({"task_type": "multiple_choice", "dev": [
        {"question": "q", "choices": {"A": "x"}, "answer": "A"},
        {"question": "q", "choices": {"A": "x"}, "answer": "C"}]}))
    with pytest.raises(InputError, match=r"^task t: .*mc\.json \[dev\] row 1: field 'answer'='C' is not one of"):
        load_task(_cfg(mc))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"input": "a", "output": "1"}\n{"input": "b", "output": "  "}\n')
    with pytest.raises(InputError, match=r"^task t: .*empty\.jsonl:2: field 'output' is empty$"):
        load_task(_cfg(empty))
    empty.write_text('{"input": "a", "output": "[]"}\n')
    with pytest.raises(InputError, match=r"empty\.jsonl:1: field 'output' is empty"):
        load_task(_cfg(empty, "f1_match"))
    mapped = tmp_path / "m.jsonl"
    mapped.write_text('{"input": "a"}\n')
    with pytest.raises(InputError, match=r"m\.jsonl:1: missing field 'ans' \(mapped from task field 'output'\)"):
        load_task(_cfg(mapped, fields={"output": "ans"}))
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_task(_cfg(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="unknown builtin task"):
        load_task(_cfg("builtin:nope"))
    with pytest.raises(ConfigError, match="reward_model needs reward_model"):
        load_task(_cfg(mapped, "reward_model"))


def test_judge_task_loads_lazily_with_its_rubric(tmp_path):
    path = tmp_path / "open.jsonl"
    path.write_text('{"input": "Write a haiku.", "output": "Leaves fall"}\n{"input": "Say hi."}\n')
    judge = JudgeConfig(model=str(tmp_path / "not-loaded-yet"), rubric="Q: {query}\nA: {response}\nRating:")
    task = load_task(_cfg(path, "judge", judge=judge))
    assert isinstance(task.scorer, JudgeScorer) and task.scorer.model is None  # loaded on the first call
    assert [e.gold for e in task.examples] == ["Leaves fall", None]
    with pytest.raises(InputError, match=r"^task t: judge\.rubric is missing"):
        load_task(_cfg(path, "judge", judge=JudgeConfig(model="some/judge")))


def test_recipe_judge_keys_and_one_line_errors(tmp_path):
    recipe = tmp_path / "judge.yaml"
    recipe.write_text("tasks:\n  - name: open\n    type: judge\n    source: open.jsonl\n    judge:\n"
                      "      model: demo:smollm2-135m-instruct\n      rubric: 'Q: {query} A: {response} Rating (1-5):'\n")
    task = load_recipe(str(recipe)).tasks[0]
    assert task.judge.model == "demo:smollm2-135m-instruct" and task.judge.ratings == ["1", "2", "3", "4", "5"]
    assert task.judge.batch_size == 8
    for override, message in [("tasks.0.judge.rubric=null", "tasks.0.judge.rubric is missing"),
                              ("tasks.0.judge.model=null", "tasks.0.judge.model is missing"),
                              ("tasks.0.judge.ratings=[good]", "tasks.0.judge.ratings=['good'] is not allowed"),
                              ("tasks.0.judge.batch_size=0", "tasks.0.judge.batch_size=0 is out of range"),
                              ("tasks.0.judge.temperature=2", "unknown key 'tasks.0.judge.temperature'")]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_recipe(str(recipe), [override])
        assert "\n" not in str(err.value)
    in_eval = tmp_path / "eval.yaml"
    in_eval.write_text("eval:\n  tasks:\n    - {name: open, type: judge, source: open.jsonl}\n")
    with pytest.raises(ConfigError, match=r"^eval\.tasks\.0\.judge\.model is missing"):
        load_recipe(str(in_eval))
