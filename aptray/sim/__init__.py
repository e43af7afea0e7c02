"""Simulator: the real Engine and schedulers driven by a virtual clock and a cost-model executor."""
