"""Shared fixtures: tiny random checkpoints saved to temp dirs and loaded through from_pretrained."""

import json

import pytest

from switchkit.testing import build_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer(300)


@pytest.fixture(scope="session")
def tiny_pool_dirs(tmp_path_factory, tiny_tokenizer):
    """Three tiny same-tokenizer models: pretrained (no chat template), finetuned, aligned."""
    root = tmp_path_factory.mktemp("pool")
    base_tok = build_tokenizer(300, chat_template=False)
    return [
        save_tiny_model(root / "base", base_tok, seed=1),
        save_tiny_model(root / "sft", tiny_tokenizer, seed=2),
        save_tiny_model(root / "aligned", tiny_tokenizer, seed=3),
    ]


@pytest.fixture(scope="session")
def tiny_pool_yaml(tiny_pool_dirs):
    """The recipe's ``pool:`` section for the three tiny models (named base, sft, aligned)."""
    base, sft, aligned = tiny_pool_dirs
    return f"""pool:
  candidates:
    - {{source: "{base}", role: pretrained, name: base}}
    - {{source: "{sft}", role: finetuned, name: sft}}
    - {{source: "{aligned}", role: aligned, name: aligned}}
  device: cpu
"""


@pytest.fixture
def tiny_recipe(tmp_path, tiny_pool_yaml):
    """A recipe over the three tiny same-tokenizer models and a 5-question local task."""
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"input": f"What is the capital of {c}?", "output": [a]}) + "\n"
                            for c, a in [("France", "Paris"), ("Canada", "Ottawa"), ("Peru", "Lima"),
                                         ("Chile", "Santiago"), ("Kenya", "Nairobi")]))
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
run_dir: {tmp_path}/run
{tiny_pool_yaml}generation: {{patch_size: 3, max_new_tokens: 9, temperature: 0.7, batch_size: 2}}
eval:
  methods: [single, random, untuned]
  tasks: [{{name: qa, type: f1_match, source: "{task}"}}]
  splits: [test]
  seeds: [0]
""")
    return path
