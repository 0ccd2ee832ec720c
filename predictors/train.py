"""Predictor training: per layer a bias-free ReLU MLP `fc2 @ relu(fc1 @ p)` (PowerInfer's shape), trained on
positive-weighted BCE, its hidden width grown until the layer reaches the target recall at an acceptable
predicted-active fraction, and its threshold calibrated on held-out tokens: the largest that keeps the target
recall, lowered further in layers whose misses would still disturb the model's output too much (MissedError).

One threshold for the whole model (PowerInfer reads a single sparse_threshold): each layer is calibrated to
its own threshold t_l < 0, and its fc2 is scaled by 1 / |t_l| so that the global threshold is -1. The scale is
positive, so `logits / |t_l| >= -1  <=>  logits >= t_l` holds exactly (up to float rounding of the scaled
weights). A threshold t_l >= 0 cannot be folded this way, so training keeps it negative: it retrains the
layer for an epoch with lighter positives (which lowers the logits) until it is; as a last resort t_l is
lowered to -1e-3, which only raises that layer's recall (reported as `threshold_clamped`)."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from powerinfer_py.model import Predictor

from .metrics import confusion_counts, confusion_rates

GLOBAL_THRESHOLD = -1.0
ERROR_TOKENS = 2048  # about this many held-out tokens, spread over all of them, score the missed-activation error
BISECTION_STEPS = 16  # a threshold within 1/65536 of the logit range


@dataclass
class TrainConfig:
    target_recall: float = 0.95
    max_active_ratio: float = 1.3  # acceptable predicted-active / true-active fraction at the target recall
    min_rank: int = 32
    max_rank: int = 120  # 120 * (576 + 1536) is 9.5% of a relu-smollm2 layer's FFN parameters
    rank_multiple: int = 8
    epochs: int = 4
    batch_size: int = 1024
    lr: float = 1e-2
    heldout_share: float = 0.1
    # Bound on each layer's MissedError (inf: recall alone sets the threshold). On relu-smollm2 the perplexity
    # increase on wiki-dev came out as 3-4x the sum of the layers' errors under five threshold rules; 7e-5 in
    # each of its 30 layers then predicts +0.6-0.8%: within the 1% target, with room for other text.
    max_error: float = 7e-5
    seed: int = 0


def heldout_split(n_tokens: int, share: float, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows): every k-th block of consecutive tokens is held out, so both halves see
    every kind of text in the profile."""
    every = max(2, round(1 / share))
    held = (torch.arange(n_tokens) // block) % every == every - 1
    if not held.any():  # fewer tokens than one block cycle: hold out the tail
        held[-max(1, int(n_tokens * share)):] = True
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def initial_rank(sparsity: float, cfg: TrainConfig) -> int:
    """The width tried first, from the layer's sparsity. At a fixed recall the extra predicted neurons are a
    larger multiple of the true ones the sparser the layer, so sparse layers start at max_rank and denser ones
    lower: max_rank * sparsity / 0.8, at least half of max_rank."""
    return round_rank(cfg.max_rank * min(1.0, max(0.5, sparsity / 0.8)), cfg)


def round_rank(r: float, cfg: TrainConfig) -> int:
    m = cfg.rank_multiple
    return int(min(cfg.max_rank, max(cfg.min_rank, math.ceil(r / m) * m)))


def bce_grad(logits: torch.Tensor, masks: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """d/dlogits of the positive-weighted BCE summed over all elements: pos_weight * (sigmoid - 1) for active
    neurons, sigmoid for inactive ones. Written out, it is one pass instead of autograd's several over the
    (batch, n_ff) logits, the largest tensor in training."""
    s = torch.sigmoid(logits)
    return torch.where(masks, pos_weight * (s - 1), s)


def fit(pred: Predictor, inputs: torch.Tensor, masks: torch.Tensor, epochs: int, cfg: TrainConfig,
        pos_weight: torch.Tensor, generator: torch.Generator) -> None:
    """Adam with a learning rate decaying linearly to zero. `inputs` (bfloat16) and `masks` are already in a
    random order; each epoch visits their contiguous batches in a new random order. Matmuls run in bfloat16
    autocast (several times faster on CPUs with bf16 units, harmless for a classifier)."""
    n_batches = math.ceil(inputs.shape[0] / cfg.batch_size)
    steps = epochs * n_batches
    opt = torch.optim.Adam(pred.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    pos_weight = pos_weight.to(inputs.dtype)
    for _ in range(epochs):
        for b in torch.randperm(n_batches, generator=generator).tolist():
            rows = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
                logits = pred.logits(inputs[rows])
            opt.zero_grad(set_to_none=True)
            logits.backward(bce_grad(logits.detach(), masks[rows], pos_weight).to(logits.dtype))
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


class MissedError:
    """The relative error that active neurons predicted inactive cause in a layer's output, on held-out tokens:
    mean over tokens of ||w_down(missed activations)||^2 / ||residual after the layer||^2. A per-layer proxy for
    the perplexity cost of misses: at equal recall, layer 0 of relu-smollm2 (whose FFN output dwarfs its input)
    scores 10x the other layers, and sparsifying it alone costs as much perplexity as all other layers together.
    `rows` picks the scored tokens out of the held-out ones (inputs: their raw predictor inputs)."""

    def __init__(self, block, inputs: torch.Tensor, rows: torch.Tensor):
        weight = block.feed_forward.w_down.weight
        self.rows, self.w_down = rows, block.feed_forward.w_down
        with torch.no_grad():
            p = inputs[rows].to(weight.device, weight.dtype)
            self.act = block.feed_forward.activation(block.ffn_norm(p))
            self.out_norm = (p + self.w_down(self.act)).float().pow(2).sum(-1)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, threshold: float) -> float:
        missed = (logits[self.rows] < threshold).to(self.act.device)
        dy = self.w_down(self.act * missed)
        return (dy.float().pow(2).sum(-1) / self.out_norm).mean().item()


def _calibrate(pred, inputs, masks, recall, missed_error=None, max_error=math.inf) -> tuple[float, dict]:
    """The largest threshold that keeps `recall` and, given missed_error, keeps that error at most max_error
    (found by bisection: the error only falls as the threshold does). Returns (threshold, held-out rates)."""
    logits = predictor_logits(pred, inputs)
    threshold = calibrate_threshold(logits, masks, recall)
    if missed_error is not None and missed_error(logits, threshold) > max_error:
        lo, hi = logits.min().item(), threshold  # below every logit nothing is missed
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if missed_error(logits, mid) <= max_error else (lo, mid)
        threshold = lo
    rates = confusion_rates(confusion_counts(logits >= threshold, masks))
    if missed_error is not None:
        rates["missed_error"] = missed_error(logits, threshold)
    return threshold, rates


def train_layer(inputs: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig, block=None) -> tuple[dict, float, dict]:
    """One layer from its predictor inputs (tokens, dim) and true masks (tokens, n_ff) bool; with the model's
    `block` (its ffn_norm and feed_forward), the threshold also bounds the missed-activation error.
    Returns (state dict for the raw residual input, calibrated threshold, report)."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    train_rows, held_rows = heldout_split(inputs.shape[0], cfg.heldout_share)
    train_rows = train_rows[torch.randperm(len(train_rows), generator=generator)].to(inputs.device)
    held_rows = held_rows.to(inputs.device)
    # Per-dimension input scale (no shift: there is no bias), folded into fc1 at the end.
    scale = inputs[train_rows].float().pow(2).mean(0).sqrt().clamp(min=1e-6)
    x_train, y_train = (inputs[train_rows] / scale).bfloat16(), masks[train_rows]
    x_held, y_held = inputs[held_rows] / scale, masks[held_rows]
    active = y_train.float().mean(0)
    # Positives weighted by each neuron's inactive/active odds: rare activations count as much as common ones.
    pos_weight = ((1 - active) / active.clamp(min=1e-4)).clamp(1, 100)
    missed_error = None
    if block is not None:
        rows = torch.arange(0, len(held_rows), max(1, len(held_rows) // ERROR_TOKENS), device=inputs.device)
        missed_error = MissedError(block, inputs[held_rows], rows)
    calibrate = functools.partial(_calibrate, inputs=x_held, masks=y_held, recall=cfg.target_recall,
                                  missed_error=missed_error, max_error=cfg.max_error)

    rank, steps = initial_rank(1 - active.mean().item(), cfg), []
    while True:  # each width trained from scratch: warm-starting a wider one from a narrower one did worse
        torch.manual_seed(cfg.seed)
        pred = Predictor(inputs.shape[1], rank, masks.shape[1]).to(inputs.device)
        fit(pred, x_train, y_train, cfg.epochs, cfg, pos_weight, generator)
        threshold, heldout = calibrate(pred)
        for shift in range(1, 4):
            if threshold < 0:
                break
            fit(pred, x_train, y_train, 1, cfg, pos_weight / 2 ** shift, generator)
            threshold, heldout = calibrate(pred)
        steps.append({"rank": rank, "active_ratio": heldout["active_ratio"], "threshold": threshold})
        if heldout["active_ratio"] <= cfg.max_active_ratio or rank >= cfg.max_rank:
            break
        rank = round_rank(rank * 1.5, cfg)
    state = {"fc1.weight": (pred.fc1.weight / scale).detach(), "fc2.weight": pred.fc2.weight.detach()}
    report = {"rank": rank, "threshold": threshold, "heldout": heldout, "steps": steps,
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


def train_predictors(dataset, cfg: TrainConfig, device="cpu", model=None, progress: bool = True):
    """Train every layer of a PredictorDataset (with the model, also bounding each layer's missed-activation
    error). Returns (PowerInfer layers, sparse_threshold, report)."""
    layers, thresholds, reports = [], [], []
    bar = tqdm(range(dataset.n_layers), desc="train", unit="layer", disable=not progress)
    for i in bar:
        inputs, masks = dataset.layer(i)
        block = model.layers[i] if model is not None else None
        state, threshold, report = train_layer(inputs.to(device), masks.to(device), cfg, block)
        layers.append({k: v.cpu() for k, v in state.items()})
        thresholds.append(threshold)
        reports.append({"layer": i, **report})
        bar.set_postfix(rank=report["rank"], ratio=f"{report['heldout']['active_ratio']:.2f}")
    folded, clamped = fold_thresholds(layers, thresholds)
    for r, c in zip(reports, clamped):
        r["threshold_clamped"] = c
    return folded, GLOBAL_THRESHOLD, {"config": asdict(cfg), "layers": reports}
