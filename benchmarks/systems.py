"""The systems the suite compares, each measured the same way on the same checkpoint and budget:

- hybrid: this engine (hot neurons on the GPU, cold ones on the CPU) with the placement solved for the budget;
- layer_split: the dense runtime with whole layers split at the budget (llama.cpp's -ngl);
- accelerate: transformers' LlamaForCausalLM dispatched by accelerate with device_map="auto" and max_memory
  set to the budget (what from_pretrained(device_map="auto", max_memory=...) builds);
- dense: the dense runtime entirely on the GPU (the ceiling without offload), where the model fits;
- bound: the modelled decode time of the hybrid placement (solver.timing) with the bandwidths of this run.

Each returns one row (a dict). Timing: one warm-up generation (graph capture, allocator, caches) that is not
counted, then REPEATS generations of the same prompt; prompt and decode speeds are the medians. The number of
new tokens is chosen from the warm-up so that a system fits its time box (slow offload gets a few tokens)."""
from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time

import numpy as np
import torch

from kernels import FFNRows
from powerinfer_py.engine import DTYPE_NAMES, build_hybrid
from powerinfer_py.formats import write_gpuidx
from powerinfer_py.formats.hf import HF_TO_INTERNAL, rename
from powerinfer_py.generate import Generator
from powerinfer_py.hybrid import split_rows
from powerinfer_py.layer_split import build_layer_split, gpu_layers_for_budget
from powerinfer_py.loader import build_model
from solver import PlacementProblem, solve_placement, vram_ledger

CTX = 512  # KV cache length of every system (PowerInfer's default context)
PROMPT_TOKENS = 64
REPEATS = 3
WARMUP_TOKENS = 4
MIN_NEW, MAX_NEW = 4, 128
INTERNAL_TO_HF = {v: k for k, v in HF_TO_INTERNAL.items()}


def free_memory() -> int:
    """Free what earlier systems left and restart the peak count; returns the bytes still allocated (earlier
    systems' cuBLAS workspaces, one per stream, stay for the process's life), the baseline of peak_gpu_bytes."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_tokens(prompt_s: float, token_s: float, time_box: float) -> int:
    """Tokens per timed generation so that REPEATS of them take about time_box seconds."""
    per_run = time_box / REPEATS - prompt_s
    return int(min(MAX_NEW, CTX - PROMPT_TOKENS, max(MIN_NEW, 1 + per_run / max(token_s, 1e-6))))


def summarize(runs: list[dict], new: int) -> dict:
    """Medians of the runs' prompt and decode speeds (decode counts the steps after the prefill's token)."""
    return {"prompt_tps": statistics.median(r["prompt_tokens"] / r["prompt_s"] for r in runs),
            "decode_tps": statistics.median(r["decode_steps"] / r["decode_s"] for r in runs),
            "new_tokens": new, "runs": runs}


def time_generator(model, prompt: list[int], time_box: float, use_graph: bool = True) -> dict:
    """The runtime's Generator (dense, layer split or hybrid)."""
    gen = Generator(model, CTX, use_cuda_graph=use_graph)
    gen.generate(prompt, WARMUP_TOKENS)  # compiles the kernels and captures the decode graphs
    _, warm = gen.generate(prompt, WARMUP_TOKENS)  # the speed estimate, without them (they take ~0.5 s)
    new = new_tokens(warm.prompt_seconds, warm.generate_seconds / (WARMUP_TOKENS - 1), time_box)
    runs = []
    for _ in range(REPEATS):
        _, s = gen.generate(prompt, new)
        runs.append({"prompt_tokens": s.prompt_tokens, "prompt_s": s.prompt_seconds, "decode_s": s.generate_seconds,
                     "decode_steps": s.generated_tokens - 1})
    return summarize(runs, new)


def time_hf(model, prompt: list[int], time_box: float) -> dict:
    """transformers' generate, greedy; the prefill is timed as a one-token generation and subtracted from a
    full one (as benchmarks/dense_decode.py does)."""
    ids = torch.tensor([prompt], device=model.device)

    def seconds(n):
        _sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync()
        return time.perf_counter() - t0

    seconds(1)  # warm-up
    prompt_s = seconds(1)
    new = new_tokens(prompt_s, seconds(2) - prompt_s, time_box)
    runs = []
    for _ in range(REPEATS):
        prompt_s = seconds(1)
        runs.append({"prompt_tokens": len(prompt), "prompt_s": prompt_s, "decode_s": seconds(new) - prompt_s,
                     "decode_steps": new - 1})
    return summarize(runs, new)


def peak_gpu_bytes(base: int) -> int | None:
    """The system's GPU memory: the peak allocated since free_memory() returned `base`, less `base`."""
    return torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------- systems

def engine_ledger(ckpt, predictors, gpu_weight_type: str, dtype=torch.float16):
    """The ledger build_hybrid charges (same arguments), to place and bound before anything is loaded."""
    ranks = [p["fc1.weight"].shape[0] for p in predictors]
    return vram_ledger(ckpt.config, DTYPE_NAMES[dtype], gpu_weight_type, CTX, 1, ranks, embeddings_on_gpu=True)


def solve(ledger, counts, tokens: float, budget: int, bandwidths, time_limit: float):
    """The engine's placement for `budget` (coverage objective, as `powerinfer-py run` solves it)."""
    problem = PlacementProblem(counts, ledger, budget, bandwidths=bandwidths, tokens=tokens)
    return problem, solve_placement(problem, "coverage", time_limit=time_limit)


