"""CUDA backend: the kernels of sparse_ffn.cu compiled by CuPy and launched on torch's current stream, zero-copy
on torch tensors, with no host synchronisation (so a decode step can be captured in a CUDA graph). `launch`
serves every kernel of the package: through the driver's cuLaunchKernelEx, so that on sm_90+ each kernel may
start while the one before it finishes (programmatic dependent launch; common.cuh says how the kernels wait).
Importing this module imports CuPy; the registry imports it only for CUDA devices."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import cupy
import numpy as np
import torch

from powerinfer_py.model import ffn_activation

from .ffn import Backend
from .rows import DTYPE_CODES, FLOAT_DTYPES, FFNRows, stride_bytes

WEIGHT_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}
ACT_CODES = {"relu": 0, "drelu": 1, "silu": 2}
TOKEN_TILES = (1, 2, 4, 8)  # tokens per launch the kernels are compiled for
THREADS = 256  # 8 warps; the kernels assume it
COLS_PER_BLOCK = 256
ROWS_PER_BLOCK = 32  # gate_up and gate_up_one: candidate rows per block (ROWS_PER_BLOCK in sparse_ffn.cu)
SEGMENT = 1024  # gate_up: row elements per work item
GATE_UP_SMEM = 24 << 10  # gate_up's dynamic shared memory at most (its 18 KB static stay under 48 KB)
# From this many tokens on, float rows go through cuBLAS over all rows (measured by `python -m kernels.bench`).
DENSE_MIN_TOKENS = 4
# gate_up_one and ffn_one stage x in shared memory as fp32, beside their static lists, within the 48 KB a launch
# gets without opting in (12K elements failed to launch)
ONE_TOKEN_MAX_X = 11 << 10
DONE_COUNTERS = 4096  # column blocks of 256: rows of up to 1M elements (16 KB; the ledger's small buffers)
# ffn_one takes one-token steps over rows of at most this many bytes: a block's chain of dependent reads (list,
# gate/up, down, the last block's write) beats two launches only while the rows are few (`python -m kernels.bench
# --gpu-sections one`, BENCHMARKS.md)
ONE_LAUNCH_MAX_BYTES = 64 << 20
DOWN_BLOCKS_PER_SM = 2  # down_partial: row splits x column blocks ~ this many blocks per SM (kernels.bench sweeps it)


def compile_module(filename: str, names=()) -> cupy.RawModule:
    """A .cu file of this package behind common.cuh, compiled by NVRTC for the current device (CuPy caches the
    binary); names: the template instances to compile."""
    here = Path(__file__).parent
    src = (here / "common.cuh").read_text() + (here / filename).read_text()
    return cupy.RawModule(code=src, options=("-std=c++17",), name_expressions=list(names) or None)


@functools.cache
def _module(weight_type: str) -> cupy.RawModule:
    wt = WEIGHT_CODES[weight_type]
    names = [f"gate_up<{wt},{xt},{tt}>" for xt in DTYPE_CODES.values() for tt in TOKEN_TILES]
    names += [f"down_partial<{wt},{tt}>" for tt in TOKEN_TILES]
    if weight_type in FLOAT_DTYPES:
        names += [f"{k}<{wt},{xt}>" for k in ("gate_up_one", "ffn_one") for xt in DTYPE_CODES.values()]
    return compile_module("sparse_ffn.cu", names)


@functools.cache
def _done_counters(device: torch.device) -> torch.Tensor:
    """down_partial's per-column-block counts of finished splits (zero between launches: the last block resets
    its own); one buffer per device, as launches on a device are ordered on one stream."""
    return torch.zeros(DONE_COUNTERS, dtype=torch.int32, device=device)


@functools.cache
def _ffn_sums(device: torch.device, xpad: int) -> torch.Tensor:
    """ffn_one's fp32 output sums (xpad) and its count of finished blocks, zero between launches (the last block
    zeroes them); one per device and row length (launches on a device are ordered on one stream)."""
    return torch.zeros(xpad + 4, dtype=torch.float32, device=device)


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def ptr(t: torch.Tensor) -> np.uint64:
    """A tensor's device address as a kernel argument."""
    return np.uint64(t.data_ptr())


class _LaunchAttribute(ctypes.Structure):  # the driver's CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # the driver's CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_ARG_TYPES = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
              np.dtype(np.int32): ctypes.c_int32, np.dtype(np.float32): ctypes.c_float}


