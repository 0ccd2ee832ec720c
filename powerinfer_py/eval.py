"""Perplexity over a text file of blank-line-separated documents: each document scored on its own with EOS
appended, in windows of at most `window` tokens (no context carried across windows)."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import InputError


def read_documents(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise InputError(f"{path}: data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise InputError(f"{path}: no documents (expected text separated by blank lines)")
    return docs


def document_windows(tokenizer, documents: list[str], window: int):
    """Token windows (lists of ids) to score: each document + EOS, split into chunks of at most `window`."""
    eos = tokenizer.eos_ids[0]
    for doc in documents:
        ids = tokenizer.encode(doc) + [eos]
        for i in range(0, len(ids), window):
            chunk = ids[i:i + window]
            if len(chunk) > 1:
                yield chunk


class _ZeroCounter:
    """Counts exactly-zero FFN activations at the input of each layer's down projection."""

    def __init__(self, model):
        self.zeros = self.total = 0
        self.handles = [layer.feed_forward.w_down.register_forward_pre_hook(self._hook)
                        for layer in model.layers if hasattr(layer.feed_forward, "w_down")]

    def _hook(self, module, args):
        h = args[0]
        self.zeros += int((h == 0).sum())
        self.total += h.numel()

    def close(self):
        for h in self.handles:
            h.remove()

    @property
    def fraction(self):
        return self.zeros / self.total if self.total else float("nan")


@torch.inference_mode()
def perplexity(model, tokenizer, documents: list[str], window: int = 1024, progress: bool = True) -> dict:
    """{'ppl', 'tokens' (scored predictions), 'zero_frac' (mean share of FFN activations that are exactly 0)}."""
    device = model.tok_embeddings.weight.device
    windows = list(document_windows(tokenizer, documents, window))
    counter = _ZeroCounter(model)
    nll, count = 0.0, 0
    try:
        for ids in tqdm(windows, desc="eval", unit="win", disable=not progress):
            tokens = torch.tensor([ids], device=device)
            logits = model(tokens)  # no cache: plain causal attention over the window
            nll += F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    finally:
        counter.close()
    return {"ppl": math.exp(nll / count), "tokens": count, "zero_frac": counter.fraction}
