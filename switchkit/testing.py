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


def save_tiny_switcher(folder: str | Path, model_dir: str | Path, names: list[str]) -> Path:
    """A switcher export as ``toolkit train-switcher`` leaves it (HF weights plus ``switchkit.json``, prompt format
    v1), with the weights of ``model_dir``, for a pool of the candidates ``names``."""
    import shutil

    from .artifacts import SwitcherMeta, write_meta

    shutil.copytree(model_dir, folder)
    write_meta(Path(folder), SwitcherMeta(
        prompt_format="v1", n=len(names), candidates=[{"index": i, "name": n, "source": "x", "role": "aligned"}
                                                      for i, n in enumerate(names)],
        adapter=False, base_model=None, model_id_tokens=list(range(1, len(names) + 1)), max_length=None))
    return Path(folder)


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def save_tiny_gguf(hf_dir: str | Path, path: str | Path) -> Path:
    """Write the tiny Llama saved in ``hf_dir`` as an F32 GGUF file (llama.cpp tensor layout)."""
    import json

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(cfg.vocab_size)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [""] * len(tokenizer)
    for text, i in state["model"]["vocab"].items():
        tokens[i] = text
    special = {t["content"] for t in state["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in state["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    def permute(w, heads):  # llama.cpp stores q/k rows interleaved for its rotary layout
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if key in top:
            name = top[key]
        else:
            layer, rest = key.split(".")[2], ".".join(key.split(".")[3:])
            name = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                array = permute(array, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                array = permute(array, cfg.num_key_value_heads)
        writer.add_tensor(name, array.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
