"""Hybrid GPU-CPU inference under a VRAM budget (PowerInfer's main job).

Attention, norms, the output head, predictors and the KV cache live on the GPU (the ledger charges every
byte); each layer's FFN neurons are split by the placement: hot rows on the GPU, cold rows on the CPU, both
computed per token from the same predictor mask (hybrid.py). The placement comes from a `.gpuidx` file
(PowerInfer's format, cached next to the model like PowerInfer) or is solved from activation counts."""
from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from kernels import get_backend
from kernels.cpu import native_library
from solver.ledger import format_bytes, parse_budget, vram_ledger
from solver.placement import PlacementProblem, solve_placement

from .errors import BudgetError, InputError, PowerInferError
from .formats import (
    default_gpuidx_path,
    load_activations,
    load_predictors,
    profiled_tokens,
    read_gpuidx,
    write_gpuidx,
)
from .hybrid import HostBuffers, HybridCounters, HybridFeedForward, split_rows
from .loader import Checkpoint, build_model, install_predictors
from .model import FeedForward

FFN_WEIGHTS = ("w_gate", "w_up", "w_down")
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
FREE_VRAM_MARGIN = 512 << 20  # left free when no budget is given (CUDA context, allocator slack)


def add_hybrid_args(p) -> None:
    g = p.add_argument_group("hybrid GPU-CPU inference (used when --vram-budget or --predictors is given)")
    g.add_argument("--vram-budget", default=None,
                   help="GPU bytes the engine may use, e.g. 6GiB, 512MiB, or a bare number of GiB; "
                        "'free' = free VRAM minus a margin")
    g.add_argument("--predictors", default=None, help="predictor folder (model_<i>.pt) for an HF checkpoint")
    g.add_argument("--activation", default=None, help="activation counts folder (default: MODEL_DIR/activation)")
    g.add_argument("--gpuidx", default=None, help="GPU index file (default: MODEL.generated.gpuidx)")
    g.add_argument("--reset-gpu-index", action="store_true", help="solve the placement again, even if cached")
    g.add_argument("--gpu-weight-type", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="storage of hot FFN rows on the GPU (default: the model dtype)")
    g.add_argument("--objective", default="coverage", choices=["coverage", "latency"])


@dataclass
class HybridSetup:
    model: torch.nn.Module
    ledger: object
    placement_masks: list
    budget: int
    counters: HybridCounters | None
    placement_source: str


def default_activation_dir(model_path: str) -> str:
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    return os.path.join(folder, "activation")


def resolve_budget(text: str | None, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if text is None or text == "free":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free - FREE_VRAM_MARGIN, 0)
    return parse_budget(text)


def get_predictors(ckpt: Checkpoint, folder: str | None):
    """(per-layer predictor state dicts, threshold): from --predictors, else from the file (PowerInfer GGUF)."""
    cfg = ckpt.config
    if folder:
        return load_predictors(folder, cfg.n_layers, cfg.dim, cfg.n_ff)
    if ckpt.predictors:
        return ckpt.predictors, cfg.sparse_threshold
    raise InputError(f"{ckpt.path}: has no predictors; give --predictors DIR (see `powerinfer-py train-predictors`)")


