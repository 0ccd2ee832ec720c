#!/usr/bin/env python3
"""Check a demo model folder on the CPU with Hugging Face transformers, independently of the training code:

    PYTHONPATH=. python scripts/demo_model_check.py powerinfer_py/demo_model

Loads it as LlamaForCausalLM (fp32), checks that powerinfer_py.model.Transformer on the same weights gives
the same logits, and prints the per-document perplexity on heldout.txt, the per-layer share of inactive FFN
neurons (gate_proj output <= 0) on those tokens, and greedy continuations of a few prompts. With
--heldout-all (the data stage's heldout_all.txt.xz) it also prints the token-level perplexity over all
held-out documents in max_position_embeddings windows, as the training script measures it.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from powerinfer_py.config import ModelConfig
from powerinfer_py.model import Transformer
from train_demo_model import hf_name, read_docs


def runtime_model(hf: LlamaForCausalLM) -> Transformer:
    """powerinfer_py's Transformer holding the same weights."""
    model = Transformer(ModelConfig.from_hf(hf.config.to_dict())).eval()
    theirs = hf.state_dict()
    model.load_state_dict({k: theirs[hf_name(k)] for k in model.state_dict() if k != "output.weight"}, strict=False)
    return model


@torch.no_grad()
def stream_perplexity(hf: LlamaForCausalLM, tok, path: Path, batch: int = 16) -> tuple[float, int]:
    """All documents of an xz file joined into one stream (EOT before each), cut into full windows."""
    ids = torch.tensor([i for doc in read_docs(path) for i in [tok.bos_token_id] + tok.encode(doc, add_special_tokens=False)])
    seq = hf.config.max_position_embeddings
    n = (len(ids) - 1) // seq
    x, y = ids[: n * seq].view(n, seq), ids[1 : n * seq + 1].view(n, seq)
    nll = sum(F.cross_entropy(hf(x[i : i + batch]).logits.flatten(0, 1).float(), y[i : i + batch].flatten(),
                              reduction="sum").item() for i in range(0, n, batch))
    return math.exp(nll / (n * seq)), n * seq


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="powerinfer_py/demo_model")
    ap.add_argument("--heldout-all", type=Path, help="heldout_all.txt.xz from the data stage")
    ap.add_argument("--prompts", nargs="*", default=["The kernel", "Python is", "A list comprehension"])
    args = ap.parse_args()
    folder = Path(args.folder)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    cfg = hf.config
    print(f"parameters: {sum(p.numel() for p in hf.parameters()):,}")

    active = []
    for layer in hf.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda m, i, gate: active.append(gate[0] > 0))
    docs = (folder / "heldout.txt").read_text().strip().split("\n\n")
    nll, count, max_diff = 0.0, 0, 0.0
    active_count = torch.zeros(cfg.num_hidden_layers)
    ever_active = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.bool)
    ours = runtime_model(hf)
    for i, doc in enumerate(docs):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(doc, add_special_tokens=False)[: cfg.max_position_embeddings - 1]])
        logits = hf(ids[:, :-1]).logits.float()
        nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
        layers = torch.stack(active)  # (layers, tokens, n_ff)
        active.clear()
        active_count += layers.sum((1, 2))
        ever_active |= layers.any(1)
        if i < 8:
            max_diff = max(max_diff, (ours(ids[:, :-1]) - logits).abs().max().item())
    print(f"powerinfer_py Transformer vs transformers, max |logit diff| on 8 documents: {max_diff:.2e}")
    inactive = (1 - active_count / (count * cfg.intermediate_size)).tolist()
    print(f"heldout.txt: {len(docs)} documents, {count:,} tokens, perplexity {math.exp(nll / count):.2f}")
    print("inactive share per layer: " + " ".join(f"{s:.3f}" for s in inactive)
          + f" (mean {sum(inactive) / len(inactive):.3f}); never active: {(~ever_active).sum(1).tolist()}"
          + f" of {cfg.intermediate_size}")
    if args.heldout_all:
        ppl, n = stream_perplexity(hf, tok, args.heldout_all)
        print(f"{args.heldout_all}: perplexity {ppl:.2f} over {n:,} tokens "
              f"in {cfg.max_position_embeddings}-token windows")
    for prompt in args.prompts:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
        out = hf.generate(ids, max_new_tokens=60, do_sample=False)
        print(f"greedy {prompt!r} -> {tok.decode(out[0, 1:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
