"""``toolkit train-switcher``: synthesize (if needed), train, export.

Training resumes from ``<run_dir>/checkpoints/switcher/last.ckpt`` (``checkpoints/task_switchers/<task>/`` per
task) when the checkpoint folder's fingerprint matches the job, so rerunning the same command continues the run
(raise ``train.epochs`` to train further) and does nothing once it is exported. Exported weights are safetensors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import datasets
import lightning as L

from switchkit.artifacts import checkpoint_dir, load_records, read_meta, records_hash, switcher_dir
from switchkit.config import CandidateConfig, ConfigError, Recipe, aligned_candidate
from switchkit.io import check_output
from switchkit.prompt import get_format

from .base import FitPlan, fit_fingerprint, fit_module, load_backbone, plan_fit
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


def switcher_plan(recipe: Recipe, records: datasets.Dataset, task: Optional[str], out: Path,
                  overwrite: bool = False, kind: str = "switcher") -> FitPlan:
    """What the fit of one switcher continues and replaces (checked before anything loads); ``kind`` names its
    checkpoint folder (``switcher``, or ``router`` for the trained-router baseline)."""
    expected = fit_fingerprint(recipe, "train", init_candidate(recipe), data=records_hash(records), task=task,
                               n=len(recipe.pool.candidates), prompt_format=recipe.switcher.prompt_format or "v1")
    return plan_fit(checkpoint_dir(recipe, kind, task), expected, recipe.train, "train", out, overwrite)


def fit_switcher(recipe: Recipe, data: Sequence[str | Path] | datasets.Dataset, *, task: Optional[str] = None,
                 progress: bool = True, plan: Optional[FitPlan] = None) -> tuple[SwitcherModule, dict, L.Trainer]:
    """Train one switcher on ``data`` (record files, or records checked by :func:`load_records`), optionally one
    task; return (module, val metrics, trainer). The records and the checkpoints are checked before the backbone
    loads.

    ``majority_accuracy`` is the validation accuracy of always answering the training split's most common label.
    """
    train = recipe.train
    records = data if isinstance(data, datasets.Dataset) else load_records(data, len(recipe.pool.candidates), task)
    plan = plan or switcher_plan(recipe, records, task, switcher_dir(recipe, task))
    module = build_module(recipe)
    data = SwitcherDataModule(records, module.tokenizer, module.format, module.vocab, task=task,
                              max_length=train.max_length, micro_batch_size=train.micro_batch_size,
                              val_fraction=train.val_fraction, seed=train.seed)
    data.setup()
    trainer = fit_module(module, data, train, "train", plan, progress)
    results = trainer.validate(module, datamodule=data, verbose=False) if data.val_set is not None else []
    return module, _metrics(results, module.n, data), trainer


def train_switcher(recipe: Recipe, data_files: Sequence[str | Path], *, task: Optional[str] = None,
                   output: Optional[str | Path] = None, progress: bool = True,
                   overwrite: bool = False, kind: str = "switcher") -> tuple[Path, dict]:
    """Train one switcher on ``data_files`` (optionally one task), export it; return (folder, val metrics).

    A rerun of the same job continues its checkpoint (and does nothing once it is exported); checkpoints or an
    export folder of another job are an error unless ``overwrite``."""
    out = Path(output) if output else switcher_dir(recipe, task)
    records = load_records(data_files, len(recipe.pool.candidates), task)
    plan = switcher_plan(recipe, records, task, out, overwrite, kind)
    if plan.finished:
        meta = read_meta(out)
        print(f"switcher: {out} is up to date ({plan.epochs_done} epochs)")
        return out, meta.metrics if meta else {}
    module, metrics, trainer = fit_switcher(recipe, records, task=task, progress=progress, plan=plan)
    export_switcher(module, trainer, recipe, metrics, init_candidate(recipe).source, out, replace=plan.replace_out)
    return out, metrics


def dataset_files(recipe: Recipe, overwrite: bool = False) -> list[Path]:
    """``train.data`` if set, else the synthesis output (synthesized first, or continued, unless up to date)."""
    if recipe.train.data:
        return [Path(p) for p in recipe.train.data]
    from switchkit.data_synthesis.synthesize import run_synthesis

    return [run_synthesis(recipe, progress=True, overwrite=overwrite)]


def train_switcher_command(recipe: Recipe, overwrite: bool = False) -> None:
    """Synthesize if needed, train one switcher (global) or one per task, export, and print where each went."""
    from .strategies import check_strategy

    check_strategy(recipe.train, "train")
    if recipe.train.per_task and not recipe.tasks:
        raise ConfigError("train.per_task=true needs tasks: the recipe lists none")
    tasks = [t.name for t in recipe.tasks] if recipe.train.per_task else [None]
    for task in tasks:  # before synthesis: folders that no fit of this recipe wrote
        if not (checkpoint_dir(recipe, "switcher", task) / "fingerprint.json").is_file():
            check_output(checkpoint_dir(recipe, "switcher", task), overwrite=overwrite)
            check_output(switcher_dir(recipe, task), overwrite=overwrite)
    files = dataset_files(recipe, overwrite)
    for task in tasks:
        out, metrics = train_switcher(recipe, files, task=task, overwrite=overwrite)
        label = f"switcher for task {task}" if task else "switcher"
        acc = metrics.get("accuracy")
        print(f"{label}: {out}" + (f" (val accuracy {acc:.3f}, majority-class {metrics['majority_accuracy']:.3f}, "
                                   f"regret {metrics['utility_regret']:.3f})" if acc is not None else ""))
        print(f"checkpoints: {checkpoint_dir(recipe, 'switcher', task)}")
    print(f"training data: {', '.join(map(str, files))}")
