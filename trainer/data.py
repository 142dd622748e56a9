"""Switcher training data: synthesized records -> token ids -> padded batches.

Records come from ``data_synthesis`` (Parquet or JSONL, one row per record with at least ``prompt``,
``label`` and ``utilities``). Prompts are encoded with :func:`switchkit.prompt.encode_prompt`, the same
encoding the engine uses at inference, so long prompts keep the query head and the most recent trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader

from switchkit.io import InputError
from switchkit.prompt import SwitcherVocab, encode_prompt

REQUIRED = ("prompt", "label", "utilities")


def load_records(files: Sequence[str | Path], n: int, task: Optional[str] = None) -> datasets.Dataset:
    """Read and check synthesized records from Parquet/JSONL files (union), optionally one task only."""
    parts = []
    for file in map(Path, files):
        if not file.is_file():
            raise InputError(f"{file}: file not found")
        try:
            if file.suffix == ".parquet":
                ds = datasets.Dataset.from_parquet(str(file), keep_in_memory=True)
            elif file.suffix in (".jsonl", ".json"):
                ds = datasets.Dataset.from_json(str(file), keep_in_memory=True)
            else:
                raise InputError(f"{file}: unknown data format: use .parquet or .jsonl")
        except InputError:
            raise
        except Exception as exc:  # pyarrow / datasets parse errors
            raise InputError(f"{file}: cannot read records ({str(exc).strip().splitlines()[0]})") from None
        for key in REQUIRED:
            if key not in ds.column_names:
                raise InputError(f"{file}: missing field {key!r} (columns are {', '.join(ds.column_names)})")
        for row, (label, utils, prompt) in enumerate(zip(ds["label"], ds["utilities"], ds["prompt"])):
            where = f"{file}:row {row}"
            if not isinstance(prompt, str) or not prompt:
                raise InputError(f"{where}: field 'prompt' must be a non-empty string")
            if not isinstance(label, int) or not 0 <= label < n:
                raise InputError(f"{where}: field 'label'={label!r} is out of range: allowed is 0..{n - 1}")
            if not isinstance(utils, list) or len(utils) != n:
                raise InputError(f"{where}: field 'utilities' must be a list of {n} numbers (one per model)")
        if task is not None:
            if "task" not in ds.column_names:
                raise InputError(f"{file}: missing field 'task' (needed to train one switcher per task)")
            ds = ds.filter(lambda t: t == task, input_columns="task", keep_in_memory=True)
        parts.append(ds.select_columns(list(REQUIRED)))
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(data) == 0:
        raise InputError(f"no records{' for task ' + repr(task) if task else ''} in {', '.join(map(str, files))}")
    return data


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


class SwitcherDataModule(L.LightningDataModule):
    """Encoded switcher records with a seeded train/validation split."""

    def __init__(self, files: Sequence[str | Path], tokenizer, vocab: SwitcherVocab, *, task: Optional[str] = None,
                 max_length: int = 1024, micro_batch_size: int = 8, val_fraction: float = 0.1, seed: int = 0):
        super().__init__()
        self.files, self.tokenizer, self.vocab, self.task = list(files), tokenizer, vocab, task
        self.max_length, self.micro_batch_size = max_length, micro_batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.train_set: Optional[datasets.Dataset] = None
        self.val_set: Optional[datasets.Dataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, encode and split the records (once)."""
        if self.train_set is not None:
            return
        data = load_records(self.files, len(self.vocab.token_ids), self.task)
        data = data.map(
            lambda batch: {"input_ids": [encode_prompt(self.tokenizer, self.vocab, p, self.max_length)
                                         for p in batch["prompt"]]},
            batched=True, remove_columns=["prompt"], keep_in_memory=True, desc="encoding prompts",
        )
        n_val = int(round(len(data) * self.val_fraction))
        if n_val and len(data) - n_val > 0:
            split = data.train_test_split(test_size=n_val, seed=self.seed, keep_in_memory=True)
            self.train_set, self.val_set = split["train"], split["test"]
        else:
            self.train_set, self.val_set = data.shuffle(seed=self.seed, keep_in_memory=True), None

    def _loader(self, data: datasets.Dataset, shuffle: bool) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return DataLoader(data, batch_size=self.micro_batch_size, shuffle=shuffle,
                          collate_fn=lambda rows: collate(rows, pad_id))

    def train_dataloader(self) -> DataLoader:
        """Shuffled micro-batches of the training split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Micro-batches of the validation split (none when ``val_fraction`` is 0)."""
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
