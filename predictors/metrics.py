"""Predictor quality counted one way everywhere (training's held-out check and evaluation)."""
from __future__ import annotations

import torch


def confusion_counts(predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """int64 [true positives, predicted active, truly active, all] over (token, neuron) pairs; add to accumulate."""
    return torch.stack([(predicted & true).sum(), predicted.sum(), true.sum(),
                        torch.tensor(true.numel(), device=true.device)]).to(torch.int64)


def confusion_rates(counts: torch.Tensor) -> dict:
    """recall, precision, true and predicted active fractions, and their ratio (what the kernels pay extra)."""
    tp, n_pred, n_true, n = (int(c) for c in counts.tolist())
    return {"recall": tp / n_true if n_true else 1.0, "precision": tp / n_pred if n_pred else 1.0,
            "true_active": n_true / n if n else 0.0, "predicted_active": n_pred / n if n else 0.0,
            "active_ratio": n_pred / n_true if n_true else float("inf")}
