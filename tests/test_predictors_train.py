import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from powerinfer_py.model import Predictor
from predictors.metrics import confusion_counts, confusion_rates
from predictors.train import (GLOBAL_THRESHOLD, MissedError, TrainConfig, bce_grad, calibrate_threshold,
                              fold_thresholds, heldout_split, initial_rank, train_layer)


def planted_problem(n_tokens, seed, dim=24, n_ff=40, rank=6, lean=0.5):
    """Masks made by a hidden predictor of PowerInfer's shape (active iff its logit > 0; fc2 leans negative so
    that about a quarter of the neurons are active, as in a ReLU model, or half with lean=0), inputs with uneven
    per-dimension scales like a residual stream."""
    g = torch.Generator().manual_seed(0)  # the same teacher for every draw
    teacher = Predictor(dim, rank, n_ff)
    with torch.no_grad():
        teacher.fc1.weight.copy_(torch.randn(rank, dim, generator=g))
        teacher.fc2.weight.copy_(torch.randn(n_ff, rank, generator=g) - lean)
    scales = torch.logspace(-1, 1.5, dim)
    inputs = torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(seed)) * scales
    with torch.no_grad():
        return inputs, teacher.logits(inputs) > 0


@pytest.fixture
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trained_predictor_reaches_its_recall_on_a_planted_problem(one_thread):
    inputs, masks = planted_problem(8000, seed=1)
    cfg = TrainConfig(target_recall=0.95, min_rank=16, max_rank=16, epochs=15, batch_size=256, lr=1e-2)
    state, threshold, report = train_layer(inputs, masks, cfg)
    assert report["heldout"]["recall"] >= 0.95
    assert threshold < 0  # kept negative so that it folds into the global threshold
    assert state["fc1.weight"].shape == (16, 24) and state["fc2.weight"].shape == (40, 16)

    # fresh tokens through the exported weights, which take the raw (unscaled) input
    pred = Predictor(24, 16, 40, threshold)
    pred.load_state_dict(state)
    test_inputs, test_masks = planted_problem(4000, seed=2)
    with torch.no_grad():
        rates = confusion_rates(confusion_counts(pred(test_inputs), test_masks))
    assert rates["recall"] >= 0.94
    assert rates["active_ratio"] < 1.2  # learned: few extra neurons predicted (an untrained one needs ~4x)


def test_calibrated_threshold_hits_the_requested_recall_on_held_out_data():
    def draw(seed, n=20000):
        g = torch.Generator().manual_seed(seed)
        masks = torch.rand(n, generator=g) < 0.3
        logits = torch.randn(n, generator=g) + 1.5 * masks  # positives score higher, with overlap
        return logits, masks

    logits, masks = draw(1)
    for recall in (0.9, 0.95, 0.99):
        t = calibrate_threshold(logits, masks, recall)
        got = confusion_rates(confusion_counts(logits >= t, masks))["recall"]
        assert got >= recall and (logits[masks] >= t).sum() == math.ceil(recall * masks.sum())  # largest such t
        held_logits, held_masks = draw(2)
        held = confusion_rates(confusion_counts(held_logits >= t, held_masks))["recall"]
        assert abs(held - recall) < 0.01


def test_folding_thresholds_is_exact():
    g = torch.Generator().manual_seed(3)
    layers = [{"fc1.weight": torch.randn(8, 12, generator=g, dtype=torch.float64),
               "fc2.weight": torch.randn(20, 8, generator=g, dtype=torch.float64)} for _ in range(3)]
    thresholds = [-0.37, -2.5, 0.4]
    folded, clamped = fold_thresholds(layers, thresholds)
    assert clamped == [False, False, True]
    p = torch.randn(500, 12, generator=g, dtype=torch.float64)

    def logits(sd):
        return F.relu(p @ sd["fc1.weight"].T) @ sd["fc2.weight"].T

    for sd, f, t in zip(layers[:2], folded[:2], thresholds[:2]):
        assert torch.equal(logits(f) >= GLOBAL_THRESHOLD, logits(sd) >= t)
    # a non-negative threshold is lowered: the folded layer predicts a superset of what t would
    assert ((logits(layers[2]) >= 0.4) & ~(logits(folded[2]) >= GLOBAL_THRESHOLD)).sum() == 0


