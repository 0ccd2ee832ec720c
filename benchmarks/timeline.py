"""One decode step of the hybrid engine under torch.profiler: a chrome trace (open it in Perfetto or
chrome://tracing) and, per layer, how the CPU's cold-row compute overlaps the GPU's hot-row kernels.

In a hybrid layer the host records an event once x and the mask are on their way to pinned memory, the hot
rows' kernels (or their CUDA graph) are launched, and the CPU computes the cold rows (hybrid.py). The hot
kernels of a layer are therefore the ones launched between the last event record and the start of its cold
range; the trace's correlation ids tie each kernel to its launch."""
from __future__ import annotations

import contextlib
import json

import torch

from powerinfer_py import hybrid
from powerinfer_py.generate import Generator

COLD_RANGE = "hybrid.cold_rows"


@contextlib.contextmanager
def cold_row_ranges():
    """Label every CPU cold-row computation (hybrid.py's sparse_ffn on CPU rows) with a profiler range."""
    original = hybrid.sparse_ffn

    def labelled(x, rows, *args, **kwargs):
        if rows.device.type != "cpu":
            return original(x, rows, *args, **kwargs)
        with torch.profiler.record_function(COLD_RANGE):
            return original(x, rows, *args, **kwargs)

    hybrid.sparse_ffn = labelled
    try:
        yield
    finally:
        hybrid.sparse_ffn = original


def trace_decode_step(model, prompt: list[int], ctx: int, path: str) -> dict:
    """Profile one decode step (after a warm-up that captures its graphs), write the chrome trace to `path`
    and return the per-layer overlap summary."""
    gen = Generator(model, ctx)
    tokens, _ = gen.generate(prompt, 2)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), cold_row_ranges(), torch.profiler.profile(activities=activities) as prof:
        gen.decode(tokens[-1], len(prompt) + len(tokens) - 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prof.export_chrome_trace(path)
    with open(path) as f:
        return overlap_summary(json.load(f)["traceEvents"])


def overlap_summary(events: list[dict]) -> dict:
    """Per layer (one cold range each): CPU cold-row time, GPU hot-kernel busy time and span, and the time
    both ran at once, in microseconds; totals over the step."""
    spans = [e for e in events if e.get("ph") == "X"]
    cold = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("name") == COLD_RANGE)
    kernels = {}  # correlation id -> (start, end) of the kernels it launched
    for e in spans:
        if e.get("cat") == "kernel" and "correlation" in e.get("args", {}):
            kernels.setdefault(e["args"]["correlation"], []).append((e["ts"], e["ts"] + e["dur"]))
    api = sorted((e["ts"], e["name"], e["args"]["correlation"]) for e in spans
                 if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}))
    layers = []
    for c0, c1 in cold:
        records = [ts for ts, name, _ in api if ts < c0 and "EventRecord" in name]
        launched = [k for ts, _, corr in api if records and records[-1] < ts < c0 for k in kernels.get(corr, [])]
        layer = {"cpu_cold_us": c1 - c0, "gpu_hot_us": None, "gpu_hot_span_us": None, "overlap_us": None}
        if launched:
            g0, g1 = min(k[0] for k in launched), max(k[1] for k in launched)
            layer.update(gpu_hot_us=sum(k[1] - k[0] for k in launched), gpu_hot_span_us=g1 - g0,
                         overlap_us=max(0.0, min(c1, g1) - max(c0, g0)))
        layers.append(layer)
    total = {key: sum(layer[key] or 0.0 for layer in layers)
             for key in ("cpu_cold_us", "gpu_hot_us", "gpu_hot_span_us", "overlap_us")}
    both = sum(min(layer["cpu_cold_us"], layer["gpu_hot_span_us"]) for layer in layers if layer["gpu_hot_span_us"])
    step = [e["ts"] for e in spans] + [e["ts"] + e["dur"] for e in spans]
    return {"layers": layers, "total": total, "step_us": max(step) - min(step) if step else 0.0,
            "overlap_share": total["overlap_us"] / both if both else None}
