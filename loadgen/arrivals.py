"""Gamma inter-arrival times: mean 1/rate, coefficient of variation CV (shape 1/CV^2; CV = 1 is Poisson)."""
from __future__ import annotations

import numpy as np


def gamma_intervals(rate: float, cv: float, n: int, seed: int = 0) -> np.ndarray:
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got rate={rate}, cv={cv}")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)  # mean = shape * scale = 1/rate
    return np.random.default_rng(seed).gamma(shape, scale, size=n)


def arrival_times(rate: float, cv: float, n: int, seed: int = 0) -> np.ndarray:
    """Arrival times in seconds from 0; the first request arrives at 0."""
    gaps = gamma_intervals(rate, cv, n, seed)
    gaps[0] = 0.0
    return np.cumsum(gaps)
