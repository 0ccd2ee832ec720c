"""The GPU-CPU hand-off of a hybrid decode step, without the host in the GPU's way.

Per split layer (`exchange`) the GPU writes the FFN input and the list of the layer's active cold rows (read off
the predictor's mask) into pinned host memory and raises a flag there (send_to_host), then waits on the GPU for
the CPU's flag and copies the CPU's cold-row result to the GPU (fetch_from_host), all beside its hot rows (on a
side stream); once both are done it adds the two and the residual (add_parts). Meanwhile one host call
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
FETCH_THREADS = 256  # FETCH_THREADS in handoff.cu
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
        """GPU: layer `slot`'s FFN output plus residual (if given): hands the input x (1, dim) and mask
        (1, n_ff) to the CPU and fetches its result on this stream while hot() (the GPU's rows, returning x's
        shape and dtype) runs on the side stream, then adds the two (rounded as `residual + (hot() + cpu)` in
        torch). The hot rows go to the side stream so that send_to_host, a programmatic dependent on this
        stream, is resident before the predictor ends and starts at once."""
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        self._send(slot, x.contiguous(), active.contiguous())
        self._fetch(slot)
        with torch.cuda.stream(self.side):
            y_gpu = hot().contiguous()
        main.wait_stream(self.side)
        y_gpu.record_stream(main)
        if residual is not None:
            if residual.dtype != y_gpu.dtype or residual.numel() != y_gpu.numel():
                raise ValueError(f"residual: expected {y_gpu.numel()} elements of {y_gpu.dtype}, got "
                                 f"{residual.numel()} of {residual.dtype}")
            residual = residual.contiguous()
        out = torch.empty_like(y_gpu)
        _launch("add_parts", (ptr(y_gpu), ptr(self.y_cold), np.uint64(0) if residual is None else ptr(residual),
                              ptr(out), np.int32(y_gpu.numel()), np.int32(DTYPE_CODES[y_gpu.dtype])), self.device)
        return out

    def _send(self, slot, x, active):
        cold_idx = self.cold_idx[slot]
        args = (ptr(x), np.int64(x.numel() * x.element_size()), ptr(active), np.int32(active.numel()),
                ptr(cold_idx), np.int32(cold_idx.numel()), ptr(self.x_host), ptr(self.cold_list[slot]),
                ptr(self.ready[0, slot]), ptr(self.epoch))
        _launch("send_to_host", args, self.device)

    def _fetch(self, slot):
        args = (ptr(self.y_host), ptr(self.y_cold), np.int64(self.y_host.numel() * self.y_host.element_size()),
                ptr(self.ready[1, slot]), ptr(self.epoch), ptr(self.error), np.int64(TIMEOUT_S * 1e9))
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
