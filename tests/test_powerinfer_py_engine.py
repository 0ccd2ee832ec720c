"""The hybrid engine against the dense runtime: same tokens with all-active predictors, same logits with real
(random) predictors; on the device, at several budgets, within the budget's bytes."""
import numpy as np
import pytest
import torch

from powerinfer_py import hybrid
from powerinfer_py.config import ModelConfig
from powerinfer_py.engine import build_hybrid
from powerinfer_py.generate import Generator
from powerinfer_py.loader import Checkpoint, build_model, install_predictors
from powerinfer_py.model import Transformer

CFG = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=160, max_seq_len=256,
                  ffn_act="relu", tie_embeddings=True)


def random_checkpoint(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "output.weight"}
    return Checkpoint(cfg, tensors, None, None, "hf", "<random>")


def random_predictors(cfg, rank=16, all_active=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(cfg.n_layers):
        fc1 = torch.randn(rank, cfg.dim, generator=g) / cfg.dim ** 0.5
        fc2 = torch.zeros(cfg.n_ff, rank) if all_active else torch.randn(cfg.n_ff, rank, generator=g) / rank ** 0.5
        out.append({"fc1.weight": fc1, "fc2.weight": fc2})
    return out


def test_cpu_engine_with_all_active_predictors_equals_dense():
    ckpt = random_checkpoint()
    dense = build_model(ckpt)
    setup = build_hybrid(ckpt, "cpu", torch.float32, predictors=random_predictors(CFG, all_active=True))
    prompt = [5, 17, 42, 7]
    want, _ = Generator(dense, 128).generate(prompt, 64)
    got, _ = Generator(setup.model, 128).generate(prompt, 64)
    assert got == want


def test_cpu_engine_equals_dense_model_with_the_same_predictors():
    ckpt = random_checkpoint()
    preds = random_predictors(CFG)
    dense = build_model(ckpt)
    install_predictors(dense, preds, 0.0)
    setup = build_hybrid(ckpt, "cpu", torch.float32, predictors=preds, threshold=0.0)
    tokens = torch.randint(0, CFG.vocab_size, (1, 24))
    with torch.no_grad():
        want, got = dense(tokens), setup.model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    active = dense.layers[0].predictor(dense.tok_embeddings(tokens))
    assert 0.2 < active.float().mean() < 0.8  # the predictors really are sparse


@pytest.mark.gpu
@pytest.mark.parametrize("hot_kernels", ["ffn_one", "gate_up_one, down_partial"])  # the second adds the CPU's half
@pytest.mark.parametrize("prompt_len", [4, 40])  # 40: the prefill streams the cold rows to the GPU
@pytest.mark.parametrize("gpu_share", [0.0, 0.3, 0.7, 1.0])
def test_gpu_engine_all_active_equals_dense_at_several_splits(gpu_share, prompt_len, hot_kernels, monkeypatch):
    if hot_kernels != "ffn_one":
        monkeypatch.setattr("kernels.cuda.ONE_LAUNCH_MAX_BYTES", 0)
    ckpt = random_checkpoint(CFG.replace(dim=128, n_ff=384, n_heads=4, head_dim=32))
    cfg = ckpt.config
    rng = np.random.default_rng(0)
    masks = [rng.random(cfg.n_ff) < gpu_share for _ in range(cfg.n_layers)]
    dense = build_model(ckpt, device="cuda", dtype=torch.float16)
    setup = build_hybrid(ckpt, "cuda", torch.float16, budget=1 << 30, gpu_masks=masks,
                         predictors=random_predictors(cfg, all_active=True))
    prompt = [5, 17, 42, 7] * (prompt_len // 4)
    assert (prompt_len >= hybrid.STREAM_MIN_TOKENS) == (prompt_len == 40)
    want, _ = Generator(dense, 128).generate(prompt, 64)
    got, _ = Generator(setup.model, 128).generate(prompt, 64)
    assert got == want
    if setup.counters is None:  # every neuron on the GPU: the hit rate is 100% by construction, nothing counted
        assert gpu_share == 1.0
        return
    # every neuron active: the hit rate (counted on the GPU in prefill, by the CPU in decode) is the GPU share
    assert setup.counters.hit_rate == pytest.approx(sum(int(m.sum()) for m in masks) / (cfg.n_layers * cfg.n_ff))


@pytest.mark.gpu
def test_gpu_engine_without_c_kernels_decodes_eagerly(monkeypatch):
    """No C compiler: no hand-off, so split layers wait on the host and decode runs without CUDA graphs."""
    from powerinfer_py import engine

    monkeypatch.setattr(engine, "native_library", lambda: None)
    ckpt = random_checkpoint(CFG.replace(dim=128, n_ff=384, n_heads=4, head_dim=32))
    masks = [np.arange(ckpt.config.n_ff) % 2 == 0 for _ in range(ckpt.config.n_layers)]
    setup = build_hybrid(ckpt, "cuda", torch.float16, budget=1 << 30, gpu_masks=masks,
                         predictors=random_predictors(ckpt.config, all_active=True))
    gen = Generator(setup.model, 128)
    assert setup.model.handoff is None and not gen.use_graph
    want, _ = Generator(build_model(ckpt, device="cuda", dtype=torch.float16), 128).generate([5, 17, 42], 32)
    assert gen.generate([5, 17, 42], 32)[0] == want


@pytest.mark.gpu
@pytest.mark.parametrize("ffn_share", [0.0, 0.4, 1.0])
def test_gpu_memory_stays_within_the_budget(tmp_path, ffn_share):
    from powerinfer_py.formats import save_activations
    from solver import vram_ledger

    ckpt = random_checkpoint(CFG.replace(dim=256, n_ff=1024, n_heads=4, head_dim=64, vocab_size=2048, n_layers=4))
    cfg = ckpt.config
    preds = random_predictors(cfg)
    ledger = vram_ledger(cfg, "f16", "f16", 256, 1, [16] * cfg.n_layers, embeddings_on_gpu=True)
    budget = ledger.dense_bytes + int(ffn_share * cfg.n_layers * cfg.n_ff) * ledger.ffn_bytes_per_neuron
    save_activations(str(tmp_path), [torch.rand(cfg.n_ff) * 100 for _ in range(cfg.n_layers)])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    setup = build_hybrid(ckpt, "cuda", torch.float16, budget, preds, ctx_len=256, activation=str(tmp_path),
                         gpuidx=str(tmp_path / "model.gpuidx"))
    hot = sum(int(m.sum()) for m in setup.placement_masks)
    assert 0 <= ffn_share * cfg.n_layers * cfg.n_ff - hot < cfg.n_ff  # filled to within a layer (C_l > n_ff here)
    Generator(setup.model, 256).generate(list(range(3, 43)), 64)  # 40 tokens: the prefill streams cold rows
    assert torch.cuda.max_memory_allocated() - base <= budget
