"""A small bandwidth model of one decode step, used as the latency objective and in reports.

Per layer the GPU first streams the layer's dense bytes (attention, predictor, norms, its KV cache); then the
FFN splits: the GPU streams the rows of the hot neurons the predictor activates while the CPU streams the
activated cold rows and hands its result back. An activation count over `tokens` profiled tokens is a neuron's
probability of being active, so each side's FFN bytes per token are its counts / tokens x bytes per neuron.
The halves overlap, so a layer takes dense + max(GPU FFN time, CPU FFN time + hand-off); a layer whose neurons
all live on the GPU has no CPU half and no hand-off. The output head runs on the GPU. Issue #7 bounds a layer by
max(all its GPU bytes / GPU bandwidth, CPU FFN time + hand-off) instead, as if the CPU could start with the
layer: never slower, and the stricter yardstick for the engine (`overlap_dense`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from kernels import FFNRows
from powerinfer_py.errors import InputError

from .ledger import DENSE_DTYPES, Ledger


@dataclass(frozen=True)
class Bandwidths:
    """Defaults measured on the H100 device machine (shared/docs/device-facts.md, 2026-11-22)."""
    gpu: float = 3.0e12  # B/s, HBM device-to-device copy
    cpu: float = 116e9  # B/s, DRAM read with 16 threads
    pcie: float = 55e9  # B/s, pinned host<->device
    sync_s: float = 27e-6  # an 8 KB H2D + D2H + synchronize round trip

    def __post_init__(self):
        for name in ("gpu", "cpu", "pcie"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} bandwidth {getattr(self, name)}: must be positive")
        if not self.sync_s >= 0:
            raise InputError(f"sync time {self.sync_s}: must not be negative")


@dataclass(frozen=True)
class TokenModel:
    layer_dense_s: np.ndarray  # per layer: its dense bytes at GPU bandwidth
    head_s: float  # final norm and output head
    gpu_s_per_neuron: float  # one neuron's rows at GPU bandwidth
    cpu_s_per_neuron: float  # one neuron's rows (the CPU kernels' layout) at CPU bandwidth
    cpu_bytes_per_neuron: int
    handoff_s: float  # round trip plus the FFN input and active mask down and the FFN output up
    tokens: float  # tokens the activation counts were collected over: count / tokens = activation probability

    @classmethod
    def build(cls, ledger: Ledger, tokens: float, bandwidths: Bandwidths) -> "TokenModel":
        cfg = ledger.config
        cpu_bytes = FFNRows.bytes_per_neuron(cfg.dim, ledger.ffn_weight_type, gated=True, device="cpu")
        dense = np.array([ledger.layer_bytes(i) for i in range(cfg.n_layers)], dtype=np.float64)
        handoff_bytes = 2 * cfg.dim * DENSE_DTYPES[ledger.dtype].itemsize + cfg.n_ff
        return cls(layer_dense_s=dense / bandwidths.gpu,
                   head_s=ledger.category_bytes()["output"] / bandwidths.gpu,
                   gpu_s_per_neuron=ledger.ffn_bytes_per_neuron / bandwidths.gpu,
                   cpu_s_per_neuron=cpu_bytes / bandwidths.cpu,
                   cpu_bytes_per_neuron=cpu_bytes,
                   handoff_s=bandwidths.sync_s + handoff_bytes / bandwidths.pcie,
                   tokens=float(tokens))

    def layer_times(self, hot: np.ndarray, hot_counts: np.ndarray, cold_counts: np.ndarray, n_ff: int,
                    overlap_dense: bool = False) -> np.ndarray:
        """Seconds per layer with `hot` neurons on the GPU serving hot_counts activations, cold_counts on the CPU.
        overlap_dense: the CPU half may also overlap the layer's dense part, max(all GPU bytes / GPU bandwidth,
        CPU half + hand-off) (issue #7's bound; the engine cannot start the CPU before the predictor)."""
        gpu = hot_counts / self.tokens * self.gpu_s_per_neuron
        cpu = np.where(hot == n_ff, 0.0, cold_counts / self.tokens * self.cpu_s_per_neuron + self.handoff_s)
        if overlap_dense:
            return np.maximum(self.layer_dense_s + gpu, cpu)
        return self.layer_dense_s + np.maximum(gpu, cpu)

    @property
    def min_gpu_neurons(self) -> int:
        """The paper's C_l: the fewest GPU neurons whose saving pays for the hand-off, C t_gpu + T_sync <= C t_cpu,
        with t the time to stream one neuron's rows on each side (none if the CPU streams rows faster)."""
        saving = self.cpu_s_per_neuron - self.gpu_s_per_neuron
        return math.ceil(self.handoff_s / saving) if saving > 0 else sys.maxsize
