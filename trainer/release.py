"""``toolkit release ckpt=DIR out=DIR [push_to_hub=REPO]``: a self-contained switcher folder with a model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from switchkit.artifacts import META_FILE, SwitcherMeta, check_switcher, read_meta
from switchkit.io import InputError, atomic_path, check_output

METRIC_NAMES = {
    "accuracy": "accuracy (argmax = label)",
    "majority_accuracy": "majority-class accuracy (baseline)",
    "calibration_error": "expected calibration error",
    "utility_regret": "utility regret (best minus chosen)",
    "loss": "cross-entropy",
    "train_records": "training records",
    "val_records": "validation records",
}

CARD = """---
{{ card_data }}
---

# switchkit switcher

A switcher LM for switch generation over a pool of {{ n }} checkpoints: given a query and the response so far
(prompt format `{{ prompt_format }}`), it picks which checkpoint writes the next patch, from the next-token
logits of the model-id tokens `0`..`{{ n - 1 }}`.
{% if adapter %}
This folder holds a LoRA adapter. Its base is the pool candidate `{{ base_model }}`; switchkit shares that
candidate's weights, so the pool stays at n models.
{% endif %}
## Candidates

| id | name | role | source |
| --- | --- | --- | --- |
{% for c in candidates %}| {{ c.index }} | {{ c.name }} | {{ c.role }} | `{{ c.source }}` |
{% endfor %}
## Validation metrics

| metric | value |
| --- | --- |
{% for label, value in metrics %}| {{ label }} | {{ value }} |
{% endfor %}
## Training

Tasks: {{ tasks }}. Epochs {{ train.epochs }}, learning rate {{ train.lr }}, batch size {{ train.batch_size }},
LoRA {{ "on" if train.lora and train.lora.enabled else "off" }}, soft targets {{ "on" if train.soft_targets else "off" }}.

## Intended use

Choosing the next writer, patch by patch, in `toolkit generate` with `switcher.path` set to this folder and a
pool whose candidates match the table above, in the same order.

## Limits

- It only knows the candidates above; with other models or another order its choices are meaningless.
- Labels come from sampled rollouts scored by task scorers, so they are noisy; validation accuracy measures
  agreement with those labels, not answer quality.
- Trained on the tasks listed; on other tasks it may still help, but check with `toolkit eval`.
- It is a small classifier over model ids, not a chat model: do not use it to generate text.
"""


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(meta: SwitcherMeta) -> ModelCard:
    """The model card of a released switcher: metrics table, candidates, intended use and limits."""
    recipe, base = meta.recipe, meta.base_model
    hub_base = base if base and "/" in base and ":" not in base and not Path(base).exists() else None
    metrics = [(label, _fmt(meta.metrics[key])) for key, label in METRIC_NAMES.items() if key in meta.metrics]
    metrics += [(f"accuracy on records labelled model {i}", _fmt(v))
                for i, v in enumerate(meta.metrics.get("per_class_accuracy", []))]
    data = ModelCardData(library_name="peft" if meta.adapter else "transformers", tags=["switchkit", "switcher"],
                         base_model=hub_base)
    return ModelCard.from_template(
        data, template_str=CARD, n=meta.n, prompt_format=meta.prompt_format, adapter=meta.adapter,
        base_model=base, candidates=meta.candidates, metrics=metrics, train=recipe.get("train", {}),
        tasks=", ".join(t["name"] for t in recipe.get("tasks", [])) or "(not recorded)")


def release_command(ckpt: str, out: str, push_to_hub: Optional[str] = None, overwrite: bool = False) -> None:
    """Copy an exported switcher (``ckpt``: a folder with switchkit.json) to ``out`` with a model card.

    An existing ``out`` that is not empty is an error unless ``overwrite`` (then it is replaced as a whole)."""
    src = Path(ckpt)
    if src.is_file():
        raise InputError(f"ckpt={ckpt}: give an exported switcher folder (e.g. runs/NAME/switcher), "
                         "not a training checkpoint file")
    if not src.is_dir():
        raise InputError(f"ckpt={ckpt}: folder not found")
    meta = read_meta(src)
    if meta is None:
        raise InputError(f"ckpt={ckpt}: not an exported switcher ({META_FILE} is missing)")
    check_switcher(src, meta.n)
    target = Path(out)
    if src.resolve() in target.resolve().parents:
        raise InputError(f"out={out} is inside ckpt={ckpt}: write the release elsewhere")
    replace = check_output(target, overwrite=overwrite)
    with atomic_path(target, overwrite=replace) as tmp:
        shutil.copytree(src, tmp)
        model_card(meta).save(tmp / "README.md")
    print(f"release: {out} ({', '.join(sorted(p.name for p in Path(out).iterdir()))})")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=out, repo_id=push_to_hub, commit_message="switchkit switcher release")
        print(f"pushed to https://huggingface.co/{push_to_hub}")
