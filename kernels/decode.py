"""The dense half of a one-token decode step as fused CUDA kernels (kernels/decode.cu), with plain torch references.

At 7B shapes a decode layer's attention, norms and predictor were ~25 small torch/cuBLAS kernels, each a few
microseconds even when it moves little; here they are five: matrix-vector products with their prologue or
epilogue (the attention norm before wqkv, the residual after wo, ReLU after the predictor's fc1 with the FFN's
RMSNorm written beside it, the threshold straight to a bool mask after fc2), and attention over the cache up to
the query's position with RoPE and the KV-cache write inside (split over keys, the splits combined by the last
block of each head; the cached keys load while wqkv ends). A stand-alone RMSNorm kernel serves the other norms
(the output's, layers without a predictor).

RoPE's cos and sin for the step's position come from one more (the plain path computes them in ~10), and greedy
decoding's argmax and token bookkeeping at the end of a step from another (`greedy_advance`).

`use_decode_kernels(model)` switches a model's RMSNorm, Block, Predictor and Transformer modules in place to
subclasses that run these kernels for one-token CUDA steps in fp16/bf16; every other call (prefill, CPU, fp32)
runs the model's own torch code, which is also what the tests compare the kernels with. CuPy is imported on
first launch.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from powerinfer_py.model import Block, Predictor, RMSNorm, Transformer, apply_rope

from .rows import DTYPE_CODES

HALF_DTYPES = (torch.float16, torch.bfloat16)  # the kernels' element types (rows.DTYPE_CODES 1 and 2)
EPILOGUES = {"store": 0, "relu": 1, "at_least": 2}  # the order of decode.cu's enum
NORMS = {None: 0, "x": 1, "out": 2}  # decode.cu's NO_NORM, NORM_X, NORM_OUT
# (epilogue, norm) pairs compiled: the plain products, wqkv (attention_norm first), the predictor's fc1 (ffn_norm
# written beside it)
GEMV_VARIANTS = [(e, 0) for e in EPILOGUES.values()] + [(EPILOGUES["store"], 1), (EPILOGUES["relu"], 2)]
# compiled for; gemv takes the fewest that still give every SM a block (7B's predictor fc1, 1024 x 4096: two, so
# that its 256 blocks load every row before they wait)
GEMV_WARPS_PER_ROW = (1, 2, 4, 8)
# with one warp a row, rows short enough go R at a time (decode.cu's R: 7B's predictor fc2, k = 1024, two), so
# that a lane's GEMV_LOADS load slots (decode.cu) all hold weights
GEMV_LOADS = 8
GEMV_ROW_GROUPS = (1, 2, 4)
GEMV_MAX_K = 16 << 10  # x is staged in shared memory: 2 bytes an element, 32 KB
GEMV_BLOCKS_PER_SM = 2  # gemv's grid at most (its blocks loop over the rows); 2 of 256 threads fit an SM
NORM_THREADS = 512
ATTENTION_THREADS = 512  # 128 keys of 128 elements in flight a block (4 a group of 16 threads)
ATTENTION_HEAD_DIMS = (8, 16, 32, 64, 128, 256)  # 8 elements a thread, a key's threads within one warp
ATTENTION_MAX_SPLITS = 32  # key splits per head at most; each leaves hd + 2 fp32 values
ATTENTION_MIN_CHUNK = 256  # keys per split at least: up to 256 keys, one block a head (two rounds), no combining
ARGMAX_THREADS = 1024  # greedy_advance's one block


def attention_workspace_bytes(n_heads: int, head_dim: int) -> int:
    """Device memory of the attention's split partials and per-head counters (the VRAM ledger charges it)."""
    return 4 * n_heads * (ATTENTION_MAX_SPLITS * (head_dim + 2) + 1)


@functools.cache
def _module():
    from .cuda import compile_module

    names = [f"gemv<{dt},{e},{w},{norm},{r}>" for dt in map(DTYPE_CODES.get, HALF_DTYPES)
             for e, norm in GEMV_VARIANTS for w in GEMV_WARPS_PER_ROW for r in GEMV_ROW_GROUPS if w == 1 or r == 1]
    names += [f"{k}<{dt}>" for k in ("rms_norm", "rope_table", "decode_attention")
              for dt in map(DTYPE_CODES.get, HALF_DTYPES)]
    return compile_module("decode.cu", names + ["greedy_advance"])


