"""Task loaders: builtin, the {task_type, dev, test} JSON, JSONL, Parquet, field mapping, clear errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from switchkit.config import ConfigError, TaskConfig
from switchkit.tasks import load_task
from switchkit.io import InputError


def _cfg(source, type="exact_match", **kw):
    return TaskConfig(name="t", type=type, source=str(source), **kw)


def test_builtin_capitals_split_and_traps():
    dev = load_task(_cfg("builtin:capitals", "f1_match"))
    test = load_task(_cfg("builtin:capitals", "f1_match"), split="test")
    assert len(dev) >= 40 and len(test) >= 40
    assert not {e.query for e in dev.examples} & {e.query for e in test.examples}
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
    with pytest.raises(InputError, match=r"mc\.json \[dev\] row 1: field 'answer'='C' is not one of"):
        load_task(_cfg(mc))
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
