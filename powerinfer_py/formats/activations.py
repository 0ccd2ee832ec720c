"""PowerInfer activation statistics: DIR/activation_{i}.pt, one 1-D tensor of n_ff per-neuron counts per layer."""
from __future__ import annotations

import json
import os

import torch

from ..errors import InputError
from .layer_files import layer_files


def activation_path(folder: str, layer: int) -> str:
    return os.path.join(folder, f"activation_{layer}.pt")


def save_activations(folder: str, counts: list[torch.Tensor]) -> None:
    """Write one file per layer into an existing folder (callers make the folder atomically)."""
    for i, c in enumerate(counts):
        torch.save(c.detach().cpu().contiguous(), activation_path(folder, i))


def load_activations(folder: str, n_layers: int | None = None, n_ff: int | None = None) -> list[torch.Tensor]:
    """Counts per layer, in numeric layer order (PowerInfer's exporter sorts names as strings: layer 2 would get
    layer 10's counts). Checks the layer count and each tensor's length when given."""
    paths = layer_files(folder, "activation_{i}.pt", "activation", n_layers)
    out = []
    for path in paths:
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt files
            raise InputError(f"{path}: cannot read activation counts ({e.__class__.__name__})") from None
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise InputError(f"{path}: expected a 1-D tensor of per-neuron counts")
        if n_ff is not None and t.numel() != n_ff:
            raise InputError(f"{path}: {t.numel()} counts, the model has n_ff={n_ff}")
        out.append(t)
    return out


def profiled_tokens(folder: str) -> float | None:
    """Tokens the profiler counted over, from the stats.json `powerinfer-py profile` writes beside the counts."""
    try:
        with open(os.path.join(folder, "stats.json")) as f:
            return float(json.load(f)["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
