"""transformers' own model and generate: the reference aptray's greedy tokens are checked against
(tests on CPU, loadgen.gpu_check on a GPU)."""
from __future__ import annotations

import copy

import torch


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def hf_greedy(model, prompt, max_new_tokens: int) -> tuple[int, ...]:
    """generate, greedy, EOS ignored (as the engine's ignore_eos), one unpadded prompt on the model's device."""
    config = copy.deepcopy(model.generation_config)
    # an id no token can have: generate falls back to the model's EOS when given None
    config.eos_token_id, config.do_sample, config.max_new_tokens = 10**9, False, max_new_tokens
    ids = torch.tensor([list(prompt)], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids))
    return tuple(out[0, len(prompt):].tolist())
