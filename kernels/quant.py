"""GGUF Q8_0 / Q4_0 blocks in torch, bit-exact with gguf.quants (tests check it), so rows can be quantized
on any machine and gathered as whole rows of blocks without re-quantizing.

Q8_0 block (34 bytes): fp16 scale d, 32 x int8 q; value = d * q.
Q4_0 block (18 bytes): fp16 scale d, 16 bytes of nibbles; element j<16 is the low nibble of byte j, element
j+16 its high nibble; value = d * (nibble - 8).
"""
from __future__ import annotations

import torch

BLOCK = 32  # elements per block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}


def row_bytes(d: int, weight_type: str) -> int:
    """Bytes of one quantized row of d elements (d a multiple of 32)."""
    return d // BLOCK * BLOCK_BYTES[weight_type]


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), written as gguf writes it."""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def quantize(w: torch.Tensor, weight_type: str) -> torch.Tensor:
    """(m, d) float -> (m, row_bytes) uint8 GGUF blocks."""
    m, d = w.shape
    blocks = w.detach().to("cpu", torch.float32).reshape(-1, BLOCK)
    if weight_type == "q8_0":
        scale = blocks.abs().amax(1, keepdim=True) / 127
        inv = torch.where(scale == 0, 0.0, 1 / scale)
        qs = _roundf(blocks * inv).to(torch.int8).view(torch.uint8)
    elif weight_type == "q4_0":
        imax = blocks.abs().argmax(1, keepdim=True)
        scale = blocks.gather(1, imax) / -8
        inv = torch.where(scale == 0, 0.0, 1 / scale)
        q = (blocks * inv + 8.5).trunc().to(torch.uint8).clamp(0, 15)
        qs = q[:, :16] | (q[:, 16:] << 4)
    else:
        raise ValueError(f"weight_type: {weight_type!r} is not a quantized type (q8_0, q4_0)")
    scale_bytes = scale.to(torch.float16).reshape(-1).view(torch.uint8).reshape(-1, 2)
    return torch.cat([scale_bytes, qs], 1).reshape(m, row_bytes(d, weight_type))


def dequantize(blocks: torch.Tensor, weight_type: str, d: int) -> torch.Tensor:
    """(m, >= row_bytes) uint8 GGUF rows (any padding after the blocks is ignored) -> (m, d) float32."""
    m = blocks.shape[0]
    nbytes = BLOCK_BYTES[weight_type]
    b = blocks[:, : row_bytes(d, weight_type)].reshape(-1, nbytes)
    scale = b[:, :2].contiguous().view(torch.float16).float()
    if weight_type == "q8_0":
        q = b[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], 1).float() - 8
    return (scale * q).reshape(m, d)
