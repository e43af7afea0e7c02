"""One prepared check of aptray on a GPU: kernels, engine exactness, bandwidth, step costs, and a
real-clock replay against the simulator, within a fixed wall-clock budget (python -m loadgen.gpu_check)."""
