"""Switcher prompt formats: the selector text, how a switcher's tokenizer encodes it, and the model-id tokens.

The selector text (the public switcher checkpoints' prompt, e.g. ``bunsenfeng/PFA_switcher_1``)::

    {query} <model i begins> {text} <model i ends> ... Which model should generate the next segment?
    Please respond with a number from 0 to {n-1}. The answer is model 

Formats (registry :data:`FORMATS`, named by ``prompt_format`` in recipes and ``switchkit.json``):

- ``v1``: the selector text encoded as is (with BOS if the tokenizer adds one).
- ``v1-chat``: the selector text as one chat-templated user turn with the generation prompt, as the public
  reference code gives it to its switchers.

Decision rule: one forward pass, the next-token logits of the n model-id tokens, a softmax over those n only.
The model-id token for digit ``d`` is the token the switcher's tokenizer produces for ``d`` right after the
encoded prompt. For BPE tokenizers that fold a leading space into the digit (``" 3"``), the prompt's trailing
space belongs to the id token, so the prompt is encoded without it. :meth:`PromptFormat.vocab` works this
out once per tokenizer; the trainer and the engine both use it, so training and inference read the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .config import MAX_MODELS


def segment_block(model: int, text: str) -> str:
    """One ``<model i begins> TEXT <model i ends>`` block, with its leading space."""
    return f" <model {model} begins> {text} <model {model} ends>"


def question(n: int) -> str:
    """The closing question for a pool of ``n`` models."""
    return (
        f" Which model should generate the next segment? Please respond with a number from 0 to {n - 1}."
        " The answer is model "
    )


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_MODELS:
        raise ValueError(f"a switcher pool has 1..{MAX_MODELS} models, got n={n}")


def build_prompt(query: str, segments: Sequence[tuple[int, str]], n: int) -> str:
    """The selector text for a query and the segments written so far, as (model id, text) pairs."""
    _check_n(n)
    return query + "".join(segment_block(m, t) for m, t in segments) + question(n)


@dataclass(frozen=True)
class SwitcherVocab:
    """How a tokenizer reads the answer: the id token per model and whether the trailing space folds in."""

    token_ids: tuple[int, ...]
    strip_trailing_space: bool


class PromptFormat:
    """How a switcher sees the selector text. Subclasses define :meth:`wrap`; the rest follows from it."""

    name = ""

    def wrap(self, tokenizer, text: str) -> tuple[str, bool]:
        """(the text to tokenize, whether the tokenizer adds its special tokens) for a selector text."""
        raise NotImplementedError

    def vocab(self, tokenizer, n: int) -> SwitcherVocab:
        """Find the single token each digit ``0..n-1`` becomes right after the encoded prompt."""
        _check_n(n)
        probe, special = self.wrap(tokenizer, "Q" + question(n))

        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=special)["input_ids"]

        base = enc(probe)
        stripped = enc(probe[:-1]) if probe.endswith(" ") else None
        ids, folds = [], []
        for d in range(n):
            full = enc(probe + str(d))
            if full[: len(base)] == base and len(full) == len(base) + 1:
                ids.append(full[-1])
                folds.append(False)
            elif stripped is not None and full[: len(stripped)] == stripped and len(full) == len(stripped) + 1:
                ids.append(full[-1])
                folds.append(True)
            else:
                raise ValueError(f"the switcher tokenizer does not encode model id {d} as one token after the prompt")
        if len(set(folds)) != 1 or len(set(ids)) != n:
            raise ValueError("the switcher tokenizer encodes the model ids inconsistently; it cannot be a switcher")
        return SwitcherVocab(tuple(ids), folds[0])

    def encode(self, tokenizer, vocab: SwitcherVocab, text: str, max_length: Optional[int] = None) -> list[int]:
        """Token ids of a selector text; a prompt over ``max_length`` keeps its first half (the query) and its
        most recent tail."""
        wrapped, special = self.wrap(tokenizer, text)
        if vocab.strip_trailing_space and wrapped.endswith(" "):
            wrapped = wrapped[:-1]
        ids = tokenizer(wrapped, add_special_tokens=special)["input_ids"]
        if max_length is None or len(ids) <= max_length:
            return ids
        head = max_length // 2
        return ids[:head] + ids[len(ids) - (max_length - head):]


class V1(PromptFormat):
    """The selector text as is."""

    name = "v1"

    def wrap(self, tokenizer, text):
        return text, True


class V1Chat(PromptFormat):
    """The selector text as one chat-templated user turn plus the generation prompt."""

    name = "v1-chat"

    def wrap(self, tokenizer, text):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format v1-chat needs a switcher tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False), False


FORMATS: dict[str, PromptFormat] = {f.name: f for f in (V1(), V1Chat())}


def get_format(name: str) -> PromptFormat:
    """The registered prompt format ``name``."""
    if name not in FORMATS:
        raise ValueError(f"prompt_format={name!r} is unknown: allowed are {', '.join(FORMATS)}")
    return FORMATS[name]


def default_format(tokenizer) -> str:
    """The format for a plain HF switcher without ``switchkit.json``: v1-chat with a chat template, else v1."""
    return "v1-chat" if getattr(tokenizer, "chat_template", None) else "v1"
