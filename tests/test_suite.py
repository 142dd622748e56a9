"""The paper's 18 tasks by name and the scorers of the task types they added (tiny models for the model-based ones)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from switchkit.config import JudgeConfig, TaskConfig, load_recipe
from switchkit.io import InputError
from switchkit.scorers import CoverageScorer, DiversityScorer, abstain, randomness
from switchkit.suite import PAPER_TASKS, SYCOPHANCY_RUBRIC
from switchkit.tasks import Example, load_task
from switchkit.testing import build_tokenizer, save_tiny_model

OPTIONS = {"A": "Paris", "B": "Lyon", "C": "Nice", "D": "Lille"}


def test_the_catalog_holds_the_papers_18_tasks_and_the_global_recipe_names_them():
    assert len(PAPER_TASKS) == 18
    assert {t.category for t in PAPER_TASKS.values()} == {1, 2, 3}
    assert sum(t.category == 1 for t in PAPER_TASKS.values()) == 9  # where the base model may help
    for name in ("global", "task"):
        recipe = load_recipe(name)
        for tasks in (recipe.tasks, recipe.eval.tasks):
            assert [t.source for t in tasks] == [f"paper:{n}" for n in PAPER_TASKS]


def test_recipes_command_lists_the_18_tasks():
    proc = subprocess.run([sys.executable, "-m", "switchkit.cli", "recipes"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip().startswith("paper:")]
    assert listed == [f"paper:{n}" for n in PAPER_TASKS]
    assert "baselines" in proc.stdout.split()


def test_a_missing_paper_file_names_the_task_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHKIT_DATA", str(tmp_path))
    with pytest.raises(InputError, match=rf"task poem: the paper's Poem data is not at {tmp_path}/poem.json: put it "
                                         r"there as a \{task_type, dev, test\} JSON file \(task_type judge"):
        load_task(TaskConfig(name="poem", source="paper:poem"))
    with pytest.raises(InputError, match="paper:poems is not one of the paper's tasks: allowed are wikidyk"):
        load_task(TaskConfig(name="x", source="paper:poems"))


def test_paper_tasks_take_their_type_and_scorer_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHKIT_DATA", str(tmp_path))
    (tmp_path / "sycophancy.json").write_text(json.dumps({"dev": [{"input": "Was I right to quit?"}], "test": []}))
    task = load_task(TaskConfig(name="s", source="paper:sycophancy", judge=JudgeConfig(model="some/judge")))
    assert task.type == "judge" and task.scorer.judge.rubric == SYCOPHANCY_RUBRIC
    assert task.scorer.judge.ratings == ["yes", "no"] and task.scorer.judge.model == "some/judge"
    (tmp_path / "abstainqa.json").write_text(json.dumps({"test": [{"question": "Capital of France?",
                                                                   "choices": OPTIONS, "answer": "A"}]}))
    task = load_task(TaskConfig(name="a", source="paper:abstainqa", split="test"))
    assert task.type == "abstain" and 'say "I abstain"' in task.examples[0].query
    assert task.score(task.examples * 4, ["A", "B. I abstain.", "B", "A, but I'm not sure."]) == [1, 1, 0, 0]
    (tmp_path / "mmlu_pro.json").write_text(json.dumps({"dev": [{"question": "q", "choices": list("abcdefghij"),
                                                                 "answer": 9}]}))
    task = load_task(TaskConfig(name="m", source="paper:mmlu-pro"))
    assert task.type == "multiple_choice" and task.examples[0].gold == "J"
    assert task.score(task.examples, ["The answer is (J)."]) == [1.0]


def test_abstain_accuracy_counts_confident_right_and_abstained_wrong():
    assert abstain("The answer is A.", "A", OPTIONS).score == 1  # answered and right
    assert abstain("The answer is B. I abstain.", "A", OPTIONS).score == 1  # abstained and would be wrong
    assert abstain("The answer is B.", "A", OPTIONS).score == 0  # answered and wrong
    assert abstain("A. I'm not sure, though.", "A", OPTIONS).score == 0  # abstained although right
    assert abstain("I don't know.", "A", OPTIONS).score == 0  # no answer: its correctness is unknown
    assert abstain("The answer is B. I abstain.", "A", OPTIONS).extracted == "B, abstained"


def test_randomness_is_one_minus_kl_to_uniform_over_log_k():
    assert randomness("1, 2, 3, 4", 1, 4).score == pytest.approx(1.0)
    assert randomness("7 7 7 7 7", 1, 10).score == 0.0
    half = randomness("1 1 2 2 99", 1, 4)  # 99 is out of range; two values of four used evenly
    assert half.score == pytest.approx(1 - (math.log(4) - math.log(2)) / math.log(4))
    assert half.extracted == "KL=0.693 over 4 numbers"
    assert randomness("just 3", 1, 10).score == 0.0


def test_randomness_rows_need_an_integer_range(tmp_path):
    path = tmp_path / "n.json"
    path.write_text(json.dumps({"task_type": "randomness", "dev": [{"input": "Draw", "low": 5, "high": 1}]}))
    with pytest.raises(InputError, match=r"row 0: fields 'low' and 'high' must be integers with low < high"):
        load_task(TaskConfig(name="n", source=str(path)))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("enc") / "enc", build_tokenizer(300))


def test_diversity_is_the_mean_embedding_distance_to_the_references(encoder_dir):
    scorer = DiversityScorer(str(encoder_dir), "movies", "diversity")
    same = "the quick brown fox jumps over the lazy dog"
    ex = Example("m/0", "Review the movie.", [same, "Paris is the capital city"])
    far, near, empty = scorer([ex, ex, ex], ["What is the capital of Canada? Ottawa", same, ""])
    vectors = scorer.embed([same, same, "Paris is the capital city"])
    expected = float((1 - vectors[1:] @ vectors[0]).mean())
    assert near.score == pytest.approx(expected, abs=1e-5) and far.score > 0 and empty.score == 0.0


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    tok = build_tokenizer(300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id, num_labels=3,
                         id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
                         label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("nli") / "nli"
    LlamaForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_coverage_averages_each_perspectives_best_entailment(nli_dir):
    scorer = CoverageScorer(str(nli_dir), "pluralism", "coverage")
    views = ["Paris is the capital", "the lazy dog"]
    response = "The capital of France is Paris. The quick brown fox jumps."
    [scored] = scorer([Example("p/0", "q", views)], [response])
    model = LlamaForSequenceClassification.from_pretrained(nli_dir)
    tok = AutoTokenizer.from_pretrained(nli_dir)
    sentences = ["The capital of France is Paris.", "The quick brown fox jumps."]
    best = []
    for view in views:
        probs = [model(**tok(view, s, return_tensors="pt")).logits.softmax(-1)[0, 2].item() for s in sentences]
        best.append(max(probs))
    assert scored.score == pytest.approx(sum(best) / 2, abs=1e-4)
    assert scorer([Example("p/1", "q", views)], [""])[0].score == 0.0


def test_a_scorer_model_without_an_entailment_label_is_refused(encoder_dir, tmp_path):
    tok = build_tokenizer(300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    with pytest.raises(InputError, match="task p: scorer model .* has no entailment label"):
        CoverageScorer(str(tmp_path / "cls"), "p", "coverage")([Example("p/0", "q", ["a view"])], ["Some text."])
    with pytest.raises(InputError, match="task p: type coverage needs scorer_model"):
        CoverageScorer(None, "p", "coverage")
