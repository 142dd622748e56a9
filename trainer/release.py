"""``toolkit release ckpt=DIR out=DIR [push_to_hub=REPO]``: a self-contained switcher folder with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from switchkit.io import InputError, atomic_path

from .export import read_meta

METRIC_NAMES = {
    "accuracy": "accuracy (argmax = label)",
    "calibration_error": "expected calibration error",
    "utility_regret": "utility regret (best minus chosen)",
    "loss": "cross-entropy",
    "train_records": "training records",
    "val_records": "validation records",
}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(meta: dict) -> str:
    """The README.md of a released switcher: metrics table, candidates, intended use and limits."""
    n, metrics, recipe = meta["n"], meta["metrics"], meta.get("recipe", {})
    tasks = ", ".join(t["name"] for t in recipe.get("tasks", [])) or "(not recorded)"
    train = recipe.get("train", {})
    base = meta.get("base_model")
    front = ["---", "library_name: " + ("peft" if meta["adapter"] else "transformers"), "tags: [switchkit, switcher]"]
    if base and "/" in base and ":" not in base and not Path(base).exists():  # a hub id, as the Hub expects
        front.append(f"base_model: {base}")
    lines = front + ["---", "", "# switchkit switcher", "",
                     f"A switcher LM for switch generation over a pool of {n} checkpoints: given a query and the "
                     "response so far (prompt format `" + meta["prompt_format"] + "`), it picks which checkpoint writes "
                     "the next patch, from the next-token logits of the model-id tokens `0`..`" + str(n - 1) + "`.", ""]
    if meta["adapter"]:
        lines += [f"This folder holds a LoRA adapter. Its base is the pool candidate `{base}`; switchkit shares that "
                  "candidate's weights, so the pool stays at n models.", ""]
    lines += ["## Candidates", "", "| id | name | role | source |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['index']} | {c['name']} | {c['role']} | `{c['source']}` |" for c in meta["candidates"]]
    lines += ["", "## Validation metrics", "", "| metric | value |", "| --- | --- |"]
    for key, label in METRIC_NAMES.items():
        if key in metrics:
            lines.append(f"| {label} | {_fmt(metrics[key])} |")
    for i, value in enumerate(metrics.get("per_class_accuracy", [])):
        lines.append(f"| accuracy on records labelled model {i} | {_fmt(value)} |")
    lines += ["", "## Training", "",
              f"Tasks: {tasks}. Epochs {train.get('epochs')}, learning rate {train.get('lr')}, batch size "
              f"{train.get('batch_size')}, LoRA {'on' if train.get('lora', {}).get('enabled') else 'off'}, "
              f"soft targets {'on' if train.get('soft_targets') else 'off'}.", "",
              "## Intended use", "",
              "Choosing the next writer, patch by patch, in `toolkit generate` with `switcher.path` set to this folder "
              "and a pool whose candidates match the table above, in the same order.", "",
              "## Limits", "",
              "- It only knows the candidates above; with other models or another order its choices are meaningless.",
              "- Labels come from sampled rollouts scored by task scorers, so they are noisy; validation accuracy "
              "measures agreement with those labels, not answer quality.",
              "- Trained on the tasks listed; on other tasks it may still help, but check with `toolkit eval`.",
              "- It is a small classifier over model ids, not a chat model: do not use it to generate text.", ""]
    return "\n".join(lines)


def release_command(ckpt: str, out: str, push_to_hub: Optional[str] = None) -> None:
    """Copy an exported switcher (``ckpt``: a folder with switchkit.json) to ``out`` with a model card."""
    src = Path(ckpt)
    if src.is_file():
        raise InputError(f"ckpt={ckpt}: give an exported switcher folder (e.g. runs/NAME/switcher), "
                         "not a training checkpoint file")
    if not src.is_dir():
        raise InputError(f"ckpt={ckpt}: folder not found")
    meta = read_meta(src)
    weights = list(src.glob("*.safetensors"))
    if not weights:
        raise InputError(f"ckpt={ckpt}: no .safetensors weights in the folder")
    with atomic_path(out) as tmp:
        shutil.copytree(src, tmp)
        (tmp / "README.md").write_text(model_card(meta))
    print(f"release: {out} ({', '.join(sorted(p.name for p in Path(out).iterdir()))})")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=out, repo_id=push_to_hub, commit_message="switchkit switcher release")
        print(f"pushed to https://huggingface.co/{push_to_hub}")

