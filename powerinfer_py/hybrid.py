"""The hybrid FFN: one layer's neurons split between the GPU (hot rows) and the CPU (cold rows), both halves
computed at the same time from the same predictor mask, partial outputs added on the GPU.

Decode steps traced for a CUDA graph go through a kernels.Handoff shared by the split layers
(Handoff.exchange): the GPU hands x and the list of active cold rows to pinned host memory and raises a flag,
and beside its hot rows waits on the GPU for the CPU's flag and fetches the CPU's result, which the hot rows' last
kernel adds with the residual, while one host call computes every layer's cold rows as their flags come
(generate.capture_decode). Other calls (prefill, eager decode) hand off per layer from the host: GPU: copy x
and the mask to pinned host buffers (`send`), record an event, launch the hot rows (`gpu_part`) | CPU: wait for
the event, compute the cold rows (`cpu_part`) | GPU: copy the cold result back, pinned and non-blocking, and
add it (`receive`). The module keeps model.FeedForward's signature, so the model code does not change; kernels
come from the `kernels` registry."""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from kernels import FFNRows, sparse_ffn

# Prompts of this many tokens or more take the cold rows to the GPU instead of computing them on the CPU (one
# read of every cold row over PCIe beats the CPU's pass over the rows many tokens need; measured with
# `python -m benchmarks.prefill`, BENCHMARKS.md). Staged in blocks of STREAM_BLOCK_BYTES; the ledger charges two.
STREAM_MIN_TOKENS = 16
STREAM_BLOCK_BYTES = 32 << 20


class HostBuffers:
    """Pinned host buffers for the per-layer hand-off from the host, shared by all layers (a layer is done with
    them before the next one starts), grown to the longest call."""

    def __init__(self, dim: int, n_ff: int, dtype):
        self.dim, self.n_ff, self.dtype = dim, n_ff, dtype
        self.buffers = None

    def get(self, T: int):
        """(x, active, y) host buffers for T tokens."""
        if self.buffers is None or self.buffers[0].shape[0] < T:
            pin = torch.cuda.is_available()
            self.buffers = (torch.empty((T, self.dim), dtype=self.dtype, pin_memory=pin),
                            torch.empty((T, self.n_ff), dtype=torch.bool, pin_memory=pin),
                            torch.empty((T, self.dim), dtype=self.dtype, pin_memory=pin))
        return tuple(b[:T] for b in self.buffers)


class HybridCounters:
    """GPU hit rate (share of active neurons served on the GPU) and host time in cold-row compute. Sums counted
    on the GPU stay there until read (no synchronisation; captured in graphs); layers that hand off through a
    kernels.Handoff are counted by its host side, from the counts the GPU sends with each layer's list."""

    def __init__(self, device):
        self.gpu_counts = torch.zeros(2, dtype=torch.long, device=device)  # active neurons, of them on the GPU
        self.host_counts = [0, 0]
        self.cpu_seconds = 0.0

    def reset(self):
        self.gpu_counts.zero_()
        self.host_counts = [0, 0]
        self.cpu_seconds = 0.0

    def count(self, active, gpu_mask=None):
        """gpu_mask None: every neuron of the layer is on the GPU."""
        if gpu_mask is None:
            self.gpu_counts += active.sum()
        else:
            self.gpu_counts += torch.stack((active.sum(), (active & gpu_mask).sum()))

    def add_host_step(self, seconds: float, active: int = 0, cold_active: int = 0):
        self.cpu_seconds += seconds
        self.host_counts[0] += active
        self.host_counts[1] += active - cold_active

    @property
    def hit_rate(self) -> float:
        active, hits = (g + h for g, h in zip(self.gpu_counts.tolist(), self.host_counts))
        return hits / active if active else float("nan")


