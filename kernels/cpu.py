"""CPU backend over the cold rows, packed as fp32 (see rows.py). Multi-threaded through torch's own kernels:
- gate/up: the active rows are gathered in chunks into a reused buffer that stays in cache, then multiplied;
  a fresh gather of all active rows is the trap device-facts.md measures (page faults, 3 passes over DRAM).
- down: embedding_bag(mode='sum', per_sample_weights=h) reads the active rows of down_t in place; each
  token's rows are split into one bag per thread so all threads work, and the bags are summed in order.
Host synchronisation is free here, so the code looks at the mask (nonzero) to pick rows."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from powerinfer_py.model import ffn_activation

from .rows import FFNRows

CHUNK_BYTES = 8 << 20  # gathered bytes per matrix per chunk: stays in L2/L3 between the copy and the product
DENSE_FRACTION = 0.35  # from this share of active rows on, multiply all rows (measured: kernels/BENCHMARKS_kernels.md)


class CpuBackend:
    name = "cpu"

    def __init__(self):
        self._local = threading.local()  # per-thread gather buffers, reused across calls

    def _buffers(self, rows_per_chunk: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None or bufs[0].shape[0] < rows_per_chunk or bufs[0].shape[1] != d:
            bufs = (torch.empty(rows_per_chunk, d), torch.empty(rows_per_chunk, d))
            self._local.bufs = bufs
        return bufs

    def gate_up(self, x, rows: FFNRows, active, act, threshold, h, full):
        row_active = active[:, rows.neuron_idx]
        xf = x.float()
        hc = torch.zeros(row_active.shape)
        sel = row_active.any(0).nonzero().squeeze(1)
        if sel.numel() >= DENSE_FRACTION * rows.m:
            hc = ffn_activation(xf @ rows.gate.T, xf @ rows.up.T, act, threshold) * row_active
        else:
            rows_per_chunk = max(1, CHUNK_BYTES // (4 * rows.d))
            gate_buf, up_buf = self._buffers(rows_per_chunk, rows.d)
            for chunk in sel.split(rows_per_chunk):
                g = torch.index_select(rows.gate, 0, chunk, out=gate_buf[: chunk.numel()])
                u = torch.index_select(rows.up, 0, chunk, out=up_buf[: chunk.numel()])
                hc[:, chunk] = ffn_activation(xf @ g.T, xf @ u.T, act, threshold) * row_active[:, chunk]
        if full:
            h[:, rows.neuron_idx] = hc
        else:
            h.copy_(hc)

    def down(self, h, rows: FFNRows, y):
        T, bags = h.shape[0], torch.get_num_threads()
        token, row = (h != 0).nonzero().unbind(1)  # token-major, rows ascending
        counts = torch.bincount(token, minlength=T)
        starts = counts.cumsum(0) - counts
        offsets = (starts[:, None] + counts[:, None] * torch.arange(bags) // bags).reshape(-1)
        sums = F.embedding_bag(row, rows.down_t, offsets, mode="sum", per_sample_weights=h[token, row])
        y.copy_(sums.view(T, bags, rows.d).sum(1))
