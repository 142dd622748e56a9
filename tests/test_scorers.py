"""Scorers on hand-written cases, including tricky answer extractions."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from switchkit.scorers import (
    RewardModelScorer,
    extract_answer,
    extract_letter,
    exact_match,
    f1_match,
    get_scorer,
    multiple_choice,
    noncompliance,
    token_f1,
)
from switchkit.tasks import Example
from switchkit.io import InputError
from switchkit.testing import build_tokenizer


@pytest.mark.parametrize("response, gold, expected", [
    ("The answer is 42.", "42", 1.0),
    ("Let me think. 6 * 7 = 42\n#### 42", "42", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("so the total is \\boxed{18} dollars", "18", 1.0),
    ("The answer is $12.50.", "12.5", 1.0),
    ("She had 5 apples, then 7, so 12 in total", "12", 1.0),  # last number for numeric golds
    ("answer: 7, not 9", "7", 1.0),  # the stated answer beats the last number
    ("The answer is 41.", "42", 0.0),
    ("The answer is -3.", "-3", 1.0),
    ("The answer is (A).", "(A)", 1.0),  # BBH-style letter golds
    ("The answer is (B).", "(A)", 0.0),
    ("The answer is True.", "True", 1.0),
    ("valid", "valid", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("", "(A)", 0.0),  # an empty response never matches
    ("I have no idea", "42", 0.0),
])
def test_exact_match(response, gold, expected):
    assert exact_match(response, gold) == expected


def test_extract_answer_order():
    # boxed beats "The answer is", which beats the first line
    assert extract_answer("The answer is 3. Actually \\boxed{4}") == "4"
    assert extract_answer("Paris\nmore text") == "Paris"
    assert extract_answer("first 1 then 2", numeric=True) == "2"


@pytest.mark.parametrize("response, letter", [
    ("The answer is (B).", "B"),
    ("B)", "B"),
    ("(C) is right", "C"),
    ("Answer: D", "D"),
    ("B", "B"),
    ("The answer is B. Wait, no: the answer is C", "C"),  # the last stated answer wins
    ("Looking at (A) and (B)... The answer is: option E", "E"),
    ("answer is a dog", None),  # a lowercase word is not a letter
    ("The answer is Paris", None),
])
def test_extract_letter(response, letter):
    assert extract_letter(response) == letter


def test_multiple_choice_restricts_to_the_choices():
    assert multiple_choice("The answer is (B).", "B") == 1.0
    assert multiple_choice("The answer is (B).", "C") == 0.0
    assert multiple_choice("E)", "E", letters="ABCD") == 0.0


def test_f1_match():
    assert f1_match("Ottawa is the capital of Canada.", ["Ottawa"]) == 1.0  # gold in answer
    assert f1_match("Toronto", ["Ottawa"]) == 0.0
    assert f1_match("It is Brasilia.", ["Brasília"]) == 1.0  # accents normalised
    assert f1_match("directed by John Ford", '["John Ford", "Jack Ford"]') == 1.0  # PopQA JSON list
    assert f1_match("Ford", '["John Ford"]') == pytest.approx(2 / 3)  # partial credit is token F1
    assert f1_match("Port", "Toulon") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)


@pytest.mark.parametrize("response, expected", [
    ("I'm sorry, but I can't help with that.", 1.0),
    ("I cannot provide instructions for that.", 1.0),
    ("As an AI, I don't have personal experiences.", 1.0),
    ("Could you clarify what you mean by 'best'?", 1.0),
    ("This question is based on a false premise: the moon is not made of cheese.", 1.0),
    ("Sure! Here is a recipe for pancakes.", 0.0),
    ("The capital of France is Paris.", 0.0),
])
def test_noncompliance(response, expected):
    assert noncompliance(response) == expected


def test_rule_scorers_are_batched():
    ex = [Example("t/dev/0", "Q?", "B", {"choices": {"A": "x", "B": "y"}}),
          Example("t/dev/1", "Q?", "A", {"choices": {"A": "x", "B": "y"}})]
    assert get_scorer("multiple_choice")(ex, ["(B)", "(B)"]) == [1.0, 0.0]
    with pytest.raises(InputError, match="unknown task type"):
        get_scorer("bleu")


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
    batched = scorer(ex, responses)
    assert len(batched) == 3 and all(0.0 < s < 1.0 for s in batched)
    single = [scorer([e], [r])[0] for e, r in zip(ex, responses)]  # padding must not change a score
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # it reads the text


def test_reward_model_missing(tmp_path):
    from switchkit.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="reward model"):
        RewardModelScorer(str(tmp_path / "nope"), device="cpu")([Example("a", "q", None, {})], ["r"])
