"""A GPT-2-style byte-level BPE tokenizer trained offline on ShareGPT text.

No model hub is reachable here; OPT uses GPT-2's 50k byte-level BPE, so a BPE of the same size
trained on ShareGPT gives token counts close to OPT's (not identical ids). Any HF tokenizer
folder can be used instead.
"""
from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<pad>", "</s>", "<s>"]


def train_bpe_tokenizer(out_dir: str, texts, vocab_size: int = 50265) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>", bos_token="<s>")
    fast.save_pretrained(out_dir)
    return out_dir


def sharegpt_texts(limit: int):
    from loadgen.samples import sharegpt_conversations

    for conv in itertools.islice(sharegpt_conversations(), limit):
        for turn in conv[:2]:
            yield turn["value"]
