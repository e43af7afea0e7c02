"""SamplingParams: what a client asks of one generation (vLLM's names and defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from aptray.request_checks import InvalidRequest

# Temperatures below this sample greedily (vLLM's rule): dividing logits by a vanishing temperature
# overflows to inf and makes the softmax NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    # Per-request SLOs in seconds; None takes the engine's defaults.
    ttft_slo: float | None = None
    tbt_slo: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k < 2**31:
            raise InvalidRequest(f"top_k must be -1 (off) or a positive integer below 2**31, got {self.top_k!r}",
                                 "top_k")
        # the sampler seeds a generator with seed * 1_000_003 + token index: it must fit in 64 bits
        if self.seed is not None and (not isinstance(self.seed, int) or abs(self.seed) > 2**40):
            raise InvalidRequest(f"seed must be an integer within +-2**40, got {self.seed!r}", "seed")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", "stop")
        if any(not isinstance(t, int) for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be integers", "stop_token_ids")
        for name in ("ttft_slo", "tbt_slo"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise InvalidRequest(f"{name} must be a positive, finite number of seconds, got {value}",
                                     f"{name[:-4]}_ms")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE
