"""`powerinfer-py demo`: the whole pipeline on the embedded demo model, through the same commands a user runs:
profile -> train predictors -> solve a placement for a budget -> convert to a PowerInfer GGUF -> generate
under that budget -> perplexity dense vs sparse. Works without a GPU (every neuron on the CPU)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch

DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
PROMPT = "The Python interpreter"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded demo model")
    p.add_argument("-o", "--output", default="powerinfer-demo", help="working folder (default: ./powerinfer-demo)")
    p.add_argument("--force", action="store_true", help="replace an existing working folder")
    p.add_argument("--vram-budget", default=None, help="default: what puts about half of the FFN on the CPU")
    p.add_argument("-p", "--prompt", default=PROMPT)
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_demo)


def _step(title: str) -> None:
    print(f"\n=== {title}", file=sys.stderr, flush=True)


def half_ffn_budget(model_dir: str, predictor_dir: str) -> str:
    """A budget whose FFN share holds about half of the neurons, from the ledger the engine uses on a GPU (fp16;
    `solve` charges the same by default)."""
    from solver import vram_ledger

    from .formats import load_predictors
    from .loader import read_config

    cfg = read_config(model_dir)
    preds, _ = load_predictors(predictor_dir, cfg.n_layers, cfg.dim, cfg.n_ff)
    ledger = vram_ledger(cfg, "f16", "f16", min(2048, cfg.max_seq_len), 1, [p["fc1.weight"].shape[0] for p in preds],
                         embeddings_on_gpu=True)
    return f"{ledger.dense_bytes + ledger.ffn_bytes_per_neuron * cfg.n_layers * cfg.n_ff // 2}B"


def cmd_demo(args) -> int:
    from predictors.evaluate import evaluate_predictors, format_table

    from .atomic import check_writable
    from .cli import main
    from .eval import read_documents
    from .loader import build_model, load_checkpoint

    check_writable(args.output, args.force)
    if os.path.exists(args.output):
        shutil.rmtree(args.output)
    os.makedirs(args.output)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    work = lambda name: os.path.join(args.output, name)  # noqa: E731
    calib, heldout = os.path.join(DEMO_MODEL, "calib.txt"), os.path.join(DEMO_MODEL, "heldout.txt")

    def call(*argv):
        print("$ powerinfer-py " + " ".join(argv), file=sys.stderr, flush=True)
        rc = main(list(argv))
        if rc:
            raise SystemExit(rc)

    _step("1/6 profile activations on real text")
    call("profile", "-m", DEMO_MODEL, "--data", calib, "-o", work("activation"), "--device", device, "--dump-dataset")
    with open(os.path.join(work("activation"), "stats.json")) as f:
        sparsity = json.load(f)["mean_sparsity"]

    _step("2/6 train the per-layer predictors")
    call("train-predictors", "-m", DEMO_MODEL, "--data", work("activation"), "-o", work("predictors"), "--device", device)

    budget = args.vram_budget or half_ffn_budget(DEMO_MODEL, work("predictors"))
    _step(f"3/6 solve the placement for a VRAM budget of {budget}")
    call("solve", "-m", DEMO_MODEL, "--activation", work("activation"), "--vram-budget", budget,
         "--predictors", work("predictors"), "-o", work("demo.powerinfer.gguf.generated.gpuidx"), "--report")

    _step("4/6 convert to a PowerInfer GGUF (predictors inside)")
    call("convert", DEMO_MODEL, work("predictors"), "-o", work("demo.powerinfer.gguf"), "--outtype", "f16")

    _step("5/6 generate under the budget (hybrid engine)")
    call("run", "-m", work("demo.powerinfer.gguf"), "--vram-budget", budget, "-p", args.prompt,
         "-n", str(args.n_predict), "--device", device)

    _step("6/6 perplexity on held-out text, dense vs predicted sparsity")
    ckpt = load_checkpoint(work("demo.powerinfer.gguf"))
    model = build_model(ckpt, device=device, dtype=torch.float32)
    result = evaluate_predictors(model, ckpt.tokenizer, read_documents(heldout), ckpt.predictors,
                                 ckpt.config.sparse_threshold)
    print(format_table(result), file=sys.stderr)
    print(json.dumps({"activation_sparsity": round(sparsity, 4), "predictor_mean_recall": round(result["mean_recall"], 4),
                      "predicted_over_true_active": round(result["mean_active_ratio"], 3),
                      "ppl_dense": round(result["dense"]["ppl"], 3), "ppl_sparse": round(result["sparse"]["ppl"], 3)}))
    return 0
