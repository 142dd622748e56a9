"""``toolkit train-switcher``: synthesize (if needed), train, export.

Training resumes from ``<run_dir>/checkpoints/switcher[/<task>]/last.ckpt`` when it exists, so rerunning
the same command continues the run (raise ``train.epochs`` to train further). Lightning checkpoints are
pickled: only resume from checkpoints this run wrote. Exported weights are safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import lightning as L

from switchkit.config import CandidateConfig, ConfigError, Recipe, aligned_index, run_path
from switchkit.models import load_source

from .data import SwitcherDataModule
from .export import export_switcher
from .module import SwitcherModule, apply_lora
from .strategies import backbone_dtype, check_strategy, make_trainer


def init_candidate(recipe: Recipe) -> CandidateConfig:
    """The backbone to start from: ``train.init`` or the pool's aligned candidate (the last one by default)."""
    if recipe.train.init:
        return CandidateConfig(source=recipe.train.init, role="aligned")
    cands = recipe.pool.candidates
    if not cands:
        raise ConfigError("pool.candidates is empty: the switcher needs n >= 1 candidates (and train.init or an aligned one)")
    return cands[aligned_index([c.role for c in cands])]


def build_module(recipe: Recipe) -> SwitcherModule:
    """Load the backbone (float32 on CPU, bf16 for bf16-true/DeepSpeed), add LoRA if enabled, wrap it."""
    train = recipe.train
    dtype = str(backbone_dtype(train)).replace("torch.", "")
    model, tokenizer = load_source(init_candidate(recipe), dataclasses.replace(recipe.pool, dtype=dtype, device="cpu"))
    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if train.lora.enabled:
            model.enable_input_require_grads()
    if train.lora.enabled:
        model = apply_lora(model, train.lora)
    model.train()
    try:
        return SwitcherModule(model, tokenizer, len(recipe.pool.candidates), lr=train.lr,
                              soft_targets=train.soft_targets, soft_temperature=train.soft_temperature,
                              max_length=train.max_length)
    except ValueError as exc:  # the tokenizer cannot encode the model ids as single tokens
        raise ConfigError(f"train.init / aligned candidate cannot be a switcher: {exc}") from None


def _metrics(results: list[dict], n: int, n_train: int, n_val: int) -> dict:
    if not results:
        return {"train_records": n_train, "val_records": 0}
    r = results[0]
    return {
        "accuracy": r["val_acc"],
        "per_class_accuracy": [r[f"val_acc_class_{i}"] for i in range(n)],
        "calibration_error": r["val_ece"],
        "utility_regret": r["val_regret"],
        "loss": r["val_loss"],
        "train_records": n_train,
        "val_records": n_val,
    }


def _gathered(module: SwitcherModule, strategy: str):
    """Full parameters on every rank for export (ZeRO-3 partitions them)."""
    if strategy != "deepspeed_stage_3":
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def fit_switcher(recipe: Recipe, data_files: Sequence[str | Path], *, task: Optional[str] = None,
                 progress: bool = True) -> tuple[SwitcherModule, dict, L.Trainer]:
    """Train one switcher on ``data_files`` (optionally one task); return (module, val metrics, trainer)."""
    train = recipe.train
    check_strategy(train)  # before loading anything
    L.seed_everything(train.seed, verbose=False)
    module = build_module(recipe)
    data = SwitcherDataModule(data_files, module.tokenizer, module.vocab, task=task, max_length=train.max_length,
                              micro_batch_size=train.micro_batch_size, val_fraction=train.val_fraction,
                              seed=train.seed)
    data.setup()
    ckpt_dir = Path(recipe.run_dir) / "checkpoints" / "switcher" / (task or "")
    trainer = make_trainer(train, ckpt_dir, progress)
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if train.resume and last.exists() else None
    if resume:
        print(f"resuming from {resume}")
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    results = trainer.validate(module, datamodule=data, verbose=False) if data.val_set is not None else []
    return module, _metrics(results, module.n, len(data.train_set), len(data.val_set or [])), trainer


def train_switcher(recipe: Recipe, data_files: Sequence[str | Path], *, task: Optional[str] = None,
                   output: Optional[str | Path] = None, progress: bool = True) -> tuple[Path, dict]:
    """Train one switcher on ``data_files`` (optionally one task), export it; return (folder, val metrics)."""
    module, metrics, trainer = fit_switcher(recipe, data_files, task=task, progress=progress)
    train = recipe.train
    out = Path(output) if output else run_path(recipe, train.output, "switcher") / (task or "")
    with _gathered(module, train.strategy):
        if trainer.is_global_zero:
            export_switcher(module, out, recipe, metrics, init_candidate(recipe).source, merge=train.merge_lora)
    return out, metrics


def dataset_files(recipe: Recipe) -> list[Path]:
    """``train.data`` if set, else the synthesis output (running synthesis first when it does not exist)."""
    if recipe.train.data:
        return [Path(p) for p in recipe.train.data]
    from switchkit.data_synthesis.synthesize import data_path, run_synthesis, synthesis_dir

    existing = data_path(synthesis_dir(recipe), recipe)
    if existing.is_file():
        print(f"synthesis: {existing} exists, skipping synthesis")
        return [existing]
    return [run_synthesis(recipe, progress=True)]


def train_switcher_command(recipe: Recipe) -> None:
    """Synthesize if needed, train one switcher (global) or one per task, export, and print where each went."""
    check_strategy(recipe.train)
    if recipe.train.per_task and not recipe.tasks:
        raise ConfigError("train.per_task=true needs tasks: the recipe lists none")
    files = dataset_files(recipe)
    print(f"training data: {', '.join(map(str, files))}")
    tasks = [t.name for t in recipe.tasks] if recipe.train.per_task else [None]
    for task in tasks:
        out, metrics = train_switcher(recipe, files, task=task)
        label = f"switcher for task {task}" if task else "switcher"
        acc = metrics.get("accuracy")
        print(f"{label}: {out}" + (f" (val accuracy {acc:.3f}, regret {metrics['utility_regret']:.3f})" if acc is not None else ""))
        print(f"checkpoints: {Path(recipe.run_dir) / 'checkpoints' / 'switcher' / (task or '')}")
