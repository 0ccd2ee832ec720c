"""CPU backend over the cold rows, packed as in rows.py (f32/f16/bf16 elements or GGUF Q8_0/Q4_0 blocks).

- Up to NATIVE_MAX_TOKENS tokens (decode): the C kernels of cpu_rows.c, built once for this machine with the
  system C compiler and OpenMP, called through ctypes. Each needed row is read once, in place, in its packed
  type: no gathered copy, so they run near memory bandwidth (BENCHMARKS.md, sparse kernels).
- More tokens (prefill), or no C compiler: torch matrix products over the needed rows, gathered and decoded to
  fp32 in chunks into reused buffers that stay in cache (a fresh gather of all active rows is the trap
  device-facts.md measures), from DENSE_FRACTION of the rows on over all rows; f32 rows' down projection by
  embedding_bag, in place. Host synchronisation is free here, so this path looks at the mask (nonzero).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from powerinfer_py.atomic import atomic_file
from powerinfer_py.model import ffn_activation

from .ffn import Backend
from .rows import DTYPE_CODES, FFNRows, stride_bytes

NATIVE_MAX_TOKENS = 8  # MAX_TOKENS in cpu_rows.c; measured: at 16 tokens the C kernels take 2x the dense product
MIN_BYTES_PER_THREAD = 1 << 20  # of the share's rows: a small share takes fewer threads (each costs a wake-up)
CHUNK_BYTES = 8 << 20  # fp32 bytes per matrix per chunk of the torch path: stays in L2/L3 between gather and product
DENSE_FRACTION = 0.35  # from this share of needed rows on, the torch path multiplies all rows
SOURCE = Path(__file__).with_name("cpu_rows.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
WEIGHT_CODES = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4}
ACT_CODES = {"relu": 0, "drelu": 1, "silu": 2}


def _cpu_id() -> bytes:
    """What -march=native depends on: the CPU's model and flags (Linux), so a shared cache never mixes CPUs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags")).encode()


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """cpu_rows.c built for this machine (cached in ~/.cache/powerinfer-py by source, compiler, flags and CPU),
    or None, with a warning, where it cannot be built (no C compiler with OpenMP: set CC to choose one)."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + repr((cc, CFLAGS)).encode() + _cpu_id()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "powerinfer-py"
    path = cache / f"cpu_rows-{key}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_file(str(path), force=True) as tmp:
                subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"kernels: cannot build {SOURCE.name} with {cc} ({detail.strip()[:300]}); the CPU backend "
                      "uses torch's slower gather-then-matmul path", stacklevel=2)
        return None
    i32, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.gate_up.argtypes = [ptr, ptr, i64, i32, ptr, i64, ptr, i64, ptr, i32, i32, i32, f32, ptr, i32, i32]
    lib.down.argtypes = [ptr, i64, i32, i64, i32, ptr, i32, ptr, i32]
    lib.ffn.argtypes = [ptr, ptr, ptr, i64, i32, ptr, i64, ptr, i64, ptr, i32, i32, i32, f32, ptr, i32, i32]
    lib.cold_step.argtypes = [ctypes.POINTER(RowsDesc), i32, i32, i32, i32, f32, ptr, i32, ptr, i64, ptr, ptr, ptr,
                              i32, ctypes.c_double, ptr, ptr, i32]
    lib.gate_up.restype = lib.down.restype = lib.ffn.restype = None
    lib.cold_step.restype = i32
    return lib


class RowsDesc(ctypes.Structure):
    """rows_desc of cpu_rows.c: one layer's packed rows, by address."""
    _fields_ = [("gate", ctypes.c_void_p), ("up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("neuron_idx", ctypes.c_void_p), ("m", ctypes.c_int64)]

    @classmethod
    def of(cls, rows: FFNRows) -> RowsDesc:
        return cls(rows.gate.data_ptr(), rows.up.data_ptr(), rows.down_t.data_ptr(), stride_bytes(rows.gate),
                   rows.neuron_idx.data_ptr(), rows.m)


class ColdStep:
    """The CPU half of a decode step over several layers' cold rows (cold_step in cpu_rows.c): layer by layer,
    wait for the input flag in `ready[0]`, compute the rows that the layer's row of cold_list names into y_host,
    raise the output flag in `ready[1]`. The host buffers and flags are CPU tensors (pinned when a GPU writes
    them) that must outlive this object."""

    def __init__(self, layers: list[FFNRows], act: str, threshold: float, x_host, cold_list, y_host, ready):
        self.lib = native_library()
        if self.lib is None:
            raise RuntimeError("kernels: the CPU half of the hand-off needs the C kernels (no C compiler found)")
        if len({rows.weight_type for rows in layers}) != 1 or ready.shape != (2, len(layers)):
            raise ValueError("layers: expected one weight type, and ready of shape (2, layers)")
        if (cold_list.dtype != torch.int32 or cold_list.dim() != 2 or cold_list.shape[0] != len(layers)
                or cold_list.shape[1] < 2 + max(rows.m for rows in layers) or not cold_list.is_contiguous()):
            raise ValueError("cold_list: expected contiguous int32 (layers, 2 + the most rows of a layer)")
        self.descs = (RowsDesc * len(layers))(*[RowsDesc.of(rows) for rows in layers])
        self.layers = layers  # keeps the rows alive while the C side holds their addresses
        self.times = torch.zeros((len(layers), 2), dtype=torch.float64)  # when each layer's input came, output left
        self.counts = torch.zeros((len(layers), 2), dtype=torch.int64)  # each layer's active neurons, cold ones
        self.args = (self.descs, len(layers), WEIGHT_CODES[layers[0].weight_type], layers[0].d, ACT_CODES[act],
                     threshold, x_host.data_ptr(), DTYPE_CODES[x_host.dtype], cold_list.data_ptr(), cold_list.shape[1],
                     y_host.data_ptr(), ready[0].data_ptr(), ready[1].data_ptr())

    @staticmethod
    def list_of(rows: FFNRows, active: torch.Tensor) -> torch.Tensor:
        """What the GPU writes into cold_list for one token's mask `active` (n_ff,) over these rows (the
        reference of handoff.cu's send_to_host)."""
        listed = active[rows.neuron_idx].nonzero().flatten()
        head = torch.tensor([int(active.sum()), listed.numel()])
        return torch.cat((head, listed)).int()

    def __call__(self, epoch: int, timeout_s: float) -> bool:
        """Runs the step whose flags carry `epoch`; False if an input flag did not come within timeout_s."""
        return self.lib.cold_step(*self.args, epoch, timeout_s, self.times.data_ptr(), self.counts.data_ptr(),
                                  torch.get_num_threads()) == 0


def _threads(t: torch.Tensor) -> int:
    """Threads for a kernel over the packed matrix t (torch's number, fewer for small matrices)."""
    return max(1, min(torch.get_num_threads(), t.shape[0] * stride_bytes(t) // MIN_BYTES_PER_THREAD))


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self):
        self.lib = native_library()  # None: the torch path only
        self._local = threading.local()  # per-thread gather buffers of the torch path, reused across calls

    def gate_up(self, x, rows: FFNRows, active, act, threshold, h, full):
        T = x.shape[0]
        if self.lib is None or T > NATIVE_MAX_TOKENS:
            return self._gate_up_torch(x, rows, active, act, threshold, h, full)
        xf, active = x.float().contiguous(), active.contiguous()
        self.lib.gate_up(rows.gate.data_ptr(), rows.up.data_ptr(), stride_bytes(rows.gate),
                         WEIGHT_CODES[rows.weight_type], rows.neuron_idx.data_ptr(), rows.m, active.data_ptr(),
                         active.shape[1], xf.data_ptr(), rows.d, T, ACT_CODES[act], threshold, h.data_ptr(),
                         int(full), _threads(rows.gate))

    def ffn(self, x, rows: FFNRows, active, act, threshold, y, residual=None, beside=None, cold=None) -> bool:
        """y = the rows' FFN output: one pass over each needed row (C kernels), or gate_up then down."""
        T = x.shape[0]
        if self.lib is None or T > NATIVE_MAX_TOKENS:
            return super().ffn(x, rows, active, act, threshold, y, residual, beside, cold)
        if beside is not None:
            beside(False)
        xf, active = x.float().contiguous(), active.contiguous()
        self.lib.ffn(rows.gate.data_ptr(), rows.up.data_ptr(), rows.down_t.data_ptr(), stride_bytes(rows.gate),
                     WEIGHT_CODES[rows.weight_type], rows.neuron_idx.data_ptr(), rows.m, active.data_ptr(),
                     active.shape[1], xf.data_ptr(), rows.d, T, ACT_CODES[act], threshold, y.data_ptr(),
                     DTYPE_CODES[y.dtype], _threads(rows.gate))
        return False

    def down(self, h, rows: FFNRows, y, active=None, cold=None, residual=None) -> bool:
        T = h.shape[0]
        if self.lib is None or T > NATIVE_MAX_TOKENS:
            self._down_torch(h, rows, y)
            return False
        h = h.contiguous()
        out = y if y.dtype == torch.float32 else torch.empty(y.shape)
        self.lib.down(rows.down_t.data_ptr(), stride_bytes(rows.down_t), WEIGHT_CODES[rows.weight_type], rows.m,
                      rows.d, h.data_ptr(), T, out.data_ptr(), _threads(rows.down_t))
        if out is not y:
            y.copy_(out)
        return False

    def _gate_up_torch(self, x, rows, active, act, threshold, h, full):
        row_active = active[:, rows.neuron_idx]
        xf = x.float()
        hc = torch.zeros(row_active.shape)
        for chunk in _chunks(row_active.any(0), rows):
            g, u = self._unpack(rows, rows.gate, chunk, 0), self._unpack(rows, rows.up, chunk, 1)
            hc[:, chunk] = ffn_activation(xf @ g.T, xf @ u.T, act, threshold) * row_active[:, chunk]
        if full:
            h[:, rows.neuron_idx] = hc
        else:
            h.copy_(hc)

    def _down_torch(self, h, rows, y):
        if rows.weight_type == "f32":
            return _down_embedding_bag(h, rows, y)
        out = torch.zeros(y.shape)
        for chunk in _chunks((h != 0).any(0), rows):
            out += h[:, chunk] @ self._unpack(rows, rows.down_t, chunk, 0)
        y.copy_(out)

    def _unpack(self, rows, t, chunk, slot):
        """Rows `chunk` of the packed matrix t as fp32 (rows.unpack); an index chunk is gathered into this
        thread's reused buffer `slot` first: a fresh gather page-faults (the trap of device-facts.md)."""
        if isinstance(chunk, slice):
            return rows.unpack(t, chunk)
        bufs = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get((slot, t.dtype))
        if buf is None or buf.shape[0] < chunk.numel() or buf.shape[1] != t.shape[1]:
            buf = bufs[(slot, t.dtype)] = torch.empty(max(chunk.numel(), 1), t.shape[1], dtype=t.dtype)
        return rows.unpack(torch.index_select(t, 0, chunk, out=buf[: chunk.numel()]), slice(None))


def _down_embedding_bag(h, rows: FFNRows, y):
    """f32 rows: embedding_bag(mode='sum', per_sample_weights=h) reads the needed rows of down_t in place (faster
    than gathering them); each token's rows are split into one bag per thread, the bags summed in order."""
    T, bags, width = h.shape[0], torch.get_num_threads(), rows.down_t.shape[1]
    token, row = (h != 0).nonzero().unbind(1)  # token-major, rows ascending
    counts = torch.bincount(token, minlength=T)
    starts = counts.cumsum(0) - counts
    offsets = (starts[:, None] + counts[:, None] * torch.arange(bags) // bags).reshape(-1)
    sums = F.embedding_bag(row, rows.down_t, offsets, mode="sum", per_sample_weights=h[token, row])
    y.copy_(sums.view(T, bags, width)[:, :, : rows.d].sum(1))


def _chunks(needed: torch.Tensor, rows: FFNRows) -> list:
    """The needed rows in chunks of CHUNK_BYTES of fp32: index tensors, or from DENSE_FRACTION on slices over
    all rows (one slice for f32 rows, which are multiplied in place)."""
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * rows.d))
    sel = needed.nonzero().squeeze(1)
    if sel.numel() >= DENSE_FRACTION * rows.m:
        step = rows.m if rows.weight_type == "f32" else rows_per_chunk
        return [slice(i, i + step) for i in range(0, rows.m, step)]
    return list(sel.split(rows_per_chunk))
