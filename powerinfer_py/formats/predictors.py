"""PowerInfer predictor folders: model_{i}.pt state dicts with fc1.weight (r, d) and fc2.weight (n_ff, r), no
biases, and an optional config.json with sparse_threshold."""
from __future__ import annotations

import json
import os

import torch

from ..errors import InputError
from .layer_files import layer_files


def save_predictors(folder: str, layers: list[dict], sparse_threshold: float, extra_config: dict | None = None):
    """Write into an existing folder (callers make it under a temporary name and rename it)."""
    for i, sd in enumerate(layers):
        torch.save({"fc1.weight": sd["fc1.weight"].detach().cpu().contiguous(),
                    "fc2.weight": sd["fc2.weight"].detach().cpu().contiguous()},
                   os.path.join(folder, f"model_{i}.pt"))
    cfg = {"sparse_threshold": float(sparse_threshold), **(extra_config or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load_predictors(folder: str, n_layers: int | None = None, dim: int | None = None,
                    n_ff: int | None = None) -> tuple[list[dict], float]:
    """(per-layer {'fc1.weight', 'fc2.weight'} in layer order, sparse_threshold). Checks count and shapes.
    The tensors are memory-mapped from the files, so checking a 7B model's predictors reads almost nothing."""
    paths = layer_files(folder, "model_{i}.pt", "predictor", n_layers)
    out = []
    for path in paths:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read when first used
        except Exception as e:
            raise InputError(f"{path}: cannot read predictor ({e.__class__.__name__})") from None
        if not isinstance(sd, dict) or "fc1.weight" not in sd or "fc2.weight" not in sd:
            raise InputError(f"{path}: expected a state dict with fc1.weight and fc2.weight")
        fc1, fc2 = sd["fc1.weight"], sd["fc2.weight"]
        r = fc1.shape[0]
        if fc1.dim() != 2 or (dim is not None and fc1.shape[1] != dim):
            raise InputError(f"{path}: fc1.weight has shape {tuple(fc1.shape)}, expected (r, {dim})")
        if fc2.dim() != 2 or fc2.shape[1] != r or (n_ff is not None and fc2.shape[0] != n_ff):
            raise InputError(f"{path}: fc2.weight has shape {tuple(fc2.shape)}, expected ({n_ff}, {r})")
        out.append({"fc1.weight": fc1, "fc2.weight": fc2})
    threshold = 0.0
    cfg_path = os.path.join(folder, "config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                threshold = float(json.load(f).get("sparse_threshold", 0.0))
        except (ValueError, OSError) as e:
            raise InputError(f"{cfg_path}: unreadable ({e})") from None
    return out, threshold
