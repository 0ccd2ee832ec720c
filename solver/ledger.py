"""The VRAM ledger: every byte the GPU holds for a model, in the order PowerInfer places it.

The budget is spent on attention, predictors, FFN norms, the output head, the KV cache and the runtime's
workspace first; only what is left goes to FFN neurons. Items carry the runtime's state-dict names so the engine
can check each one against a real tensor's nbytes, and the total against torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kernels import FFNRows
from kernels.decode import attention_workspace_bytes
from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import BudgetError, InputError
from powerinfer_py.generate import PREFILL_CHUNK
from powerinfer_py.hybrid import STREAM_BLOCK_BYTES

DENSE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# PowerInfer's order; "attention" includes attention_norm, "norm" is the FFN norms, "output" the final norm too.
CATEGORIES = ("attention", "predictor", "norm", "output", "embedding", "kv_cache", "workspace")
GRAPH_WORKSPACE_BYTES = 32 << 20  # cuBLAS workspace on Hopper (32 MiB) of the one stream the engine runs on

_UNITS = {"": 1 << 30, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str) -> int:
    """Bytes from '6GiB', '6GB' (10^9), '512MiB', '0.5G' (binary) or a bare '6' (GiB, as PowerInfer's flag)."""
    m = _BUDGET.match(str(text))
    unit = m and _UNITS.get(m.group(2).lower())
    if unit is None:
        raise InputError(f"budget {text!r}: expected a number with a unit of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB "
                         "or K, M, G, T (binary), e.g. 6GiB")
    value = int(float(m.group(1)) * unit)
    if value <= 0:
        raise InputError(f"budget {text!r}: must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LedgerItem:
    name: str  # the runtime's tensor name (state-dict name or buffer), or workspace.*
    bytes: int
    category: str
    layer: int | None = None


@dataclass
class Ledger:
    """Dense items in placement order, and the bytes each FFN neuron placed on the GPU adds."""
    config: ModelConfig
    items: list[LedgerItem]
    ffn_bytes_per_neuron: int
    dtype: str  # of every dense tensor, the KV cache and the activations
    ffn_weight_type: str

    @property
    def dense_bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    def category_bytes(self) -> dict[str, int]:
        totals = dict.fromkeys(CATEGORIES, 0)
        for item in self.items:
            totals[item.category] += item.bytes
        return totals

    def layer_bytes(self, layer: int) -> int:
        """Dense bytes a decode step reads for one layer (weights, predictor, norms, its whole KV cache)."""
        return sum(item.bytes for item in self.items if item.layer == layer)

    def fit(self, budget: int) -> tuple[list[LedgerItem], list[LedgerItem], int]:
        """(placed, not placed, bytes left for FFN neurons): items are placed in order until one does not fit."""
        used = 0
        for i, item in enumerate(self.items):
            if used + item.bytes > budget:
                return self.items[:i], self.items[i:], 0
            used += item.bytes
        return self.items, [], budget - used

    def ffn_budget(self, budget: int) -> int:
        """Bytes left for FFN neurons; BudgetError naming what is needed and what fits when the dense parts don't."""
        placed, unplaced, left = self.fit(budget)
        if unplaced:
            need = ", ".join(f"{c} {format_bytes(b)}" for c, b in self.category_bytes().items() if b)
            raise BudgetError(
                f"VRAM budget {format_bytes(budget)} is {format_bytes(self.dense_bytes - budget)} short of the "
                f"{format_bytes(self.dense_bytes)} the dense parts need ({need}); in PowerInfer's order it holds "
                f"{_describe(placed, unplaced)} and no FFN neurons")
        return left

    def table(self, budget: int, hot_neurons: int) -> str:
        """The ledger as text: bytes per category, the FFN neurons placed, and what is left of the budget."""
        rows = [(c, format_bytes(b)) for c, b in self.category_bytes().items() if b]
        ffn = hot_neurons * self.ffn_bytes_per_neuron
        rows.append((f"ffn ({hot_neurons} neurons x {self.ffn_bytes_per_neuron} B)", format_bytes(ffn)))
        rows.append(("total", format_bytes(self.dense_bytes + ffn)))
        rows.append(("budget", format_bytes(budget)))
        rows.append(("unused", format_bytes(budget - self.dense_bytes - ffn)))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)


def _describe(placed: list[LedgerItem], unplaced: list[LedgerItem]) -> str:
    """'attention, ..., 12 of 60 kv_cache tensors, not kv_cache, workspace': what a budget holds and what not."""
    split = unplaced[0].category
    held = [c for c in CATEGORIES if any(item.category == c for item in placed) and c != split]
    n_split = sum(item.category == split for item in placed)
    if n_split:
        held.append(f"{n_split} of {n_split + sum(item.category == split for item in unplaced)} {split} tensors")
    missing = [c for c in CATEGORIES if any(item.category == c for item in unplaced)]
    return f"{', '.join(held) or 'nothing'}, not {', '.join(missing)}"


def workspace_bytes(cfg: ModelConfig, dtype: str, ctx_len: int, tokens: int, max_rank: int) -> int:
    """Activations of one forward over `tokens` tokens (a decode step of a batch, or a prefill chunk): the
    residual, attention input and output, normed FFN input and FFN output (5 x dim), q/k/v, fp32 attention scores
    over ctx_len, gate/up/activation and predictor logits over n_ff, the predictor's hidden layer, and the bool
    active mask."""
    size = DENSE_DTYPES[dtype].itemsize
    q_dim = cfg.n_heads * cfg.head_dim
    per_seq = size * (5 * cfg.dim + q_dim + 2 * cfg.kv_dim + 4 * cfg.n_ff + max_rank)
    return tokens * (per_seq + 4 * cfg.n_heads * ctx_len + cfg.n_ff)


SMALL_BUFFERS_BYTES = 64 << 10  # static decode inputs, hit and kernel counters, RoPE tables: each in 512 B blocks


def runtime_bytes(cfg: ModelConfig) -> int:
    """The hybrid engine's own buffers: each layer's bool mask of GPU neurons and the hand-off's int32 indices of
    its CPU neurons (kernels.Handoff; at most n_ff), the decode attention's split partials (kernels.decode), the
    one-token FFN's fp32 output sums (kernels.cuda, dim padded to 8, and a counter) and the small tensors of a
    decode step; each rounded to the allocator's 512 B blocks."""
    def blocks(n: int) -> int:
        return -(-n // 512) * 512

    return (cfg.n_layers * (blocks(cfg.n_ff) + blocks(4 * cfg.n_ff))
            + attention_workspace_bytes(cfg.n_heads, cfg.head_dim)
            + blocks(4 * (-(-cfg.dim // 8) * 8 + 4)) + SMALL_BUFFERS_BYTES)


def stream_bytes(cfg: ModelConfig, bytes_per_neuron: int, tokens: int) -> int:
    """A long prompt's cold rows on their way through the GPU (hybrid.HybridFeedForward.streamed_part): two
    blocks of rows (the one computed, the next one copied; at most a layer's worth each) and two fp32 sums."""
    block = min(STREAM_BLOCK_BYTES, cfg.n_ff * bytes_per_neuron)
    return 2 * block + 2 * 4 * cfg.dim * tokens


def vram_ledger(cfg: ModelConfig, weight_type: str, ffn_weight_type: str, ctx_len: int, batch: int,
                predictor_ranks: list[int] | None, embeddings_on_gpu: bool = False,
                graph_workspace_bytes: int = GRAPH_WORKSPACE_BYTES) -> Ledger:
    """Every GPU byte for cfg. weight_type (f32, f16, bf16) is the dtype of dense weights, predictors, norms, KV cache
    and activations; ffn_weight_type (also q8_0, q4_0) that of the FFN rows, in the kernels' packed layout."""
    if weight_type not in DENSE_DTYPES:
        raise InputError(f"weight type {weight_type!r}: dense tensors are one of {', '.join(DENSE_DTYPES)}")
    if ctx_len < 1 or batch < 1:
        raise InputError(f"context length {ctx_len} and batch {batch}: both must be at least 1")
    if predictor_ranks is not None and len(predictor_ranks) != cfg.n_layers:
        raise InputError(f"predictor ranks: {len(predictor_ranks)} given for a model of {cfg.n_layers} layers")
    try:
        per_neuron = FFNRows.bytes_per_neuron(cfg.dim, ffn_weight_type, gated=True)  # every ModelConfig FFN is gated
    except ValueError as e:
        raise InputError(f"FFN weight type: {e}") from None
    size = DENSE_DTYPES[weight_type].itemsize
    d, q_dim, kv_dim = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_dim
    items = []

    def add(name, n_elements, category, layer=None):
        items.append(LedgerItem(name, n_elements * size, category, layer))

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        add(p + "attention_norm.weight", d, "attention", i)
        add(p + "attention.wqkv.weight", (q_dim + 2 * kv_dim) * d, "attention", i)
        add(p + "attention.wo.weight", d * q_dim, "attention", i)
    for i, r in enumerate(predictor_ranks or []):
        add(f"layers.{i}.predictor.fc1.weight", r * d, "predictor", i)
        add(f"layers.{i}.predictor.fc2.weight", cfg.n_ff * r, "predictor", i)
    for i in range(cfg.n_layers):
        add(f"layers.{i}.ffn_norm.weight", d, "norm", i)
    add("norm.weight", d, "output")
    add("output.weight", cfg.vocab_size * d, "output")  # with tied embeddings this one tensor serves both
    if embeddings_on_gpu and not cfg.tie_embeddings:
        add("tok_embeddings.weight", cfg.vocab_size * d, "embedding")
    for i in range(cfg.n_layers):
        for kind in ("k", "v"):
            add(f"layers.{i}.attention.kv_cache.{kind}", batch * kv_dim * ctx_len, "kv_cache", i)
    max_rank = max(predictor_ranks or [0])
    prefill_tokens = min(PREFILL_CHUNK, ctx_len)  # the engine prefills prompts in chunks of this many tokens
    items.append(LedgerItem("workspace.activations",
                            workspace_bytes(cfg, weight_type, ctx_len, batch * prefill_tokens, max_rank),
                            "workspace"))
    items.append(LedgerItem("workspace.logits", 4 * batch * cfg.vocab_size, "workspace"))
    items.append(LedgerItem("workspace.graph", graph_workspace_bytes, "workspace"))
    items.append(LedgerItem("workspace.runtime", runtime_bytes(cfg), "workspace"))
    items.append(LedgerItem("workspace.stream", stream_bytes(cfg, per_neuron, batch * prefill_tokens), "workspace"))
    return Ledger(cfg, items, per_neuron, weight_type, ffn_weight_type)
