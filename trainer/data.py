"""Switcher training data: synthesized records -> token ids -> padded batches.

Records come from ``data_synthesis`` (:func:`switchkit.artifacts.load_records`). Prompts are encoded with the
switcher's prompt format, the same encoding the engine uses at inference, so long prompts keep the query head
and the most recent trace. The validation split is by query (``query_id``): no query is in both parts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import datasets
import torch

from switchkit.artifacts import load_records
from switchkit.prompt import PromptFormat, SwitcherVocab

from .base import EncodedDataModule


def split_by_query(data: datasets.Dataset, val_fraction: float, seed: int) -> tuple[datasets.Dataset, Optional[datasets.Dataset]]:
    """(train, validation): about ``val_fraction`` of the records, whole queries at a time (rows without
    ``query_id`` count as their own query); validation is None when it would be empty or take everything."""
    keys = data["query_id"] if "query_id" in data.column_names else [str(i) for i in range(len(data))]
    queries = sorted(set(keys))
    random.Random(seed).shuffle(queries)
    held, want = set(), round(len(data) * val_fraction)
    count = {q: 0 for q in queries}
    for key in keys:
        count[key] += 1
    total = 0
    for q in queries:
        if total >= want:
            break
        held.add(q)
        total += count[q]
    if not held or len(held) == len(queries):
        return data.shuffle(seed=seed, keep_in_memory=True), None
    train = [i for i, key in enumerate(keys) if key not in held]
    val = [i for i, key in enumerate(keys) if key in held]
    return data.select(train, keep_in_memory=True), data.select(val, keep_in_memory=True)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows; ``last_index`` points at each sequence's final real token."""
    lengths = torch.tensor([len(r["input_ids"]) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : lengths[i]] = torch.as_tensor(r["input_ids"])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "last_index": lengths - 1,
        "labels": torch.tensor([r["label"] for r in rows]),
        "utilities": torch.tensor([r["utilities"] for r in rows], dtype=torch.float32),
    }


class SwitcherDataModule(EncodedDataModule):
    """Encoded switcher records with a seeded train/validation split by query."""

    def __init__(self, files: Sequence[str | Path] | datasets.Dataset, tokenizer, fmt: PromptFormat,
                 vocab: SwitcherVocab, *,
                 task: Optional[str] = None, max_length: int = 1024, micro_batch_size: int = 8,
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__(tokenizer, collate, micro_batch_size, seed)
        self.files = files if isinstance(files, datasets.Dataset) else list(files)  # checked records, or files
        self.format, self.vocab, self.task = fmt, vocab, task
        self.max_length, self.val_fraction, self.seed = max_length, val_fraction, seed

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, encode and split the records (once)."""
        if self.train_set is not None:
            return
        data = self.files if isinstance(self.files, datasets.Dataset) else \
            load_records(self.files, len(self.vocab.token_ids), self.task)
        keep = [c for c in ("prompt", "label", "utilities", "query_id") if c in data.column_names]
        data = data.select_columns(keep).map(
            lambda batch: {"input_ids": [self.format.encode(self.tokenizer, self.vocab, p, self.max_length)
                                         for p in batch["prompt"]]},
            batched=True, remove_columns=["prompt"], keep_in_memory=True, desc="encoding prompts",
        )
        self.train_set, self.val_set = split_by_query(data, self.val_fraction, self.seed)
