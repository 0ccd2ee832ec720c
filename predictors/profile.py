"""Activation profiling: run the dense model over text in large batches and count, per layer and neuron, the
tokens for which the neuron is active (PowerInfer's activation_{i}.pt), optionally dumping the predictor
training set on the way."""
from __future__ import annotations

import torch
from tqdm import tqdm

from powerinfer_py.errors import UnsupportedModelError

from .capture import FFNCapture, active_mask, run_layers
from .dataset import DatasetWriter

SKEW_SHARES = (0.5, 0.8, 0.9, 0.99)


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Cut the tokenized text into windows of `window` tokens. With max_tokens, take evenly spaced windows
    across the whole text: a prefix of a corpus sorted by source would profile one kind of text only."""
    ids = tokenizer.encode(text)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    if max_tokens is not None and max_tokens < len(ids):
        n = -(-max_tokens // window)
        step = len(windows) / n
        windows = [windows[int(k * step)] for k in range(n)]
        windows[-1] = windows[-1][:max_tokens - window * (n - 1)]
    return windows


def check_profilable(cfg, active_threshold: float) -> None:
    if not cfg.is_relu_family and active_threshold <= 0:
        raise UnsupportedModelError(
            f"the model's FFN activation is {cfg.ffn_act}, which is never exactly zero, so no neuron is inactive; "
            "pass --fatrelu-threshold T to count neurons with |activation| > T as active")


def hot_neurons(counts: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the fewest, hottest neurons that together carry `share` of all activations in `counts`."""
    order = counts.double().cpu().sort(descending=True)
    total = order.values.sum()
    if total == 0:
        return order.indices[:0]
    n = int(torch.searchsorted(order.values.cumsum(0), share * total).item()) + 1
    return order.indices[:n]


def activation_stats(counts: list[torch.Tensor], tokens: int) -> list[dict]:
    """Per layer: sparsity (share of inactive neuron-token pairs) and, for each share q in SKEW_SHARES, the
    fraction of neurons (hottest first) that carries q of all activations: the skew the GPU split lives on."""
    return [{"sparsity": 1 - c.sum().item() / (tokens * c.numel()) if tokens else float("nan"),
             "neurons_carrying": {str(q): len(hot_neurons(c, q)) / c.numel() for q in SKEW_SHARES}}
            for c in counts]


class Profiler:
    """Accumulates counts (and optionally the training set) over forward passes of `model`."""

    def __init__(self, model, active_threshold: float = 0.0, dataset: DatasetWriter | None = None):
        cfg = model.config
        device = model.tok_embeddings.weight.device
        self.model, self.active_threshold, self.dataset = model, active_threshold, dataset
        self.counts = [torch.zeros(cfg.n_ff, dtype=torch.int64, device=device) for _ in range(cfg.n_layers)]
        self.tokens = 0

    def run(self, tokens: torch.Tensor) -> None:
        """One batch (B, T). Counts and dataset rows are committed only once the whole batch has gone through."""
        n_ff = self.model.config.n_ff
        batch_counts, inputs, masks = {}, {}, {}

        def on_layer(i, p, act):
            mask = active_mask(act, self.active_threshold).reshape(-1, n_ff)
            batch_counts[i] = mask.sum(0)
            if self.dataset is not None:
                inputs[i], masks[i] = p.reshape(mask.shape[0], -1).to(torch.float16), mask

        with FFNCapture(self.model, on_layer):
            run_layers(self.model, tokens)
        for i, c in batch_counts.items():
            self.counts[i] += c
        if self.dataset is not None:
            order = sorted(inputs)
            self.dataset.append([inputs[i] for i in order], [masks[i] for i in order])
        self.tokens += tokens.numel()


def profile(model, windows: list[list[int]], batch_tokens: int = 4096, active_threshold: float = 0.0,
            dataset: DatasetWriter | None = None, progress: bool = True) -> tuple[Profiler, bool]:
    """Profile the windows in batches of about batch_tokens tokens. Returns (profiler, interrupted): Ctrl-C
    stops after the last complete batch and keeps what was counted."""
    check_profilable(model.config, active_threshold)
    profiler = Profiler(model, active_threshold, dataset)
    device = model.tok_embeddings.weight.device
    batches = _batches(windows, batch_tokens)
    bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="profile", disable=not progress)
    try:
        for batch in batches:
            profiler.run(torch.tensor(batch, device=device))
            bar.update(len(batch) * len(batch[0]))
    except KeyboardInterrupt:
        return profiler, True
    finally:
        bar.close()
    return profiler, False


def _batches(windows, batch_tokens):
    """Stack equal-length windows into (B, T) batches of about batch_tokens tokens."""
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    for length, group in by_len.items():
        per_batch = max(1, batch_tokens // length)
        for i in range(0, len(group), per_batch):
            yield group[i:i + per_batch]
