"""Scorers on hand-labelled responses written the way models answer, plus the model-based scorers."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from switchkit.config import JudgeConfig
from switchkit.io import InputError
from switchkit.models import ModelLoadError
from switchkit.scorers import (
    JudgeScorer,
    RewardModelScorer,
    Scored,
    get_scorer,
    math_equal,
    rating_token_ids,
)
from switchkit.tasks import Example
from switchkit.testing import build_tokenizer

LABELLED = [json.loads(line) for line in (Path(__file__).parent / "data" / "labelled_responses.jsonl").open()]


def _example(row: dict, i: int = 0) -> Example:
    meta = {"choices": row["choices"]} if "choices" in row else {}
    return Example(f"labelled/test/{i}", row.get("query", "Q?"), row.get("gold"), meta)


@pytest.mark.parametrize("row", [
    pytest.param(row, id=f"{i}-{row['task_type']}-{row['why'][:40]}",
                 marks=[pytest.mark.xfail(reason=row["known_miss"], strict=True)] if "known_miss" in row else [])
    for i, row in enumerate(LABELLED)
])
def test_labelled_response(row):
    got = get_scorer(row["task_type"])([_example(row)], [row["response"]])[0]
    assert got == Scored(pytest.approx(row["score"], abs=1e-4), row["extracted"]), row["why"]


def test_labelled_set_covers_every_rule_scorer():
    kinds = {row["task_type"] for row in LABELLED}
    assert kinds == {"exact_match", "multiple_choice", "f1_match", "noncompliance"} and len(LABELLED) >= 60


@pytest.mark.parametrize("answer, gold", [
    ("3/4", "0.75"), ("\\frac{3}{4}", "0.75"), ("0.75", "\\frac{3}{4}"), ("1,000,000", "1000000"), ("$18", "18"),
    ("3.50", "3.5"), ("2 1/2", "2.5"), ("-7", "-7"), ("25%", "25"),
])
def test_math_equal_by_value(answer, gold):
    assert math_equal(answer, gold)


@pytest.mark.parametrize("answer, gold", [("16", "18"), ("0.7", "0.75"), ("1,000", "1000000"), ("-7", "7")])
def test_math_unequal(answer, gold):
    assert not math_equal(answer, gold)


def test_rule_scorers_are_batched():
    choices = {"A": "x", "B": "y"}
    ex = [Example("t/dev/0", "Q?", "B", {"choices": choices}), Example("t/dev/1", "Q?", "A", {"choices": choices})]
    assert get_scorer("multiple_choice")(ex, ["(B)", "The answer is y"]) == [Scored(1.0, "B"), Scored(0.0, "B")]
    with pytest.raises(InputError, match="unknown task type 'bleu'"):
        get_scorer("bleu")


@pytest.mark.parametrize("task_type, gold, meta, message", [
    ("multiple_choice", "E", {"choices": {"A": "x", "B": "y"}}, r"t/dev/3: the gold letter 'E' is not one of the choices A, B"),
    ("exact_match", "  ", {}, r"t/dev/3: the gold answer is empty"),
    ("f1_match", [], {}, r"t/dev/3: the gold answer is empty"),
    ("f1_match", None, {}, r"t/dev/3: the gold answer is empty"),
])
def test_bad_gold_is_a_one_line_error_naming_task_and_row(task_type, gold, meta, message):
    with pytest.raises(InputError, match=message) as err:
        get_scorer(task_type)([Example("t/dev/3", "Q?", gold, meta)], ["anything"])
    assert "\n" not in str(err.value)


def test_reward_model_scorer(tmp_path):
    tok = build_tokenizer(300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                         pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), batch_size=2, device="cpu")
    ex = [Example(f"t/dev/{i}", q, None, {}) for i, q in enumerate(["Hi?", "What is the capital of France?", "x"])]
    responses = ["Hello there, friend.", "Paris", "the quick brown fox jumps over the lazy dog"]
    batched = [s.score for s in scorer(ex, responses)]
    assert len(batched) == 3 and all(0.0 < s < 1.0 for s in batched)
    single = [scorer([e], [r])[0].score for e, r in zip(ex, responses)]  # padding must not change a score
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # it reads the text


def test_reward_model_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="reward model"):
        RewardModelScorer(str(tmp_path / "nope"), device="cpu")([Example("a", "q", None, {})], ["r"])


# ---------------------------------------------------------------- LM judge

RUBRIC = ("Rate how well the answer responds to the question, from 1 (useless) to 5 (excellent).\n"
          "Question: {query}\nAnswer: {response}\nRating:")


@pytest.fixture(scope="module")
def judge_dir(tiny_pool_dirs):
    return tiny_pool_dirs[1]  # a tiny causal LM with a chat template; its digits are single tokens


def _judge(judge_dir, **kw) -> JudgeScorer:
    return JudgeScorer(JudgeConfig(**{"model": str(judge_dir), "rubric": RUBRIC, **kw}), "helpfulness")


JUDGED = [Example(f"helpfulness/dev/{i}", q, None, {}) for i, q in
          enumerate(["What is the capital of France?", "Hi", "Explain why the sky is blue in one sentence."])]
RESPONSES = ["Paris", "Hello there! How can I help you today, my friend?", "Sunlight scatters off air molecules."]


def test_judge_score_is_the_expected_rating_from_the_logits(judge_dir):
    scored = _judge(judge_dir)(JUDGED, RESPONSES)
    tok = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    digits = [tok.convert_tokens_to_ids(d) for d in "12345"]
    assert [tok.tokenize(d) for d in "12345"] == [[d] for d in "12345"]
    for ex, response, got in zip(JUDGED, RESPONSES, scored):
        text = tok.apply_chat_template([{"role": "user", "content": RUBRIC.format(query=ex.query, response=response)}],
                                       add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(model(ids).logits[0, -1, digits], dim=-1)
        assert got.score == pytest.approx(float((p * torch.arange(5)).sum() / 4), abs=1e-5)
        assert got.extracted == str(int(p.argmax()) + 1)
    assert len({round(s.score, 6) for s in scored}) == 3  # it reads the response


def test_judge_batched_equals_one_by_one(judge_dir):
    scorer = _judge(judge_dir, batch_size=2)  # three prompts of different lengths: one padded batch and one single
    batched = scorer(JUDGED, RESPONSES)
    single = [scorer([ex], [r])[0] for ex, r in zip(JUDGED, RESPONSES)]
    assert [s.score for s in batched] == pytest.approx([s.score for s in single], abs=1e-5)
    assert [s.extracted for s in batched] == [s.extracted for s in single]


def test_judge_reference_and_custom_ratings(judge_dir):
    scorer = _judge(judge_dir, rubric="Reference: {reference}\nAnswer: {response}\nScore (0-2):", ratings=["0", "1", "2"])
    got = scorer([Example("ref/dev/0", "Q", "Paris", {})], ["Paris"])[0]
    assert 0.0 < got.score < 1.0 and got.extracted in {"0", "1", "2"}
    with pytest.raises(InputError, match=r"ref/dev/1: the judge rubric uses \{reference\}, but the row has no 'output'"):
        scorer([Example("ref/dev/1", "Q", None, {})], ["Paris"])


@pytest.mark.parametrize("config, message", [
    ({"rubric": None}, r"task helpfulness: judge\.rubric is missing"),
    ({"rubric": "   "}, r"task helpfulness: judge\.rubric is missing"),
    ({"model": None}, r"task helpfulness: judge\.model is missing"),
    ({"rubric": "Rate {answer}:"}, r"judge\.rubric has the placeholders \['answer'\]: allowed are"),
    ({"rubric": "Rate {response:"}, r"judge\.rubric is not a valid template"),
    ({"ratings": ["1"]}, r"judge\.ratings=\['1'\] is not allowed"),
    ({"ratings": ["1", "1"]}, r"judge\.ratings=\['1', '1'\] is not allowed"),
])
def test_judge_config_errors_are_one_line(judge_dir, config, message):
    with pytest.raises(InputError, match=message) as err:
        _judge(judge_dir, **config)
    assert "\n" not in str(err.value)


def test_judge_model_errors(judge_dir, tmp_path):
    with pytest.raises(InputError, match=r"task helpfulness: judge .*does not encode each of the ratings \['10', '20'\]"):
        _judge(judge_dir, ratings=["10", "20"])(JUDGED[:1], RESPONSES[:1])  # two digits are two tokens here
    with pytest.raises(ModelLoadError, match="nope"):
        _judge(tmp_path / "nope")(JUDGED[:1], RESPONSES[:1])


def test_rating_tokens_fold_a_trailing_space():
    """GPT-2-style BPE writes "Rating: 4" with the token " 4": the prompt's trailing space belongs to the rating."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Rating: 1 Rating: 2 Rating: 3 Rating: 4 Rating: 5"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids, fold = rating_token_ids(fast, "Rating: ", list("12345"))
    assert fold and ids == [fast.convert_tokens_to_ids("\u0120" + d) for d in "12345"]
    assert rating_token_ids(fast, "Rating:", list("12345"))[1] is False
