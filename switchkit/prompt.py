"""The switcher prompt (format ``v1``) and the model-id tokens the switcher's decision is read from.

v1 is the format of the public switcher checkpoints (e.g. ``bunsenfeng/PFA_switcher_1``)::

    {query} <model i begins> {text} <model i ends> ... Which model should generate the next segment?
    Please respond with a number from 0 to {n-1}. The answer is model 

Decision rule: one forward pass over the prompt, the next-token logits of the n model-id tokens,
a softmax over those n only. The model-id token for digit ``d`` is the token the switcher's tokenizer
produces for ``d`` right after the prompt, i.e. in ``tokenize(prompt + d)``. For BPE tokenizers that fold
a leading space into the digit (``" 3"``), the prompt's trailing space belongs to the id token, so the
prompt is encoded without it. :func:`switcher_vocab` works this out once per tokenizer and both the
trainer and the engine use it, so training and inference read the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .io import InputError

PROMPT_FORMATS = ("v1",)
META_FILE = "switchkit.json"  # beside an exported switcher: prompt_format, n, candidates, base_model, ...
MAX_MODELS = 10


def segment_block(model: int, text: str) -> str:
    """One ``<model i begins> TEXT <model i ends>`` block, with its leading space."""
    return f" <model {model} begins> {text} <model {model} ends>"


def question(n: int) -> str:
    """The closing question for a pool of ``n`` models."""
    return (
        f" Which model should generate the next segment? Please respond with a number from 0 to {n - 1}."
        " The answer is model "
    )


def build_prompt(query: str, segments: Sequence[tuple[int, str]], n: int, prompt_format: str = "v1") -> str:
    """The exact switcher prompt for a query and the segments written so far, as (model id, text) pairs."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r} is unknown: allowed are {', '.join(PROMPT_FORMATS)}")
    if not 1 <= n <= MAX_MODELS:
        raise ValueError(f"a switcher pool has 1..{MAX_MODELS} models, got n={n}")
    return query + "".join(segment_block(m, t) for m, t in segments) + question(n)


@dataclass(frozen=True)
class SwitcherVocab:
    """How a tokenizer reads the v1 answer: the id token per model and whether the trailing space folds in."""

    token_ids: tuple[int, ...]
    strip_trailing_space: bool

    def prompt_text(self, prompt: str) -> str:
        """The prompt text to encode, with the trailing space removed when the id tokens carry it."""
        return prompt[:-1] if self.strip_trailing_space and prompt.endswith(" ") else prompt


def switcher_vocab(tokenizer, n: int) -> SwitcherVocab:
    """Find the single token each digit ``0..n-1`` becomes right after a v1 prompt."""
    if not 1 <= n <= MAX_MODELS:
        raise ValueError(f"a switcher pool has 1..{MAX_MODELS} models, got n={n}")
    probe = "Q" + question(n)

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    base = enc(probe)
    stripped = enc(probe[:-1])
    ids, folds = [], []
    for d in range(n):
        full = enc(probe + str(d))
        if full[: len(base)] == base and len(full) == len(base) + 1:
            ids.append(full[-1])
            folds.append(False)
        elif full[: len(stripped)] == stripped and len(full) == len(stripped) + 1:
            ids.append(full[-1])
            folds.append(True)
        else:
            raise ValueError(f"the switcher tokenizer does not encode model id {d} as one token after the prompt")
    if len(set(folds)) != 1 or len(set(ids)) != n:
        raise ValueError("the switcher tokenizer encodes the model ids inconsistently; it cannot be used as a switcher")
    return SwitcherVocab(tuple(ids), folds[0])


def encode_prompt(tokenizer, vocab: SwitcherVocab, prompt: str, max_length: int | None = None,
                  keep_head: int | None = None) -> list[int]:
    """Token ids of a switcher prompt (with BOS if the tokenizer adds one).

    If ``max_length`` is set and the prompt is longer, it is left-truncated in the middle: the first
    ``keep_head`` tokens (default: half of ``max_length``, i.e. the query) and the most recent tail are kept.
    """
    ids = tokenizer(vocab.prompt_text(prompt), add_special_tokens=True)["input_ids"]
    if max_length is None or len(ids) <= max_length:
        return ids
    head = min(keep_head if keep_head is not None else max_length // 2, max_length - 1)
    return ids[:head] + ids[len(ids) - (max_length - head):]


def read_switcher_meta(folder: str | Path) -> dict:
    """An exported switcher's ``switchkit.json``; ``{}`` for a folder without one (a plain HF switcher)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    return meta
