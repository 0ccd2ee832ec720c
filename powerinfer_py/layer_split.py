"""llama.cpp's offload strategy (`-ngl N`): whole layers on the GPU, the rest on the CPU.

The first `n_gpu_layers` blocks (and the token embedding) live on the GPU in the model's dtype; the other
blocks, the final norm and the output head live on the CPU in float32, because PyTorch's half-precision CPU
matrix-vector products run at a fraction of memory bandwidth (shared/docs/device-facts.md). The hidden state
crosses to the CPU once per forward, at the first CPU block. llama.cpp offloads the *last* N layers instead of
the first; the bytes each side reads per token are the same. The CPU blocks cannot be captured in a CUDA graph:
decode with Generator(..., use_cuda_graph=False).

This is the baseline the hybrid engine is measured against: the same checkpoint, the same budget."""
from __future__ import annotations

import torch

from solver.ledger import GRAPH_WORKSPACE_BYTES, workspace_bytes

from .engine import DTYPE_NAMES
from .errors import BudgetError, InputError
from .loader import Checkpoint, build_model, device_state
from .model import Transformer


def block_bytes(cfg, dtype, ctx_len: int) -> int:
    """GPU bytes of one block: its weights and its KV cache of ctx_len positions."""
    q_dim = cfg.n_heads * cfg.head_dim
    params = 2 * cfg.dim + 2 * q_dim * cfg.dim + 2 * cfg.kv_dim * cfg.dim + 3 * cfg.dim * cfg.n_ff
    return (params + 2 * cfg.kv_dim * ctx_len) * dtype.itemsize


def gpu_layers_for_budget(cfg, budget: int, dtype=torch.float16, ctx_len: int = 2048) -> int:
    """The most leading blocks that fit `budget` beside the embedding and the decode workspace (and the output
    head and CUDA-graph workspace, when every block fits): what a llama.cpp user finds by trying -ngl values."""
    fixed = (cfg.vocab_size * cfg.dim * dtype.itemsize
             + workspace_bytes(cfg, DTYPE_NAMES[dtype], ctx_len, 1, 0) + 4 * cfg.vocab_size)
    head = (cfg.dim + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)) * dtype.itemsize + GRAPH_WORKSPACE_BYTES
    per_block = block_bytes(cfg, dtype, ctx_len)
    if fixed + cfg.n_layers * per_block + head <= budget:
        return cfg.n_layers
    if budget < fixed:
        raise BudgetError(f"VRAM budget of {budget} bytes cannot hold even the token embedding and workspace "
                          f"({fixed} bytes)")
    return min(cfg.n_layers - 1, (budget - fixed) // per_block)


def build_layer_split(ckpt: Checkpoint, n_gpu_layers: int, dtype=torch.float16, device="cuda",
                      cpu_dtype=torch.float32) -> Transformer:
    """A Transformer whose first n_gpu_layers blocks run on `device` in `dtype` and the rest on the CPU in
    `cpu_dtype` (with device='cpu' both sides run on the CPU: the tests use it)."""
    cfg = ckpt.config
    if not 0 <= n_gpu_layers <= cfg.n_layers:
        raise InputError(f"--gpu-layers {n_gpu_layers}: the model has {cfg.n_layers} layers")
    if n_gpu_layers == cfg.n_layers:
        return build_model(ckpt, device=device, dtype=dtype)
    on_gpu = {"tok_embeddings.weight"} if n_gpu_layers else set()
    on_gpu |= {name for name in ckpt.tensors if name.startswith("layers.")
               and int(name.split(".")[1]) < n_gpu_layers}
    model = build_model(ckpt, device="cpu", dtype=cpu_dtype, skip=on_gpu)
    if cfg.tie_embeddings and on_gpu:  # the output head keeps its own CPU copy of the shared matrix
        model.output.weight = torch.nn.Parameter(ckpt.tensors["tok_embeddings.weight"].to(cpu_dtype))
    model.load_state_dict(device_state(ckpt, on_gpu, device, dtype), strict=False, assign=True)
    if on_gpu:
        model.inv_freq = model.inv_freq.to(device)
    for block in model.layers[n_gpu_layers:]:
        block.register_forward_pre_hook(_move_inputs(torch.device("cpu"), cpu_dtype))
    return model


def _move_inputs(device, dtype):
    """A pre-hook that brings a block's inputs (hidden state, RoPE tables, positions, mask) to its device and
    dtype; for every block after the first CPU one the hidden state is already there."""
    def hook(block, args):
        return tuple(a.to(device, dtype) if torch.is_tensor(a) and a.is_floating_point()
                     else a.to(device) if torch.is_tensor(a) else a for a in args)
    return hook
