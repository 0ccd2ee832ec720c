"""The fused one-token decode kernels against float64 math and against the torch modules they replace."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("cupy")
from kernels import decode  # noqa: E402
from powerinfer_py.config import ModelConfig  # noqa: E402
from powerinfer_py.generate import Generator  # noqa: E402
from powerinfer_py.model import Predictor, Transformer  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 8), (37, 1000), (1000, 4096), (12288, 4096), (11008, 1024), (576, 16384),
                                 (960, 576), (4400, 512), (4403, 200), (9000, 1032)])
def test_gemv_matches_float64(dtype, n, k):
    """Every launch shape: 1 to 8 warps a row, and 2 or 4 short rows a warp at once (11008 x 1024: 7B's predictor
    fc2; 4403 x 200: a last group of 3 rows)."""
    w = torch.randn(n, k, device="cuda").to(dtype)
    x = torch.randn(k, device="cuda").to(dtype)
    want = w.double() @ x.double()
    got = decode.gemv(w, x)
    assert got.dtype == dtype and rel_err(got, want) < 2 * ULP[dtype]
    assert rel_err(decode.gemv(w, x, "relu"), want.clamp_min(0)) < 2 * ULP[dtype]
    threshold = float(want.median())
    mask = decode.gemv(w, x, "at_least", threshold)
    rounded = want.to(dtype).double()  # the torch op compares the product rounded to the dtype
    near = (want - threshold).abs() <= 4 * ULP[dtype] * want.abs().max()
    assert mask.dtype == torch.bool and torch.equal(mask[~near], (rounded >= threshold)[~near])


def test_gemv_launch_shapes():
    """Short rows go several at a time only while every SM still gets a block."""
    assert decode.gemv_launch_shape(11008, 1024, 132) == (1, 2, 264)  # 7B's predictor fc2
    assert decode.gemv_launch_shape(4400, 512, 132) == (1, 4, 138)
    assert decode.gemv_launch_shape(12288, 4096, 132) == (1, 1, 264)  # 7B's wqkv
    assert decode.gemv_launch_shape(1536, 1024, 132) == (1, 1, 192)  # two at a time would leave SMs idle
    assert decode.gemv_launch_shape(960, 576, 132) == (2, 1, 240)
    assert decode.gemv_launch_shape(9000, 1032, 132) == (1, 1, 264)  # one vector more than two rows' slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(37, 1000), (12288, 4096), (576, 576), (11008, 1024)])
def test_gemv_with_the_norm_before_and_the_residual_after(dtype, n, k):
    """wqkv's product takes attention_norm's place and wo's adds the residual: as the two torch ops round."""
    w = torch.randn(n, k, device="cuda").to(dtype)
    x = (3 * torch.randn(k, device="cuda")).to(dtype)
    norm_weight = torch.randn(k, device="cuda").to(dtype)
    normed = decode.rms_norm_reference(x, norm_weight, 1e-5).double()
    got = decode.gemv(w, x, norm=(norm_weight, 1e-5))
    assert rel_err(got, w.double() @ normed) < 4 * ULP[dtype]
    residual = (10 * torch.randn(n, device="cuda")).to(dtype)
    got = decode.gemv(w, x, residual=residual)
    assert rel_err(got, residual.double() + w.double() @ x.double()) < 2 * ULP[dtype]
    assert rel_err(got, decode.gemv_reference(w, x, residual=residual)) < 2 * ULP[dtype]
    got, got_normed = decode.gemv(w, x, "relu", side_norm=(norm_weight, 1e-5))  # fc1 with ffn_norm beside it
    assert rel_err(got, (w.double() @ x.double()).clamp_min(0)) < 2 * ULP[dtype]
    assert ((got_normed.double() - normed).abs() <= 2 * ULP[dtype] * normed.abs() + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 576), (1, 4096), (5, 8192), (3, 104)])
def test_rms_norm_matches_the_module(dtype, rows, d):
    x = (3 * torch.randn(rows, d, device="cuda")).to(dtype)
    w = torch.randn(d, device="cuda").to(dtype)
    got = decode.rms_norm(x, w, 1e-5)
    want = decode.rms_norm_reference(x, w, 1e-5)
    # both round the normalised x once and the product once: at most a unit in the last place apart
    assert ((got.double() - want.double()).abs() <= ULP[dtype] * want.double().abs() * 2 + 1e-30).all()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(got, exact) < 2 * ULP[dtype]


