"""Build a model from a local Hugging Face folder, each rank reading only its slice of each tensor."""
from __future__ import annotations

import glob
import logging
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig

from aptray.model.layers import _load_whole

logger = logging.getLogger("aptray")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_class(arch: str):
    if arch == "opt":
        from aptray.model.opt import OPTForCausalLM
        return OPTForCausalLM
    from aptray.model.llama import LlamaForCausalLM
    return LlamaForCausalLM


def _checkpoint_tensors(path: str):
    """Yield (name, lazily sliceable tensor) from *.safetensors, or *.bin when there are none."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        return
    files = sorted(glob.glob(os.path.join(path, "*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path!r}")
    for file in files:
        yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()


def load_model(path: str, arch: str, dtype: str, device: torch.device, load_format: str = "auto") -> torch.nn.Module:
    hf_config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = model_class(arch)(hf_config, DTYPES[dtype])
    if load_format == "dummy":
        for param in model.parameters():  # small values keep activations finite through many layers
            param.data.normal_(0.0, 0.02)
        return model.eval()
    params = dict(model.named_parameters())
    missing = set(params)
    for name, tensor in _checkpoint_tensors(path):
        target = name if name in params else f"model.{name}"  # old OPT checkpoints lack "model."
        target = model.tied_names.get(target, target)
        if target not in params:
            logger.debug("ignoring checkpoint tensor %s", name)
            continue
        param = params[target]
        getattr(param, "weight_loader", _load_whole)(param, tensor)
        missing.discard(target)
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks tensors: {sorted(missing)[:5]}")
    return model.eval()