@functools.cache
def _launch_kernel_ex():
    driver = ctypes.CDLL("libcuda.so.1")
    fn = driver.cuLaunchKernelEx
    fn.argtypes = (ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def programmatic_launch(index: int) -> bool:
    """Whether kernels on device `index` launch as programmatic dependents (sm_90+)."""
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _launch_attributes(index: int):
    attrs = (_LaunchAttribute * 1)()
    attrs[0].id = PROGRAMMATIC_STREAM_SERIALIZATION
    attrs[0].value[0] = 1
    return attrs, int(programmatic_launch(index))


def launch(kernel, grid, args, device: torch.device, shared_mem: int = 0, block: int = THREADS):
    """Launch a CuPy kernel (args: numpy scalars, as CuPy takes them) on torch's current stream of `device`, so
    it is ordered with torch's work and can be captured in torch's CUDA graphs, as a programmatic dependent
    where the device has them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    grid = tuple(grid) + (1,) * (3 - len(grid))
    values = [_ARG_TYPES[a.dtype](a) for a in args]
    params = (ctypes.c_void_p * max(1, len(values)))(*(ctypes.addressof(v) for v in values))
    attrs, n_attrs = _launch_attributes(index)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(block, 1, 1), shared_mem,
                           torch.cuda.current_stream(device).cuda_stream, attrs, n_attrs)
    with cupy.cuda.Device(index):
        error = _launch_kernel_ex()(ctypes.byref(config), kernel.kernel.ptr, params, None)
    if error:
        raise RuntimeError(f"cuLaunchKernelEx: CUDA error {error} launching {kernel.name}")


def _tile(T: int) -> int:
    return next(tt for tt in TOKEN_TILES if tt >= T)


def _xpad(rows: FFNRows) -> int:
    """The row length the kernels read: d padded to a multiple of 8 elements (rows.py pads rows so)."""
    return -(-rows.d // 8) * 8


def _kernel_x(x: torch.Tensor, rows: FFNRows) -> torch.Tensor:
    """x as gate_up reads it (8 elements at a time, in 16-byte loads): x itself when it is contiguous, d a
    multiple of 8 and 16-byte aligned (the kernels convert it in registers); else a zero-padded fp32 copy."""
    if x.is_contiguous() and rows.d % 8 == 0 and x.data_ptr() % 16 == 0:
        return x
    xf = x.new_zeros((x.shape[0], _xpad(rows)), dtype=torch.float32)
    xf[:, : rows.d] = x
    return xf


def _one_token(x: torch.Tensor, rows: FFNRows) -> bool:
    """Whether a call takes the one-token kernels (whole float rows per warp, x staged in shared memory)."""
    return x.shape[0] == 1 and rows.weight_type in FLOAT_DTYPES and _xpad(rows) <= ONE_TOKEN_MAX_X


class CudaBackend(Backend):
    name = "cuda"

    def ffn(self, x, rows: FFNRows, active, act, threshold, y, residual=None, beside=None, cold=None) -> bool:
        """One token over small float rows: gate, up, down and the residual in one launch (ffn_one; the CPU's
        share, if given, is left to the caller); otherwise gate_up, then down."""
        if not _one_token(x, rows) or rows.nbytes > ONE_LAUNCH_MAX_BYTES:
            return super().ffn(x, rows, active, act, threshold, y, residual, beside, cold)
        if cold is not None:
            residual = None
        xk, active = _kernel_x(x, rows), active.contiguous()
        xpad = _xpad(rows)
        sums = _ffn_sums(x.device, xpad)
        kernel = _module(rows.weight_type).get_function(
            f"ffn_one<{WEIGHT_CODES[rows.weight_type]},{DTYPE_CODES[xk.dtype]}>")
        args = (ptr(rows.gate), ptr(rows.up), np.int64(stride_bytes(rows.gate)),
                ptr(rows.down_t), np.int64(stride_bytes(rows.down_t)), ptr(rows.neuron_idx),
                np.int32(rows.m), ptr(active), ptr(xk), np.int32(rows.d), np.int32(xpad), np.int32(ACT_CODES[act]),
                np.float32(threshold), ptr(sums), ptr(sums[xpad:].view(torch.int32)), ptr(y),
                np.int32(DTYPE_CODES[y.dtype]), np.uint64(0) if residual is None else ptr(residual))
        launch(kernel, (-(-rows.m // ROWS_PER_BLOCK),), args, x.device, 4 * max(xpad, 8 * THREADS))
        if beside is not None:
            beside(True)
        return residual is not None

    def gate_up(self, x, rows: FFNRows, active, act, threshold, h, full):
        """Write h (fp32, (T, m) or the full (T, n_ff)) for the active neurons."""
        T = x.shape[0]
        if T >= DENSE_MIN_TOKENS and rows.weight_type in FLOAT_DTYPES:
            return self._gate_up_dense(x, rows, active, act, threshold, h, full)
        xk, active = _kernel_x(x, rows), active.contiguous()
        mod, wt = _module(rows.weight_type), WEIGHT_CODES[rows.weight_type]
        xpad = _xpad(rows)
        if _one_token(x, rows):
            kernel = mod.get_function(f"gate_up_one<{wt},{DTYPE_CODES[xk.dtype]}>")
            args = (ptr(rows.gate), ptr(rows.up), np.int64(stride_bytes(rows.gate)),
                    ptr(rows.neuron_idx), np.int32(rows.m), ptr(active), ptr(xk), np.int32(rows.d), np.int32(xpad),
                    np.int32(ACT_CODES[act]), np.float32(threshold), ptr(h), np.int32(full))
            launch(kernel, (-(-rows.m // ROWS_PER_BLOCK),), args, x.device, 4 * xpad)
            return
        smem_per_token = ROWS_PER_BLOCK * -(-rows.d // SEGMENT) * 2 * 4  # fp32 gate and up sums per segment
        max_tile = max(tt for tt in TOKEN_TILES if smem_per_token * tt <= GATE_UP_SMEM)
        for t0 in range(0, T, max_tile):
            n = min(T - t0, max_tile)
            tile = _tile(n)
            kernel = mod.get_function(f"gate_up<{wt},{DTYPE_CODES[xk.dtype]},{tile}>")
            args = (ptr(rows.gate), ptr(rows.up), np.int64(stride_bytes(rows.gate)),
                    ptr(rows.neuron_idx), np.int32(rows.m), ptr(active[t0]), np.int64(active.shape[1]),
                    ptr(xk[t0]), np.int64(stride_bytes(xk)), np.int32(rows.d), np.int32(n),
                    np.int32(ACT_CODES[act]), np.float32(threshold), ptr(h[t0]), np.int32(full))
            launch(kernel, (-(-rows.m // ROWS_PER_BLOCK),), args, x.device, smem_per_token * tile)

    def down(self, h, rows: FFNRows, y, active=None, cold=None, residual=None) -> bool:
        """y (T, d) = h @ down_t over the rows with h != 0; fp32 partial sums per row split, added in split order
        by the last split of each column block (one launch per tile of tokens). One token with its mask: the
        kernel loads the mask's first rows before it waits for h; with the CPU's share (a kernels.handoff.ColdPart)
        it also adds that and the residual (returns True)."""
        T = h.shape[0]
        if T >= DENSE_MIN_TOKENS and rows.weight_type in FLOAT_DTYPES:
            y.copy_(h.to(rows.down_t.dtype) @ rows.down_t[:, : rows.d])
            return False
        fused = cold is not None and T == 1
        col_blocks = -(-rows.d // COLS_PER_BLOCK)
        splits = max(1, min(-(-rows.m // 256), DOWN_BLOCKS_PER_SM * sm_count(h.device.index) // col_blocks))
        rows_per_split = -(-rows.m // splits)
        splits = -(-rows.m // rows_per_split)
        mod, wt = _module(rows.weight_type), WEIGHT_CODES[rows.weight_type]
        h, done = h.contiguous(), _done_counters(h.device)
        for t0 in range(0, T, TOKEN_TILES[-1]):
            n = min(T - t0, TOKEN_TILES[-1])
            partial = torch.empty((splits, n, rows.d), dtype=torch.float32, device=h.device)
            kernel = mod.get_function(f"down_partial<{wt},{_tile(n)}>")
            args = (ptr(rows.down_t), np.int64(stride_bytes(rows.down_t)),
                    np.int32(rows.m), np.int32(rows.d), ptr(h[t0]), np.int32(n), np.int32(rows_per_split),
                    ptr(partial), ptr(done), ptr(y[t0]), np.int32(DTYPE_CODES[y.dtype]))
            early = active is not None and T == 1 and rows.weight_type in FLOAT_DTYPES
            args += (ptr(rows.neuron_idx) if early else np.uint64(0),
                     ptr(active.contiguous()) if early else np.uint64(0))
            args += cold.kernel_args(residual) if fused else (np.uint64(0),) * 6
            launch(kernel, (col_blocks, splits), args, h.device)
        return fused

    def _gate_up_dense(self, x, rows, active, act, threshold, h, full):
        """Many tokens: cuBLAS over all rows (each row read once for every token), then mask."""
        xw = x.to(rows.gate.dtype)
        g = (xw @ rows.gate[:, : rows.d].T).float()
        u = (xw @ rows.up[:, : rows.d].T).float()
        hc = ffn_activation(g, u, act, threshold) * active[:, rows.neuron_idx]
        if full:
            h[:, rows.neuron_idx] = hc
        else:
            h.copy_(hc)
