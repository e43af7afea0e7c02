"""Load generation and evaluation: datasets, arrivals, traces, clients, SLO metrics, sweeps, plots."""
