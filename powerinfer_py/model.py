"""A plain Llama decoder (gpt-fast style): the math, nothing else.

The FFN is the seam for sparse inference: `FeedForward.forward(x, active)` takes an optional mask of active
neurons per token, and the hybrid engine swaps the module for one with the same signature that splits the
neurons between GPU and CPU. Kernels never appear here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in fp32 and rounded once, then scaled in x's dtype (as transformers does); one fused kernel
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32) and the attention scaling for cfg's RoPE variant (transformers' formulas)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", "default")
    scale = 1.0
    if kind in ("default", "dynamic"):  # dynamic-NTK changes the base per call: see rope_cos_sin
        pass
    elif kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor = s["factor"]
        old_len = s.get("original_max_position_embeddings") or cfg.max_seq_len

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scale = s.get("attention_factor")
        if scale is None:
            if s.get("mscale") and s.get("mscale_all_dim"):
                scale = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
            else:
                scale = mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    else:
        raise ValueError(f"unknown rope_type {kind!r}")
    return inv_freq.float(), float(scale)


def rope_cos_sin(cfg: ModelConfig, inv_freq: torch.Tensor, scale: float, input_pos: torch.Tensor, dtype):
    """cos and sign-folded sin (see apply_rope) in `dtype` for the given positions. Dynamic NTK grows the base
    with the longest position, as transformers does; the computation stays on tensors so a CUDA graph can
    capture it."""
    s = cfg.rope_scaling or {}
    if s.get("rope_type") == "dynamic":
        dim, factor = cfg.head_dim, s["factor"]
        old_len = s.get("original_max_position_embeddings") or cfg.max_seq_len
        seq_len = (input_pos.max() + 1).clamp(min=old_len).double()
        base = cfg.rope_theta * ((factor * seq_len / old_len) - (factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=input_pos.device) / dim
        inv_freq = (1.0 / base ** exponent).float()
    freqs = input_pos.float()[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos() * scale, freqs.sin() * scale
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x, cos, signed_sin):
    """Rotate-half RoPE (Hugging Face layout) on the last dimension of x. rotate_half(x) * sin equals
    roll(x, hd/2) * signed_sin with the first half of sin negated: three kernels instead of six."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


# ---------------------------------------------------------------- attention with a preallocated KV cache

class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


QKV = ("wq", "wk", "wv")


def merge_qkv(state: dict, prefix: str) -> None:
    """In place: Llama's separate wq, wk, wv under `prefix` (when all three are there) become one wqkv."""
    if all(prefix + w + ".weight" in state for w in QKV):
        state[prefix + "wqkv.weight"] = torch.cat([state.pop(prefix + w + ".weight") for w in QKV])


class Attention(nn.Module):
    """q, k and v come from one matrix `wqkv` (one matrix-vector product a token, and RoPE on q and k at once);
    state dicts keep Llama's separate wq/wk/wv, merged on load and split on save."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_sizes = (cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.kv_dim)
        self.wqkv = nn.Linear(cfg.dim, sum(self.qkv_sizes), bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self._register_load_state_dict_pre_hook(lambda state, prefix, *args: merge_qkv(state, prefix))
        self._register_state_dict_hook(Attention._split_qkv)

    @staticmethod
    def _split_qkv(module, state, prefix, local_metadata):
        wqkv = state.pop(prefix + "wqkv.weight")
        for w, part in zip(QKV, wqkv.split(module.qkv_sizes)):
            state[prefix + w + ".weight"] = part

    def forward(self, x, cos, sin, input_pos, kv_len: int | None, mask=None):
        B, T, _ = x.shape
        q_dim, kv_dim, _ = self.qkv_sizes
        qkv = self.wqkv(x)
        qk = apply_rope(qkv[..., : q_dim + kv_dim].view(B, T, -1, self.head_dim), cos[:, None], sin[:, None])
        q, k = qk.transpose(1, 2).split((self.n_heads, self.n_kv_heads), dim=1)
        v = qkv[..., q_dim + kv_dim:].view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if mask is None:  # no cache: plain causal attention over this call's tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            if kv_len is not None:  # attend only to the first kv_len positions of the cache
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------- FFN and predictor

def ffn_activation(gate, up, act: str, threshold: float = 0.0):
    """The FFN's neuron activations: SwiGLU, ReGLU (relu(gate)*up) or dReLU (relu(gate)*relu(up)).
    A FATReLU threshold zeroes gate activations at or below it (ProSparse)."""
    a = F.silu(gate) if act == "silu" else F.relu(gate)
    if threshold > 0:
        a = torch.where(a > threshold, a, torch.zeros_like(a))
    return a * (F.relu(up) if act == "drelu" else up)


class FeedForward(nn.Module):
    """Dense FFN. `active` (bool, broadcastable to (..., n_ff)) zeroes predicted-inactive neurons exactly."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act, self.threshold = cfg.ffn_act, cfg.ffn_threshold
        self.w_gate = nn.Linear(cfg.dim, cfg.n_ff, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.n_ff, bias=False)
        self.w_down = nn.Linear(cfg.n_ff, cfg.dim, bias=False)

    def activation(self, x):
        return ffn_activation(self.w_gate(x), self.w_up(x), self.act, self.threshold)

    def forward(self, x, active=None, residual=None):
        """The FFN of x, plus residual if given (sparse FFN modules take the same call and fuse the add)."""
        h = self.activation(x)
        if active is not None:
            h = h.masked_fill(~active, 0)
        y = self.w_down(h)
        return y if residual is None else residual + y