def _launch(name: str, grid, block: int, args, device, shared_mem: int = 0):
    """Launch decode.cu's `name` (template arguments included); tensors pass as addresses (None as a null one),
    ints as int32, floats as float32."""
    from .cuda import launch, ptr

    args = tuple(ptr(a) if torch.is_tensor(a) else np.uint64(0) if a is None else np.float32(a)
                 if isinstance(a, float) else np.int32(a) for a in args)
    launch(_module().get_function(name), grid, args, device, shared_mem, block)


# ---------------------------------------------------------------- the kernels, each with its reference

def gemv(weight: torch.Tensor, x: torch.Tensor, epilogue: str = "store", threshold: float = 0.0,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
         side_norm: tuple[torch.Tensor, float] | None = None):
    """weight (n, k) @ x (k,) for one token: the product in x's dtype, its ReLU, or the bool mask product >=
    threshold. fp32 sums; reads each weight once in 16-byte loads. norm = (weight, eps): multiply RMSNorm(x)
    instead of x ("store" only); residual (n,): add it to the product ("store" only); side_norm = (weight, eps):
    also return RMSNorm(x) ("relu" only; the predictor's fc1 and ffn_norm read the same residual), as
    (product, normed)."""
    from .cuda import sm_count

    n, k = weight.shape
    out = torch.empty(n, dtype=torch.bool if epilogue == "at_least" else x.dtype, device=x.device)
    normed = torch.empty_like(x) if side_norm is not None else None
    wpr, group, blocks = gemv_launch_shape(n, k, sm_count(x.device.index))
    norm_weight, eps = norm or side_norm or (None, 0.0)
    variant = NORMS["x" if norm is not None else "out" if side_norm is not None else None]
    _launch(f"gemv<{DTYPE_CODES[x.dtype]},{EPILOGUES[epilogue]},{wpr},{variant},{group}>", (blocks,), 256,
            (weight, x, n, k, float(threshold), out, norm_weight, float(eps), residual, normed), x.device,
            shared_mem=2 * k)
    return out if normed is None else (out, normed)