class HybridFeedForward(nn.Module):
    def __init__(self, gpu_rows: FFNRows | None, cpu_rows: FFNRows | None, n_ff: int, act: str, threshold: float,
                 device, host: HostBuffers | None = None, counters: HybridCounters | None = None):
        """device: where the model runs; on CUDA, gpu_rows live there and cpu_rows are the cold rows."""
        super().__init__()
        self.gpu_rows, self.cpu_rows, self.n_ff = gpu_rows, cpu_rows, n_ff
        self.act, self.threshold, self.host, self.counters = act, threshold, host, counters
        self.splits = cpu_rows is not None and torch.device(device).type == "cuda"  # the call crosses PCIe
        self.handoff, self.slot = None, None  # set by the engine for split layers: kernels.Handoff, this layer's slot
        if torch.device(device).type == "cuda":
            self.copied = torch.cuda.Event()
            self.register_buffer("gpu_mask", torch.zeros(n_ff, dtype=torch.bool, device=device), persistent=False)
            if gpu_rows is not None:
                self.gpu_mask[gpu_rows.neuron_idx] = True

    def forward(self, x, active=None, residual=None):
        """The FFN of x (..., d), plus residual (x's shape) if given."""
        shape = x.shape
        x, active = self.prepare(x, active)
        if self.counters is not None and not self.engaged(x):  # an engaged hand-off's host side counts hits
            self.counters.count(active, self.gpu_mask if self.cpu_rows is not None else None)
        res = residual.reshape(x.shape) if residual is not None else None
        if not self.splits:  # one device: the kernels may add the residual as they write
            rows = self.gpu_rows if self.gpu_rows is not None else self.cpu_rows
            return sparse_ffn(x, rows, active, self.act, self.threshold, residual=res).view(shape)
        if self.engaged(x):  # the hand-off's last kernel adds the residual
            return self.handoff.exchange(self.slot, x, active, lambda *args: self.gpu_part(x, active, *args),
                                         res).view(shape)
        if x.shape[0] >= STREAM_MIN_TOKENS:
            y = self.gpu_part(x, active) + self.streamed_part(x, active)
        else:
            self.send(x, active)
            self.copied.record()
            y = self.gpu_part(x, active)
            self.cpu_part(x.shape[0])
            y = self.receive(y)
        y = y.view(shape)
        return y if residual is None else residual + y

    def engaged(self, x) -> bool:
        """Whether this call hands off through the decode step's kernels.Handoff (a one-token step in a graph)."""
        return self.handoff is not None and self.handoff.engaged and x.shape[0] == 1

    def prepare(self, x, active):
        """(T, d) input and (T, n_ff) mask (all True without a predictor)."""
        x = x.reshape(-1, x.shape[-1])
        if active is None:  # no predictor: every neuron computes (dense, exact)
            active = torch.ones((x.shape[0], self.n_ff), dtype=torch.bool, device=x.device)
        return x, active.reshape(-1, self.n_ff)

    def send(self, x, active):
        x_host, active_host, _ = self.host.get(x.shape[0])
        x_host.copy_(x, non_blocking=True)
        active_host.copy_(active, non_blocking=True)

    def gpu_part(self, x, active, beside=None, residual=None, cold=None):
        """The GPU rows' share; with a hand-off's beside, residual and cold (sparse_ffn), its whole output."""
        if self.gpu_rows is None:
            if beside is not None:
                beside(False)
            y = torch.zeros_like(x)
            return cold.add(y, residual) if cold is not None else y
        return sparse_ffn(x, self.gpu_rows, active, self.act, self.threshold, residual=residual, beside=beside,
                          cold=cold)

    def streamed_part(self, x, active):
        """The cold rows' share for many tokens, computed on the GPU: the rows are copied there block by block
        (pinned memory, copies queued on the stream) and each block is multiplied like hot rows."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        step = max(1, STREAM_BLOCK_BYTES // FFNRows.bytes_per_neuron(self.cpu_rows.d, self.cpu_rows.weight_type))
        block_out = torch.empty_like(y)
        for start in range(0, self.cpu_rows.m, step):
            block = self.cpu_rows.block(start, start + step).to(x.device, non_blocking=True)
            y += sparse_ffn(x, block, active, self.act, self.threshold, out=block_out)
        return y.to(x.dtype)

    def cpu_part(self, T: int):
        """Wait for the copies of `send`, then compute the cold rows into the pinned output buffer."""
        x_host, active_host, y_host = self.host.get(T)
        self.copied.synchronize()
        t0 = time.perf_counter()
        sparse_ffn(x_host, self.cpu_rows, active_host, self.act, self.threshold, out=y_host)
        if self.counters is not None:
            self.counters.add_host_step(time.perf_counter() - t0)

    def receive(self, y):
        y_host = self.host.get(y.shape[0])[2]
        return y + y_host.to(y.device, non_blocking=True)


def split_rows(gate, up, down, gpu_mask: np.ndarray, device, weight_type: str):
    """(gpu_rows, cpu_rows) of one layer: gate/up (n_ff, d), down (d, n_ff); gpu_mask (n_ff,) bool.
    The CPU keeps only its cold rows; the GPU rows are packed compactly on the device. Both halves store
    `weight_type` (the CPU kernels read half and quantized rows in place: fewer bytes than fp32)."""
    hot = torch.from_numpy(np.flatnonzero(gpu_mask)).long()
    cold = torch.from_numpy(np.flatnonzero(~gpu_mask)).long()

    def pack(idx, dev, weight_type):
        if idx.numel() == 0:
            return None
        return FFNRows.pack(gate[idx], up[idx], down[:, idx].T, idx, dev, weight_type)

    cold_rows = pack(cold, "cpu", weight_type)
    if cold_rows is not None and torch.device(device).type == "cuda":
        cold_rows = cold_rows.pin_memory()  # long prompts stream them to the GPU (HybridFeedForward.streamed_part)
    return pack(hot, device, weight_type), cold_rows
