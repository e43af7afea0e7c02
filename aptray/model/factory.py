"""Tiny random-weight OPT and Llama models with a working tokenizer, made offline as HF folders.

They are the test models: no hub is reachable, and random weights exercise every code path.
"""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, OPTConfig, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<pad>", "</s>", "<s>"]  # pad 1, eos 2, bos 3
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital. "
    "Large language models serve requests in batches; the cache holds keys and values for every token. "
    "Write a function that returns the sum of a list of numbers. def add(a, b): return a + b\n"
    "Summarise the following document in three sentences. Once upon a time there was a scheduler. "
)


def make_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>", bos_token="<s>", chat_template=CHAT_TEMPLATE)


def make_tiny_model(path: str, arch: str = "opt", hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int | None = None, ffn_dim: int | None = None,
                    max_positions: int = 512, vocab_size: int = 512, init_std: float = 0.2,
                    seed: int = 0) -> str:
    """Write a random-weight model of the given shape (plus tokenizer) to path; returns path."""
    tokenizer = make_tokenizer(min(vocab_size, 512))
    vocab = max(vocab_size, len(tokenizer))
    ffn = ffn_dim or 4 * hidden_size
    ids = dict(pad_token_id=1, eos_token_id=2, bos_token_id=3)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=num_layers, ffn_dim=ffn,
                        num_attention_heads=num_heads, max_position_embeddings=max_positions,
                        word_embed_proj_dim=hidden_size, dropout=0.0, attention_dropout=0.0,
                        init_std=init_std, **ids)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=ffn,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_positions,
                          initializer_range=init_std, tie_word_embeddings=False, **ids)
    else:
        raise ValueError(f"arch must be 'opt' or 'llama', got {arch!r}")
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