class Predictor(nn.Module):
    """PowerInfer's per-layer activation predictor: logits = fc2 @ relu(fc1 @ p), active iff logit >= threshold."""

    def __init__(self, dim: int, rank: int, n_ff: int, threshold: float = 0.0):
        super().__init__()
        self.threshold = threshold
        self.fc1 = nn.Linear(dim, rank, bias=False)
        self.fc2 = nn.Linear(rank, n_ff, bias=False)

    def logits(self, p):
        return self.fc2(F.relu(self.fc1(p)))

    def forward(self, p):
        return self.logits(p) >= self.threshold


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.predictor: Predictor | None = None  # set when running sparse

    def attention_residual(self, x, cos, sin, input_pos, kv_len, mask=None):
        return x + self.attention(self.attention_norm(x), cos, sin, input_pos, kv_len, mask)

    def attend(self, x, cos, sin, input_pos, kv_len, mask=None):
        """The residual after attention, and the FFN's input and active mask."""
        h = self.attention_residual(x, cos, sin, input_pos, kv_len, mask)
        return h, *self.ffn_inputs(h)

    def ffn_inputs(self, h):
        """The FFN's input and active mask; the predictor reads the residual before ffn_norm, as PowerInfer does."""
        active = self.predictor(h) if self.predictor is not None else None
        return self.ffn_norm(h), active

    def forward(self, x, cos, sin, input_pos, kv_len, mask=None):
        h, x_ffn, active = self.attend(x, cos, sin, input_pos, kv_len, mask)
        return self.feed_forward(x_ffn, active, residual=h)  # h + FFN(x_ffn)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq, self.rope_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_len = 0  # KV cache length, 0: no cache (setup_caches)

    def setup_caches(self, batch: int, max_len: int, dtype=None, device=None):
        """Preallocate the KV cache (static shapes, so decode can be captured in a CUDA graph); by default each
        layer's in its own dtype and on its own device (layer_split.py puts layers on two devices)."""
        cfg = self.config
        self.max_len = max_len
        for layer in self.layers:
            own = layer.attention_norm.weight
            layer.attention.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype or own.dtype,
                                               device or own.device)

    def forward(self, tokens, input_pos=None, kv_len: int | None = None, last_only: bool = False):
        """tokens (B, T); input_pos (T,) their positions in the KV cache. kv_len: how much of the cache to attend
        to (eager); None attends over the whole cache under the mask (static shapes for graphs). Without
        input_pos, a stand-alone causal pass that leaves the cache alone (perplexity, profiling)."""
        use_cache = input_pos is not None and self.max_len > 0
        if input_pos is None:
            input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        x, cos, sin, mask = self.embed(tokens, input_pos, kv_len, use_cache)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, kv_len, mask)
        return self.head(x[:, -1:] if last_only else x)

    def embed(self, tokens, input_pos, kv_len=None, use_cache=True):
        """Token embeddings, RoPE cos/sin and, with the KV cache, the attention mask over it (key position <=
        query position, over the attended length), shared by all layers. No mask: no cache."""
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope(input_pos, x.dtype)
        mask = None
        if use_cache:
            mask = torch.arange(kv_len or self.max_len, device=x.device)[None, :] <= input_pos[:, None]
        return x, cos, sin, mask

    def rope(self, input_pos, dtype):
        return rope_cos_sin(self.config, self.inv_freq, self.rope_scale, input_pos, dtype)

    def head(self, x):
        return self.output(self.norm(x)).float()
