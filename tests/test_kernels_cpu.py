"""The CPU backend against float64 math on the rows' exact values: fresh random inputs every case."""
import pytest
import torch

from kernels import FFNRows, sparse_down, sparse_ffn, sparse_gate_up, sparse_ffn_reference, sparse_gate_up_reference
from kernels import cpu
from kernels.cases import random_mask, random_share

F32_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed_case(m, d, n_ff, weight_type):
    gate, up, down_t, idx = random_share(m, d, n_ff)
    rows = FFNRows.pack(gate, up, down_t, idx, "cpu", weight_type)
    return rows, [t.double() for t in rows.dense()]


@pytest.mark.parametrize("weight_type", ["f32", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("T", [1, 3])
def test_cpu_ffn_matches_float64(weight_type, density, T):
    d = 96 if weight_type.startswith("q") else 77
    rows, (gate, up, down_t) = packed_case(203, d, 500, weight_type)
    x, active = torch.randn(T, d), random_mask(T, 500, density)
    for act, threshold in [("relu", 0.0), ("drelu", 0.0), ("silu", 0.0), ("relu", 0.5)]:
        y = sparse_ffn(x, rows, active, act, threshold)
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active, act, threshold)
        assert y.dtype == x.dtype and rel_err(y, ref) < F32_RTOL[torch.float32]


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_and_out_buffer(x_dtype):
    rows, (gate, up, down_t) = packed_case(64, 40, 128, "f16")
    x, active = torch.randn(2, 40).to(x_dtype), random_mask(2, 128, 0.4)
    out = torch.full((2, 40), float("nan"), dtype=x_dtype)
    assert sparse_ffn(x, rows, active, out=out) is out
    ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
    assert rel_err(out, ref) < F32_RTOL[x_dtype]


def test_cpu_gather_in_several_chunks(monkeypatch):
    """Small chunks exercise the chunk loop and the buffer reuse; the dense path covers the rest."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 50 * 13)  # 13 rows a chunk
    rows, (gate, up, down_t) = packed_case(300, 50, 400, "f32")
    for density in (0.2, 0.9):
        x, active = torch.randn(2, 50), random_mask(2, 400, density)
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
        assert rel_err(sparse_ffn(x, rows, active), ref) < 1e-5


def test_cpu_gate_up_full_writes_only_owned_columns():
    rows, (gate, up, _) = packed_case(30, 24, 90, "f32")
    x, active = torch.randn(3, 24), random_mask(3, 90, 0.5)
    h = torch.full((3, 90), -7.0)
    sparse_gate_up(x, rows, active, "silu", full=True, out=h)
    ref = sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, "silu")
    assert rel_err(h[:, rows.neuron_idx], ref) < 1e-6
    others = torch.ones(90, dtype=torch.bool)
    others[rows.neuron_idx] = False
    assert (h[:, others] == -7.0).all()


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_cpu_empty_and_full_masks(density):
    rows, (gate, up, down_t) = packed_case(45, 33, 45, "f32")
    x, active = torch.randn(2, 33), random_mask(2, 45, density)
    y = sparse_ffn(x, rows, active)
    ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
    if density == 0:
        assert (y == 0).all()
    else:
        assert rel_err(y, ref) < 1e-5


def test_cpu_down_uses_every_thread_bag_and_is_deterministic():
    rows, (_, _, down_t) = packed_case(97, 20, 97, "f32")
    h = torch.randn(4, 97) * (torch.rand(4, 97) < 0.5)
    h[2] = 0  # a token with no active rows
    y1, y2 = sparse_down(h, rows), sparse_down(h, rows)
    assert torch.equal(y1, y2) and (y1[2] == 0).all()
    assert rel_err(y1, h.double() @ down_t) < 1e-6
