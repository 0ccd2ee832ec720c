"""Benchmark of the sparse FFN kernels: `python -m kernels.bench [--cpu-only] [--json PATH]`.

For Llama-2-7B (d 4096, n_ff 11008) and 70B (8192, 28672) FFN shapes, at 5-50% active rows, one token:
- GPU: time per sparse_ffn call (CUDA-graph replay, L2 flushed before every call and the flush's own time
  subtracted) and its bandwidth on the bytes it must move (active rows, x, y, mask, index, h), against a
  device-to-device copy measured in the same run; the dense cuBLAS products of the same matrices and the torch
  gather-then-matmul reference beside it; a token sweep for the dense-GEMM switch.
- CPU: the CPU backend (fp32 rows) against a plain read of the same number of bytes, the dense fp32
  products and the gather-then-matmul reference, caches flushed before every call.
Inputs are random (never zeros), fresh per call set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from . import FFNRows, sparse_down, sparse_ffn, sparse_ffn_reference, sparse_gate_up
from . import cpu as cpu_backend
from .cases import random_mask
from .rows import FLOAT_DTYPES

SHAPES = {"7B": (4096, 11008), "70B": (8192, 28672)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
ROWS_PER_CALL = 8  # distinct inputs per timed graph, so no call finds its rows in L2 from the one before


# ---------------------------------------------------------------- GPU

def _capture(body):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
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


def random_gpu_rows(d, n_ff, weight_type):
    """A whole layer's rows on the GPU in the CUDA layout, random values (quantized: random blocks, sane scales)."""
    def matrix():
        if weight_type in FLOAT_DTYPES:
            return torch.randn(n_ff, d, device="cuda", dtype=FLOAT_DTYPES[weight_type]) / d ** 0.5
        block = 34 if weight_type == "q8_0" else 18
        blocks = torch.randint(0, 256, (n_ff, d // 32, block), dtype=torch.uint8, device="cuda")
        scales = (torch.rand(n_ff, d // 32, 1, device="cuda") * 0.01 + 0.001).half()
        blocks[:, :, :2] = scales.view(torch.uint8)
        return blocks.view(n_ff, -1)
    # d is a multiple of 256 here, so unpadded rows are already the CUDA layout (rows.py)
    return FFNRows(matrix(), matrix(), matrix(), torch.arange(n_ff, device="cuda"), d, weight_type, n_ff)


def _row_bytes(rows):
    return rows.gate.stride(0) * rows.gate.element_size()


def gpu_bench(timer, copy_bw, records):
    for shape, (d, n_ff) in SHAPES.items():
        for weight_type in ("f16", "bf16", "q8_0", "q4_0"):
            rows = random_gpu_rows(d, n_ff, weight_type)
            x = [torch.randn(1, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
            out = [torch.empty(1, d, device="cuda", dtype=torch.float16) for _ in range(ROWS_PER_CALL)]
            for density in DENSITIES:
                active = [random_mask(1, n_ff, density).cuda() for _ in range(ROWS_PER_CALL)]
                n_active = statistics.mean(int(a.sum()) for a in active)
                # down reads only the rows whose activation is nonzero (relu zeroes about half the active ones)
                n_nonzero = statistics.mean(int((sparse_gate_up(xi, rows, a) != 0).sum()) for xi, a in zip(x, active))
                weight_bytes = (2 * n_active + n_nonzero) * _row_bytes(rows)
                io_bytes = 2 * d * 2 + n_ff * (1 + 8 + 4 + 4)
                t = timer.seconds(lambda i: sparse_ffn(x[i], rows, active[i], out=out[i]))
                records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density, T=1,
                                    impl="sparse_ffn", us=t * 1e6, bytes=weight_bytes + io_bytes,
                                    GBs=(weight_bytes + io_bytes) / t / 1e9, ceiling_GBs=copy_bw / 1e9))
                if weight_type == "f16":
                    h = [torch.empty(1, n_ff, device="cuda") for _ in range(ROWS_PER_CALL)]
                    for impl, step, nbytes in (
                        ("sparse_gate_up only", lambda i: sparse_gate_up(x[i], rows, active[i], out=h[i]),
                         2 * n_active * _row_bytes(rows)),
                        ("sparse_down only", lambda i: sparse_down(h[i], rows, out=out[i]),
                         n_nonzero * _row_bytes(rows)),
                    ):
                        t = timer.seconds(step)
                        records.append(dict(device="gpu", shape=shape, weight_type=weight_type, density=density,
                                            T=1, impl=impl, us=t * 1e6, bytes=nbytes, GBs=nbytes / t / 1e9,
                                            ceiling_GBs=copy_bw / 1e9))
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
            del rows
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
    rows = random_gpu_rows(d, n_ff, "f16")
    default = cuda_backend.DENSE_MIN_TOKENS
    for T in (1, 2, 4, 8, 12, 16, 24, 32, 64):
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


# ---------------------------------------------------------------- CPU

def cpu_bench(records, flush_bytes, shapes):
    flush_buf = torch.ones(flush_bytes // 4)

    def seconds(step, reps=5):
        times = []
        for r in range(reps):
            flush_buf.sum()
            start = time.perf_counter()
            step(r)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    threads = torch.get_num_threads()
    for shape in shapes:
        d, n_ff = SHAPES[shape]
        gate, up, down_t = (torch.randn(n_ff, d) / d ** 0.5 for _ in range(3))
        idx = torch.arange(n_ff)
        rows = FFNRows(gate, up, down_t, idx, d, "f32", n_ff)  # the CPU layout: fp32 rows
        x = torch.randn(1, d)
        read_buf = torch.randn(3 * n_ff * d)
        t = seconds(lambda r: (x @ gate.T, x @ up.T, torch.randn(1, n_ff) @ down_t))
        records.append(dict(device="cpu", threads=threads, shape=shape, weight_type="f32", density=1.0, T=1,
                            impl="dense torch fp32 (3 mat-vec)", us=t * 1e6, bytes=3 * n_ff * d * 4,
                            GBs=3 * n_ff * d * 4 / t / 1e9))
        for density in DENSITIES:
            active = [random_mask(1, n_ff, density) for _ in range(5)]
            n_active = statistics.mean(int(a.sum()) for a in active)
            h = [sparse_gate_up(x, rows, a) for a in active]
            n_nonzero = statistics.mean(int((hr != 0).sum()) for hr in h)  # the rows down reads
            nbytes = int((2 * n_active + n_nonzero) * d * 4)
            read = seconds(lambda r: read_buf[: nbytes // 4].sum())
            base = dict(device="cpu", threads=threads, shape=shape, weight_type="f32", density=density, T=1)
            for impl, step in (
                ("sparse_ffn", lambda r: sparse_ffn(x, rows, active[r])),
                ("sparse_gate_up only", lambda r: sparse_gate_up(x, rows, active[r])),
                ("sparse_down only", lambda r: sparse_down(h[r], rows)),
                ("torch gather-then-matmul reference", lambda r: sparse_ffn_reference(x, gate, up, down_t, idx, active[r])),
            ):
                t = seconds(step)
                part = {"sparse_gate_up only": 2 * n_active * d * 4 / nbytes,
                        "sparse_down only": n_nonzero * d * 4 / nbytes}.get(impl, 1)
                records.append(base | dict(impl=impl, us=t * 1e6, bytes=nbytes * part, GBs=nbytes * part / t / 1e9,
                                           ceiling_GBs=nbytes / read / 1e9))
            if density in (0.1, 0.3):  # the gather chunk size
                default = cpu_backend.CHUNK_BYTES
                for chunk in (1 << 20, 64 << 20):
                    cpu_backend.CHUNK_BYTES = chunk
                    t = seconds(lambda r: sparse_gate_up(x, rows, active[r]))
                    records.append(base | dict(impl=f"sparse_gate_up only, chunk {chunk >> 20} MiB", us=t * 1e6,
                                               bytes=2 * n_active * d * 4, GBs=2 * n_active * d * 4 / t / 1e9,
                                               ceiling_GBs=nbytes / read / 1e9))
                cpu_backend.CHUNK_BYTES = default
        del gate, up, down_t, rows, read_buf


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
    parser.add_argument("--cpu-shapes", default="7B,70B")
    parser.add_argument("--flush-mib", type=int, default=640, help="bytes read between CPU calls (over the L3)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    records, meta = [], dict(torch=torch.__version__, cpu_threads=torch.get_num_threads())
    if not args.cpu_only and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        timer = GpuTimer()
        meta["copy_GBs"] = copy_bandwidth() / 1e9
        gpu_bench(timer, meta["copy_GBs"] * 1e9, records)
        token_sweep(timer, records)
    cpu_bench(records, args.flush_mib << 20, args.cpu_shapes.split(","))
    print(json.dumps(meta))
    print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)


if __name__ == "__main__":
    main()
