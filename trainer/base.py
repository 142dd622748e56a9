"""The training base shared by the switcher trainer and distillation.

It owns what every fit needs: the backbone (a pool candidate, float32 on CPU or bf16 for bf16-true and
DeepSpeed) with optional LoRA and gradient checkpointing, AdamW over the trainable parameters, checkpoints that
hold only trainable weights, the Lightning trainer with its strategy (:mod:`.strategies`), a fingerprint of
each fit (:func:`fit_fingerprint`) so that ``last.ckpt`` is continued only by the same job and loaded as weights
only, a shuffle that a resumed fit repeats exactly, and an export that gathers ZeRO-3-partitioned weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from switchkit.config import CandidateConfig, ConfigError, FitConfig, LoraConfig, Recipe, to_dict
from switchkit.io import InputError, atomic_path, check_output, clear_output, write_json_atomic
from switchkit.models import load_source, source_identity
from switchkit.runner import same_job

from .strategies import backbone_dtype, check_strategy, make_trainer


class EpochShuffle(Sampler):
    """A shuffle drawn from (seed, epoch): Lightning sets the epoch, so a fit resumed at an epoch boundary sees
    the same order as one that never stopped."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


class EncodedDataModule(L.LightningDataModule):
    """Encoded rows split into ``train_set`` and ``val_set`` (set by :meth:`setup`), served as micro-batches
    padded by ``collate(rows, pad_id)``."""

    def __init__(self, tokenizer, collate: Callable[[list[dict], int], dict], micro_batch_size: int, seed: int = 0):
        super().__init__()
        self.tokenizer, self.collate, self.micro_batch_size = tokenizer, collate, micro_batch_size
        self.shuffle_seed = seed
        self.train_set = None
        self.val_set = None

    def _loader(self, rows, shuffle: bool) -> DataLoader:
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return DataLoader(rows, batch_size=self.micro_batch_size,
                          sampler=EpochShuffle(len(rows), self.shuffle_seed) if shuffle else None,
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


FIT_VERSION = 1  # bump when the checkpoints or exports of a fit change for the same inputs


def fit_fingerprint(recipe: Recipe, section: str, candidate: CandidateConfig, **data) -> dict:
    """What decides a fit's checkpoints and export: the backbone (config and weights), the ``section``'s settings
    except those that only extend or place it (epochs, resume, output, input paths), and ``data`` (content hashes
    of the training data and anything else the caller adds)."""
    skip = ("epochs", "resume", "output", "data", "generations")
    settings = {k: v for k, v in to_dict(recipe)[section].items() if k not in skip}
    return {"version": FIT_VERSION, "init": {**dataclasses.asdict(candidate), "weights": source_identity(candidate)},
            section: settings, **data}


@dataclass
class FitPlan:
    """What a fit continues and replaces, decided by :func:`plan_fit` before anything loads."""

    ckpt_dir: Path
    expected: dict
    out: Path
    resume: Optional[Path]  # last.ckpt of this job, to continue from
    fresh: bool  # the checkpoint folder holds other work that overwrite=true replaces
    replace_out: bool  # the export replaces what is at out (this job's earlier export, or overwrite=true)
    epochs_done: int = 0  # completed epochs in last.ckpt
    epochs: int = 0

    @property
    def finished(self) -> bool:
        """This job trained every epoch and exported to ``out`` already: nothing is left to do."""
        return self.resume is not None and self.epochs_done >= self.epochs and self.out.is_dir() and \
            any(self.out.iterdir())


def check_checkpoint(path: Path) -> int:
    """A checkpoint to resume from loads as weights only (no code is unpickled) and is a Lightning checkpoint;
    returns its number of completed epochs."""
    if path.is_dir():  # a DeepSpeed checkpoint folder: DeepSpeed reads it
        return 0
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable checkpoint ({first}): delete it, or rerun with overwrite=true, "
                         "to restart the fit from scratch") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(f"{path}: not a Lightning checkpoint (no state_dict): delete it, or rerun with "
                         "overwrite=true, to restart the fit from scratch")
    return int(ckpt.get("epoch", -1)) + 1  # saved at the end of each epoch: "epoch" is the finished one's index


def plan_fit(ckpt_dir: Path, expected: dict, fit: FitConfig, key: str, out: Path, overwrite: bool) -> FitPlan:
    """Before loading: checkpoints are continued only under the same fingerprint and the export folder is this
    job's or new; anything else is an error naming it (and what changed), unless ``overwrite``."""
    same = same_job(ckpt_dir / "fingerprint.json", expected, ckpt_dir, overwrite)
    fresh = not same and check_output(ckpt_dir, overwrite=overwrite)
    last = ckpt_dir / "last.ckpt"
    if same and last.exists() and not fit.resume:
        if not overwrite:
            raise ConfigError(f"{key}.resume=false, but {last} exists: set overwrite=true to start the fit over, "
                              f"or {key}.resume=true to continue it")
        fresh = True
    resume = last if same and fit.resume and last.exists() else None
    done = check_checkpoint(resume) if resume is not None else 0
    replace_out = check_output(out, overwrite=overwrite, ours=same) or same
    return FitPlan(ckpt_dir, expected, Path(out), resume, fresh, replace_out, done, fit.epochs)


def fit_module(module: TrainableModule, data: L.LightningDataModule, fit: FitConfig, key: str, plan: FitPlan,
               progress: bool = True) -> L.Trainer:
    """Train ``module`` as ``plan`` says: continue this job's ``last.ckpt`` (loaded as weights only), or start
    over in a checkpoint folder stamped with the job's fingerprint."""
    if plan.fresh:
        clear_output(plan.ckpt_dir)
    write_json_atomic(plan.ckpt_dir / "fingerprint.json", plan.expected)
    trainer = make_trainer(fit, key, plan.ckpt_dir, progress)
    if plan.resume:
        print(f"resuming from {plan.resume}")
    trainer.fit(module, datamodule=data, ckpt_path=str(plan.resume) if plan.resume else None, weights_only=True)
    return trainer


def _gathered(module: TrainableModule, strategy: str):
    """Full parameters on every rank while exporting (ZeRO-3 partitions them)."""
    if strategy != "deepspeed_stage_3":
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def export_model(module: TrainableModule, trainer: L.Trainer, fit: FitConfig, out: Path, *, merge: bool,
                 extra: Optional[Callable[[object, Path], None]] = None, replace: bool = False) -> Path:
    """Save the module's model (a peft adapter, or merged when ``merge``) and tokenizer to ``out`` atomically.

    ``extra(model, folder)`` adds files to the folder before it is swapped in; an existing folder at ``out`` is
    replaced only with ``replace`` (:attr:`FitPlan.replace_out`). Only the global-zero rank writes.
    """
    with _gathered(module, fit.strategy):
        if trainer.is_global_zero:
            model = module.model
            if merge and hasattr(model, "peft_config"):
                model = module.model = model.merge_and_unload()
            model.config.use_cache = True
            with atomic_path(out, overwrite=replace) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                module.tokenizer.save_pretrained(tmp)
                if extra is not None:
                    extra(model, tmp)
    return Path(out)
