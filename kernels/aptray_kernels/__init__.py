"""aptray's attention kernels (Triton on GPU) and their torch references (CPU)."""
from . import ops, reference  # noqa: F401
