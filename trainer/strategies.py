"""Training strategies: ``auto`` (CPU or one GPU) and DeepSpeed ZeRO-2/3 with bf16 (several GPUs or nodes)."""

from __future__ import annotations

from pathlib import Path

import torch

from switchkit.config import ConfigError, FitConfig


def deepspeed_config(train: FitConfig) -> dict:
    """The DeepSpeed config for ``train.strategy=deepspeed_stage_2|3``.

    Lightning fills in the micro-batch size, gradient accumulation and clipping from the Trainer.
    """
    stage = int(train.strategy.rsplit("_", 1)[1])
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True}


def check_strategy(train: FitConfig, key: str) -> None:
    """Fail early, in one line, when the strategy cannot run on this machine (``key`` names the recipe section)."""
    if not train.strategy.startswith("deepspeed"):
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}.strategy={train.strategy} needs CUDA GPUs, but none is available: "
            f"use {key}.strategy=auto on CPU or a single device"
        )
    if not train.precision.startswith("bf16"):
        raise ConfigError(
            f"{key}.precision={train.precision} with {key}.strategy={train.strategy}: "
            f"DeepSpeed runs here in bf16, use {key}.precision=bf16-mixed or bf16-true"
        )


def resolve_strategy(train: FitConfig, key: str):
    """The Lightning strategy for a recipe: ``"auto"`` or a configured ``DeepSpeedStrategy``."""
    check_strategy(train, key)
    if train.strategy == "auto":
        return "auto"
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # With LoRA, checkpoints skip the frozen backbone (resume loads them non-strictly).
    return DeepSpeedStrategy(config=deepspeed_config(train), exclude_frozen_parameters=train.lora.enabled)


def world_size(train: FitConfig) -> int:
    """How many processes train together (devices per node x nodes)."""
    devices = train.devices
    if devices == "auto" or devices == "-1":
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    elif devices.isdigit():
        per_node = int(devices)
    else:  # a list such as "0,1,3"
        per_node = len([d for d in devices.split(",") if d.strip()])
    return max(per_node, 1) * train.num_nodes


def accumulation_steps(train: FitConfig) -> int:
    """Micro-batches per optimizer step so that one step sees ``train.batch_size`` records in total."""
    return max(train.batch_size // (train.micro_batch_size * world_size(train)), 1)


def make_trainer(cfg: FitConfig, key: str, ckpt_dir: Path, progress: bool = True):
    """A Lightning Trainer for ``cfg`` (switcher or distillation): its strategy, precision and gradient
    accumulation, ``last.ckpt`` rewritten (atomically) at the end of every epoch in ``ckpt_dir``, and CSV logs
    beside it. Torch's random state is seeded from (seed, epoch, batch) before each training batch, so a fit
    resumed from an epoch's checkpoint repeats the rest exactly (dropout included)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from switchkit.engine import derive_seed

    class BatchSeed(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            torch.manual_seed(derive_seed(cfg.seed, "fit", trainer.current_epoch, batch_idx, trainer.global_rank))

    return L.Trainer(
        max_epochs=cfg.epochs, accelerator="auto", devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy=resolve_strategy(cfg, key), precision=cfg.precision, accumulate_grad_batches=accumulation_steps(cfg),
        gradient_clip_val=1.0, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False,
                                   save_on_train_epoch_end=True), BatchSeed()],
        logger=CSVLogger(ckpt_dir, name="logs"), enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=ckpt_dir,
    )


def backbone_dtype(train: FitConfig) -> torch.dtype:
    """Weights in bf16 for ``bf16-true`` and DeepSpeed (it keeps fp32 master weights), else fp32."""
    if train.precision == "bf16-true" or train.strategy.startswith("deepspeed"):
        return torch.bfloat16
    return torch.float32
