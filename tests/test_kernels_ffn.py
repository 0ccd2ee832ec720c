"""The entry points: argument checks before any work, empty shares, and the backend registry."""
import warnings

import pytest
import torch

from kernels import FFNRows, get_backend, sparse_down, sparse_ffn, sparse_gate_up
from kernels.cases import random_mask, random_share


@pytest.fixture
def rows():
    gate, up, down_t, idx = random_share(10, 32, 40)
    return FFNRows.pack(gate, up, down_t, idx, "cpu", "f32")


def test_bad_arguments_name_themselves(rows):
    x, active = torch.randn(2, 32), random_mask(2, 40, 0.5)
    cases = [
        (dict(x=x.long()), TypeError, "x: expected dtype"),
        (dict(x=torch.randn(2, 31)), ValueError, "x: expected shape"),
        (dict(x=torch.randn(2, 32, device="meta")), ValueError, "x: expected a tensor on cpu"),
        (dict(active=active.float()), TypeError, "active"),
        (dict(active=random_mask(3, 40, 0.5)), ValueError, "active: expected shape"),
        (dict(active=random_mask(2, int(rows.neuron_idx[-1]), 0.5)), ValueError, "active: has"),
        (dict(act="gelu"), ValueError, "act"),
        (dict(out=torch.empty(2, 31)), ValueError, "out"),
        (dict(out=torch.empty(2, 64)[:, ::2]), ValueError, "out: must be contiguous"),
        (dict(rows="rows"), TypeError, "rows"),
    ]
    for change, error, match in cases:
        args = dict(x=x, rows=rows, active=active, act="relu", out=None) | change
        with pytest.raises(error, match=match):
            sparse_ffn(args["x"], args["rows"], args["active"], args["act"], out=args["out"])
    with pytest.raises(TypeError, match="h: expected dtype"):
        sparse_down(torch.randn(2, 10, dtype=torch.float64), rows)
    with pytest.raises(ValueError, match="out: expected shape"):
        sparse_gate_up(x, rows, active, full=True, out=torch.empty(2, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_is_added_as_torch_adds(rows, dtype):
    x, active = torch.randn(2, 32).to(dtype), random_mask(2, 40, 0.5)
    residual = (10 * torch.randn(2, 32)).to(dtype)
    assert torch.equal(sparse_ffn(x, rows, active, residual=residual), residual + sparse_ffn(x, rows, active))
    empty = FFNRows.pack(*(torch.empty(0, 32),) * 3, torch.empty(0, dtype=torch.int64), "cpu", "f32")
    assert torch.equal(sparse_ffn(x, empty, active, residual=residual), residual)
    with pytest.raises(TypeError, match="residual: expected dtype"):
        sparse_ffn(x, rows, active, residual=residual.double())


def test_empty_share_gives_zeros():
    empty = torch.empty(0, 32)
    rows = FFNRows.pack(empty, empty, empty, torch.empty(0, dtype=torch.int64), "cpu", "q8_0")
    assert rows.nbytes == 0
    x, active = torch.randn(3, 32), random_mask(3, 40, 0.5)
    out = torch.full((3, 32), float("nan"))
    assert (sparse_ffn(x, rows, active, out=out) == 0).all()
    assert sparse_gate_up(x, rows, active).shape == (3, 0)


def test_registry_picks_once_and_falls_back_with_a_warning():
    assert get_backend("cpu").name == "cpu" and get_backend("cpu") is get_backend("cpu")
    with pytest.raises(ValueError, match="device"):
        get_backend("mps")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback is not taken")
    get_backend.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert get_backend("cuda").name == "reference"
    assert any("slow torch reference" in str(w.message) for w in caught)
