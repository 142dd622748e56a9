"""The training base shared by the switcher trainer and distillation.

It owns what every fit needs: the backbone (a pool candidate, float32 on CPU or bf16 for bf16-true and
DeepSpeed) with optional LoRA and gradient checkpointing, AdamW over the trainable parameters, checkpoints that
hold only trainable weights, the Lightning trainer with its strategy (:mod:`.strategies`), resume from
``last.ckpt``, and an export that gathers ZeRO-3-partitioned weights before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from switchkit.config import CandidateConfig, ConfigError, FitConfig, LoraConfig, Recipe
from switchkit.io import atomic_path
from switchkit.models import load_source

from .strategies import backbone_dtype, check_strategy, make_trainer


class EncodedDataModule(L.LightningDataModule):
    """Encoded rows split into ``train_set`` and ``val_set`` (set by :meth:`setup`), served as micro-batches
    padded by ``collate(rows, pad_id)``."""

    def __init__(self, tokenizer, collate: Callable[[list[dict], int], dict], micro_batch_size: int):
        super().__init__()
        self.tokenizer, self.collate, self.micro_batch_size = tokenizer, collate, micro_batch_size
        self.train_set = None
        self.val_set = None

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return DataLoader(rows, batch_size=self.micro_batch_size, shuffle=shuffle,
                          collate_fn=lambda batch: self.collate(batch, pad_id))

    def train_dataloader(self) -> DataLoader:
        """Shuffled micro-batches of the training split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Micro-batches of the validation split (none when it is empty)."""
        return self._loader(self.val_set, shuffle=False) if self.val_set else []


class TrainableModule(L.LightningModule):
    """A LightningModule around a causal LM (full or peft LoRA): AdamW over what trains, trainable-only checkpoints."""

    def __init__(self, model, tokenizer, *, lr: float):
        super().__init__()
        self.model, self.tokenizer, self.lr = model, tokenizer, lr
        self.strict_loading = False  # checkpoints hold only trainable weights

    def configure_optimizers(self):
        """AdamW over the trainable parameters."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights (a LoRA checkpoint does not repeat the frozen backbone)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def apply_lora(model, lora: LoraConfig, key: str):
    """Wrap a causal LM with a peft LoRA adapter (only the adapter trains); ``key`` names the recipe section."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the backbone
        raise ConfigError(f"{key}.lora.target_modules={list(lora.target_modules)}: {str(exc).splitlines()[0]}") from None


def load_backbone(recipe: Recipe, candidate: CandidateConfig, fit: FitConfig, key: str):
    """Check the strategy, seed, then load ``candidate`` for training (LoRA and gradient checkpointing as set)."""
    check_strategy(fit, key)  # before loading anything
    L.seed_everything(fit.seed, verbose=False)
    dtype = str(backbone_dtype(fit)).replace("torch.", "")
    model, tokenizer = load_source(candidate, dataclasses.replace(recipe.pool, dtype=dtype, device="cpu"))
    model.config.use_cache = False
    if fit.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if fit.lora.enabled:
            model.enable_input_require_grads()
    if fit.lora.enabled:
        model = apply_lora(model, fit.lora, key)
    model.train()  # loaded in eval mode; LoRA dropout needs train mode
    return model, tokenizer


def fit_module(module: TrainableModule, data: L.LightningDataModule, fit: FitConfig, key: str, ckpt_dir: Path,
               progress: bool = True) -> L.Trainer:
    """Train ``module``; resumes from ``ckpt_dir/last.ckpt`` (written by this run) when ``resume`` is set."""
    trainer = make_trainer(fit, key, ckpt_dir, progress)
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if fit.resume and last.exists() else None
    if resume:
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return trainer


def _gathered(module: TrainableModule, strategy: str):
    """Full parameters on every rank while exporting (ZeRO-3 partitions them)."""
    if strategy != "deepspeed_stage_3":
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def export_model(module: TrainableModule, trainer: L.Trainer, fit: FitConfig, out: Path, *, merge: bool,
                 extra: Optional[Callable[[object, Path], None]] = None) -> Path:
    """Save the module's model (a peft adapter, or merged when ``merge``) and tokenizer to ``out`` atomically.

    ``extra(model, folder)`` adds files to the folder before it is swapped in. Only the global-zero rank writes.
    """
    with _gathered(module, fit.strategy):
        if trainer.is_global_zero:
            model = module.model
            if merge and hasattr(model, "peft_config"):
                model = module.model = model.merge_and_unload()
            model.config.use_cache = True
            with atomic_path(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                module.tokenizer.save_pretrained(tmp)
                if extra is not None:
                    extra(model, tmp)
    return Path(out)
