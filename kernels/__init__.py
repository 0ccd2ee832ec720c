"""Sparse FFN kernels: gate/up over the predicted-active rows and the down projection as a weighted sum of
rows, on GPU (CUDA C through CuPy) and CPU (C/OpenMP, torch without a compiler), with plain torch references
beside them; fused one-token kernels for the dense half of a decode step (kernels.decode); and the GPU-CPU
hand-off of a hybrid decode step (kernels.handoff, imported on CUDA only)."""
from .ffn import get_backend, sparse_down, sparse_ffn, sparse_gate_up, use_decode_kernels
from .reference import sparse_down_reference, sparse_ffn_reference, sparse_gate_up_reference
from .rows import WEIGHT_TYPES, FFNRows

__all__ = ["FFNRows", "WEIGHT_TYPES", "get_backend", "sparse_down", "sparse_down_reference", "sparse_ffn",
           "sparse_ffn_reference", "sparse_gate_up", "sparse_gate_up_reference", "use_decode_kernels"]