def get_placement(ckpt: Checkpoint, ledger, budget: int, gpuidx: str | None, activation: str | None,
                  reset: bool, objective: str, log=None):
    """(gpu masks per layer, where they came from). A cached index is reused only if it was solved for this
    budget; otherwise the placement is solved from activation counts and the cache rewritten atomically."""
    cfg = ckpt.config
    path = gpuidx or default_gpuidx_path(ckpt.path)
    if os.path.exists(path) and not reset:
        masks, capacity = read_gpuidx(path, cfg.n_layers, cfg.n_ff)
        hot = sum(int(m.sum()) for m in masks)
        if capacity == budget and hot * ledger.ffn_bytes_per_neuron <= ledger.ffn_budget(budget):
            return [np.asarray(m, dtype=bool) for m in masks], f"cached {path}"
        if gpuidx:  # the user named this index: use it if it fits, never silently replace it
            if hot * ledger.ffn_bytes_per_neuron > ledger.ffn_budget(budget):
                raise BudgetError(f"{path}: places {hot} neurons ({format_bytes(hot * ledger.ffn_bytes_per_neuron)}),"
                                  f" more than the {format_bytes(ledger.ffn_budget(budget))} the budget leaves for FFN")
            return [np.asarray(m, dtype=bool) for m in masks], f"given {path}"
    folder = activation or default_activation_dir(ckpt.path)
    counts = load_activations(folder, cfg.n_layers, cfg.n_ff)
    problem = PlacementProblem(counts, ledger, budget, tokens=profiled_tokens(folder))
    placement = solve_placement(problem, objective, time_limit=30.0)
    masks = [m.numpy().astype(bool) for m in placement.gpu_masks]
    if os.path.exists(path) and log:  # PowerInfer's cache: re-solved for a new budget, and said so
        log(f"placement: {path} was solved for another budget or --reset-gpu-index was given; replacing it")
    try:
        write_gpuidx(path, masks, budget, force=True)
        source = f"solved ({placement.status}, {placement.solve_time_s:.2f} s), cached in {path}"
    except (OSError, PowerInferError) as e:  # a read-only model folder: run anyway, say so
        source = f"solved ({placement.status}); could not cache it in {path}: {e}"
    if log:
        log(f"placement: modelled GPU hit rate {placement.hit_rate:.1%}, {int(placement.hot_neurons.sum())} hot neurons")
    return masks, source


def build_hybrid(ckpt: Checkpoint, device, dtype, budget: int | None = None, predictors=None, threshold=0.0,
                 gpu_masks=None, gpu_weight_type: str | None = None, ctx_len: int = 2048,
                 gpuidx: str | None = None, activation: str | None = None, reset: bool = False,
                 objective: str = "coverage", log=None, choose_dense_when_all_fits: bool = True) -> HybridSetup:
    """The model with hybrid FFNs. Without CUDA every neuron is a CPU neuron (the same engine, all on the CPU).
    gpu_masks overrides the placement (tests, benchmarks). When every neuron fits on the GPU, the sparse and the
    dense FFN are both timed and the faster one kept."""
    cfg = ckpt.config
    device = torch.device(device)
    dense_type = DTYPE_NAMES[dtype]
    ranks = [p["fc1.weight"].shape[0] for p in predictors] if predictors else None
    ledger = vram_ledger(cfg, dense_type, gpu_weight_type or dense_type, ctx_len, 1, ranks, embeddings_on_gpu=True)
    if device.type == "cuda":
        ledger.ffn_budget(budget)  # raises a BudgetError that says what fits, before anything is loaded
        if gpu_masks is None:
            gpu_masks, source = get_placement(ckpt, ledger, budget, gpuidx, activation, reset, objective, log)
        else:
            source = "given"
    else:
        gpu_masks, source = [np.zeros(cfg.n_ff, dtype=bool)] * cfg.n_layers, "no CUDA: all neurons on the CPU"
    ffn_names = {f"layers.{i}.feed_forward.{w}.weight" for i in range(cfg.n_layers) for w in FFN_WEIGHTS}
    all_gpu = device.type == "cuda" and all(np.all(m) for m in gpu_masks)
    # with every neuron on the GPU the hit rate is 100% by construction: no counting kernels in the step
    counters = HybridCounters(device) if device.type == "cuda" and not all_gpu else None
    try:
        model = build_model(ckpt, device=device, dtype=dtype, skip=ffn_names)
        if predictors:
            install_predictors(model, predictors, threshold)
        install_hybrid_ffns(model, ckpt, gpu_masks, device, gpu_weight_type or dense_type, counters)
        if all_gpu and choose_dense_when_all_fits \
                and budget >= ledger.dense_bytes + 2 * ledger.ffn_bytes_per_neuron * cfg.n_layers * cfg.n_ff:
            source += "; " + keep_faster_full_gpu_ffn(model, ckpt, gpu_masks, gpu_weight_type or dense_type)
        if counters is not None:
            counters.reset()  # count the user's tokens only
    except torch.OutOfMemoryError:
        model = None
        torch.cuda.empty_cache()
        raise BudgetError(f"CUDA ran out of memory while loading under a {format_bytes(budget)} budget "
                          f"(the GPU has {format_bytes(torch.cuda.mem_get_info(device)[0])} free now); "
                          "try a smaller --vram-budget") from None
    return HybridSetup(model, ledger, gpu_masks, budget or 0, counters, source)


