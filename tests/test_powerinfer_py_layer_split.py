"""The layer-split baseline (llama.cpp's -ngl) against the dense model: same logits and tokens at every split."""
import pytest
import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import BudgetError, InputError
from powerinfer_py.generate import Generator
from powerinfer_py.layer_split import block_bytes, build_layer_split, gpu_layers_for_budget
from powerinfer_py.loader import Checkpoint, build_model
from powerinfer_py.model import Transformer

CFG = ModelConfig(vocab_size=101, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, n_ff=160, max_seq_len=256,
                  ffn_act="relu")


def random_checkpoint(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not (cfg.tie_embeddings and k == "output.weight")}
    return Checkpoint(cfg, tensors, None, None, "hf", "<random>")


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_gpu_layers", [0, 1, 3, 4])
def test_split_gives_the_dense_logits_and_tokens(n_gpu_layers, tied):
    """The 'GPU' side runs in float64 on the CPU, so the hand-off's dtype conversion is exercised."""
    ckpt = random_checkpoint(CFG.replace(tie_embeddings=tied))
    dense = build_model(ckpt)
    split = build_layer_split(ckpt, n_gpu_layers, dtype=torch.float64, device="cpu")
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        want, got = dense(tokens), split(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want_ids, _ = Generator(dense, 64).generate([5, 17, 42], 24)
    got_ids, _ = Generator(split, 64, use_cuda_graph=False).generate([5, 17, 42], 24)
    assert got_ids == want_ids
    caches = [layer.attention.kv_cache.k.dtype for layer in split.layers]
    assert caches == [torch.float64] * n_gpu_layers + [torch.float32] * (CFG.n_layers - n_gpu_layers)


def test_gpu_layers_for_budget():
    per_block = block_bytes(CFG, torch.float16, 128)
    budgets = range(60_000, 600_000, 5_000)
    counts = [gpu_layers_for_budget(CFG, b, torch.float16, 128) for b in budgets]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == CFG.n_layers - 1
    for b, n in zip(budgets, counts):  # each block's bytes buy one more block, until the last needs the head too
        if n < CFG.n_layers - 1:
            assert gpu_layers_for_budget(CFG, b + per_block, torch.float16, 128) == n + 1
    assert gpu_layers_for_budget(CFG, 1 << 30, torch.float16, 128) == CFG.n_layers
    with pytest.raises(BudgetError):
        gpu_layers_for_budget(CFG, 1000, torch.float16, 128)
    with pytest.raises(InputError):
        build_layer_split(random_checkpoint(CFG), 5, device="cpu")


@pytest.mark.gpu
def test_cuda_split_matches_dense_cuda():
    ckpt = random_checkpoint(CFG)
    dense = build_model(ckpt, device="cuda", dtype=torch.float16)
    split = build_layer_split(ckpt, 2)
    assert split.layers[1].attention.wqkv.weight.is_cuda and not split.layers[2].attention.wqkv.weight.is_cuda
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        want, got = dense(tokens.cuda()).cpu(), split(tokens.cuda())
    assert (got - want).norm() / want.norm() < 1e-2
    ids, stats = Generator(split, 64, use_cuda_graph=False).generate([5, 17, 42], 16)
    assert len(ids) == 16 and stats.generate_tps > 0
