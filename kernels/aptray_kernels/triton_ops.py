"""All of aptray's Triton kernels, by the ops name they implement.

Importing this module needs triton. The functions also run on CPU tensors when TRITON_INTERPRET=1 was set
before this module was first imported (that is how tests/test_kernels.py checks them without a GPU).
"""
from __future__ import annotations

from .triton_absorbed import absorbed_decode_attention, hidden_attention  # noqa: F401
from .triton_cache import gather_hidden, write_hidden, write_kv  # noqa: F401
from .triton_paged_attention import decode_attention, paged_decode_attention  # noqa: F401
from .triton_recompute import gather_project_kv, recompute_decode_attention  # noqa: F401

# What ops._TRITON gets on CUDA machines: same names and signatures as the references.
KERNELS = {
    "write_kv": write_kv,
    "write_hidden": write_hidden,
    "gather_hidden": gather_hidden,
    "paged_decode_attention": paged_decode_attention,
    "absorbed_decode_attention": absorbed_decode_attention,
    "recompute_decode_attention": recompute_decode_attention,
}
