"""Synthetic ReLU Llamas: the target statistics, the PowerInfer file, and the statistics the model itself
produces when the file is loaded back and run on fresh tokens."""
import os

import numpy as np
import pytest
import torch

from benchmarks.synthetic import CONSTANT, activation_probabilities, expected_counts, write_synthetic
from powerinfer_py.config import ModelConfig
from powerinfer_py.formats import load_activations, read_gguf
from powerinfer_py.loader import build_model, install_predictors, load_checkpoint
from predictors.capture import FFNCapture

CFG = ModelConfig(vocab_size=300, dim=96, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=320, max_seq_len=512,
                  ffn_act="relu")
RANK = 41


@pytest.mark.parametrize("n_ff", [320, 11008])
def test_activation_probabilities_meet_the_published_figures(n_ff):
    q = activation_probabilities(n_ff)
    assert np.all(np.diff(q) <= 0) and 0 <= q.min() and q.max() <= 0.99
    assert abs(q.mean() - 0.30) < 1e-6  # 70% of neurons inactive per token
    assert abs(q[:round(0.26 * n_ff)].sum() / q.sum() - 0.80) < 1e-3  # the hottest 26% carry 80%


def test_expected_counts():
    counts = expected_counts(2, 320, tokens=1000)
    assert len(counts) == 2 and counts[0].shape == (320,) and not torch.equal(counts[0], counts[1])
    assert abs(counts[0].sum().item() / (1000 * 320) - 0.30) < 0.01


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("synthetic") / "tiny.powerinfer.gguf")
    report = write_synthetic(path, CFG, RANK, "cpu", torch.float32, seed=3, calib_tokens=512, eval_tokens=512,
                             log=lambda msg: None)
    return path, report


def test_file_is_a_powerinfer_gguf_with_activation_files(synthetic):
    path, report = synthetic
    f = read_gguf(path)
    assert f.magic == b"PWRI" and f.metadata["powerinfer.sparse_threshold"] == 0.0
    block = sorted(n.split(".", 2)[2] for n in f.tensors if n.startswith("blk.0."))
    assert block == sorted(f"{t}.weight" for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down_t", "fc1", "fc2"))
    assert f.tensors["blk.0.fc1.weight"].shape == (RANK, CFG.dim)
    assert {t.ggml_type.name for t in f.tensors.values() if len(t.shape) == 2} == {"F16"}
    counts = load_activations(os.path.join(os.path.dirname(path), "activation"), CFG.n_layers, CFG.n_ff)
    assert sum(int(c.sum()) for c in counts) > 0 and report["file_bytes"] == os.path.getsize(path)


def test_measured_statistics_are_near_the_targets(synthetic):
    m = synthetic[1]["measured"]
    assert abs(m["sparsity"] - 0.70) < 0.04
    assert abs(m["hot_mass"] - 0.80) < 0.05
    assert 0.93 < m["recall"] and 0.8 < m["precision"] < 1.0


def test_the_loaded_model_reproduces_the_statistics_on_fresh_tokens(synthetic):
    """Through the runtime's own forward pass and predictors, read from the file: the constant channel holds,
    about 70% of the neurons are inactive, and the predictors find the active ones."""
    ckpt = load_checkpoint(synthetic[0])
    t = ckpt.tensors
    assert torch.all(t["tok_embeddings.weight"][:, 0] == CONSTANT)
    assert not t["layers.1.attention.wo.weight"][0].any() and not t["layers.1.feed_forward.w_down.weight"][0].any()
    model = build_model(ckpt)
    predictors = build_model(ckpt)
    install_predictors(predictors, ckpt.predictors, ckpt.config.sparse_threshold)
    stats = []

    def on_layer(i, p, act):
        true = act != 0
        predicted = predictors.layers[i].predictor(p)
        stats.append((true.float().mean().item(), (true & predicted).sum().item() / true.sum().item()))

    tokens = torch.randint(0, CFG.vocab_size, (4, 128), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), FFNCapture(model, on_layer):
        model(tokens)
    active, recall = np.mean(stats, axis=0)
    assert abs(active - 0.30) < 0.04 and recall > 0.93