def hybrid(ckpt, budget: int, predictors, threshold: float, masks, gpuidx: str, gpu_weight_type: str,
           prompt, time_box: float, device, dtype=torch.float16, after_timing=None) -> dict:
    """This engine, reading the placement from a PowerInfer .gpuidx written for the budget. The peak GPU memory
    covers loading and generation (a `powerinfer-py run`); after_timing(model) runs afterwards (perplexity: its
    windows' full logits are evaluation's memory, not the engine's)."""
    write_gpuidx(gpuidx, masks, budget, force=True)
    base = free_memory()
    t0 = time.perf_counter()
    setup = build_hybrid(ckpt, device, dtype if device == "cuda" else torch.float32, budget, predictors, threshold,
                         gpu_weight_type=gpu_weight_type, ctx_len=CTX, gpuidx=gpuidx)
    build_s = time.perf_counter() - t0
    row = time_generator(setup.model, prompt, time_box)
    row["gpu_peak_bytes"] = peak_gpu_bytes(base)
    if setup.counters is not None:
        row["gpu_hit_rate"] = setup.counters.hit_rate  # of the timed generations (and their warm-up)
    extra = after_timing(setup.model) if after_timing else {}
    hot = sum(int(np.sum(m)) for m in setup.placement_masks)
    total = ckpt.config.n_layers * ckpt.config.n_ff
    row.update(extra, build_s=build_s, placement=setup.placement_source, gpu_neuron_share=hot / total)
    row["cold_row_type"] = next((layer.feed_forward.cpu_rows.weight_type for layer in setup.model.layers
                                 if getattr(layer.feed_forward, "cpu_rows", None) is not None), None)
    return row, setup


def layer_split(ckpt, budget: int, prompt, time_box: float, device, dtype=torch.float16) -> dict:
    base = free_memory()
    n = gpu_layers_for_budget(ckpt.config, budget, dtype, CTX)
    t0 = time.perf_counter()
    model = build_layer_split(ckpt, n, dtype, device) if device == "cuda" else \
        build_layer_split(ckpt, n, torch.float32, "cpu")
    build_s = time.perf_counter() - t0
    row = time_generator(model, prompt, time_box, use_graph=n == ckpt.config.n_layers)
    row.update(build_s=build_s, gpu_layers=n, gpu_peak_bytes=peak_gpu_bytes(base))
    return row


def hf_model(ckpt, dtype=torch.float16):
    """transformers' LlamaForCausalLM holding the checkpoint's own tensors (no copy to disk, no random init)."""
    import accelerate
    import transformers

    with accelerate.init_empty_weights():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config.to_hf()))
    state = {rename(name, INTERNAL_TO_HF): t.to(dtype) for name, t in ckpt.tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def accelerate_offload(ckpt, budget: int, prompt, time_box: float, dtype=torch.float16) -> dict:
    """device_map="auto" with max_memory={GPU: budget, CPU: all RAM}: accelerate keeps the layers that do not
    fit on the CPU and copies their weights to the GPU for every forward."""
    import accelerate

    base = free_memory()
    t0 = time.perf_counter()
    model = hf_model(ckpt, dtype)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device_map = accelerate.infer_auto_device_map(model, max_memory={0: budget, "cpu": ram}, dtype=dtype,
                                                  no_split_module_classes=model._no_split_modules)
    model = accelerate.dispatch_model(model, device_map)
    build_s = time.perf_counter() - t0
    row = time_hf(model, prompt, time_box)
    placed = list(device_map.values())
    row.update(build_s=build_s, modules_on_gpu=sum(d == 0 for d in placed),
               modules_offloaded=sum(d == "cpu" for d in placed), gpu_peak_bytes=peak_gpu_bytes(base))
    return row


def dense(ckpt, prompt, time_box: float, device, dtype=torch.float16) -> dict:
    base = free_memory()
    t0 = time.perf_counter()
    model = build_model(ckpt, device=device, dtype=dtype if device == "cuda" else torch.float32)
    build_s = time.perf_counter() - t0
    row = time_generator(model, prompt, time_box)
    row.update(build_s=build_s, gpu_peak_bytes=peak_gpu_bytes(base))
    return row


def cold_row_type(gpu_weight_type: str) -> str:
    """The layout the engine keeps cold rows in on the CPU (asked of hybrid.split_rows on a tiny layer)."""
    w = torch.randn(4, 32)
    return split_rows(w, w, w.T, np.zeros(4, dtype=bool), "cpu", gpu_weight_type)[1].weight_type


def bound(problem, masks, bandwidths, cold_type: str) -> dict:
    """The modelled decode speed of `masks` (solver.timing.TokenModel), with the cold rows read in `cold_type`
    (the problem's time model is set to it): in the engine's order, per layer its dense bytes / GPU bandwidth
    + max(hot FFN bytes / GPU bandwidth, active cold bytes / CPU bandwidth + hand-off), summed, plus the output
    head (decode_tps); and issue #7's stricter bound, per layer max(all its GPU bytes / GPU bandwidth, active
    cold bytes / CPU bandwidth + hand-off) (overlap_decode_tps)."""
    per_neuron = FFNRows.bytes_per_neuron(problem.ledger.config.dim, cold_type, device="cpu")
    problem.timing = dataclasses.replace(problem.timing, cpu_bytes_per_neuron=per_neuron,
                                         cpu_s_per_neuron=per_neuron / bandwidths.cpu)
    placement = problem.placement(masks, "coverage", "given", None, 0.0)
    return {"decode_tps": placement.tokens_per_s, "token_time_s": placement.token_time_s,
            "overlap_decode_tps": 1.0 / placement.overlap_token_time_s,
            "cold_row_type": cold_type, "modelled_hit_rate": placement.hit_rate,
            "cpu_bytes_per_token": float(placement.cpu_bytes_per_token.sum()),
            "layer_time_s": placement.layer_time_s.tolist()}
