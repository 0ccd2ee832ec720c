"""The predictor training set written by `profile --dump-dataset`: per layer the predictor input (fp16) and
the true active mask (bit-packed), appended batch by batch so memory stays flat however many tokens.

Folder layout (raw little-endian arrays, row i = token i):
  meta.json          {"format", "n_layers", "dim", "n_ff", "tokens", "active_threshold"}
  inputs_{i}.f16     (tokens, dim) float16
  masks_{i}.bits     (tokens, ceil(n_ff / 8)) uint8, numpy.packbits(bitorder="little") of each token's mask
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from powerinfer_py.errors import InputError

FORMAT = "powerinfer-py predictor dataset v1"


def _inputs_path(folder, layer):
    return os.path.join(folder, f"inputs_{layer}.f16")


def _masks_path(folder, layer):
    return os.path.join(folder, f"masks_{layer}.bits")


def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """(tokens, n_ff) bool -> (tokens, ceil(n_ff/8)) uint8."""
    return np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little")


def unpack_mask(packed: np.ndarray, n_ff: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=-1, count=n_ff, bitorder="little").view(np.bool_))


class DatasetWriter:
    """Appends whole batches (all layers at once), so an interrupted run never leaves layers of unequal length."""

    def __init__(self, folder: str, n_layers: int, dim: int, n_ff: int, active_threshold: float = 0.0):
        self.folder, self.tokens = folder, 0
        self.meta = {"format": FORMAT, "n_layers": n_layers, "dim": dim, "n_ff": n_ff,
                     "active_threshold": active_threshold}
        os.makedirs(folder, exist_ok=True)
        self.files = [(open(_inputs_path(folder, i), "wb"), open(_masks_path(folder, i), "wb"))
                      for i in range(n_layers)]

    def append(self, inputs: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        """inputs[i] (tokens, dim), masks[i] (tokens, n_ff) bool for every layer i."""
        for (f_in, f_mask), p, m in zip(self.files, inputs, masks):
            f_in.write(p.detach().to("cpu", torch.float16).numpy().tobytes())
            f_mask.write(pack_mask(m).tobytes())
        self.tokens += inputs[0].shape[0]

    def close(self) -> None:
        for f_in, f_mask in self.files:
            f_in.close()
            f_mask.close()
        with open(os.path.join(self.folder, "meta.json"), "w") as f:
            json.dump({**self.meta, "tokens": self.tokens}, f, indent=2)


class PredictorDataset:
    """Read side: memory-mapped per-layer arrays."""

    def __init__(self, folder: str):
        meta_path = os.path.join(folder, "meta.json")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{meta_path}: not a predictor dataset ({e.__class__.__name__})") from None
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{meta_path}: unknown dataset format {self.meta.get('format')!r}")
        self.folder = folder
        self.n_layers, self.dim, self.n_ff = self.meta["n_layers"], self.meta["dim"], self.meta["n_ff"]
        self.tokens = self.meta["tokens"]
        self.active_threshold = self.meta.get("active_threshold", 0.0)
        row_bytes = {_inputs_path: 2 * self.dim, _masks_path: (self.n_ff + 7) // 8}
        for i in range(self.n_layers):
            for name, size in row_bytes.items():
                path = name(folder, i)
                if not os.path.exists(path) or os.path.getsize(path) != self.tokens * size:
                    raise InputError(f"{path}: missing or truncated (expected {self.tokens} rows)")

    def inputs(self, layer: int) -> np.ndarray:
        return np.memmap(_inputs_path(self.folder, layer), np.float16, "r", shape=(self.tokens, self.dim))

    def packed_masks(self, layer: int) -> np.ndarray:
        return np.memmap(_masks_path(self.folder, layer), np.uint8, "r", shape=(self.tokens, (self.n_ff + 7) // 8))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer in memory: inputs (tokens, dim) float32 and masks (tokens, n_ff) bool."""
        inputs = torch.from_numpy(np.array(self.inputs(layer))).float()
        return inputs, unpack_mask(np.array(self.packed_masks(layer)), self.n_ff)
