"""Distillation data: (query, switch-generation response) pairs -> response-only SFT batches.

The student's own chat template renders the query (``switchkit.models.encode_query``); the response is
encoded after it and closed with the student's EOS. Labels are ``-100`` on every prompt token, so only
response tokens count in the loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from switchkit.models import encode_query
from switchkit.trainer.base import EncodedDataModule

IGNORE = -100


def encode_pair(tokenizer, query: str, response: str, plain_template: str, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one pair; the prompt is left-truncated if the pair is too long."""
    prompt = encode_query(tokenizer, query, plain_template)
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = answer + [tokenizer.eos_token_id]
    answer = answer[:max_length - 1]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows; padding is masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DistillDataModule(EncodedDataModule):
    """Encoded (query, response) pairs with a seeded train/validation split."""

    def __init__(self, pairs: Sequence[tuple[str, str]], tokenizer, *, plain_template: str, max_length: int,
                 micro_batch_size: int, val_fraction: float = 0.1, seed: int = 0):
        super().__init__(tokenizer, collate, micro_batch_size, seed)
        self.pairs, self.plain_template, self.max_length = list(pairs), plain_template, max_length
        self.val_fraction, self.seed = val_fraction, seed

    def setup(self, stage: Optional[str] = None) -> None:
        """Encode and split the pairs (once)."""
        if self.train_set is not None:
            return
        rows = [encode_pair(self.tokenizer, q, r, self.plain_template, self.max_length) for q, r in self.pairs]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(len(rows) * self.val_fraction)) if len(rows) > 1 else 0
        self.val_set = [rows[i] for i in order[:n_val]]
        self.train_set = [rows[i] for i in order[n_val:]]