def install_hybrid_ffns(model, ckpt: Checkpoint, gpu_masks, device, gpu_weight_type: str, counters) -> None:
    """Replace each layer's FFN with a HybridFeedForward over the checkpoint's rows, split by gpu_masks."""
    cfg = ckpt.config
    host = HostBuffers(cfg.dim, cfg.n_ff, model.tok_embeddings.weight.dtype) if device.type == "cuda" else None
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}.feed_forward."
        gpu_rows, cpu_rows = split_rows(ckpt.tensors[p + "w_gate.weight"], ckpt.tensors[p + "w_up.weight"],
                                        ckpt.tensors[p + "w_down.weight"], np.asarray(gpu_masks[i], dtype=bool),
                                        device, gpu_weight_type)
        layer.feed_forward = HybridFeedForward(gpu_rows, cpu_rows, cfg.n_ff, cfg.ffn_act, cfg.ffn_threshold,
                                               device, host, counters)
    split = [layer.feed_forward for layer in model.layers if layer.feed_forward.splits]
    model.handoff = None
    # the hand-off needs the C kernels and CuPy; without them decode hands off layer by layer, eagerly
    if split and native_library() is not None and get_backend("cuda").name == "cuda":
        from kernels.handoff import Handoff

        model.handoff = Handoff([ff.cpu_rows for ff in split], cfg.dim, cfg.n_ff, host.dtype, cfg.ffn_act,
                                cfg.ffn_threshold, device, counters.add_host_step)
        for slot, ff in enumerate(split):
            ff.handoff, ff.slot = model.handoff, slot


def decode_tps(model, tokens: int = 32) -> float:
    """Decode tokens/s of `model` (CUDA graphs, after a warm-up), for choosing between FFN implementations."""
    from .generate import Generator

    gen = Generator(model, max_len=64)
    gen.generate(list(range(3, 11)), 8)
    return gen.generate(list(range(3, 11)), tokens)[1].generate_tps


def keep_faster_full_gpu_ffn(model, ckpt: Checkpoint, gpu_masks, gpu_weight_type: str) -> str:
    """Every neuron fits on the GPU with room for a second copy of the FFN: time the sparse FFNs (predictors +
    sparse kernels) against the dense FFNs (no predictors, exact), and keep the faster."""
    sparse_tps = decode_tps(model)
    predictors = [layer.predictor for layer in model.layers]
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    for i, layer in enumerate(model.layers):
        layer.feed_forward, layer.predictor = None, None
        torch.cuda.empty_cache()
        with torch.device("meta"):
            dense = FeedForward(ckpt.config)
        dense.load_state_dict({w + ".weight": ckpt.tensors[f"layers.{i}.feed_forward.{w}.weight"].to(device, dtype)
                               for w in FFN_WEIGHTS}, assign=True)
        layer.feed_forward = dense
    gc.collect()  # the timing's CUDA graphs hold memory until collected
    torch.cuda.empty_cache()
    dense_tps = decode_tps(model)
    if dense_tps >= sparse_tps:
        return f"all neurons fit: dense FFN kept ({dense_tps:.0f} tok/s against sparse {sparse_tps:.0f})"
    for layer, predictor in zip(model.layers, predictors):
        layer.feed_forward, layer.predictor = None, predictor
    gc.collect()
    torch.cuda.empty_cache()
    install_hybrid_ffns(model, ckpt, gpu_masks, device, gpu_weight_type, None)
    return f"all neurons fit: sparse FFN kept ({sparse_tps:.0f} tok/s against dense {dense_tps:.0f})"


