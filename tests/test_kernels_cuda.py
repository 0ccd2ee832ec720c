"""Every CUDA kernel against the reference on the rows' exact values (float64), outputs poisoned first."""
import pytest
import torch

from kernels import FFNRows, get_backend, sparse_down, sparse_ffn, sparse_gate_up, sparse_gate_up_reference
from kernels import sparse_ffn_reference
from kernels.cases import random_mask, random_share

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("cupy")
from kernels import cuda as cuda_backend  # noqa: E402

WEIGHT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]
# The sparse kernels multiply the exact weights in fp32; only the output cast and the dense (cuBLAS, weight
# dtype) path round more.
OUT_RTOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DENSE_RTOL = {"f32": 1e-3, "f16": 3e-3, "bf16": 2e-2}


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(weight_type, m=1003, d=None, n_ff=2500):
    d = d or (320 if weight_type.startswith("q") else 300)  # not multiples of 256 (a column block) or of 8
    gate, up, down_t, idx = random_share(m, d, n_ff)
    rows = FFNRows.pack(gate, up, down_t, idx, "cuda", weight_type)
    return rows, [t.double() for t in rows.dense()]


def test_backend_is_cuda():
    assert get_backend("cuda").name == "cuda"


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
@pytest.mark.parametrize("T", [1, 3, 8, 11, 20])
def test_ffn_matches_reference(weight_type, T, path, monkeypatch):
    """The sparse kernels (token tiles of up to 8, several launches past 8) and the dense-GEMM switch."""
    monkeypatch.setattr(cuda_backend, "DENSE_MIN_TOKENS", 1 if path == "dense" else 1 << 30)
    dense = path == "dense" and weight_type in DENSE_RTOL
    if path == "dense" and not dense:
        pytest.skip("quantized rows always take the sparse kernels")
    rows, (gate, up, down_t) = case(weight_type)
    for act, threshold, density in [("relu", 0.0, 0.1), ("drelu", 0.0, 0.3), ("silu", 0.0, 0.5), ("relu", 0.4, 1.0)]:
        x, active = torch.randn(T, rows.d, device="cuda"), random_mask(T, 2500, density).cuda()
        h = torch.full((T, rows.m), float("nan"), device="cuda")
        sparse_gate_up(x, rows, active, act, threshold, out=h)
        h_ref = sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, act, threshold)
        # a gate within rounding of the threshold may fall on either side of it in fp32
        clear = (x.double() @ gate.T - threshold).abs() > 1e-3 if threshold else torch.ones_like(h, dtype=torch.bool)
        assert rel_err(h[clear], h_ref[clear]) < (DENSE_RTOL[weight_type] if dense else 2e-6), (act, density)
        assert (h[~active[:, rows.neuron_idx]] == 0).all()
        y = torch.full((T, rows.d), float("nan"), device="cuda")
        sparse_down(h, rows, out=y)
        assert rel_err(y, h.double() @ down_t) < (DENSE_RTOL[weight_type] if dense else 2e-6)


@pytest.mark.parametrize("T", [1, 2])  # 1: gate_up_one and the one-token reduction of down_partial
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_ffn_output_dtypes(weight_type, x_dtype, T):
    rows, (gate, up, down_t) = case(weight_type, m=517)
    x, active = torch.randn(T, rows.d, device="cuda").to(x_dtype), random_mask(T, 2500, 0.2).cuda()
    out = torch.full((T, rows.d), float("nan"), device="cuda", dtype=x_dtype)
    sparse_ffn(x, rows, active, "relu", out=out)
    ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)
    assert torch.isfinite(out).all() and rel_err(out, ref) < OUT_RTOL[x_dtype]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_gate_up_segments_and_x_read_in_place(weight_type, x_dtype, monkeypatch):
    """d = 1056: two 1024-element segments, the second short (one GGUF block); x of every dtype read as it is
    (d a multiple of 8); a small shared-memory cap splits 5 tokens into tiles of 2."""
    monkeypatch.setattr(cuda_backend, "DENSE_MIN_TOKENS", 1 << 30)
    rows, (gate, up, _) = case(weight_type, m=300, d=1056)
    for T, smem in ((1, cuda_backend.GATE_UP_SMEM), (5, 2 * 2 * 256)):
        monkeypatch.setattr(cuda_backend, "GATE_UP_SMEM", smem)
        x, active = torch.randn(T, 1056, device="cuda").to(x_dtype), random_mask(T, 2500, 0.3).cuda()
        h = torch.full((T, rows.m), float("nan"), device="cuda")
        sparse_gate_up(x, rows, active, "silu", out=h)
        assert rel_err(h, sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, "silu")) < 2e-6


