"""Export a trained switcher in HF format plus ``switchkit.json`` (what the engine loads by path).

A LoRA switcher is saved as a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) whose
``base_model`` in ``switchkit.json`` is the candidate source it was trained from, so the engine can share
that candidate's weights; with ``train.merge_lora`` (or full fine-tuning) a merged HF model is saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from switchkit.config import Recipe, candidate_name, to_dict
from switchkit.io import InputError, atomic_path
from switchkit.prompt import META_FILE, read_switcher_meta

FORMAT_VERSION = 1


def candidate_entries(recipe: Recipe) -> list[dict]:
    """The pool's candidates as written in ``switchkit.json`` (index, name, source, role)."""
    return [
        {"index": i, "name": candidate_name(c), "source": c.source, "role": c.role}
        for i, c in enumerate(recipe.pool.candidates)
    ]


def export_switcher(module, out_dir: str | Path, recipe: Recipe, metrics: dict, base_source: str,
                    merge: bool = False) -> Path:
    """Save ``module``'s switcher to ``out_dir`` atomically and return the folder.

    With ``merge=True`` a LoRA adapter is merged into the backbone in place (the module's model is
    replaced by the merged one), so call it last.
    """
    model = module.model
    adapter = hasattr(model, "peft_config") and not merge
    if hasattr(model, "peft_config") and merge:
        model = model.merge_and_unload()
        module.model = model
    meta = {
        "format_version": FORMAT_VERSION,
        "prompt_format": recipe.switcher.prompt_format,
        "n": module.n,
        "candidates": candidate_entries(recipe),
        "base_model": base_source if adapter else None,
        "adapter": adapter,
        "model_id_tokens": list(module.vocab.token_ids),
        "strip_trailing_space": module.vocab.strip_trailing_space,
        "recipe": to_dict(recipe),
        "metrics": metrics,
    }
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        module.tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Path(out_dir)


def read_meta(path: str | Path) -> dict:
    """Read and check an exported switcher's ``switchkit.json``."""
    meta = read_switcher_meta(path)
    if not meta:
        raise InputError(f"{path}: not an exported switcher ({META_FILE} is missing)")
    file = Path(path) / META_FILE
    for key in ("format_version", "prompt_format", "n", "candidates", "adapter", "metrics"):
        if key not in meta:
            raise InputError(f"{file}: missing key {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise InputError(f"{file}: format_version={meta['format_version']!r} is unknown: allowed is {FORMAT_VERSION}")
    return meta