def gemv_launch_shape(n: int, k: int, sms: int) -> tuple[int, int, int]:
    """(warps a row, rows a warp takes at once, blocks) of gemv over an (n, k) matrix on `sms` SMs: the fewest
    warps a row that give every SM a block; with one, as many rows at once as a lane's load slots hold whole
    while every SM still gets a block."""
    wpr = next(w for w in GEMV_WARPS_PER_ROW if w == 8 or n * w // 8 >= sms)
    group = max(r for r in GEMV_ROW_GROUPS
                if r == 1 or (wpr == 1 and k // 8 <= 32 * GEMV_LOADS // r and n // r // 8 >= sms))
    n_groups = -(-n // group)
    return wpr, group, min(-(-n_groups * wpr // 8), GEMV_BLOCKS_PER_SM * sms)


def gemv_reference(weight, x, epilogue="store", threshold=0.0, norm=None, residual=None, side_norm=None):
    if side_norm is not None:
        return gemv_reference(weight, x, epilogue, threshold), rms_norm_reference(x, *side_norm)
    if norm is not None:
        x = rms_norm_reference(x, *norm)
    y = F.linear(x, weight)
    if residual is not None:
        y = residual + y
    return F.relu(y) if epilogue == "relu" else y >= threshold if epilogue == "at_least" else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm over the last dimension of a contiguous x (d a multiple of 8, at most GEMV_MAX_K), one block
    per row."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    _launch(f"rms_norm<{DTYPE_CODES[x.dtype]}>", (x.numel() // d,), NORM_THREADS, (x, weight, d, float(eps), out),
            x.device, shared_mem=2 * d)
    return out


def rms_norm_reference(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


def rope_table(inv_freq: torch.Tensor, scale: float, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """model.rope_cos_sin's (cos, sign-folded sin), (1, hd) each, for one position pos (a (1,) int64 tensor) in
    one launch; inv_freq (hd/2,) contiguous fp32, fp16 or bf16."""
    half = inv_freq.numel()
    cos, sin = torch.empty((2, 1, 2 * half), dtype=dtype, device=pos.device)
    _launch(f"rope_table<{DTYPE_CODES[dtype]}>", (1,), half,
            (inv_freq, DTYPE_CODES[inv_freq.dtype], float(scale), pos, half, cos, sin), pos.device)
    return cos, sin


@functools.cache
def _attention_workspace(device: torch.device, n_heads: int, head_dim: int):
    """Split partials and per-head counters (zero; the kernel leaves them zero), shared by a model's layers."""
    partial = torch.empty(n_heads * ATTENTION_MAX_SPLITS * (head_dim + 2), dtype=torch.float32, device=device)
    return partial, torch.zeros(n_heads, dtype=torch.int32, device=device)


def attention_splits(max_len: int) -> tuple[int, int]:
    """(splits, keys per split) for a cache of max_len positions."""
    splits = max(1, min(ATTENTION_MAX_SPLITS, max_len // ATTENTION_MIN_CHUNK))
    return splits, -(-max_len // splits)


def decode_attention(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int) -> torch.Tensor:
    """Softmax attention (scale 1/sqrt(hd)) of one token over cache positions 0..pos (a (1,) int64 tensor), with
    RoPE on its q and k: qkv holds the token's q (n_heads heads), k and v (n_kv heads each) as wqkv gives them;
    k (with RoPE) and v are written into the caches (1, n_kv, max_len, hd), hd in ATTENTION_HEAD_DIMS, at pos.
    cos and sin as model.rope_cos_sin gives them. Returns (n_heads * hd,). The kernel reads the keys before pos
    ahead of the kernel before it ending, so calls at successive positions must have a torch op between them (as
    decode steps do)."""
    _, n_kv, max_len, hd = k_cache.shape
    splits, chunk = attention_splits(max_len)
    partial, counters = _attention_workspace(qkv.device, n_heads, hd)
    out = torch.empty(n_heads * hd, dtype=qkv.dtype, device=qkv.device)
    _launch(f"decode_attention<{DTYPE_CODES[qkv.dtype]}>", (n_heads, splits), ATTENTION_THREADS,
            (qkv, cos, sin, pos, n_heads, n_kv, hd, max_len, chunk, float(hd ** -0.5), partial, counters, k_cache,
             v_cache, out), qkv.device, shared_mem=4 * (hd + 2) * (ATTENTION_THREADS // (hd // 8)))
    return out


def decode_attention_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int):
    """The model's plain ops: RoPE, the cache write, and SDPA over the cache masked past pos (no host read of pos,
    so a CUDA graph can hold it, as kernels.bench times it)."""
    _, n_kv, max_len, hd = k_cache.shape
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    qk = apply_rope(qkv[: q_dim + kv_dim].view(-1, hd), cos.view(1, hd), sin.view(1, hd))
    k_cache[0, :, pos] = qk[n_heads:].unsqueeze(1)
    v_cache[0, :, pos] = qkv[q_dim + kv_dim:].view(n_kv, 1, hd)
    mask = torch.arange(max_len, device=pos.device)[None, :] <= pos  # (1, max_len): one query
    y = F.scaled_dot_product_attention(qk[:n_heads].view(1, n_heads, 1, hd), k_cache, v_cache, attn_mask=mask,
                                       enable_gqa=n_kv != n_heads)
    return y.reshape(-1)


def greedy_advance(logits: torch.Tensor, token: torch.Tensor, pos: torch.Tensor, ring: torch.Tensor,
                   ring_host: torch.Tensor) -> None:
    """The end of a greedy decode step on the GPU, in one launch (where torch takes ~6 kernels and a copy, ~35 us
    at a 32K vocabulary): token (1 int64) = the argmax of the fp32 logits (n,) as torch.argmax picks it;
    ring[pos % 2] = token (ring: 2 int64) and ring_host (2 int64, pinned) = ring; pos (1 int64) += 1."""
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        layout = "contiguous" if logits.is_contiguous() else "non-contiguous"
        raise ValueError(f"logits: expected contiguous float32, got {layout} {logits.dtype}")
    _launch("greedy_advance", (1,), ARGMAX_THREADS, (logits, logits.numel(), token, pos, ring, ring_host),
            logits.device)


def greedy_advance_reference(logits, token, pos, ring, ring_host) -> None:
    t = torch.argmax(logits).view(1)
    token.view(1).copy_(t)
    ring.index_copy_(0, pos % 2, t)
    ring_host.copy_(ring, non_blocking=True)
    pos.add_(1)


# ---------------------------------------------------------------- the model's modules on the kernels

def _fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels take x: contiguous fp16/bf16 on CUDA, 16-byte aligned, weights of its dtype."""
    return (x.is_cuda and x.dtype in HALF_DTYPES and x.is_contiguous() and x.data_ptr() % 16 == 0
            and all(w.dtype == x.dtype and w.is_contiguous() for w in weights))


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    k = weight.shape[1]
    return k % 8 == 0 and k <= GEMV_MAX_K and weight.data_ptr() % 16 == 0


class FusedRMSNorm(RMSNorm):
    def forward(self, x):
        d = x.shape[-1]
        if not _fits(x, self.weight) or d % 8 or d > GEMV_MAX_K:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


class FusedBlock(Block):
    def attention_residual(self, x, cos, sin, input_pos, kv_len, mask=None):
        """x + attention(attention_norm(x)) for one token in three kernels: attention_norm inside the wqkv product,
        attention with RoPE and the KV write, and wo with the residual added."""
        attn, cache, norm = self.attention, self.attention.kv_cache, self.attention_norm
        if (mask is None or x.numel() != x.shape[-1] or cache is None
                or not _fits(x, attn.wqkv.weight, attn.wo.weight, norm.weight, cos, sin)
                or not _gemv_fits(x, attn.wqkv.weight) or not _gemv_fits(x, attn.wo.weight)
                or cache.k.shape[0] != 1 or cache.k.dtype != x.dtype or attn.head_dim not in ATTENTION_HEAD_DIMS
                or cos.data_ptr() % 16 or sin.data_ptr() % 16
                or input_pos.dtype != torch.int64):
            return super().attention_residual(x, cos, sin, input_pos, kv_len, mask)
        qkv = gemv(attn.wqkv.weight, x.view(-1), norm=(norm.weight, norm.eps))
        y = decode_attention(qkv, cos, sin, input_pos, cache.k, cache.v, attn.n_heads)
        return gemv(attn.wo.weight, y, residual=x.view(-1)).view(x.shape)

    def ffn_inputs(self, h):
        """One token with a fused predictor: ffn_norm comes out of the predictor's fc1 launch."""
        predictor, norm = self.predictor, self.ffn_norm
        if not isinstance(predictor, FusedPredictor) or not predictor.fits(h) or not _fits(h, norm.weight):
            return super().ffn_inputs(h)
        active, x_ffn = predictor.forward_with_norm(h, norm)
        return x_ffn, active


class FusedPredictor(Predictor):
    def fits(self, p) -> bool:
        """Whether the kernels take p: one token, fp16/bf16 on CUDA like the weights, k within the gemv's."""
        w1, w2 = self.fc1.weight, self.fc2.weight
        return p.numel() == p.shape[-1] and _fits(p, w1, w2) and _gemv_fits(p, w1) and _gemv_fits(p, w2)

    def forward(self, p):
        if not self.fits(p):
            return super().forward(p)
        return self.mask(gemv(self.fc1.weight, p.view(-1), "relu"), p)

    def forward_with_norm(self, p, norm: RMSNorm):
        """(active mask, norm(p)) for a p that `fits`: fc1's launch also writes the norm (it reads p anyway)."""
        hidden, normed = gemv(self.fc1.weight, p.view(-1), "relu", side_norm=(norm.weight, norm.eps))
        return self.mask(hidden, p), normed.view(p.shape)

    def mask(self, hidden, p):
        return gemv(self.fc2.weight, hidden, "at_least", self.threshold).view(*p.shape[:-1], -1)


class FusedTransformer(Transformer):
    def rope(self, input_pos, dtype):
        """One position: cos and sin in one launch (rope_cos_sin takes ~10 small kernels); dynamic NTK, whose
        base grows with the position, stays on the model's code."""
        if (input_pos.numel() != 1 or not input_pos.is_cuda or input_pos.dtype != torch.int64
                or dtype not in HALF_DTYPES or (self.config.rope_scaling or {}).get("rope_type") == "dynamic"
                or self.inv_freq.device != input_pos.device or not self.inv_freq.is_contiguous()
                or self.inv_freq.dtype not in DTYPE_CODES or self.inv_freq.numel() > 1024):  # a block's threads
            return super().rope(input_pos, dtype)
        return rope_table(self.inv_freq, self.rope_scale, input_pos, dtype)


FUSED = {RMSNorm: FusedRMSNorm, Block: FusedBlock, Predictor: FusedPredictor, Transformer: FusedTransformer}


def use_decode_kernels(model) -> int:
    """Switch the model's RMSNorm, Block, Predictor and Transformer modules to their fused subclasses, in place (same
    parameters, buffers and hooks); returns how many were switched. Modules added later (predictors attached
    after this call) keep their class."""
    switched = 0
    for module in model.modules():
        fused = FUSED.get(type(module))
        if fused is not None:
            module.__class__ = fused
            switched += 1
    return switched
