"""Predictor evaluation on held-out documents: per layer recall, precision, true and predicted active fraction,
parameter and time share; end to end, perplexity with predicted sparsity beside dense perplexity.

Per-layer numbers are taken in the dense pass (each predictor sees the residual stream the model really
produces, as in training); the sparse pass then runs with every layer's predictor installed, so predicted
-inactive neurons give exactly 0 and errors compound across layers as they would in deployment."""
from __future__ import annotations

import json
import time

import torch

from powerinfer_py.eval import perplexity
from powerinfer_py.formats import load_activations, load_predictors
from powerinfer_py.loader import install_predictors

from .capture import FFNCapture, active_mask
from .metrics import confusion_counts, confusion_rates
from .profile import hot_neurons

HOT_SHARE = 0.8


def evaluate_predictors(model, tokenizer, documents: list[str], predictors: list[dict], threshold: float,
                        window: int = 1024, active_threshold: float = 0.0, activations: list | None = None,
                        progress: bool = True) -> dict:
    """Score PowerInfer-format predictors (per layer {'fc1.weight', 'fc2.weight'}) on `documents`. With
    `activations` (per-layer counts from a profile, PowerInfer's or ours), also report how much of these
    documents' activity the profile's hot neurons carry (HOT_SHARE of the profiled activations)."""
    cfg = model.config
    install_predictors(model, predictors, threshold)
    preds = [layer.predictor for layer in model.layers]
    for layer in model.layers:
        layer.predictor = None
    device = model.tok_embeddings.weight.device
    counts = [torch.zeros(4, dtype=torch.int64, device=device) for _ in preds]
    neuron_counts = [torch.zeros(cfg.n_ff, dtype=torch.int64, device=device) for _ in preds]
    last_input = {}

    @torch.inference_mode()
    def on_layer(i, p, act):
        true = active_mask(act, active_threshold)
        counts[i] += confusion_counts(preds[i](p), true)
        neuron_counts[i] += true.reshape(-1, cfg.n_ff).sum(0)
        last_input[i] = p[:1, -1:]

    try:
        with FFNCapture(model, on_layer):
            dense = perplexity(model, tokenizer, documents, window, progress)
        for layer, pred in zip(model.layers, preds):
            layer.predictor = pred
        sparse = perplexity(model, tokenizer, documents, window, progress)
    finally:
        for layer in model.layers:
            layer.predictor = None

    ffn_params = 3 * cfg.dim * cfg.n_ff
    times = _decode_times(model, preds, [last_input[i] for i in range(len(preds))])
    layers = []
    for i, (pred, c) in enumerate(zip(preds, counts)):
        rank = pred.fc1.weight.shape[0]
        layers.append({"layer": i, "rank": rank, **confusion_rates(c),
                       "param_share": rank * (cfg.dim + cfg.n_ff) / ffn_params,
                       "time_share": times["predictor"][i] / times["ffn"][i]})
        if activations is not None:
            hot, here = hot_neurons(activations[i], HOT_SHARE).to(device), neuron_counts[i]
            layers[-1]["profiled_hot"] = {"neurons": len(hot) / cfg.n_ff,
                                          "share_here": here[hot].sum().item() / max(here.sum().item(), 1)}
    recalls = [r["recall"] for r in layers]
    total = confusion_rates(sum(counts))
    return {
        "dense": dense, "sparse": sparse, "ppl_increase": sparse["ppl"] / dense["ppl"] - 1,
        "threshold": threshold, "mean_recall": sum(recalls) / len(recalls), "min_recall": min(recalls),
        "mean_active_ratio": sum(r["active_ratio"] for r in layers) / len(layers),
        "overall_active_ratio": total["active_ratio"], "true_active": total["true_active"],
        "predicted_active": total["predicted_active"],
        "param_share": sum(r["param_share"] for r in layers) / len(layers),
        "time_share_of_forward": sum(times["predictor"]) / times["forward"],
        "layers": layers,
    }


@torch.inference_mode()
def _decode_times(model, preds, inputs, reps: int = 30) -> dict:
    """Seconds per single-token call (the decode regime PowerInfer targets) of each predictor, each dense FFN
    (norm + FFN) on the same input, and one whole-model token."""
    device = model.tok_embeddings.weight.device

    def seconds(fn):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    return {
        "predictor": [seconds(lambda: pred(p)) for pred, p in zip(preds, inputs)],
        "ffn": [seconds(lambda: layer.feed_forward(layer.ffn_norm(p))) for layer, p in zip(model.layers, inputs)],
        "forward": seconds(lambda: model(token)),
    }


def format_table(result: dict) -> str:
    rows = ["layer  rank  recall  precis   true   pred  ratio  params   time"]
    for r in result["layers"]:
        rows.append(f"{r['layer']:>5} {r['rank']:>5} {r['recall']:>7.4f} {r['precision']:>7.4f} "
                    f"{r['true_active']:>6.3f} {r['predicted_active']:>6.3f} {r['active_ratio']:>6.3f} "
                    f"{r['param_share']:>7.2%} {r['time_share']:>6.1%}")
    rows.append(f"mean recall {result['mean_recall']:.4f} (min {result['min_recall']:.4f}); predicted/true active "
                f"{result['mean_active_ratio']:.3f}x per layer on average ({result['overall_active_ratio']:.3f}x "
                f"overall); predictor params {result['param_share']:.2%} of FFN, time "
                f"{result['time_share_of_forward']:.1%} of a forward")
    if "profiled_hot" in result["layers"][0]:
        hot = [r["profiled_hot"] for r in result["layers"]]
        rows.append(f"profiled hot neurons ({sum(h['neurons'] for h in hot) / len(hot):.1%} of each layer, carrying "
                    f"{HOT_SHARE:.0%} of the profiled activations) carry "
                    f"{sum(h['share_here'] for h in hot) / len(hot):.1%} here")
    rows.append(f"perplexity: dense {result['dense']['ppl']:.4f}, predicted sparsity {result['sparse']['ppl']:.4f} "
                f"({result['ppl_increase']:+.2%}) over {result['dense']['tokens']} tokens")
    return "\n".join(rows)


def evaluate_cli(args, ckpt, model, documents) -> int:
    """`powerinfer-py eval --predictors DIR`: the per-layer table, then one JSON line with every number."""
    cfg = ckpt.config
    layers, threshold = load_predictors(args.predictors, cfg.n_layers, cfg.dim, cfg.n_ff)
    activations = load_activations(args.activations, cfg.n_layers, cfg.n_ff) if args.activations else None
    result = evaluate_predictors(model, ckpt.tokenizer, documents, layers, threshold, window=args.window,
                                 active_threshold=getattr(args, "fatrelu_threshold", 0.0),
                                 activations=activations)
    print(format_table(result))
    print(json.dumps(result))
    return 0