def test_bce_grad_matches_autograd_of_weighted_bce():
    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(64, 30, generator=g, dtype=torch.float64)).requires_grad_()
    masks = torch.rand(64, 30, generator=g) < 0.25
    pos_weight = 1 + 5 * torch.rand(30, generator=g, dtype=torch.float64)
    F.binary_cross_entropy_with_logits(logits, masks.double(), pos_weight=pos_weight, reduction="sum").backward()
    torch.testing.assert_close(bce_grad(logits.detach(), masks, pos_weight), logits.grad)


def test_heldout_split_is_a_partition_of_interleaved_blocks():
    train, held = heldout_split(10_000, 0.1, block=100)
    assert len(train) + len(held) == 10_000 and len(set(train.tolist()) & set(held.tolist())) == 0
    assert len(held) == 1000 and held.min() < 1000 and held.max() > 9000  # spread over the whole profile
    train, held = heldout_split(50, 0.1, block=100)
    assert len(held) == 5 and len(train) == 45


def test_width_grows_until_the_predicted_active_fraction_is_acceptable(one_thread):
    inputs, masks = planted_problem(6000, seed=1, rank=12, lean=0)  # half the neurons active: starts at 20
    cfg = TrainConfig(min_rank=8, max_rank=32, rank_multiple=4, epochs=6, batch_size=256)
    _, _, report = train_layer(inputs, masks, dataclasses.replace(cfg, max_active_ratio=10.0))
    assert [s["rank"] for s in report["steps"]] == [20]  # acceptable at once: stays small
    _, _, report = train_layer(inputs, masks, dataclasses.replace(cfg, max_active_ratio=1.0))
    assert [s["rank"] for s in report["steps"]] == [20, 32] and report["rank"] == 32  # never acceptable: up to max
    assert report["steps"][1]["active_ratio"] < report["steps"][0]["active_ratio"]


@pytest.mark.parametrize("sparsity,rank", [(0.3, 64), (0.6, 96), (0.8, 120), (0.95, 120)])
def test_initial_rank_follows_the_sparsity(sparsity, rank):
    assert initial_rank(sparsity, TrainConfig(min_rank=32, max_rank=120, rank_multiple=8)) == rank


@pytest.mark.gpu
def test_training_on_cuda_reaches_its_recall():
    inputs, masks = planted_problem(8000, seed=1)
    cfg = TrainConfig(min_rank=16, max_rank=16, epochs=15, batch_size=256)
    state, threshold, report = train_layer(inputs.cuda(), masks.cuda(), cfg)
    assert report["heldout"]["recall"] >= 0.95 and report["heldout"]["active_ratio"] < 1.3
    assert state["fc1.weight"].is_cuda


def tiny_block(seed=0):
    from powerinfer_py.config import ModelConfig
    from powerinfer_py.model import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=16, dim=24, n_layers=1, n_heads=4, n_kv_heads=2, n_ff=40, ffn_act="relu")
    return Transformer(cfg).eval().layers[0]


def test_missed_error_matches_a_float64_reference():
    block = tiny_block()
    g = torch.Generator().manual_seed(5)
    p, logits = torch.randn(50, 24, generator=g) * 3, torch.randn(50, 40, generator=g)
    rows = torch.arange(0, 50, 2)
    got = MissedError(block, p, rows)(logits, 0.3)

    ff = block.feed_forward.double()
    x = p[rows].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + block.ffn_norm.eps) * block.ffn_norm.weight.double()
    act = ff.activation(x)
    dy = ff.w_down(act * (logits[rows] < 0.3))
    expected = (dy.pow(2).sum(-1) / (p[rows].double() + ff.w_down(act)).pow(2).sum(-1)).mean().item()
    assert abs(got - expected) < 1e-5 * expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_error_bound_lowers_the_threshold_until_it_holds(one_thread, device):
    block = tiny_block().to(device)
    inputs = torch.randn(5000, 24, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        masks = block.feed_forward.activation(block.ffn_norm(inputs)) != 0
    cfg = TrainConfig(min_rank=8, max_rank=8, epochs=3, batch_size=256, max_error=math.inf)
    _, free_threshold, free = train_layer(inputs, masks, cfg, block)
    bound = free["heldout"]["missed_error"] / 4
    _, threshold, bounded = train_layer(inputs, masks, dataclasses.replace(cfg, max_error=bound), block)
    assert threshold < free_threshold and bounded["heldout"]["missed_error"] <= bound
    assert bounded["heldout"]["recall"] > free["heldout"]["recall"] >= 0.95
