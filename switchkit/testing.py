"""Tiny randomly-initialised checkpoints for tests and benchmarks (no hub access).

Builds a byte-level BPE tokenizer from a small corpus, wraps it as a fast HF tokenizer (optionally with
a chat template), and saves a small Llama model beside it, so that loading goes through the real
``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Question: What is the capital of Canada? Answer: Ottawa is the capital city of Canada.",
    "The answer is model 0. The answer is model 1. The answer is model 2. Which model should generate the next segment?",
    "Please respond with a number from 0 to 9. <model 0 begins> text <model 0 ends> <model 1 begins> more <model 1 ends>",
    "Solve 12 + 30 = 42. #### 42 The answer is (B). \\boxed{7} I cannot help with that request.",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ? ! : ; ' \" ( ) [ ] { } < > / \\ - _ = + * # @ % & $",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 300, chat_template: bool = True, extra_corpus: list[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a tiny corpus; different ``vocab_size`` gives a different tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) + list(extra_corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_model(
    path: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a random tiny Llama and ``tokenizer`` to ``path`` (safetensors) and return the path."""
    path = Path(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