def run_hybrid(args) -> int:
    """`powerinfer-py run --vram-budget ...`: load, place, generate, and report every figure on stderr."""
    from .cli import require_tokenizer, resolve_device_dtype
    from .generate import Generator
    from .loader import load_checkpoint
    from .sampling import SamplingParams
    from .text import TextStream

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    device, dtype = resolve_device_dtype(args)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.model)
    predictors, threshold = get_predictors(ckpt, args.predictors)
    budget = resolve_budget(args.vram_budget, device)
    cfg = ckpt.config
    ctx = min(cfg.max_seq_len, args.ctx or 2048)
    setup = build_hybrid(ckpt, device, dtype, budget, predictors, threshold, gpu_weight_type=args.gpu_weight_type,
                         ctx_len=ctx, gpuidx=args.gpuidx, activation=args.activation, reset=args.reset_gpu_index,
                         objective=args.objective, log=log)
    del ckpt.tensors  # the CPU keeps only its cold rows (packed by build_hybrid)
    load_s = time.perf_counter() - t0
    tok = require_tokenizer(ckpt)
    ids = tok.encode(tok.apply_chat(args.prompt) if args.chat else args.prompt)
    gen = Generator(setup.model, max_len=ctx, use_cuda_graph=not args.no_cuda_graph)
    params = SamplingParams(args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty, seed=args.seed)
    stream = TextStream(tok, sys.stdout)
    _, stats = gen.generate(ids, args.n_predict, params, eos_ids=tok.eos_ids, on_token=stream.push)
    stream.close()
    report(setup, stats, load_s, log)
    return 0


@torch.inference_mode()
def predictor_seconds(model, reps: int = 20) -> float:
    """GPU time of all layers' predictors for one token, replayed as one CUDA graph (as they run in decode)."""
    preds = [layer.predictor for layer in model.layers if layer.predictor is not None]
    device = model.tok_embeddings.weight.device
    if not preds or device.type != "cuda":
        return float("nan")
    p = torch.randn(1, 1, model.config.dim, device=device, dtype=model.tok_embeddings.weight.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for pred in preds:
            pred(p)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for pred in preds:
            pred(p)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def report(setup: HybridSetup, stats, load_s: float, log) -> None:
    hot = sum(int(np.sum(m)) for m in setup.placement_masks)
    total = len(setup.placement_masks) * setup.ledger.config.n_ff
    log(f"load: {load_s:.2f} s; placement: {setup.placement_source}")
    if setup.budget:
        log("ledger:\n  " + setup.ledger.table(setup.budget, hot).replace("\n", "\n  "))
        log(f"max GPU memory allocated: {format_bytes(torch.cuda.max_memory_allocated())}")
    log(f"FFN neurons on GPU: {hot}/{total} ({hot / total:.1%})")
    log(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s; "
        f"generation: {stats.generated_tokens} tokens, {stats.generate_tps:.1f} tok/s")
    if setup.counters is not None:
        wall = stats.prompt_seconds + stats.generate_seconds
        token_s = 1 / stats.generate_tps if stats.generate_tps else float("nan")
        log(f"GPU hit rate (active neurons served on the GPU): {setup.counters.hit_rate:.1%}; "
            f"CPU share of token time: {setup.counters.cpu_seconds / wall:.1%}; "
            f"predictor share of token time: {predictor_seconds(setup.model) / token_s:.1%}")
    elif setup.budget:
        log("GPU hit rate: 100% (every FFN neuron on the GPU); CPU share of token time: 0%")
