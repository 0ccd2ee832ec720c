"""The GPU-CPU hand-off of a hybrid decode step, without the host in the GPU's way.

Per split layer (`exchange`) the GPU writes the FFN input and the list of the layer's active cold rows (read off
the predictor's mask) into pinned host memory and raises a flag there (send_to_host, launched right after the hot
rows' first kernel and running beside them), and on a side stream waits on the GPU for the CPU's flag and copies
the CPU's cold-row result to the GPU (fetch_from_host); the hot rows' down kernel adds the two and the residual
once it sees fetch's flag (or, where the hot rows take other kernels, add_parts after fetch). Every kernel of
the main stream is then a programmatic dependent of the one before: no edge between streams on the path of a
layer; the side stream joins at the step's end (`end_step`). Meanwhile one host call
(`run_cpu`, cold_step in cpu_rows.c) walks the layers: it spins on each input flag, computes the listed rows and
raises the output flag. The flags carry a step number (`epoch`, counted on the GPU by `begin_step` and on the
host by `run_cpu`), so a whole decode step is one CUDA graph replay plus one C call: no per-layer launch, event
or Python on the critical path. Both waits give up after a timeout and say so rather than hang."""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import torch

from .cpu import ColdStep
from .cuda import compile_module, launch, ptr
from .rows import DTYPE_CODES, FFNRows

THREADS = 1024  # THREADS in handoff.cu
FETCH_THREADS = 512  # FETCH_THREADS in handoff.cu
TIMEOUT_S = 30.0  # either side waiting longer than this for the other gives up with an error


@functools.cache
def _module():
    return compile_module("handoff.cu")


def _launch(name: str, args, device: torch.device, block: int = THREADS):
    launch(_module().get_function(name), (1,), args, device, block=block)


class Handoff:
    """The hand-off of one-token steps for the split layers `cold_layers` (CPU rows, in layer order)."""

    def __init__(self, cold_layers: list[FFNRows], dim: int, n_ff: int, dtype: torch.dtype, act: str,
                 threshold: float, device, on_step=None):
        """on_step(cpu_seconds, active, cold_active), if given, after each step: the host's compute time and
        the neurons the step's split layers had active, and of them cold."""
        self.device = torch.device(device)
        self.x_host = torch.empty(dim, dtype=dtype, pin_memory=True)
        # per layer: active neurons, active cold rows, their indices (send_to_host in handoff.cu, cold_step in
        # cpu_rows.c)
        self.cold_list = torch.empty((len(cold_layers), 2 + max(rows.m for rows in cold_layers)), dtype=torch.int32,
                                     pin_memory=True)
        self.cold_idx = [rows.neuron_idx.to(self.device, torch.int32) for rows in cold_layers]
        self.y_host = torch.empty(dim, dtype=dtype, pin_memory=True)
        self.y_cold = torch.empty(dim, dtype=dtype, device=self.device)  # y_host copied to the GPU
        self.fetched = torch.zeros(len(cold_layers), dtype=torch.int32, device=self.device)  # epoch of y_cold
        self.ready = torch.zeros((2, len(cold_layers)), dtype=torch.int32, pin_memory=True)  # input, output flags
        self.error = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.host_epoch = 0
        self.cold_step = ColdStep(cold_layers, act, threshold, self.x_host, self.cold_list, self.y_host, self.ready)
        self.on_step = on_step
        self.engaged = False  # set while a decode step is traced for a graph: split FFNs then use the hand-off
        self.side = torch.cuda.Stream(self.device)  # the hot rows' (a parallel branch of the graph)
        _module()  # compile now, not inside a step the CPU is already waiting on

    @contextlib.contextmanager
    def engage(self):
        self.engaged = True
        try:
            yield
        finally:
            self.engaged = False

    def begin_step(self):
        """GPU: the next step's number, at the start of the step (captured in its graph)."""
        self.epoch += 1

    def exchange(self, slot: int, x: torch.Tensor, active: torch.Tensor, hot, residual=None) -> torch.Tensor:
        """GPU: layer `slot`'s FFN output plus residual (if given), from the input x (1, dim) and mask (1, n_ff).
        hot(beside, residual, cold) computes it on this stream: the GPU's rows, calling beside(listed) where
        sparse_ffn does (it launches send_to_host, then fetch_from_host on the side stream), plus residual and
        the CPU's share `cold` (a ColdPart: added by the down kernel, or by cold.add)."""
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        x, active = x.contiguous(), active.contiguous()

        def send_and_fetch(listed):
            # Streams may share a hardware queue, so nothing may be queued before a kernel it waits for: fetch
            # after the send (it waits for the CPU, which waits for the send) and before the hot rows' down kernel
            # (which waits for fetch's flag). ffn_one, queued before both, leaves the add to cold.add.
            self._send(slot, x, active, wait_first=not listed)
            with torch.cuda.stream(self.side):
                self._fetch(slot)

        return hot(send_and_fetch, residual, ColdPart(self, slot))

    def end_step(self):
        """GPU: the current stream waits for the side stream's fetches (at the end of a step, so that no layer's
        kernels wait on an edge between streams)."""
        torch.cuda.current_stream(self.device).wait_stream(self.side)

    def _send(self, slot, x, active, wait_first=True):
        cold_idx = self.cold_idx[slot]
        args = (ptr(x), np.int64(x.numel() * x.element_size()), ptr(active), np.int32(active.numel()),
                ptr(cold_idx), np.int32(cold_idx.numel()), ptr(self.x_host), ptr(self.cold_list[slot]),
                ptr(self.ready[0, slot]), ptr(self.epoch), np.int32(wait_first))
        _launch("send_to_host", args, self.device)

    def _fetch(self, slot):
        args = (ptr(self.y_host), ptr(self.y_cold), np.int64(self.y_host.numel() * self.y_host.element_size()),
                ptr(self.ready[1, slot]), ptr(self.epoch), ptr(self.error), np.int64(TIMEOUT_S * 1e9),
                ptr(self.fetched[slot]))
        _launch("fetch_from_host", args, self.device, FETCH_THREADS)

    def run_cpu(self):
        """Host: the CPU half of the step just launched (blocks until its last layer is done)."""
        self.host_epoch += 1
        if not self.cold_step(self.host_epoch, TIMEOUT_S):
            raise RuntimeError(f"hand-off: the GPU did not signal within {TIMEOUT_S:.0f} s (step {self.host_epoch})")
        if self.error.item():
            raise RuntimeError(f"hand-off: the GPU timed out waiting for the CPU (step {self.host_epoch})")
        if self.on_step is not None:
            times, counts = self.cold_step.times, self.cold_step.counts.sum(0).tolist()
            self.on_step(float((times[:, 1] - times[:, 0]).sum()), *counts)

    @contextlib.contextmanager
    def cpu_alongside(self):
        """Run the CPU half on a thread while the block launches a step eagerly (launches may block once the
        GPU's queue is full, and the GPU waits for the CPU)."""
        failure = []

        def work():
            try:
                self.run_cpu()
            except RuntimeError as e:
                failure.append(e)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()
        if failure:
            raise failure[0]


