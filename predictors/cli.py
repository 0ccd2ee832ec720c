"""Subcommands `profile` and `train-predictors` (registered into powerinfer-py by the lead's cli.py), and the
predictor part of `eval --predictors`."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

from powerinfer_py.atomic import atomic_dir, check_writable
from powerinfer_py.errors import InputError
from powerinfer_py.formats import save_activations

from .dataset import DatasetWriter, PredictorDataset
from .profile import activation_stats, check_profilable, profile, token_windows
from .train import TrainConfig, train_predictors

DATASET = "dataset"  # the subfolder of a profile folder that holds the training set
MIN_TRAIN_TOKENS = 2048  # enough for a held-out share that calibrates the threshold
TRAIN_TASK = "training and calibrating"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register(subparsers) -> None:
    from powerinfer_py.cli import add_model_args

    p = subparsers.add_parser("profile", help="count per-neuron FFN activations (PowerInfer activation files)")
    add_model_args(p)
    _add_profile_args(p)
    p.add_argument("-o", "--output", required=True, help="folder for activation_{i}.pt and stats.json")
    p.add_argument("--dump-dataset", action="store_true", help="also store the predictor training set")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser("train-predictors", help="train PowerInfer activation predictors")
    add_model_args(p)
    _add_profile_args(p, max_tokens=100_000)
    p.add_argument("-o", "--output", required=True, help="predictor folder (model_{i}.pt, config.json)")
    defaults = TrainConfig()
    p.add_argument("--target-recall", type=float, default=defaults.target_recall)
    p.add_argument("--max-error", type=float, default=defaults.max_error,
                   help="bound on each layer's output error from missed activations, relative to the residual "
                        "(inf: recall alone sets the threshold)")
    p.add_argument("--max-active-ratio", type=float, default=defaults.max_active_ratio,
                   help="grow a layer's predictor until predicted/true active fraction is at most this")
    p.add_argument("--min-rank", type=int, default=defaults.min_rank)
    p.add_argument("--max-rank", type=int, default=defaults.max_rank)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=cmd_train)


def _add_profile_args(p, max_tokens=None) -> None:
    p.add_argument("--data", required=True,
                   help="text file" + (", or a folder written by profile --dump-dataset" if max_tokens else ""))
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to profile, spread over the text")
    p.add_argument("--window", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward pass")
    p.add_argument("--fatrelu-threshold", type=float, default=0.0,
                   help="count |activation| > T as active (needed for a SiLU model)")


def _read_text(path: str) -> str:
    from powerinfer_py.eval import read_documents

    return "\n\n".join(read_documents(path))


def _profile_into(args, model, tokenizer, folder: str, dump: bool, min_tokens: int = 2,
                  task: str = "profiling") -> tuple:
    """Profile args.data into `folder` (activation files, stats.json, optionally the dataset)."""
    check_profilable(model.config, args.fatrelu_threshold)
    windows = token_windows(tokenizer, _read_text(args.data), args.window, args.max_tokens)
    _check_tokens(args.data, sum(len(w) for w in windows), min_tokens, task)
    cfg = model.config
    dataset = DatasetWriter(os.path.join(folder, DATASET), cfg.n_layers, cfg.dim, cfg.n_ff,
                            args.fatrelu_threshold) if dump else None
    t0 = time.perf_counter()
    profiler, interrupted = profile(model, windows, args.batch_tokens, args.fatrelu_threshold, dataset)
    seconds = time.perf_counter() - t0
    if dataset is not None:
        dataset.close()
    save_activations(folder, profiler.counts)
    stats = {"tokens": profiler.tokens, "seconds": seconds, "interrupted": interrupted,
             "active_threshold": args.fatrelu_threshold, "data": os.path.abspath(args.data),
             "layers": activation_stats(profiler.counts, profiler.tokens)}
    stats["mean_sparsity"] = sum(layer["sparsity"] for layer in stats["layers"]) / len(stats["layers"])
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    note = " (interrupted: kept what was counted)" if interrupted else ""
    _log(f"profile: {profiler.tokens} tokens in {seconds:.1f} s ({profiler.tokens / seconds:.0f} tok/s), "
         f"mean sparsity {stats['mean_sparsity']:.3f}{note}")
    return profiler, interrupted


def cmd_profile(args) -> int:
    from powerinfer_py.cli import load_for_cli

    check_writable(args.output, args.force)
    ckpt, model, _ = load_for_cli(args)
    with atomic_dir(args.output, args.force) as tmp:
        _profile_into(args, model, ckpt.tokenizer, tmp, args.dump_dataset)
    _log(f"profile: wrote {args.output}")
    return 0


def cmd_train(args) -> int:
    from powerinfer_py.cli import load_for_cli
    from powerinfer_py.formats import save_predictors

    check_writable(args.output, args.force)
    cfg = TrainConfig(target_recall=args.target_recall, max_error=args.max_error,
                      max_active_ratio=args.max_active_ratio, min_rank=args.min_rank, max_rank=args.max_rank,
                      epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    t0 = time.perf_counter()
    ckpt, model, _ = load_for_cli(args)  # its FFNs score each layer's missed-activation error
    model_cfg = ckpt.config
    with contextlib.ExitStack() as stack:
        if os.path.isdir(args.data):
            dataset = PredictorDataset(_dataset_folder(args.data))
            shape = (model_cfg.n_layers, model_cfg.dim, model_cfg.n_ff)
            if (dataset.n_layers, dataset.dim, dataset.n_ff) != shape:
                raise InputError(f"{args.data}: dataset is for (layers, dim, n_ff) = "
                                 f"{(dataset.n_layers, dataset.dim, dataset.n_ff)}, the model has {shape}")
        else:  # profile on the fly into a scratch folder beside the output
            scratch = stack.enter_context(tempfile.TemporaryDirectory(
                prefix=".profile.", dir=os.path.dirname(os.path.abspath(args.output))))
            _, interrupted = _profile_into(args, model, ckpt.tokenizer, scratch, dump=True,
                                           min_tokens=MIN_TRAIN_TOKENS, task=TRAIN_TASK)
            if interrupted:
                raise KeyboardInterrupt
            dataset = PredictorDataset(os.path.join(scratch, DATASET))
        _check_tokens(args.data, dataset.tokens, MIN_TRAIN_TOKENS, TRAIN_TASK)
        layers, threshold, report = train_predictors(dataset, cfg, model.tok_embeddings.weight.device, model)
    report["seconds"] = time.perf_counter() - t0
    with atomic_dir(args.output, args.force) as tmp:
        save_predictors(tmp, layers, threshold)
        with open(os.path.join(tmp, "train_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    summary = summarize_training(report)
    _log(f"train-predictors: {summary} in {report['seconds']:.0f} s; wrote {args.output}")
    return 0


def _check_tokens(source: str, tokens: int, needed: int, task: str) -> None:
    if tokens < needed:
        raise InputError(f"{source}: {tokens} tokens; {task} needs at least {needed}")


def _dataset_folder(path: str) -> str:
    """A profile folder holds the dataset in a subfolder; accept the dataset folder itself too."""
    return path if os.path.exists(os.path.join(path, "meta.json")) else os.path.join(path, DATASET)


def summarize_training(report: dict) -> str:
    layers = report["layers"]
    recall = [r["heldout"]["recall"] for r in layers]
    ratio = [r["heldout"]["active_ratio"] for r in layers]
    ranks = [r["rank"] for r in layers]
    return (f"held-out recall mean {sum(recall) / len(recall):.3f} (min {min(recall):.3f}), predicted/true "
            f"active {sum(ratio) / len(ratio):.2f}x, ranks {min(ranks)}-{max(ranks)}")
