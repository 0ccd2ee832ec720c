import numpy as np
import pytest

from kernels import FFNRows
from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import InputError
from solver import Bandwidths, TokenModel, vram_ledger

CFG = ModelConfig(vocab_size=100, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=96)
BW = Bandwidths(gpu=2e9, cpu=1e8, pcie=5e8, sync_s=3e-6)


def test_coefficients():
    ledger = vram_ledger(CFG, "f16", "q8_0", 32, 1, [8, 8, 8])
    model = TokenModel.build(ledger, tokens=50, bandwidths=BW)
    per_neuron = FFNRows.bytes_per_neuron(CFG.dim, "q8_0")
    assert model.gpu_s_per_neuron == per_neuron / BW.gpu and model.cpu_s_per_neuron == per_neuron / BW.cpu
    assert model.handoff_s == pytest.approx(BW.sync_s + (2 * CFG.dim * 2 + CFG.n_ff) / BW.pcie)
    assert np.allclose(model.layer_dense_s, [ledger.layer_bytes(i) / BW.gpu for i in range(3)])
    assert model.head_s == ledger.category_bytes()["output"] / BW.gpu


def test_layer_times():
    model = TokenModel.build(vram_ledger(CFG, "f16", "f16", 32, 1, None), tokens=10, bandwidths=BW)
    hot = np.array([0, 40, CFG.n_ff])
    hot_counts = np.array([0.0, 120.0, 300.0])
    cold_counts = np.array([200.0, 50.0, 0.0])
    times = model.layer_times(hot, hot_counts, cold_counts, CFG.n_ff)
    gpu = hot_counts / 10 * model.gpu_s_per_neuron
    cpu = cold_counts / 10 * model.cpu_s_per_neuron + model.handoff_s
    dense = model.layer_dense_s
    assert times[0] == dense[0] + max(gpu[0], cpu[0]) and times[1] == dense[1] + max(gpu[1], cpu[1])
    assert times[2] == dense[2] + gpu[2]  # a layer wholly on the GPU has no CPU half and no hand-off
    strict = model.layer_times(hot, hot_counts, cold_counts, CFG.n_ff, overlap_dense=True)
    assert np.array_equal(strict, np.maximum(dense + gpu, np.where(hot == CFG.n_ff, 0.0, cpu)))
    assert (strict <= times).all() and strict[2] == times[2]


def test_min_gpu_neurons_is_the_papers_threshold():
    model = TokenModel.build(vram_ledger(CFG, "f16", "f16", 32, 1, None), tokens=10, bandwidths=BW)
    c = model.min_gpu_neurons
    t_gpu, t_cpu = model.gpu_s_per_neuron, model.cpu_s_per_neuron
    assert c * t_gpu + model.handoff_s <= c * t_cpu
    assert (c - 1) * t_gpu + model.handoff_s > (c - 1) * t_cpu


def test_bandwidths_must_be_positive():
    with pytest.raises(InputError, match="cpu bandwidth"):
        Bandwidths(cpu=0)
    with pytest.raises(InputError, match="sync"):
        Bandwidths(sync_s=-1)
