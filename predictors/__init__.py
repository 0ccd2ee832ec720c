"""Activation profiling, predictor training and predictor evaluation for PowerInfer-style sparse inference.

profile -> activation counts (PowerInfer's activation_{i}.pt) and, optionally, the training set;
train   -> PowerInfer predictor folders (model_{i}.pt, config.json with sparse_threshold);
evaluate -> per-layer recall / predicted-active fraction and perplexity with predicted sparsity."""
from .capture import FFNCapture, active_mask
from .dataset import DatasetWriter, PredictorDataset
from .evaluate import evaluate_cli, evaluate_predictors, format_table
from .profile import activation_stats, profile, token_windows
from .train import GLOBAL_THRESHOLD, TrainConfig, calibrate_threshold, train_layer, train_predictors

__all__ = [
    "FFNCapture", "active_mask", "DatasetWriter", "PredictorDataset", "evaluate_cli", "evaluate_predictors",
    "format_table", "activation_stats", "profile", "token_windows", "GLOBAL_THRESHOLD", "TrainConfig",
    "calibrate_threshold", "train_layer", "train_predictors",
]
