"""The CPU backend (C kernels and the torch path) against float64 math on the rows' exact values: fresh random
inputs every case."""
import shutil
import warnings

import pytest
import torch

from kernels import (
    FFNRows,
    cpu,
    get_backend,
    sparse_down,
    sparse_ffn,
    sparse_ffn_reference,
    sparse_gate_up,
    sparse_gate_up_reference,
)
from kernels.cases import random_mask, random_share

F32_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
HAS_CC = shutil.which("cc") is not None


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed_case(m, d, n_ff, weight_type):
    gate, up, down_t, idx = random_share(m, d, n_ff)
    rows = FFNRows.pack(gate, up, down_t, idx, "cpu", weight_type)
    return rows, [t.double() for t in rows.dense()]


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test through the C kernels, then through the torch path."""
    backend = get_backend("cpu")
    if request.param == "native":
        if backend.lib is None:
            pytest.skip("no C compiler with OpenMP here")
    else:
        monkeypatch.setattr(backend, "lib", None)
    return request.param


@pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc) on this machine")
def test_native_kernels_build_here():
    assert cpu.native_library() is not None and get_backend("cpu").lib is not None


def test_broken_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu.native_library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu.native_library() is None
        assert any("cannot build cpu_rows.c" in str(w.message) for w in caught)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu.native_library.cache_clear()


WEIGHT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]


def check_ffn(weight_type, density, T):
    """d past one 512-element chunk of the C kernels and not a multiple of it."""
    d = 544 if weight_type.startswith("q") else 600 if density == 0.3 else 77
    rows, (gate, up, down_t) = packed_case(150, d, 500, weight_type)
    x, active = torch.randn(T, d), random_mask(T, 500, density)
    for act, threshold in [("relu", 0.0), ("drelu", 0.0), ("silu", 0.0), ("relu", 0.5)]:
        y = sparse_ffn(x, rows, active, act, threshold)
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active, act, threshold)
        assert y.dtype == x.dtype and rel_err(y, ref) < F32_RTOL[torch.float32], (act, threshold)


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("T", [1, 3])
def test_cpu_ffn_matches_float64(weight_type, density, T, path):
    check_ffn(weight_type, density, T)


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_cpu_many_tokens_take_the_torch_path(weight_type):
    check_ffn(weight_type, 0.3, cpu.NATIVE_MAX_TOKENS + 1)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs_and_out_buffer(x_dtype, path):
    rows, (gate, up, down_t) = packed_case(64, 40, 128, "f16")
    x, active = torch.randn(2, 40).to(x_dtype), random_mask(2, 128, 0.4)
    out = torch.full((2, 40), float("nan"), dtype=x_dtype)
    assert sparse_ffn(x, rows, active, out=out) is out
    ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
    assert rel_err(out, ref) < F32_RTOL[x_dtype]


def test_cpu_torch_path_in_several_chunks(monkeypatch):
    """Small chunks exercise the chunk loop; the high density the slices over all rows."""
    monkeypatch.setattr(get_backend("cpu"), "lib", None)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 50 * 13)  # 13 rows a chunk
    rows, (gate, up, down_t) = packed_case(300, 50, 400, "bf16")
    for density in (0.2, 0.9):
        x, active = torch.randn(2, 50), random_mask(2, 400, density)
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
        assert rel_err(sparse_ffn(x, rows, active), ref) < 1e-5


def test_cpu_gate_up_full_writes_only_owned_columns(path):
    rows, (gate, up, _) = packed_case(30, 24, 90, "f32")
    x, active = torch.randn(3, 24), random_mask(3, 90, 0.5)
    h = torch.full((3, 90), -7.0)
    sparse_gate_up(x, rows, active, "silu", full=True, out=h)
    ref = sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, "silu")
    assert rel_err(h[:, rows.neuron_idx], ref) < 1e-6
    others = torch.ones(90, dtype=torch.bool)
    others[rows.neuron_idx] = False
    assert (h[:, others] == -7.0).all()


def test_cpu_compact_gate_up_writes_every_column(path):
    rows, (gate, up, _) = packed_case(40, 64, 120, "q8_0")
    x, active = torch.randn(2, 64), random_mask(2, 120, 0.2)
    h = torch.full((2, 40), float("nan"))
    sparse_gate_up(x, rows, active, out=h)
    assert rel_err(h, sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active)) < 1e-6
    assert (h[~active[:, rows.neuron_idx]] == 0).all()


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_cpu_empty_and_full_masks(density, path):
    rows, (gate, up, down_t) = packed_case(45, 33, 45, "f32")
    x, active = torch.randn(2, 33), random_mask(2, 45, density)
    y = sparse_ffn(x, rows, active)
    ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
    if density == 0:
        assert (y == 0).all()
    else:
        assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_cpu_any_thread_count_and_deterministic(threads, path, monkeypatch):
    """Threads split the listed rows (some threads list none, or get none); down adds per-thread partials."""
    monkeypatch.setattr(cpu, "MIN_BYTES_PER_THREAD", 1)
    rows, (gate, up, down_t) = packed_case(97, 20, 97, "bf16")
    x, active = torch.randn(4, 20), random_mask(4, 97, 0.5)
    active[2] = False  # a token with no active rows
    active[:, 5:] &= torch.rand(97 - 5) < 0.05  # few rows, most in the first thread's slice
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = sparse_gate_up(x, rows, active)
        y1, y2 = sparse_down(h, rows), sparse_down(h, rows)
    finally:
        torch.set_num_threads(default)
    assert rel_err(h, sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active)) < 1e-6
    assert torch.equal(y1, y2) and (y1[2] == 0).all()
    assert rel_err(y1, h.double() @ down_t) < 1e-6


@pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc) on this machine")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype,weight_type", [(torch.float16, "f16"), (torch.float32, "q8_0"),
                                               (torch.bfloat16, "bf16")])
def test_cold_step_follows_the_flags_layer_by_layer(dtype, weight_type, threads):
    """A thread plays the GPU: it writes each layer's input and list of active cold rows, raises the input flag,
    waits for the output flag and checks the result against float64 math, for several layers and two steps;
    the layers have none, a few (split by column blocks, three of them, the last short) or many active cold rows
    (split by rows)."""
    import threading
    import time

    d, n_ff, n_layers = 544, 96, 4
    layers = [FFNRows.pack(*random_share(70, d, n_ff), "cpu", weight_type) for _ in range(n_layers)]
    x_host, y_host = torch.empty(d, dtype=dtype), torch.empty(d, dtype=dtype)
    cold_list = torch.empty((n_layers, 2 + 70), dtype=torch.int32)
    ready = torch.zeros((2, n_layers), dtype=torch.int32)
    step = cpu.ColdStep(layers, "relu", 0.0, x_host, cold_list, y_host, ready)
    errors, counts = [], torch.zeros((n_layers, 2), dtype=torch.int64)

    def gpu(epoch):
        for slot, rows in enumerate(layers):
            x = torch.randn(d).to(dtype)
            active = random_mask(1, n_ff, (0.0, 0.4, 0.0, 0.4)[slot])[0]
            if slot == 2:  # a few active cold rows
                active[rows.neuron_idx[[5, 6, 20, 41, 69]]] = True
            elif slot in (1, 3):  # many (more than cold_step's FEW_ROWS, whatever the draw): split by rows
                active[rows.neuron_idx[:20]] = True
            listed = cpu.ColdStep.list_of(rows, active)
            counts[slot] = listed[:2]
            x_host.copy_(x)
            cold_list[slot, : listed.numel()] = listed
            ready[0, slot] = epoch
            deadline = time.monotonic() + 10
            while int(ready[1, slot]) != epoch and time.monotonic() < deadline:
                pass
            gate, up, down_t = (t.double() for t in rows.dense())
            ref = sparse_ffn_reference(x.double()[None], gate, up, down_t, rows.neuron_idx, active[None])[0]
            errors.append(rel_err(y_host, ref) if ref.norm() > 0 else float(y_host.abs().max()))

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for epoch in (1, 2):
            thread = threading.Thread(target=gpu, args=(epoch,))
            thread.start()
            assert step(epoch, timeout_s=10.0)
            thread.join()
    finally:
        torch.set_num_threads(default)
    assert len(errors) == 2 * n_layers and max(errors) < 2 * F32_RTOL[dtype]
    assert (step.times[:, 1] >= step.times[:, 0]).all()
    assert torch.equal(step.counts, counts)  # active neurons, and of them cold ones, of the last step
    assert counts[0, 1] == 0 and counts[2, 1] == 5 and counts[1, 1] > 16


def test_cold_list_names_the_active_cold_rows():
    rows = FFNRows.pack(*random_share(5, 8, 12), "cpu", "f32")
    active = torch.zeros(12, dtype=torch.bool)
    active[rows.neuron_idx[[1, 3]]] = True
    active[[n for n in range(12) if n not in rows.neuron_idx.tolist()][0]] = True  # a hot one
    assert cpu.ColdStep.list_of(rows, active).tolist() == [3, 2, 1, 3]


@pytest.mark.skipif(not HAS_CC, reason="no C compiler (cc) on this machine")
def test_cold_step_gives_up_when_no_input_comes():
    rows = FFNRows.pack(*random_share(8, 16, 8), "cpu", "f32")
    ready = torch.zeros((2, 1), dtype=torch.int32)
    step = cpu.ColdStep([rows], "relu", 0.0, torch.empty(16), torch.zeros((1, 10), dtype=torch.int32), torch.empty(16),
                        ready)
    assert not step(1, timeout_s=0.05)
    assert int(ready[1, 0]) == 0
