"""PNG plots of a sweep: SLO attainment vs request rate per policy, TTFT and TBT CDFs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_attainment(curves: dict[str, dict[float, float]], path: str, threshold: float = 0.9, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, curve in curves.items():
        rates = sorted(curve)
        ax.plot(rates, [100 * curve[r] for r in rates], marker="o", label=policy)
    _save_attainment(fig, ax, path, threshold, title, "SLO attainment (%)")


def _save_attainment(fig, ax, path: str, threshold: float, title: str, ylabel: str) -> None:
    ax.axhline(100 * threshold, color="grey", linestyle="--", linewidth=1, label=f"{threshold:.0%} target")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cdf(samples: dict[str, list[float]], path: str, xlabel: str, slo: float | None = None, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in samples.items():
        v = np.sort(np.asarray(values, dtype=float))
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label)
    if slo is not None:
        ax.axvline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CDF")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attainment_spread(curves: dict[str, dict[float, list[float]]], path: str, threshold: float = 0.9,
                           title: str = "") -> None:
    """Attainment vs rate per policy, the mean over seeds with error bars of one standard deviation."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, curve in curves.items():
        rates = sorted(curve)
        mean = [100 * np.mean(curve[r]) for r in rates]
        sd = [100 * np.std(curve[r], ddof=1) if len(curve[r]) > 1 else 0.0 for r in rates]
        ax.errorbar(rates, mean, yerr=sd, marker="o", capsize=3, label=policy)
    _save_attainment(fig, ax, path, threshold, title, "SLO attainment (%), mean +- sd over seeds")