def cache(n_kv, max_len, hd, dtype):
    return (torch.randn(1, n_kv, max_len, hd, device="cuda").to(dtype),
            torch.randn(1, n_kv, max_len, hd, device="cuda").to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                          {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                          {"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 2048}])
@pytest.mark.parametrize("hd,theta", [(32, 10000.0), (64, 500000.0), (128, 10000.0)])
@pytest.mark.parametrize("freq_dtype", ["fp32", "model's"])  # a model moved to fp16/bf16 moves inv_freq too
def test_rope_table_is_the_models(dtype, rope_scaling, hd, theta, freq_dtype):
    """The one-launch cos and sin equal model.rope_cos_sin's bit for bit, at positions up to 100 K."""
    from powerinfer_py.model import rope_cos_sin, rope_inv_freq

    cfg = ModelConfig(vocab_size=8, dim=4 * hd, n_layers=1, n_heads=4, n_kv_heads=4, n_ff=8, head_dim=hd,
                      rope_theta=theta, rope_scaling=rope_scaling)
    inv_freq, scale = rope_inv_freq(cfg)
    inv_freq = inv_freq.to("cuda", torch.float32 if freq_dtype == "fp32" else dtype)
    for p in [*range(0, 600, 7), 4095, 8191, 100_000]:
        pos = torch.tensor([p], device="cuda")
        got = decode.rope_table(inv_freq, scale, pos, dtype)
        want = rope_cos_sin(cfg, inv_freq, scale, pos, dtype)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), p


def attention_float64(q, k, v, pos, n_heads):
    _, n_kv, _, hd = k.shape
    n = pos + 1
    q = q.double().view(n_heads, 1, hd)
    k = k[0, :, :n].double().repeat_interleave(n_heads // n_kv, 0)
    v = v[0, :, :n].double().repeat_interleave(n_heads // n_kv, 0)
    p = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5, -1)
    return (p @ v).reshape(-1)


def random_rope_table(hd, dtype):
    """cos and sign-folded sin of random angles, as model.rope_cos_sin lays them out."""
    angles = torch.rand(hd // 2, device="cuda") * 6
    cos = torch.cat((angles.cos(), angles.cos())).to(dtype).view(1, hd)
    sin = torch.cat((-angles.sin(), angles.sin())).to(dtype).view(1, hd)
    return cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd", [(9, 3, 64), (32, 32, 128), (8, 1, 128), (4, 2, 32), (2, 2, 8),
                                             (4, 1, 16)])
@pytest.mark.parametrize("max_len", [100, 512, 4096])
def test_decode_attention_matches_float64(dtype, n_heads, n_kv, hd, max_len):
    """RoPE on q and k, the cache write and attention in one kernel, against the model's RoPE (the caches it
    writes) and float64 attention over them."""
    from powerinfer_py.model import apply_rope

    k, v = cache(n_kv, max_len, hd, dtype)
    k_want, v_want = k.clone(), v.clone()
    # one split, several, the first key of a split, the last position; again at earlier positions: the per-head
    # counters start over
    for pos in (0, 63, 64, 99, 127, 128, max_len - 1, 5):
        if pos >= max_len:
            continue
        qkv = torch.randn((n_heads + 2 * n_kv) * hd, device="cuda").to(dtype)
        cos, sin = random_rope_table(hd, dtype)
        p = torch.tensor([pos], device="cuda")
        got = decode.decode_attention(qkv, cos, sin, p, k, v, n_heads)
        reference = decode.decode_attention_reference(qkv, cos, sin, p, k_want, v_want, n_heads)
        tol = ULP[dtype] * 2 * qkv.abs().max().item()
        assert (k - k_want).abs().max().item() <= tol and torch.equal(v, v_want), pos
        untouched = torch.arange(max_len, device="cuda") != pos
        assert torch.equal(k[:, :, untouched], k_want[:, :, untouched]), pos
        q = apply_rope(qkv[: n_heads * hd].view(n_heads, hd), cos, sin).reshape(-1)
        want = attention_float64(q, k, v, pos, n_heads)
        assert rel_err(got, want) < 4 * ULP[dtype], pos
        assert rel_err(reference, attention_float64(q, k_want, v_want, pos, n_heads)) < 4 * ULP[dtype]


def test_attention_splits_cover_the_cache():
    for max_len in (1, 63, 64, 65, 100, 2048, 2049, 100000):
        splits, chunk = decode.attention_splits(max_len)
        assert 1 <= splits <= decode.ATTENTION_MAX_SPLITS and splits * chunk >= max_len
        assert chunk >= min(max_len, decode.ATTENTION_MIN_CHUNK)


@pytest.mark.parametrize("dtype", DTYPES)
def test_predictor_mask_matches_the_module(dtype):
    pred = Predictor(256, 64, 1000, threshold=0.25).cuda().to(dtype)
    p = torch.randn(1, 1, 256, device="cuda").to(dtype)
    with torch.no_grad():
        logits = pred.logits(p).double()
        want = pred(p)
        decode.use_decode_kernels(pred)
        got = pred(p)
    assert type(pred) is decode.FusedPredictor and got.shape == want.shape
    near = (logits - 0.25).abs() <= 4 * ULP[dtype] * logits.abs().max()
    assert torch.equal(got[~near], want[~near])


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_ffn_inputs_from_the_predictor_launch(dtype):
    """FusedBlock.ffn_inputs: the mask and ffn_norm out of the predictor's two launches, as the torch modules."""
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=32, n_ff=1000, vocab_size=300,
                      norm_eps=1e-5, ffn_act="relu", max_seq_len=64)
    block = Transformer(cfg).layers[0]
    block.predictor = Predictor(256, 64, 1000, threshold=0.25)
    block.to("cuda", dtype)
    h = (3 * torch.randn(1, 1, 256, device="cuda")).to(dtype)
    with torch.no_grad():
        logits = block.predictor.logits(h).double()
        want_x, want_active = block.ffn_inputs(h)
        decode.use_decode_kernels(block)
        got_x, got_active = block.ffn_inputs(h)
    assert type(block) is decode.FusedBlock and type(block.predictor) is decode.FusedPredictor
    assert got_x.shape == want_x.shape and rel_err(got_x, want_x) < 2 * ULP[dtype]
    near = (logits - 0.25).abs() <= 4 * ULP[dtype] * logits.abs().max()
    assert got_active.shape == want_active.shape and torch.equal(got_active[~near], want_active[~near])


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_decode_on_the_kernels_matches_torch(dtype):
    """Whole one-token steps (eager and in CUDA graphs) with the modules switched, against the model's own
    torch code: logits close at every step; greedy tokens equal in fp16 (bf16's 8-bit mantissa turns the sums'
    different order into an occasional flip of a near tie in this random model)."""
    cfg = ModelConfig(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=32, n_ff=512, vocab_size=300,
                      norm_eps=1e-5, ffn_act="relu", max_seq_len=512)
    torch.manual_seed(0)
    plain = Transformer(cfg).to("cuda", dtype)
    for p in plain.parameters():
        p.data.normal_(0, 0.05)
    fused = Transformer(cfg).to("cuda", dtype)
    fused.load_state_dict(plain.state_dict())
    assert decode.use_decode_kernels(fused) == 3 * cfg.n_layers + 2  # a layer's 2 norms and block; norm; model
    prompt = [5, 17, 42, 7, 99]
    for use_graph in (False, True):
        want, _ = Generator(plain, 300, use_cuda_graph=use_graph, decode_kernels=False).generate(prompt, 40)
        got, _ = Generator(fused, 300, use_cuda_graph=use_graph).generate(prompt, 40)
        assert got == want or dtype == torch.bfloat16
    gens = [Generator(m, 64, decode_kernels=False) for m in (plain, fused)]
    logits = [g.prefill(prompt) for g in gens]
    for step in range(8):
        logits = [g.decode(step + 3, len(prompt) + step) for g in gens]
        assert rel_err(logits[1], logits[0]) < 8 * ULP[dtype]


@pytest.mark.parametrize("n", [1, 7, 1000, 32000, 32001, 151936])
def test_greedy_advance_is_torchs(n):
    """The end of a greedy step in one launch against torch's ops: ties (the first index wins), NaN (above every
    value), all -inf, at even and odd positions: the token, the position, the ring and its pinned host copy."""
    rng = torch.Generator().manual_seed(n)
    tie, nan = torch.randn(n, generator=rng), torch.randn(n, generator=rng)
    tie[n // 3] = tie[n - 1] = tie.max() + 1
    nan[n // 2] = nan[n - 1] = float("nan")
    for logits in (torch.randn(n, generator=rng), tie, nan, torch.full((n,), float("-inf"))):
        for pos in (6, 9):
            states = []
            for advance in (decode.greedy_advance, decode.greedy_advance_reference):
                token, at = torch.zeros((1, 1), dtype=torch.long, device="cuda"), torch.tensor([pos], device="cuda")
                ring, host = torch.tensor([11, 12], device="cuda"), torch.zeros(2, dtype=torch.long, pin_memory=True)
                advance(logits.cuda(), token, at, ring, host)
                torch.cuda.synchronize()
                states.append((token.item(), at.item(), ring.tolist(), host.tolist()))
            assert states[0] == states[1], (logits[:4], pos)
    with pytest.raises(ValueError, match="non-contiguous torch.float32"):
        decode.greedy_advance(torch.zeros(4 * n, device="cuda")[::2], token, at, ring, host)
