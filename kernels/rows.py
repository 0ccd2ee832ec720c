"""FFNRows: one device's share of a layer's FFN rows, packed once at load in the layout the kernels read.

One layout on both devices (its bytes, which `bytes_per_neuron` gives exactly): each matrix (m, row_bytes) in
the weight type, f32/f16/bf16 elements or GGUF Q8_0/Q4_0 blocks, every row zero-padded to a multiple of 16
bytes (and of 8 elements) so the CUDA kernels read it in 16-byte loads; neuron_idx (m,) int64 beside the rows.
The CPU kernels also read the rows in place in their type (a half or a quarter of fp32's bytes).
"""
from __future__ import annotations

import dataclasses

import torch

from . import quant

# The element types of x and of outputs, as every kernel (C, CUDA) numbers them.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def stride_bytes(t: torch.Tensor) -> int:
    """Bytes from one row of a packed matrix (or of x) to the next, as the kernels take them."""
    return t.stride(0) * t.element_size()


def row_bytes(d: int, weight_type: str) -> int:
    """Bytes of one packed row of d elements."""
    if weight_type in FLOAT_DTYPES:
        return _round_up(_round_up(d, 8) * FLOAT_DTYPES[weight_type].itemsize, 16)
    return _round_up(quant.row_bytes(d, weight_type), 16)


def _check_weight_type(weight_type: str, d: int):
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type: {weight_type!r} is not one of {WEIGHT_TYPES}")
    if weight_type in quant.BLOCK_BYTES and d % quant.BLOCK:
        raise ValueError(f"weight_type: {weight_type} needs d to be a multiple of {quant.BLOCK}, got d={d}")


def _pack_matrix(name: str, w: torch.Tensor, d: int, weight_type: str, device: torch.device) -> torch.Tensor:
    """One (m, d) matrix in the packed layout on device. Quantized types also accept (m, row_bytes) uint8 GGUF rows."""
    m = w.shape[0]
    if w.dtype == torch.uint8:
        if weight_type not in quant.BLOCK_BYTES or w.shape[1] != quant.row_bytes(d, weight_type):
            raise TypeError(f"{name}: uint8 rows must be {weight_type} GGUF blocks of {quant.row_bytes(d, weight_type)}"
                            f" bytes for d={d}, got shape {tuple(w.shape)}")
        blocks = w.cpu()
    elif not w.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor (or uint8 GGUF blocks), got {w.dtype}")
    elif weight_type in quant.BLOCK_BYTES:
        blocks = quant.quantize(w, weight_type)
    out = torch.zeros(m, row_bytes(d, weight_type), dtype=torch.uint8)
    if weight_type in FLOAT_DTYPES:
        out = out.view(FLOAT_DTYPES[weight_type])
        out[:, :d] = w.cpu()
    else:
        out[:, : blocks.shape[1]] = blocks
    return out.to(device)


@dataclasses.dataclass
class FFNRows:
    """gate/up/down_t: packed (m, ...) rows, row j holding neuron neuron_idx[j]; d: the model dimension."""
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    neuron_idx: torch.Tensor
    d: int
    weight_type: str
    min_n_ff: int  # neuron_idx.max() + 1: the active mask must be at least this long

    @property
    def m(self) -> int:
        return self.neuron_idx.shape[0]

    @property
    def device(self) -> torch.device:
        return self.neuron_idx.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down_t, self.neuron_idx))

    @staticmethod
    def bytes_per_neuron(d: int, weight_type: str, gated: bool = True, device: str = "cuda") -> int:
        """Bytes one neuron takes on `device` ('cpu' or 'cuda': one layout): its 3 rows (2 if not gated) and its
        index."""
        _check_weight_type(weight_type, d)
        return (3 if gated else 2) * row_bytes(d, weight_type) + 8

    @classmethod
    def pack(cls, gate_rows, up_rows, down_t_rows, neuron_idx, device, weight_type) -> FFNRows:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not torch.is_tensor(neuron_idx) or neuron_idx.dim() != 1 or neuron_idx.dtype != torch.int64:
            raise TypeError("neuron_idx: expected a 1-D int64 tensor")
        m = neuron_idx.shape[0]
        if m and (neuron_idx[0] < 0 or (neuron_idx[1:] <= neuron_idx[:-1]).any()):
            raise ValueError("neuron_idx: must be non-negative and strictly ascending")
        shapes = {n: tuple(t.shape) for n, t in
                  (("gate_rows", gate_rows), ("up_rows", up_rows), ("down_t_rows", down_t_rows))}
        if any(len(s) != 2 or s[0] != m for s in shapes.values()) or len({s[1] for s in shapes.values()}) != 1:
            raise ValueError(f"gate_rows/up_rows/down_t_rows: expected three (m={m}, d) tensors, got {shapes}")
        d = gate_rows.shape[1]
        if gate_rows.dtype == torch.uint8 and weight_type in quant.BLOCK_BYTES:
            d = d // quant.BLOCK_BYTES[weight_type] * quant.BLOCK
        _check_weight_type(weight_type, d)
        packed = [_pack_matrix(n, w, d, weight_type, device)
                  for n, w in (("gate_rows", gate_rows), ("up_rows", up_rows), ("down_t_rows", down_t_rows))]
        min_n_ff = int(neuron_idx[-1]) + 1 if m else 0
        return cls(*packed, neuron_idx.to(device).contiguous(), d, weight_type, min_n_ff)

    def block(self, start: int, stop: int) -> FFNRows:
        """Rows [start, stop) as FFNRows (views)."""
        idx = self.neuron_idx[start:stop]
        return FFNRows(self.gate[start:stop], self.up[start:stop], self.down_t[start:stop], idx, self.d,
                       self.weight_type, int(idx[-1]) + 1 if idx.numel() else 0)

    def to(self, device, non_blocking: bool = False) -> FFNRows:
        """A copy on `device` (from pinned memory, non_blocking copies overlap the host)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> FFNRows:
        """A copy in page-locked host memory: copies to a GPU then run at PCIe speed (pageable: about a sixth)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> FFNRows:
        return dataclasses.replace(self, gate=fn(self.gate), up=fn(self.up), down_t=fn(self.down_t),
                                   neuron_idx=fn(self.neuron_idx))

    def unpack(self, t: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """Rows `rows` (a slice or an index tensor) of the packed matrix t as (n, d) float32: the exact values
        the kernels multiply (a view, not a copy, for a slice of f32 rows)."""
        part = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
        if self.weight_type in FLOAT_DTYPES:
            return part[:, : self.d].float()
        return quant.dequantize(part, self.weight_type, self.d)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down_t) as (m, d) float32 on the rows' device."""
        return self.unpack(self.gate), self.unpack(self.up), self.unpack(self.down_t)
