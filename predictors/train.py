"""Predictor training: per layer a bias-free ReLU MLP `fc2 @ relu(fc1 @ p)` (PowerInfer's shape), trained with
a positive-weighted BCE, its hidden width grown until the layer reaches the target recall at an acceptable
predicted-active fraction, and its threshold calibrated on held-out tokens.

One threshold for the whole model (PowerInfer reads a single sparse_threshold): each layer is calibrated to
its own threshold t_l < 0, and fc2 is scaled by t / |t_l| with the global t = -1. Because relu is positively
homogeneous and the scale is positive, `logits * s >= -1  <=>  logits >= t_l` holds exactly (up to float
rounding of the scaled weights). A calibrated t_l >= 0 cannot be folded this way; it is lowered to a small
negative value, which only raises that layer's recall (reported as `threshold_clamped`)."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from powerinfer_py.model import Predictor

from .metrics import confusion_counts, confusion_rates

GLOBAL_THRESHOLD = -1.0


@dataclass
class TrainConfig:
    target_recall: float = 0.95
    max_active_ratio: float = 1.2  # acceptable predicted-active / true-active fraction at the target recall
    min_rank: int = 16
    max_rank: int = 128
    rank_multiple: int = 16
    epochs: int = 4  # for the first width; each growth step trains half as many
    batch_size: int = 1024
    lr: float = 3e-3
    heldout_share: float = 0.1
    min_gain: float = 0.02  # stop growing when a step lowers the predicted-active ratio by less than this
    seed: int = 0


def heldout_split(n_tokens: int, share: float, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): every k-th block of consecutive tokens is held out, so both halves see
    every kind of text in the profile."""
    every = max(2, round(1 / share))
    held = (torch.arange(n_tokens) // block) % every == every - 1
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def initial_rank(active_fraction: float, cfg: TrainConfig) -> int:
    """Denser layers start wider: the paper sizes predictors by the layer's sparsity."""
    r = cfg.max_rank * min(1.0, 2 * active_fraction) / 2
    return _round_rank(r, cfg)


def _round_rank(r: float, cfg: TrainConfig) -> int:
    m = cfg.rank_multiple
    return int(min(cfg.max_rank, max(cfg.min_rank, math.ceil(r / m) * m)))


def grow(pred: Predictor, rank: int) -> Predictor:
    """The same function with rank - r new hidden units (fresh fc1 rows, zero fc2 columns): training goes on
    from where the narrower predictor stopped."""
    old = pred.fc1.weight.shape[0]
    wider = Predictor(pred.fc1.in_features, rank, pred.fc2.out_features).to(pred.fc1.weight.device)
    with torch.no_grad():
        wider.fc1.weight[:old] = pred.fc1.weight
        wider.fc2.weight.zero_()
        wider.fc2.weight[:, :old] = pred.fc2.weight
    return wider


def fit(pred: Predictor, inputs: torch.Tensor, masks: torch.Tensor, epochs: int, cfg: TrainConfig,
        pos_weight: torch.Tensor, generator: torch.Generator) -> None:
    """Adam on positive-weighted BCE, learning rate decaying linearly to zero; matmuls in bfloat16 autocast
    (several times faster on CPUs with bf16 units, harmless for a classifier)."""
    n = inputs.shape[0]
    steps = epochs * math.ceil(n / cfg.batch_size)
    opt = torch.optim.Adam(pred.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    device_type = inputs.device.type
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(inputs.device)
        for i in range(0, n, cfg.batch_size):
            rows = order[i:i + cfg.batch_size]
            with torch.autocast(device_type, dtype=torch.bfloat16):
                logits = pred.logits(inputs[rows])
            loss = F.binary_cross_entropy_with_logits(logits.float(), masks[rows].float(), pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def predictor_logits(pred: Predictor, inputs: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    return torch.cat([pred.logits(inputs[i:i + batch]) for i in range(0, inputs.shape[0], batch)])


def calibrate_threshold(logits: torch.Tensor, masks: torch.Tensor, recall: float) -> float:
    """The largest t with recall(logits >= t) >= `recall` over all active (token, neuron) pairs."""
    positives = logits[masks]
    if positives.numel() == 0:
        return float("inf")
    k = positives.numel() - math.ceil(recall * positives.numel()) + 1  # keep the top ceil(recall * n) positives
    return positives.float().kthvalue(k).values.item()


def train_layer(inputs: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig) -> tuple[dict, float, dict]:
    """One layer from its predictor inputs (tokens, dim) float and true masks (tokens, n_ff) bool.
    Returns (state dict for the raw residual input, calibrated threshold, report)."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_rows, held_rows = heldout_split(inputs.shape[0], cfg.heldout_share)
    # Per-dimension input scale (no shift: there is no bias), folded into fc1 at the end.
    scale = inputs[train_rows].float().pow(2).mean(0).sqrt().clamp(min=1e-6)
    x_train, y_train = inputs[train_rows] / scale, masks[train_rows]
    x_held, y_held = inputs[held_rows] / scale, masks[held_rows]
    active = y_train.float().mean(0)
    # Weight each neuron's positives by its negative/positive ratio (square-rooted, so that rare neurons count
    # more without every neuron collapsing to always-on).
    pos_weight = ((1 - active) / active.clamp(min=1e-4)).clamp(1, 100).sqrt()

    rank = initial_rank(y_train.float().mean().item(), cfg)
    pred = Predictor(inputs.shape[1], rank, masks.shape[1]).to(inputs.device)
    epochs, steps = cfg.epochs, []
    while True:
        fit(pred, x_train, y_train, epochs, cfg, pos_weight, generator)
        logits = predictor_logits(pred, x_held)
        threshold = calibrate_threshold(logits, y_held, cfg.target_recall)
        stats = confusion_rates(confusion_counts(logits >= threshold, y_held))
        ratio = stats["active_ratio"]
        steps.append({"rank": rank, "active_ratio": ratio, "threshold": threshold})
        gain = steps[-2]["active_ratio"] - ratio if len(steps) > 1 else math.inf
        if ratio <= cfg.max_active_ratio or rank >= cfg.max_rank or gain < cfg.min_gain:
            break
        rank = _round_rank(rank * 1.5, cfg)
        pred = grow(pred, rank)
        epochs = max(1, cfg.epochs // 2)
    state = {"fc1.weight": (pred.fc1.weight / scale).detach(), "fc2.weight": pred.fc2.weight.detach()}
    report = {"rank": rank, "threshold": threshold, "heldout": stats, "active_ratio": ratio, "steps": steps,
              "seconds": time.perf_counter() - t0}
    return state, threshold, report


def fold_thresholds(layers: list[dict], thresholds: list[float]) -> tuple[list[dict], list[bool]]:
    """Scale each layer's fc2 so that `logits >= GLOBAL_THRESHOLD` means `logits >= t_l` for its own t_l.
    Returns (folded layers, which layers had t_l >= 0 and were lowered)."""
    folded, clamped = [], []
    for sd, t in zip(layers, thresholds):
        clamped.append(t >= 0)
        t = min(t, -1e-3)
        folded.append({"fc1.weight": sd["fc1.weight"], "fc2.weight": sd["fc2.weight"] * (GLOBAL_THRESHOLD / t)})
    return folded, clamped


def train_predictors(dataset, cfg: TrainConfig, device="cpu", progress: bool = True):
    """Train every layer of a PredictorDataset. Returns (PowerInfer layers, sparse_threshold, report)."""
    from tqdm import tqdm

    layers, thresholds, reports = [], [], []
    bar = tqdm(range(dataset.n_layers), desc="train", unit="layer", disable=not progress)
    for i in bar:
        inputs, masks = dataset.layer(i)
        state, threshold, report = train_layer(inputs.to(device), masks.to(device), cfg)
        layers.append({k: v.cpu() for k, v in state.items()})
        thresholds.append(threshold)
        reports.append({"layer": i, **report})
        bar.set_postfix(rank=report["rank"], ratio=f"{report['active_ratio']:.2f}")
    folded, clamped = fold_thresholds(layers, thresholds)
    for r, c in zip(reports, clamped):
        r["threshold_clamped"] = c
    return folded, GLOBAL_THRESHOLD, {"config": asdict(cfg), "layers": reports}
