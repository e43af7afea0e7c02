"""aptray: LLM serving with a hybrid KV/hidden cache and SLO-aware adaptive scheduling."""
from aptray.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in torch and transformers: import it only when asked, so torch-free users stay light
    if name == "LLM":
        from aptray.llm import LLM
        return LLM
    if name == "app":  # `serve run aptray.app`: the Ray Serve application with embedded defaults
        from aptray.app import app
        return app
    raise AttributeError(name)
