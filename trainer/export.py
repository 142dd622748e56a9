"""Export a trained switcher in HF format plus ``switchkit.json`` (:class:`switchkit.artifacts.SwitcherMeta`).

A LoRA switcher is saved as a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose
``base_model`` is the candidate source it was trained from, so the engine can share that candidate's weights;
with ``train.merge_lora`` (or full fine-tuning) a merged HF model is saved.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from switchkit.artifacts import SwitcherMeta, write_meta
from switchkit.config import Recipe, candidate_name, to_dict

from .base import export_model
from .module import SwitcherModule


def candidate_entries(recipe: Recipe) -> list[dict]:
    """The pool's candidates as written in ``switchkit.json`` (index, name, source, role)."""
    return [{"index": i, "name": candidate_name(c), "source": c.source, "role": c.role}
            for i, c in enumerate(recipe.pool.candidates)]


def export_switcher(module: SwitcherModule, trainer: L.Trainer, recipe: Recipe, metrics: dict, base_source: str,
                    out: Path, replace: bool = False) -> Path:
    """Save ``module``'s switcher to ``out`` atomically (call it last: a merge replaces the module's model); an
    existing folder at ``out`` is replaced only with ``replace``."""
    merge = recipe.train.merge_lora

    def meta(model, folder: Path) -> None:
        adapter = hasattr(model, "peft_config")
        write_meta(folder, SwitcherMeta(
            prompt_format=module.format.name, n=module.n, candidates=candidate_entries(recipe), adapter=adapter,
            base_model=base_source if adapter else None, model_id_tokens=list(module.vocab.token_ids),
            max_length=module.max_length, metrics=metrics, recipe=to_dict(recipe)))

    return export_model(module, trainer, recipe.train, out, merge=merge, extra=meta, replace=replace)
