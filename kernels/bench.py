"""Benchmark of the sparse FFN kernels: `python -m kernels.bench [--cpu-only] [--cpu-compare] [--json PATH]`.

For Llama-2-7B (d 4096, n_ff 11008) and 70B (8192, 28672) FFN shapes, at 5-50% active rows, one token:
- GPU: time per sparse_ffn call (CUDA-graph replay, L2 flushed before every call and the flush's own time
  subtracted) and its bandwidth on the bytes it must move (active rows, x, y, mask, index, h), against a
  device-to-device copy measured in the same run; the dense cuBLAS products of the same matrices and the torch
  gather-then-matmul reference beside it; a token sweep for the dense-GEMM switch, the down kernel's split sweep
  and the one-launch sweep for the one-token FFN; the GPU-CPU hand-off of a decode step, per layer.
- CPU: the CPU backend (its C kernels, and its torch path) against a plain read of the same number of bytes,
  the dense fp32 products and the gather-then-matmul reference, caches flushed before every call; f32 rows,
  or with --cpu-compare every weight type, the candidate kernels that lost, and a token sweep.
Inputs are random (never zeros), fresh per call set.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time

import torch

from . import (
    FFNRows,
    get_backend,
    sparse_down,
    sparse_ffn,
    sparse_ffn_reference,
    sparse_gate_up,
)
from .cases import random_mask
from .rows import FLOAT_DTYPES, stride_bytes

SHAPES = {"7B": (4096, 11008), "70B": (8192, 28672)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
ROWS_PER_CALL = 8  # distinct inputs per timed graph, so no call finds its rows in L2 from the one before


# ---------------------------------------------------------------- GPU

def _capture(body, warm_up=None):
    """A CUDA graph of body(), after one warm-up run (body itself unless given) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (warm_up or body)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _replay_ms(graph, reps=15):
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class GpuTimer:
    """Seconds per step(i), i over ROWS_PER_CALL input sets, L2 flushed before each step by reading twice its
    size (a read leaves clean lines: a write flush would make the step pay for writing them back)."""

    def __init__(self):
        props = torch.cuda.get_device_properties(0)
        self.scratch = torch.randn(2 * props.L2_cache_size // 4, device="cuda")
        self.total = torch.empty((), device="cuda")
        flushes = _capture(lambda: [torch.sum(self.scratch, 0, out=self.total) for _ in range(ROWS_PER_CALL)])
        self.flush_ms = _replay_ms(flushes)

    def seconds(self, step):
        def body():
            for i in range(ROWS_PER_CALL):
                torch.sum(self.scratch, 0, out=self.total)
                step(i)
        return max(_replay_ms(_capture(body)) - self.flush_ms, 1e-6) / ROWS_PER_CALL / 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB by a kernel (a graph would turn copy_ into a slower memcpy node),
    bytes read plus written per second."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = _replay_ms(_capture(lambda: torch.mul(src, 1.0, out=dst)))
    return 2 * src.numel() * 4 / (ms / 1e3)


def random_rows(d, n_ff, weight_type, device="cuda"):
    """A whole layer's rows in the packed layout, random values (quantized: random blocks, sane scales)."""
    def matrix():
        if weight_type in FLOAT_DTYPES:
            return torch.randn(n_ff, d, device=device, dtype=FLOAT_DTYPES[weight_type]) / d ** 0.5
        block = 34 if weight_type == "q8_0" else 18
        blocks = torch.randint(0, 256, (n_ff, d // 32, block), dtype=torch.uint8, device=device)
        scales = (torch.rand(n_ff, d // 32, 1, device=device) * 0.01 + 0.001).half()
        blocks[:, :, :2] = scales.view(torch.uint8)
        return blocks.view(n_ff, -1)
    # d is a multiple of 256 here, so unpadded rows are already the packed layout (rows.py)
    return FFNRows(matrix(), matrix(), matrix(), torch.arange(n_ff, device=device), d, weight_type, n_ff)


def gpu_bench(timer, copy_bw, records):
    for shape, (d, n_ff) in SHAPES.items():
        for weight_type in ("f16", "bf16", "q8_0", "q4_0"):
            rows = random_rows(d, n_ff, weight_type)
            x = [torch.randn(1, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
            out = [torch.empty(1, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
            for density in DENSITIES:
                active = [random_mask(1, n_ff, density).cuda() for _ in range(ROWS_PER_CALL)]
                n_active = statistics.mean(int(a.sum()) for a in active)
                # down reads only the rows whose activation is nonzero (relu zeroes about half the active ones)
                n_nonzero = statistics.mean(int((sparse_gate_up(xi, rows, a) != 0).sum()) for xi, a in zip(x, active))
                weight_bytes = (2 * n_active + n_nonzero) * stride_bytes(rows.gate)
                io_bytes = 2 * d * 2 + n_ff * (1 + 8 + 4 + 4)
                t = timer.seconds(lambda i: sparse_ffn(x[i], rows, active[i], out=out[i]))
                records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density, T=1,
                                    impl="sparse_ffn", us=t * 1e6, bytes=weight_bytes + io_bytes,
                                    GBs=(weight_bytes + io_bytes) / t / 1e9, ceiling_GBs=copy_bw / 1e9))
                h = [torch.empty(1, n_ff, device="cuda") for _ in range(ROWS_PER_CALL)]
                for impl, step, nbytes in (
                    ("sparse_gate_up only", lambda i: sparse_gate_up(x[i], rows, active[i], out=h[i]),
                     2 * n_active * stride_bytes(rows.gate)),
                    ("sparse_down only", lambda i: sparse_down(h[i], rows, out=out[i]), n_nonzero * stride_bytes(rows.gate)),
                ):
                    t = timer.seconds(step)
                    records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density,
                                        T=1, impl=impl, us=t * 1e6, bytes=nbytes, GBs=nbytes / t / 1e9,
                                        ceiling_GBs=copy_bw / 1e9))
                if weight_type == "f16":
                    t = _eager_seconds(lambda i: sparse_ffn(x[i], rows, active[i], out=out[i]))
                    records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density, T=1,
                                        impl="sparse_ffn eager (launch overhead incl.)", us=t * 1e6))
                    dense = rows.gate, rows.up, rows.down_t
                    t = _eager_seconds(lambda i: sparse_ffn_reference(x[i], *dense, rows.neuron_idx, active[i]))
                    records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density, T=1,
                                        impl="torch gather-then-matmul reference (eager)", us=t * 1e6))
            if weight_type == "f16":
                h = [torch.randn(1, n_ff, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
                tmp = torch.empty(1, n_ff, device="cuda", dtype=torch.float16)

                def dense_step(i):
                    torch.mm(x[i], rows.gate.T, out=tmp)
                    torch.mm(x[i], rows.up.T, out=tmp)
                    torch.mm(h[i], rows.down_t, out=out[i])
                t = timer.seconds(dense_step)
                nbytes = 3 * n_ff * d * 2
                records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=1.0, T=1,
                                    impl="dense cuBLAS (3 mat-vec, all rows)", us=t * 1e6, bytes=nbytes,
                                    GBs=nbytes / t / 1e9, ceiling_GBs=copy_bw / 1e9))
            rows = None  # freed before the next weight type is made
            torch.cuda.empty_cache()


def _eager_seconds(step, reps=5):
    times = []
    for r in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(r % ROWS_PER_CALL)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def token_sweep(timer, records):
    """Sparse kernels against the dense path for T tokens, 7B f16, 10% per token (independent masks)."""
    from . import cuda as cuda_backend
    d, n_ff = SHAPES["7B"]
    rows = random_rows(d, n_ff, "f16")
    default = cuda_backend.DENSE_MIN_TOKENS
    for T in (1, 2, 4, 8, 16):
        x = [torch.randn(T, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
        out = [torch.empty(T, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
        for density in (0.1, 0.3):
            active = [random_mask(T, n_ff, density).cuda() for _ in range(ROWS_PER_CALL)]
            for impl, threshold in (("sparse", 1 << 30), ("dense", 0)):
                cuda_backend.DENSE_MIN_TOKENS = threshold
                t = timer.seconds(lambda i: sparse_ffn(x[i], rows, active[i], out=out[i]))
                records.append(dict(device="gpu", shape="7B", weight_type="f16", density=density, T=T,
                                    impl=f"token sweep: {impl}", us=t * 1e6))
    cuda_backend.DENSE_MIN_TOKENS = default


def down_split_sweep(timer, records):
    """sparse_down (f16, one token) with more or fewer row splits (cuda.DOWN_BLOCKS_PER_SM), over whole layers
    and 7B's hot rows at 11.29 GiB (7375 rows)."""
    from . import cuda as cuda_backend
    default = cuda_backend.DOWN_BLOCKS_PER_SM
    for shape, (d, n_ff) in dict(SHAPES, **{"7B hot rows": (4096, 7375)}).items():
        rows = random_rows(d, n_ff, "f16")
        out = torch.empty(1, d, device="cuda", dtype=torch.float16)
        for density in (0.05, 0.1, 0.25, 0.5):
            h = [torch.randn(1, n_ff, device="cuda") * (torch.rand(1, n_ff, device="cuda") < density)
                 for _ in range(ROWS_PER_CALL)]
            nbytes = density * n_ff * stride_bytes(rows.down_t)
            for blocks_per_sm in (1, 2, 4, 8):
                cuda_backend.DOWN_BLOCKS_PER_SM = blocks_per_sm
                t = timer.seconds(lambda i: sparse_down(h[i], rows, out=out))
                records.append(dict(device="gpu", shape=shape, weight_type="f16", density=density, T=1,
                                    impl=f"down sweep: {blocks_per_sm} blocks per SM", us=t * 1e6, bytes=nbytes,
                                    GBs=nbytes / t / 1e9))
    cuda_backend.DOWN_BLOCKS_PER_SM = default


def one_launch_sweep(timer, records):
    """sparse_ffn for one token (f16) in one launch (ffn_one) or two (gate_up_one, down_partial), from
    relu-smollm2's FFN to 7B's hot rows: where cuda.ONE_LAUNCH_MAX_BYTES should lie."""
    from . import cuda as cuda_backend
    default = cuda_backend.ONE_LAUNCH_MAX_BYTES
    for d, m, density in ((576, 1536, 0.34), (1024, 2000, 0.35), (2048, 5000, 0.4), (4096, 3700, 0.45),
                          (4096, 7375, 0.45)):
        rows = random_rows(d, m, "f16")
        x = [torch.randn(1, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
        out = torch.empty(1, d, device="cuda", dtype=torch.float16)
        active = [random_mask(1, m, density).cuda() for _ in range(ROWS_PER_CALL)]
        for impl, limit in (("one launch", 1 << 40), ("two launches", 0)):
            cuda_backend.ONE_LAUNCH_MAX_BYTES = limit
            t = timer.seconds(lambda i: sparse_ffn(x[i], rows, active[i], out=out))
            records.append(dict(device="gpu", shape=f"{d}x{m}", weight_type="f16", density=density, T=1,
                                impl=f"{impl} ({rows.nbytes / 2**20:.0f} MiB of rows)", us=t * 1e6))
    cuda_backend.ONE_LAUNCH_MAX_BYTES = default


def decode_bench(timer, copy_bw, records):
    """kernels.decode (one token, fp16, 7B shapes) beside the torch ops they replace: the matrix-vector products
    of attention and predictor with their epilogues, RMSNorm, attention over a 512-position cache."""
    from . import decode
    d, n_ff, rank, max_len, n_heads, hd = 4096, 11008, 1024, 512, 32, 128
    for name, (n, k), epilogue in (("wqkv", (3 * d, d), "store"), ("wo", (d, d), "store"),
                                   ("predictor fc1", (rank, d), "relu"), ("predictor fc2", (n_ff, rank), "at_least")):
        w = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(ROWS_PER_CALL)]
        x = [torch.randn(k, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
        nbytes = n * k * 2
        for impl, step in ((f"gemv {name} ({epilogue})", lambda i: decode.gemv(w[i], x[i], epilogue)),
                           (f"torch {name} ({epilogue})", lambda i: decode.gemv_reference(w[i], x[i], epilogue))):
            t = timer.seconds(step)
            records.append(dict(device="gpu", shape="7B", weight_type="f16", density=1.0, T=1, impl=impl,
                                us=t * 1e6, bytes=nbytes, GBs=nbytes / t / 1e9, ceiling_GBs=copy_bw / 1e9))
        w = x = None
    x = torch.randn(1, d, device="cuda", dtype=torch.float16)
    weight = torch.randn(d, device="cuda", dtype=torch.float16)
    for impl, step in (("rms_norm", lambda i: decode.rms_norm(x, weight, 1e-5)),
                       ("torch rms_norm * weight", lambda i: decode.rms_norm_reference(x, weight, 1e-5))):
        records.append(dict(device="gpu", shape="7B", weight_type="f16", density=1.0, T=1, impl=impl,
                            us=timer.seconds(step) * 1e6))
    k, v = (torch.randn(1, n_heads, max_len, hd, device="cuda", dtype=torch.float16) for _ in range(2))
    qkv = torch.randn(3 * n_heads * hd, device="cuda", dtype=torch.float16)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, device="cuda") / hd)  # Llama-2's RoPE
    for pos in (100, 500):
        p = torch.tensor([pos], device="cuda")
        cos, sin = decode.rope_table(inv_freq, 1.0, p, torch.float16)
        for impl, step in (("decode_attention (RoPE, KV write)",
                            lambda i: decode.decode_attention(qkv, cos, sin, p, k, v, n_heads)),
                           ("torch RoPE, KV write, SDPA",
                            lambda i: decode.decode_attention_reference(qkv, cos, sin, p, k, v, n_heads))):
            records.append(dict(device="gpu", shape="7B", weight_type="f16", density=(pos + 1) / max_len, T=1,
                                impl=f"{impl} (position {pos} of {max_len})", us=timer.seconds(step) * 1e6))


def handoff_bench(records, n_layers=32, reps=30):
    """One decode step's hand-off as the engine runs it (kernels.Handoff in a CUDA graph, the replay beside the
    host's cold_step), over n_layers of 7B's cold rows at 11.29 GiB (3633 f16 rows a layer) with no hot rows:
    time per layer from the GPU's input to the CPU's result added on the GPU, and the CPU's own time per layer
    (input seen to output published), at 0, 3, 30 and 300 active cold rows a layer (each layer its own rows)."""
    from .handoff import Handoff, given
    d, n_ff, m = 4096, 11008, 3633
    neuron_idx = torch.arange(m) * 3  # the cold share: every third neuron
    layers = [FFNRows(*(torch.empty(m, d, dtype=torch.float16).uniform_(-0.02, 0.02) for _ in range(3)), neuron_idx,
                      d, "f16", n_ff) for _ in range(n_layers)]
    handoff = Handoff(layers, d, n_ff, torch.float16, "relu", 0.0, "cuda")
    x = torch.randn(1, d, device="cuda").half()
    hot = torch.zeros(1, d, device="cuda").half()
    masks = [torch.zeros(1, n_ff, dtype=torch.bool, device="cuda") for _ in range(n_layers)]

    def step():
        handoff.begin_step()
        for slot, mask in enumerate(masks):
            handoff.exchange(slot, x, mask, given(hot))

    def warm_up():  # eagerly, so the CPU half runs beside it
        with handoff.cpu_alongside():
            step()

    with handoff.engage():
        graph = _capture(step, warm_up)
    for n_active in (0, 3, 30, 300):
        for mask in masks:
            mask.zero_()
            mask[0, neuron_idx[torch.randperm(m)[:n_active]].cuda()] = True
        per_layer, cpu = [], []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            graph.replay()
            handoff.run_cpu()
            torch.cuda.synchronize()
            per_layer.append((time.perf_counter() - start) / n_layers)
            cpu.append(float((handoff.cold_step.times[:, 1] - handoff.cold_step.times[:, 0]).median()))
        records.append(dict(device="gpu+cpu", shape="7B cold rows", weight_type="f16", density=n_active / m, T=1,
                            impl=f"hand-off, {n_active} active cold rows a layer (CPU's part: "
                                 f"{statistics.median(cpu) * 1e6:.1f} us)", us=statistics.median(per_layer) * 1e6))


# ---------------------------------------------------------------- CPU

CPU_WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


class CpuTimer:
    """Median seconds of step(r), r over the repetitions, caches flushed before each call by a read larger than
    the L3; `read` times a plain read of nbytes (the ceiling) the same way."""

    def __init__(self, flush_bytes, largest_read):
        self.flush_buf = torch.ones(flush_bytes // 4)
        self.read_buf = torch.randn(largest_read // 4)

    def seconds(self, step, reps=5):
        times = []
        for r in range(reps):
            self.flush_buf.sum()
            start = time.perf_counter()
            step(r)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def read_GBs(self, nbytes):
        return nbytes / self.seconds(lambda r: self.read_buf[: int(nbytes) // 4].sum()) / 1e9


@contextlib.contextmanager
def torch_path():
    """The CPU backend's torch path instead of its C kernels."""
    backend = get_backend("cpu")
    lib, backend.lib = backend.lib, None
    try:
        yield
    finally:
        backend.lib = lib


def cpu_bench(records, flush_bytes, shapes, compare, weight_types=None):
    """The CPU backend per weight type (f32 only unless compare) and density; with compare also the candidates
    that lost (numba, int8 rows through _weight_int8pack_mm) and a token sweep against the torch path."""
    threads = torch.get_num_threads()
    for shape in shapes:
        d, n_ff = SHAPES[shape]
        timer = CpuTimer(flush_bytes, 3 * n_ff * d * 4)
        x = torch.randn(1, d)
        masks = {density: [random_mask(1, n_ff, density) for _ in range(5)] for density in DENSITIES}
        for weight_type in weight_types or (CPU_WEIGHT_TYPES if compare else ("f32",)):
            rows = random_rows(d, n_ff, weight_type, "cpu")
            row_bytes = stride_bytes(rows.gate)
            if weight_type == "f32":
                dense = torch.randn(1, n_ff)
                t = timer.seconds(lambda r: (x @ rows.gate.T, x @ rows.up.T, dense @ rows.down_t))
                nbytes = 3 * n_ff * d * 4
                records.append(dict(device="cpu", threads=threads, shape=shape, weight_type="f32", density=1.0, T=1,
                                    impl="dense torch fp32 (3 mat-vec)", us=t * 1e6, bytes=nbytes,
                                    GBs=nbytes / t / 1e9, ceiling_GBs=timer.read_GBs(nbytes)))
            for density, active in masks.items():
                n_active = statistics.mean(int(a.sum()) for a in active)
                h = [sparse_gate_up(x, rows, a) for a in active]
                n_nonzero = statistics.mean(int((hr != 0).sum()) for hr in h)  # the rows down reads
                nbytes = (2 * n_active + n_nonzero) * row_bytes
                base = dict(device="cpu", threads=threads, shape=shape, weight_type=weight_type, density=density,
                            T=1, ceiling_GBs=timer.read_GBs(nbytes))
                ffn = lambda r: sparse_ffn(x, rows, active[r])
                steps = [("sparse_ffn", ffn, nbytes),
                         ("sparse_gate_up only", lambda r: sparse_gate_up(x, rows, active[r]), 2 * n_active * row_bytes),
                         ("sparse_down only", lambda r: sparse_down(h[r], rows), n_nonzero * row_bytes)]
                if weight_type == "f32":
                    steps.append(("torch gather-then-matmul reference", lambda r: sparse_ffn_reference(
                        x, rows.gate, rows.up, rows.down_t, rows.neuron_idx, active[r]), nbytes))
                if weight_type == "f32" or compare:
                    steps.append(("sparse_ffn, torch path (no C kernels)", ffn, nbytes))
                if compare and weight_type == "f32":
                    steps += _cpu_candidates(rows, x, active, n_active, nbytes)
                for impl, step, part_bytes in steps:
                    with torch_path() if "torch path" in impl else contextlib.nullcontext():
                        t = timer.seconds(step)
                    records.append(base | dict(impl=impl, us=t * 1e6, bytes=part_bytes, GBs=part_bytes / t / 1e9))
            if compare and weight_type == "f32" and shape == shapes[0]:
                _cpu_token_sweep(timer, rows, records)


def _cpu_token_sweep(timer, rows, records):
    """C kernels against the torch path for T tokens at 10% active each (independent masks)."""
    for T in (1, 4, 8, 16):
        x = torch.randn(T, rows.d)
        active = [random_mask(T, rows.m, 0.1) for _ in range(5)]
        for impl, path in (("C kernels", contextlib.nullcontext), ("torch path", torch_path)):
            with path():
                t = timer.seconds(lambda r: sparse_ffn(x, rows, active[r]))
            records.append(dict(device="cpu", shape="7B", weight_type="f32", density=0.1, T=T,
                                impl=f"token sweep: {impl}", us=t * 1e6))


def _cpu_candidates(rows, x, active, n_active, nbytes):
    """Kernels tried for the CPU backend that lost to the C kernels (kept here to re-measure): (a) numba, prange
    over the needed f32 rows read in place (if numba is installed); (c) int8 rows with per-row scales through
    torch's _weight_int8pack_mm (a quarter of the bytes, lossy), gathered in chunks (gate/up only: the down
    projection has no such op)."""
    steps = []
    try:
        import numba
        import numpy as np
    except ImportError:
        numba = None
    if numba is not None:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        gate_up, down = _numba_kernels()
        g, u, dt, xs = rows.gate.numpy(), rows.up.numpy(), rows.down_t.numpy(), x[0].numpy()
        y = np.empty(rows.d, np.float32)

        def numba_ffn(r):
            sel = active[r][0].nonzero().squeeze(1).numpy()
            hs = np.empty(len(sel), np.float32)
            gate_up(g, u, sel, xs, hs)
            nz = hs != 0
            down(dt, sel[nz], hs[nz], numba.get_num_threads(), y)
        numba_ffn(0)  # compile (cached) outside the timing
        steps.append(("candidate (a): numba f32, sparse_ffn", numba_ffn, nbytes))
    scale = lambda w: w.abs().amax(1) / 127
    w8 = [(torch.round(w / scale(w)[:, None]).to(torch.int8), scale(w).bfloat16()) for w in (rows.gate, rows.up)]
    xb, rows_per_chunk = x.bfloat16(), (8 << 20) // rows.d

    def int8_gate_up(r):
        sel = active[r][0].nonzero().squeeze(1)
        for chunk in sel.split(rows_per_chunk):
            g, u = (torch.ops.aten._weight_int8pack_mm(xb, q.index_select(0, chunk), s[chunk]) for q, s in w8)
            torch.relu(g) * u
    steps.append(("candidate (c): int8 rows, _weight_int8pack_mm, gate_up only", int8_gate_up, 2 * n_active * rows.d))
    return steps


@functools.cache
def _numba_kernels():
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gate_up(gate, up, sel, x, out):
        for i in numba.prange(sel.shape[0]):
            g = u = np.float32(0)
            for k in range(x.shape[0]):
                g += gate[sel[i], k] * x[k]
                u += up[sel[i], k] * x[k]
            out[i] = max(g, np.float32(0)) * u

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def down(down_t, sel, hs, parts, y):
        partial = np.zeros((parts, y.shape[0]), np.float32)
        for p in numba.prange(parts):
            for i in range(sel.shape[0] * p // parts, sel.shape[0] * (p + 1) // parts):
                for k in range(y.shape[0]):
                    partial[p, k] += hs[i] * down_t[sel[i], k]
        y[:] = partial.sum(0)
    return gate_up, down


def print_table(records):
    print(f"{'dev':4} {'shape':5} {'wt':5} {'dens':>5} {'T':>3} {'us':>9} {'GB/s':>7} {'ceil':>7} {'frac':>5}  impl")
    for r in records:
        gbs, ceil = r.get("GBs"), r.get("ceiling_GBs")
        frac = f"{gbs / ceil:5.2f}" if gbs and ceil else ""
        print(f"{r['device']:4} {r['shape']:5} {r['weight_type']:5} {r['density']:5.2f} {r['T']:3d} {r['us']:9.1f} "
              f"{gbs or 0:7.1f} {ceil or 0:7.1f} {frac:>5}  {r['impl']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cpu-shapes", default="7B,70B", help='comma-separated; "" for none')
    parser.add_argument("--cpu-weight-types", default=None, help="comma-separated (default: f32, or all with "
                        "--cpu-compare)")
    parser.add_argument("--cpu-compare", action="store_true",
                        help="every weight type on the CPU, the candidate kernels that lost, a CPU token sweep")
    parser.add_argument("--flush-mib", type=int, default=640, help="bytes read between CPU calls (over the L3)")
    parser.add_argument("--gpu-sections", default="ffn,tokens,down,one,decode,handoff",
                        help="comma-separated GPU parts: ffn (the sparse kernels), tokens, down and one (the "
                        "sweeps), decode (kernels.decode), handoff (kernels.Handoff)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    records, meta = [], dict(torch=torch.__version__, cpu_threads=torch.get_num_threads())
    if not args.cpu_only and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        timer = GpuTimer()
        meta["copy_GBs"] = copy_bandwidth() / 1e9
        sections = args.gpu_sections.split(",")
        for name, run in (("ffn", lambda: gpu_bench(timer, meta["copy_GBs"] * 1e9, records)),
                          ("tokens", lambda: token_sweep(timer, records)),
                          ("down", lambda: down_split_sweep(timer, records)),
                          ("one", lambda: one_launch_sweep(timer, records)),
                          ("decode", lambda: decode_bench(timer, meta["copy_GBs"] * 1e9, records)),
                          ("handoff", lambda: handoff_bench(records))):
            if name in sections:
                run()
    if args.cpu_shapes:  # "" skips the CPU part
        cpu_bench(records, args.flush_mib << 20, args.cpu_shapes.split(","), args.cpu_compare,
                  args.cpu_weight_types and args.cpu_weight_types.split(","))
    print(json.dumps(meta))
    print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)


if __name__ == "__main__":
    main()
