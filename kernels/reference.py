"""Plain torch definitions of the sparse FFN kernels (the forward_native of each): they run on any device and
dtype (float64 inputs give float64 math) and are what every fast version is tested against.

Neuron j of a device's share is row j of gate_rows/up_rows/down_t_rows and neuron neuron_idx[j] of the layer;
`active` is the layer's full-length (T, n_ff) bool mask. The references gather the active rows, then multiply.
"""
from __future__ import annotations

import torch

from powerinfer_py.model import ffn_activation


def _compute_dtype(*tensors) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def sparse_gate_up_reference(x, gate_rows, up_rows, neuron_idx, active, act="relu", threshold=0.0):
    """h (T, m): ffn_activation(gate_j . x_t, up_j . x_t) where neuron neuron_idx[j] is active for token t, else 0."""
    dtype = _compute_dtype(x, gate_rows)
    row_active = active[:, neuron_idx]  # (T, m)
    sel = row_active.any(0).nonzero().squeeze(1)
    xf = x.to(dtype)
    g = xf @ gate_rows.index_select(0, sel).to(dtype).T
    u = xf @ up_rows.index_select(0, sel).to(dtype).T
    h = torch.zeros(row_active.shape, dtype=dtype, device=x.device)
    h[:, sel] = ffn_activation(g, u, act, threshold) * row_active[:, sel]
    return h


def sparse_down_reference(h, down_t_rows):
    """y (T, d) = sum over rows j with h[t, j] != 0 of h[t, j] * down_t_rows[j]."""
    dtype = _compute_dtype(h, down_t_rows)
    sel = (h != 0).any(0).nonzero().squeeze(1)
    return h[:, sel].to(dtype) @ down_t_rows.index_select(0, sel).to(dtype)


def sparse_ffn_reference(x, gate_rows, up_rows, down_t_rows, neuron_idx, active, act="relu", threshold=0.0):
    """The device's share of the layer's FFN output for the active neurons, (T, d)."""
    h = sparse_gate_up_reference(x, gate_rows, up_rows, neuron_idx, active, act, threshold)
    return sparse_down_reference(h, down_t_rows)