@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16"])
def test_one_token_rows_up_to_the_longest(weight_type):
    """gate_up_one and ffn_one over rows of ONE_TOKEN_MAX_X elements, the longest they take (x staged in shared
    memory as fp32 beside the lists), at densities that list from a few rows a block to all 32."""
    d = cuda_backend.ONE_TOKEN_MAX_X
    rows, (gate, up, down_t) = case(weight_type, m=300, d=d)
    for density in (0.05, 0.6, 1.0):
        x, active = torch.randn(1, d, device="cuda"), random_mask(1, 2500, density).cuda()
        h = torch.full((1, rows.m), float("nan"), device="cuda")
        sparse_gate_up(x, rows, active, "silu", out=h)
        assert rel_err(h, sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, "silu")) < 2e-6
        y = sparse_ffn(x, rows, active, "silu", out=torch.empty(1, d, device="cuda"))
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active, "silu")
        assert rel_err(y, ref) < 2e-6, density


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("weight_type", ["f16", "q4_0"])
def test_full_length_output_writes_only_owned_columns(weight_type, T):
    rows, (gate, up, _) = case(weight_type)
    x, active = torch.randn(T, rows.d, device="cuda"), random_mask(T, 2500, 0.3).cuda()
    h = torch.full((T, 2500), float("nan"), device="cuda")
    sparse_gate_up(x, rows, active, "silu", full=True, out=h)
    ref = sparse_gate_up_reference(x.double(), gate, up, rows.neuron_idx, active, "silu")
    assert rel_err(h[:, rows.neuron_idx], ref) < 2e-6
    owned = torch.zeros(2500, dtype=torch.bool, device="cuda")
    owned[rows.neuron_idx] = True
    assert h[:, ~owned].isnan().all()


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16", "q8_0"])
def test_down_given_the_mask_gives_the_same_bits(weight_type, density):
    """One token: down told the mask h came from loads the first rows of each warp's first group before it waits
    for h (float rows), and adds the same sums in the same order as without it, from a few of a group's 32 rows
    to all (more than it loads early), with relu zeroing some of the rows the mask lists; 8000 rows (500 a split:
    the warps have second groups, read after the wait)."""
    rows, (_, _, down_t) = case(weight_type, m=8000, d=4096, n_ff=10000)
    backend = get_backend("cuda")
    for act in ("relu", "silu"):
        x, active = torch.randn(1, rows.d, device="cuda"), random_mask(1, 10000, density).cuda()
        h = sparse_gate_up(x, rows, active, act)
        plain, early = (torch.full((1, rows.d), float("nan"), device="cuda") for _ in range(2))
        backend.down(h, rows, plain)
        backend.down(h, rows, early, active)
        assert torch.equal(plain, early), act
        assert rel_err(early, h.double() @ down_t) < 2e-6, act


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_empty_and_full_masks(density):
    rows, (gate, up, down_t) = case("bf16")
    x, active = torch.randn(2, rows.d, device="cuda"), random_mask(2, 2500, density).cuda()
    y = sparse_ffn(x, rows, active)
    if density == 0:
        assert (y == 0).all()
    else:
        assert rel_err(y, sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)) < 2e-6


@pytest.mark.parametrize("T", [1, 4])
def test_deterministic(T):
    """Bit for bit but for the one-token FFN (ffn_one), whose blocks add into one output atomically."""
    rows, _ = case("f16", m=4000, d=1024, n_ff=5000)
    x, active = torch.randn(T, 1024, device="cuda"), random_mask(T, 5000, 0.3).cuda()
    first, second = sparse_ffn(x, rows, active), sparse_ffn(x, rows, active)
    assert torch.equal(first, second) if T > 1 else rel_err(first, second.double()) < 1e-6


@pytest.mark.parametrize("kernels", ["ffn_one", "gate_up_one, down_partial"])
@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("d", [300, 2056, 4096, 8200])  # ffn_one: thread groups sharing the rows; 2 passes, the
# second short; 3 passes
def test_one_token_ffn_over_launches(weight_type, d, kernels, monkeypatch):
    """ffn_one leaves its sums and counter zero, down_partial its counters: launch after launch, any density, each
    matches the reference, with the residual added as the torch add of the rounded sum."""
    monkeypatch.setattr(cuda_backend, "ONE_LAUNCH_MAX_BYTES", 1 << 40 if kernels == "ffn_one" else 0)
    rows, (gate, up, down_t) = case(weight_type, m=1500, d=d)
    for act, threshold, density in [("relu", 0.0, 0.3), ("silu", 0.0, 0.0), ("drelu", 0.0, 1.0), ("relu", 0.3, 0.5)]:
        x, active = torch.randn(1, d, device="cuda"), random_mask(1, 2500, density).cuda()
        y = sparse_ffn(x, rows, active, act, threshold, out=torch.full((1, d), float("nan"), device="cuda"))
        ref = sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active, act, threshold)
        assert (y == 0).all() if density == 0 else rel_err(y, ref) < 2e-6, (act, density)
        for dtype in (torch.float32, torch.float16):  # the residual added as the torch add of the rounded sum
            xr, residual = (0.05 * x).to(dtype), (10 * torch.randn(1, d, device="cuda")).to(dtype)  # within fp16
            got = sparse_ffn(xr, rows, active, act, threshold, residual=residual)
            want = residual + sparse_ffn(xr, rows, active, act, threshold)
            assert rel_err(got, want.double()) < (1e-6 if dtype == torch.float32 else 1e-3), dtype


@pytest.mark.parametrize("weight_type", ["q8_0", "f16"])  # gate_up and down_partial; ffn_one
def test_cuda_graph_capture_and_replay(weight_type):
    rows, (gate, up, down_t) = case(weight_type)
    x, active = torch.randn(1, rows.d, device="cuda"), random_mask(1, 2500, 0.2).cuda()
    out = torch.full((1, rows.d), float("nan"), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles and loads the kernels outside the capture
        sparse_ffn(x, rows, active, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sparse_ffn(x, rows, active, out=out)
    for _ in range(3):  # new inputs in the captured buffers
        x.copy_(torch.randn_like(x))
        active.copy_(random_mask(1, 2500, 0.3).cuda())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, sparse_ffn(x, rows, active).double()) < 1e-6
        assert rel_err(out, sparse_ffn_reference(x.double(), gate, up, down_t, rows.neuron_idx, active)) < 2e-6


def test_bad_devices_rejected_before_launch():
    rows, _ = case("f16", m=40)
    x, active = torch.randn(1, rows.d), random_mask(1, 2500, 0.2)
    with pytest.raises(ValueError, match="x: expected a tensor on cuda"):
        sparse_ffn(x, rows, active.cuda())
    with pytest.raises(ValueError, match="active: expected a tensor on cuda"):
        sparse_ffn(x.cuda(), rows, active)
