"""Random FFN shares for tests and benchmarks: fresh random rows, neuron indices and masks (never zeros)."""
from __future__ import annotations

import torch


def random_share(m: int, d: int, n_ff: int, generator=None, scale: float = 1.0):
    """(gate, up, down_t) random (m, d) float32 rows and m ascending neuron indices out of n_ff."""
    idx = torch.randperm(n_ff, generator=generator)[:m].sort().values
    gate, up, down_t = (torch.randn(m, d, generator=generator) * scale for _ in range(3))
    return gate, up, down_t, idx


def random_mask(T: int, n_ff: int, density: float, generator=None) -> torch.Tensor:
    """(T, n_ff) bool, each neuron active with probability `density`, independently per token."""
    return torch.rand(T, n_ff, generator=generator) < density
