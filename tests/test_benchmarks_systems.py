"""Pieces of the systems under comparison that run anywhere: the transformers model built from the
checkpoint's tensors, the token plan, the engine's cold-row layout and the bound's CPU term."""
import numpy as np
import pytest
import torch

from benchmarks import systems
from powerinfer_py.config import ModelConfig
from powerinfer_py.loader import Checkpoint, build_model
from powerinfer_py.model import Transformer
from solver import Bandwidths, PlacementProblem, vram_ledger

CFG = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=160, max_seq_len=256,
                  ffn_act="relu")


@pytest.mark.parametrize("tied", [False, True])
def test_hf_model_holds_the_same_weights(tied):
    pytest.importorskip("accelerate")
    cfg = CFG.replace(tie_embeddings=tied)
    torch.manual_seed(0)
    tensors = {k: v.detach().clone() for k, v in Transformer(cfg).state_dict().items()
               if not (tied and k == "output.weight")}
    ckpt = Checkpoint(cfg, tensors, None, None, "hf", "<random>")
    tokens = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        want = build_model(ckpt)(tokens)
        got = systems.hf_model(ckpt, torch.float32)(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_new_tokens_fit_the_time_box():
    assert systems.new_tokens(prompt_s=0.1, token_s=0.01, time_box=3.0) == 91  # 3 runs of 0.1 + 90 steps
    assert systems.new_tokens(prompt_s=0.1, token_s=1e-6, time_box=3.0) == systems.MAX_NEW
    assert systems.new_tokens(prompt_s=5.0, token_s=2.0, time_box=3.0) == systems.MIN_NEW


def test_timed_generations_are_sized_after_the_warm_up(monkeypatch):
    """The first generation captures the decode graphs (slow); the length of the timed ones comes from a second,
    so a fast model gets MAX_NEW tokens, not the few that the capture's time would allow."""
    calls = []

    class Stats:
        def __init__(self, new, seconds_per_token):
            self.prompt_tokens, self.prompt_seconds = 8, 0.01
            self.generated_tokens, self.generate_seconds = new, (new - 1) * seconds_per_token

    class FakeGenerator:
        def __init__(self, model, max_len, use_cuda_graph=True):
            pass

        def generate(self, prompt, new):
            calls.append(new)
            return [], Stats(new, 0.5 if len(calls) == 1 else 0.001)

    monkeypatch.setattr(systems, "Generator", FakeGenerator)
    row = systems.time_generator(None, [1] * 8, time_box=3.0)
    assert row["new_tokens"] == systems.MAX_NEW and calls[-systems.REPEATS:] == [systems.MAX_NEW] * systems.REPEATS
    assert row["decode_tps"] == pytest.approx(1000)


def test_bound_reads_cold_rows_in_the_given_layout():
    """All neurons cold and a slow CPU: the token time grows by the extra bytes of fp32 rows over f16 rows."""
    ledger = vram_ledger(CFG, "f16", "f16", 64, 1, [8] * CFG.n_layers, embeddings_on_gpu=True)
    counts = [torch.rand(CFG.n_ff) * 100 for _ in range(CFG.n_layers)]
    bw = Bandwidths(cpu=1e6)
    problem = PlacementProblem(counts, ledger, ledger.dense_bytes + 10 ** 6, bandwidths=bw, tokens=100)
    masks = [np.zeros(CFG.n_ff, dtype=bool)] * CFG.n_layers
    f16, f32 = (systems.bound(problem, masks, bw, t) for t in ("f16", "f32"))
    active = sum(float(c.sum()) for c in counts) / 100
    extra = active * 3 * CFG.dim * 2 / bw.cpu  # fp32 rows hold 2 more bytes per element
    assert f32["token_time_s"] - f16["token_time_s"] == pytest.approx(extra, rel=1e-6)
    assert f32["cold_row_type"] == "f32" and f16["modelled_hit_rate"] == 0
    # everything cold on a slow CPU: the strict bound lets the CPU overlap the dense part too, so it is faster
    assert f16["overlap_decode_tps"] > f16["decode_tps"]


def test_cold_row_type_is_a_kernel_layout():
    assert systems.cold_row_type("f16") in ("f32", "f16")
