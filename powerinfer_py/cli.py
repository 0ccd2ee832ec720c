"""`powerinfer-py`: one console script, a subcommand per job. Bad input prints one line and exits 2."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import PowerInferError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads a model."""
    p.add_argument("-m", "--model", required=True, help="HF checkpoint folder, GGUF or PowerInfer GGUF file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def resolve_device_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PowerInferError("--device cuda: no CUDA device is available")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    if device == "cpu" and dtype == "float16":
        raise PowerInferError("--dtype float16 is not supported on the CPU (use float32 or bfloat16)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(device), getattr(torch, dtype)


def load_for_cli(args):
    """Load the model named by -m onto the chosen device; returns (checkpoint, model, seconds)."""
    from .loader import build_model, load_checkpoint

    device, dtype = resolve_device_dtype(args)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    model = build_model(ckpt, device=device, dtype=dtype)
    return ckpt, model, time.perf_counter() - t0


def require_tokenizer(ckpt):
    if ckpt.tokenizer is None:
        raise PowerInferError(f"{ckpt.path}: has no tokenizer (tokenizer.json, tokenizer.model or GGUF vocabulary)")
    return ckpt.tokenizer


def cmd_run(args) -> int:
    from .generate import Generator
    from .sampling import SamplingParams
    from .text import TextStream

    if getattr(args, "vram_budget", None) is not None or getattr(args, "predictors", None):
        from .engine import run_hybrid

        return run_hybrid(args)
    ckpt, model, load_s = load_for_cli(args)
    tok = require_tokenizer(ckpt)
    prompt = tok.apply_chat(args.prompt) if args.chat else args.prompt
    ids = tok.encode(prompt)
    max_len = min(ckpt.config.max_seq_len, args.ctx or ckpt.config.max_seq_len)
    gen = Generator(model, max_len=max_len, use_cuda_graph=not args.no_cuda_graph)
    params = SamplingParams(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, seed=args.seed)
    stream = TextStream(tok, sys.stdout)
    _, stats = gen.generate(ids, args.n_predict, params, eos_ids=tok.eos_ids, on_token=stream.push)
    stream.close()
    _log(f"load: {load_s:.2f} s ({ckpt.kind}, {ckpt.config.n_layers} layers)")
    _log(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s; "
         f"generation: {stats.generated_tokens} tokens, {stats.generate_tps:.1f} tok/s")
    return 0


def cmd_eval(args) -> int:
    from .eval import perplexity, read_documents

    docs = read_documents(args.data)
    if args.max_docs:
        docs = docs[:args.max_docs]
    ckpt, model, _ = load_for_cli(args)
    if args.predictors:
        from predictors import evaluate_cli

        return evaluate_cli(args, ckpt, model, docs)
    result = perplexity(model, require_tokenizer(ckpt), docs, window=args.window)
    print(json.dumps(result))
    return 0


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n-predict", type=int, default=128)
    p.add_argument("--temp", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ctx", type=int, default=None, help="context length (KV cache size)")
    p.add_argument("--no-cuda-graph", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="powerinfer-py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate text (dense, or hybrid GPU-CPU with --vram-budget)")
    add_model_args(p)
    add_sampling_args(p)
    from .engine import add_hybrid_args

    add_hybrid_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="perplexity over blank-line-separated documents")
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--max-docs", type=int, default=None, help="score only the first N documents")
    p.add_argument("--predictors", default=None, help="also evaluate a predictor folder (recall, sparse ppl)")
    p.add_argument("--activations", default=None,
                   help="with --predictors: an activation folder (activation_{i}.pt, PowerInfer's or ours); "
                        "reports how much of this text's activity its profiled hot neurons carry")
    p.set_defaults(func=cmd_eval)

    import convert.cli
    import predictors.cli
    import solver.cli

    from . import demo

    for module in (predictors.cli, solver.cli, convert.cli, demo):
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except PowerInferError as e:
        print(f"powerinfer-py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"powerinfer-py {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
