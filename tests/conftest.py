"""Shared fixtures: tiny random checkpoints saved to temp dirs and loaded through from_pretrained."""

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
