"""Token sampling in llama.cpp's order: repetition penalty, top-k, top-p, min-p, temperature, then draw."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the logits alone (no history, no randomness): the GPU can pick it."""
        return self.p.temperature <= 0 and self.p.repetition_penalty == 1.0

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """logits: (vocab,) for the next token; history: all tokens so far (prompt + generated)."""
        p = self.p
        if self.greedy:
            return int(torch.argmax(logits))  # no copy of the logits to the host
        logits = logits.float().cpu().clone()
        if p.repetition_penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            vals = logits[recent]
            logits[recent] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest set reaching top_p
            logits[order[drop]] = float("-inf")
        if p.min_p > 0:
            probs = torch.softmax(logits, -1)
            logits[probs < p.min_p * probs.max()] = float("-inf")
        probs = torch.softmax(logits / p.temperature, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