class ColdPart:
    """The CPU's share of one split layer's FFN, which fetch_from_host brings to the GPU (Handoff.y_cold, flagged
    in Handoff.fetched): what a kernel needs to add it, or add() to add it with add_parts."""

    def __init__(self, handoff: Handoff, slot: int):
        self.handoff, self.slot = handoff, slot

    def kernel_args(self, residual):
        """residual, cold, its flag, epoch, error and timeout, as down_partial takes them."""
        h = self.handoff
        return (np.uint64(0) if residual is None else ptr(residual), ptr(h.y_cold), ptr(h.fetched[self.slot]),
                ptr(h.epoch), ptr(h.error), np.int64(TIMEOUT_S * 1e9))

    def add(self, y_gpu: torch.Tensor, residual=None) -> torch.Tensor:
        """residual + (y_gpu + cold), rounded as in torch, once the side stream's fetch is done."""
        h = self.handoff
        main = torch.cuda.current_stream(h.device)
        main.wait_stream(h.side)
        y_gpu = y_gpu.contiguous()
        if residual is not None:
            if residual.dtype != y_gpu.dtype or residual.numel() != y_gpu.numel():
                raise ValueError(f"residual: expected {y_gpu.numel()} elements of {y_gpu.dtype}, got "
                                 f"{residual.numel()} of {residual.dtype}")
            residual = residual.contiguous()
        out = torch.empty_like(y_gpu)
        _launch("add_parts", (ptr(y_gpu), ptr(h.y_cold), np.uint64(0) if residual is None else ptr(residual),
                              ptr(out), np.int32(y_gpu.numel()), np.int32(DTYPE_CODES[y_gpu.dtype])), h.device)
        return out


def given(y_gpu: torch.Tensor):
    """A hot() for Handoff.exchange whose GPU share is y_gpu, computed beforehand (the hand-off's tests and
    benchmark): the send waits for the mask, and add_parts adds the halves."""
    def hot(beside, residual, cold):
        beside(False)
        return cold.add(y_gpu, residual)
    return hot
