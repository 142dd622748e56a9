"""``toolkit train-switcher``: synthesize (if needed), train, export.

Training resumes from ``<run_dir>/checkpoints/switcher[/<task>]/last.ckpt`` when it exists, so rerunning the
same command continues the run (raise ``train.epochs`` to train further). Exported weights are safetensors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import lightning as L

from switchkit.artifacts import checkpoint_dir, switcher_dir, synthesis_data
from switchkit.config import CandidateConfig, ConfigError, Recipe, aligned_candidate
from switchkit.prompt import get_format

from .base import fit_module, load_backbone
from .data import SwitcherDataModule
from .export import export_switcher
from .module import SwitcherModule


def init_candidate(recipe: Recipe) -> CandidateConfig:
    """The backbone to start from: ``train.init`` or the pool's aligned candidate (the last one by default)."""
    if recipe.train.init:
        return CandidateConfig(source=recipe.train.init, role="aligned")
    return aligned_candidate(recipe.pool.candidates)


def build_module(recipe: Recipe) -> SwitcherModule:
    """Load the backbone (with LoRA if enabled) and wrap it as a switcher in the recipe's prompt format."""
    train = recipe.train
    model, tokenizer = load_backbone(recipe, init_candidate(recipe), train, "train")
    try:
        return SwitcherModule(model, tokenizer, len(recipe.pool.candidates), get_format(recipe.switcher.prompt_format or "v1"),
                              lr=train.lr, soft_targets=train.soft_targets, soft_temperature=train.soft_temperature,
                              max_length=train.max_length)
    except ValueError as exc:  # the tokenizer cannot encode the model ids as single tokens
        raise ConfigError(f"train.init / aligned candidate cannot be a switcher: {exc}") from None


def _metrics(results: list[dict], n: int, data: SwitcherDataModule) -> dict:
    n_val = len(data.val_set or [])
    metrics = {"train_records": len(data.train_set), "val_records": n_val}
    if not results:
        return metrics
    r = results[0]
    train_labels = Counter(data.train_set["label"])
    majority = train_labels.most_common(1)[0][0]
    return {
        **metrics,
        "accuracy": r["val_acc"],
        "majority_accuracy": sum(label == majority for label in data.val_set["label"]) / n_val,
        "per_class_accuracy": [r[f"val_acc_class_{i}"] for i in range(n)],
        "calibration_error": r["val_ece"],
        "utility_regret": r["val_regret"],
        "loss": r["val_loss"],
    }


def fit_switcher(recipe: Recipe, data_files: Sequence[str | Path], *, task: Optional[str] = None,
                 progress: bool = True, kind: str = "switcher") -> tuple[SwitcherModule, dict, L.Trainer]:
    """Train one switcher on ``data_files`` (optionally one task); return (module, val metrics, trainer).

    ``kind`` names its checkpoint folder (``switcher``, or ``router`` for the trained-router baseline).

    ``majority_accuracy`` is the validation accuracy of always answering the training split's most common label.
    """
    train = recipe.train
    module = build_module(recipe)
    data = SwitcherDataModule(data_files, module.tokenizer, module.format, module.vocab, task=task,
                              max_length=train.max_length, micro_batch_size=train.micro_batch_size,
                              val_fraction=train.val_fraction, seed=train.seed)
    data.setup()
    trainer = fit_module(module, data, train, "train", checkpoint_dir(recipe, kind, task), progress)
    results = trainer.validate(module, datamodule=data, verbose=False) if data.val_set is not None else []
    return module, _metrics(results, module.n, data), trainer


def train_switcher(recipe: Recipe, data_files: Sequence[str | Path], *, task: Optional[str] = None,
                   output: Optional[str | Path] = None, progress: bool = True,
                   kind: str = "switcher") -> tuple[Path, dict]:
    """Train one switcher on ``data_files`` (optionally one task), export it; return (folder, val metrics)."""
    module, metrics, trainer = fit_switcher(recipe, data_files, task=task, progress=progress, kind=kind)
    out = Path(output) if output else switcher_dir(recipe, task)
    export_switcher(module, trainer, recipe, metrics, init_candidate(recipe).source, out)
    return out, metrics


def dataset_files(recipe: Recipe) -> list[Path]:
    """``train.data`` if set, else the synthesis output (running synthesis first when it does not exist)."""
    if recipe.train.data:
        return [Path(p) for p in recipe.train.data]
    from switchkit.data_synthesis.synthesize import run_synthesis

    existing = synthesis_data(recipe)
    if existing.is_file():
        print(f"synthesis: {existing} exists, skipping synthesis")
        return [existing]
    return [run_synthesis(recipe, progress=True)]


def train_switcher_command(recipe: Recipe) -> None:
    """Synthesize if needed, train one switcher (global) or one per task, export, and print where each went."""
    from .strategies import check_strategy

    check_strategy(recipe.train, "train")
    if recipe.train.per_task and not recipe.tasks:
        raise ConfigError("train.per_task=true needs tasks: the recipe lists none")
    files = dataset_files(recipe)
    print(f"training data: {', '.join(map(str, files))}")
    tasks = [t.name for t in recipe.tasks] if recipe.train.per_task else [None]
    for task in tasks:
        out, metrics = train_switcher(recipe, files, task=task)
        label = f"switcher for task {task}" if task else "switcher"
        acc = metrics.get("accuracy")
        print(f"{label}: {out}" + (f" (val accuracy {acc:.3f}, majority-class {metrics['majority_accuracy']:.3f}, "
                                   f"regret {metrics['utility_regret']:.3f})" if acc is not None else ""))
        print(f"checkpoints: {checkpoint_dir(recipe, 'switcher', task)}")
