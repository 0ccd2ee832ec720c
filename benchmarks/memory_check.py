"""Peak GPU memory of the hybrid engine against its VRAM budget, stage by stage, with the largest live
allocations at the peak (torch's memory history), on a random model of a real shape.

    python -m benchmarks.memory_check [--shape smollm2-135m] [--gpu-share 0.5] [--prompt 64] [--new 32] [--window 512]
"""
from __future__ import annotations

import argparse
import collections

import torch

from benchmarks.common import SHAPES
from powerinfer_py.engine import build_hybrid
from powerinfer_py.generate import Generator
from powerinfer_py.loader import Checkpoint
from powerinfer_py.model import Transformer
from solver import vram_ledger


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--gpu-share", type=float, default=0.5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--window", type=int, default=512,
                    help="tokens of a stand-alone causal pass first, as perplexity runs it (0: none)")
    args = ap.parse_args(argv)
    cfg = SHAPES[args.shape]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items() if k != "output.weight" or not cfg.tie_embeddings}
    tensors = {k: torch.randn(s, dtype=torch.float16) * 0.02 for k, s in shapes.items()}
    ckpt = Checkpoint(cfg, tensors, None, None, "hf", "<random>")
    preds = [{"fc1.weight": torch.randn(args.rank, cfg.dim) * 0.05, "fc2.weight": torch.randn(cfg.n_ff, args.rank) * 0.05}
             for _ in range(cfg.n_layers)]
    ledger = vram_ledger(cfg, "f16", "f16", 512, 1, [args.rank] * cfg.n_layers, embeddings_on_gpu=True)
    budget = ledger.dense_bytes + int(args.gpu_share * cfg.n_layers * cfg.n_ff) * ledger.ffn_bytes_per_neuron
    n_hot = int(args.gpu_share * cfg.n_ff)
    masks = [torch.arange(cfg.n_ff) < n_hot for _ in range(cfg.n_layers)]
    torch.cuda.memory._record_memory_history(max_entries=200000)
    stages = []

    def stage(name):
        torch.cuda.synchronize()
        stages.append((name, torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()))

    setup = build_hybrid(ckpt, "cuda", torch.float16, budget, preds, 0.0, gpu_masks=[m.numpy() for m in masks],
                         ctx_len=512)
    stage("built")
    if args.window:
        with torch.inference_mode():
            setup.model(torch.arange(100, 100 + args.window, device="cuda")[None])
        stage("no-cache pass")
    gen = Generator(setup.model, max_len=512)
    stage("caches")
    with torch.inference_mode():
        logits = gen.prefill(list(range(100, 100 + args.prompt)))
        stage("prefill")
        token = int(logits.argmax())
        for i in range(args.new):
            token = int(gen.decode(token, args.prompt + i).argmax())
            if i == 0:
                stage("1st decode")
    stage("decoded")
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"budget {budget / 2**20:.1f} MiB (dense {ledger.dense_bytes / 2**20:.1f} MiB, ledger items: "
          + ", ".join(f"{c} {b / 2**20:.1f}" for c, b in ledger.category_bytes().items() if b) + ")")
    for name, now, peak in stages:
        print(f"{name:<10} allocated {now / 2**20:9.1f} MiB  peak {peak / 2**20:9.1f} MiB  over budget "
              f"{(peak - budget) / 2**20:+8.1f} MiB")
    live = collections.Counter()
    for seg in snapshot["segments"]:
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                frames = block.get("frames") or []
                where = next((f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames
                              if "powerinfer_py" in f["filename"] or "kernels" in f["filename"]), "?")
                live[where] += block["size"]
    print("live allocations by site (MiB):")
    for where, size in live.most_common(15):
        print(f"  {size / 2**20:9.2f}  {where}")


if __name__ == "__main__":
    main()
