import pytest
import torch

from kernels import FFNRows
from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import BudgetError, InputError
from powerinfer_py.generate import PREFILL_CHUNK
from powerinfer_py.model import Predictor, Transformer
from solver import CATEGORIES, DENSE_DTYPES, parse_budget, vram_ledger
from powerinfer_py.hybrid import STREAM_BLOCK_BYTES
from solver.ledger import stream_bytes, workspace_bytes

CFG = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=96)
RANKS = [8, 12]


@pytest.mark.parametrize("text,expected", [
    ("6GiB", 6 << 30), ("6GB", 6 * 10**9), ("6", 6 << 30), ("512MiB", 512 << 20), ("0.5G", 1 << 29),
    ("1.5 gib", 3 << 29), ("100b", 100), ("2t", 2 << 40), (".25GiB", 1 << 28), ("64KB", 64000),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["6XB", "six GiB", "GiB", "", "6 GiBs", "-1GiB", "0", "1e3MiB"])
def test_parse_budget_rejects(text):
    with pytest.raises(InputError, match="budget"):
        parse_budget(text)


def model_tensors(cfg, dtype, batch, ctx_len, ranks):
    """name -> nbytes of every parameter and buffer of a real model with predictors and a KV cache."""
    model = Transformer(cfg)
    for layer, r in zip(model.layers, ranks):
        layer.predictor = Predictor(cfg.dim, r, cfg.n_ff)
    model.to(DENSE_DTYPES[dtype])
    model.setup_caches(batch, ctx_len)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers())
    return {name: t.nbytes for name, t in tensors.items() if name != "inv_freq"}


@pytest.mark.parametrize("dtype", list(DENSE_DTYPES))
@pytest.mark.parametrize("tie,on_gpu", [(False, False), (False, True), (True, True)])
def test_items_match_real_tensors(dtype, tie, on_gpu):
    cfg = CFG.replace(tie_embeddings=tie)
    ledger = vram_ledger(cfg, dtype, "f16", ctx_len=24, batch=3, predictor_ranks=RANKS, embeddings_on_gpu=on_gpu)
    real = model_tensors(cfg, dtype, batch=3, ctx_len=24, ranks=RANKS)
    tensors = {item.name: item.bytes for item in ledger.items if item.category != "workspace"}
    for name, nbytes in tensors.items():
        assert real[name] == nbytes, name
    # every tensor the GPU holds is charged, except FFN weights (charged per neuron) and CPU-side embeddings
    uncharged = {n for n in real if ".feed_forward." in n or (n == "tok_embeddings.weight" and not on_gpu)}
    assert set(real) - uncharged - ({"tok_embeddings.weight"} if tie else set()) == set(tensors)


@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_ffn_bytes_per_neuron_match_packed_rows(weight_type):
    ledger = vram_ledger(CFG, "f16", weight_type, 16, 1, None)
    m = 5
    idx = torch.tensor([0, 3, 7, 8, 95])
    gate, up, down_t = (torch.randn(m, CFG.dim) for _ in range(3))
    rows = FFNRows.pack(gate, up, down_t, idx, "cpu", weight_type)
    assert ledger.ffn_bytes_per_neuron * m == rows.nbytes


def test_quantized_rows_hold_ggml_blocks():
    """Q8_0: 34 bytes per 32 values, Q4_0: 18 (rows padded to 16 bytes), 3 rows a neuron plus its int64 index."""
    d = 4096
    assert vram_ledger(CFG.replace(dim=d, n_heads=32), "f16", "q8_0", 16, 1, None).ffn_bytes_per_neuron \
        == 3 * (d // 32 * 34) + 8
    assert vram_ledger(CFG.replace(dim=d, n_heads=32), "f16", "q4_0", 16, 1, None).ffn_bytes_per_neuron \
        == 3 * (d // 32 * 18) + 8


def test_order_and_workspace():
    ledger = vram_ledger(CFG, "f16", "f16", 32, 2, RANKS)
    order = [CATEGORIES.index(item.category) for item in ledger.items]
    assert order == sorted(order)
    work = {item.name: item.bytes for item in ledger.items if item.category == "workspace"}
    # a prefill chunk of min(PREFILL_CHUNK, ctx) tokens per sequence: the largest forward the engine runs
    assert work["workspace.activations"] == workspace_bytes(CFG, "f16", 32, 2 * min(PREFILL_CHUNK, 32), max(RANKS))
    assert work["workspace.logits"] == 4 * 2 * CFG.vocab_size
    assert work["workspace.stream"] == stream_bytes(CFG, ledger.ffn_bytes_per_neuron, 2 * min(PREFILL_CHUNK, 32))
    assert 0 < stream_bytes(CFG, 10 << 20, 1) - 8 * CFG.dim == 2 * STREAM_BLOCK_BYTES  # big neurons: two blocks
    assert workspace_bytes(CFG, "f16", 64, 2, 12) > workspace_bytes(CFG, "f16", 32, 2, 12)  # scores over ctx
    assert workspace_bytes(CFG, "f16", 32, 4, 12) == 2 * workspace_bytes(CFG, "f16", 32, 2, 12)


def test_ffn_budget_and_what_fits():
    ledger = vram_ledger(CFG, "f16", "f16", 64, 1, RANKS, graph_workspace_bytes=0)
    dense = ledger.dense_bytes
    assert ledger.ffn_budget(dense) == 0
    assert ledger.ffn_budget(dense + 1000) == 1000
    with pytest.raises(BudgetError, match="1 B short"):
        ledger.ffn_budget(dense - 1)
    totals = ledger.category_bytes()
    kv_start = sum(totals[c] for c in CATEGORIES[:CATEGORIES.index("kv_cache")])
    kv_item = next(item.bytes for item in ledger.items if item.category == "kv_cache")
    with pytest.raises(BudgetError) as e:
        ledger.ffn_budget(kv_start + kv_item)  # room for one of the four KV tensors
    msg = str(e.value)
    assert "\n" not in msg and "1 of 4 kv_cache tensors" in msg and "not kv_cache, workspace" in msg
    placed, unplaced, left = ledger.fit(kv_start + kv_item)
    assert [i.category for i in unplaced] == ["kv_cache"] * 3 + ["workspace"] * 5 and left == 0 and sum(i.bytes for i in placed) == kv_start + kv_item


def test_bad_arguments():
    with pytest.raises(InputError, match="dense tensors"):
        vram_ledger(CFG, "q8_0", "q8_0", 16, 1, None)
    with pytest.raises(InputError, match="FFN weight type"):
        vram_ledger(CFG, "f16", "q5_k", 16, 1, None)
    with pytest.raises(InputError, match="predictor ranks"):
        vram_ledger(CFG, "f16", "f16", 16, 1, [8])
    with pytest.raises(InputError, match="context length"):
        vram_ledger(CFG, "f16", "f16", 0, 1, None)
