import pytest
import torch

from kernels.cases import random_mask, random_share
from kernels.reference import sparse_ffn_reference, sparse_gate_up_reference
from powerinfer_py.config import ModelConfig
from powerinfer_py.model import FeedForward


@pytest.mark.parametrize("act,threshold", [("relu", 0.0), ("drelu", 0.0), ("silu", 0.0), ("relu", 0.3)])
def test_reference_equals_masked_dense_ffn(act, threshold):
    """With every neuron on one device the reference is the model's FeedForward with the same mask."""
    d, n_ff, T = 48, 100, 3
    cfg = ModelConfig(vocab_size=10, dim=d, n_layers=1, n_heads=4, n_kv_heads=4, n_ff=n_ff, ffn_act=act,
                      ffn_threshold=threshold)
    ffn = FeedForward(cfg).double()
    x = torch.randn(T, d, dtype=torch.float64)
    active = random_mask(T, n_ff, 0.4)
    idx = torch.arange(n_ff)
    y = sparse_ffn_reference(x, ffn.w_gate.weight, ffn.w_up.weight, ffn.w_down.weight.T, idx, active, act, threshold)
    with torch.no_grad():
        torch.testing.assert_close(y, ffn(x, active), rtol=1e-12, atol=1e-12)


def test_reference_splits_add_up():
    """Two devices' shares of one layer sum to the whole layer's output."""
    d, n_ff = 40, 90
    gate, up, down_t, _ = random_share(n_ff, d, n_ff)
    x, active = torch.randn(2, d, dtype=torch.float64), random_mask(2, n_ff, 0.5)
    rows = (gate.double(), up.double(), down_t.double())
    hot = torch.randperm(n_ff)[:30].sort().values
    cold = torch.tensor(sorted(set(range(n_ff)) - set(hot.tolist())))
    whole = sparse_ffn_reference(x, *rows, torch.arange(n_ff), active)
    parts = sum(sparse_ffn_reference(x, *(r[i] for r in rows), i, active) for i in (hot, cold))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


def test_reference_gate_up_is_zero_where_inactive():
    gate, up, _, idx = random_share(20, 16, 50)
    active = random_mask(4, 50, 0.5)
    h = sparse_gate_up_reference(torch.randn(4, 16), gate, up, idx, active, "silu")
    assert (h[~active[:, idx]] == 0).all() and (h[active[:, idx]] != 0).all()
