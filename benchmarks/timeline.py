"""One decode step of the hybrid engine under torch.profiler: a chrome trace (open it in Perfetto or
chrome://tracing) and, per split layer, how the CPU's cold-row compute overlaps the GPU's hot-row kernels.

A decode step is one graph replay plus one host call that computes every layer's cold rows (kernels/handoff.py).
Per layer the GPU runs `send_to_host` (input and list of active cold rows to pinned memory) and
`fetch_from_host` (waits on the GPU for the CPU's result and copies it over) beside the hot rows' kernels, then
`add_parts` adds both halves; the host call records when it saw each
layer's input and when it published the output (kernels.cpu.ColdStep.times, on the clock of time.perf_counter).
Those host spans are put into the trace as `hybrid.cold_rows` events, aligned by the profiler range around the
host call."""
from __future__ import annotations

import json
import time

import torch

from powerinfer_py.generate import Generator

COLD_RANGE = "hybrid.cold_rows"
STEP_RANGE = "hybrid.cold_step"
HANDOFF_KERNELS = ("send_to_host", "fetch_from_host", "add_parts")  # kernels/handoff.cu, in a layer's order
HOT_KERNELS = ("gate_up", "ffn_one", "down")  # in the names of the hot rows' kernels (kernels/sparse_ffn.cu)


def trace_decode_step(model, prompt: list[int], ctx: int, path: str) -> dict:
    """Profile one decode step (after a warm-up that captures its graph), write the chrome trace with the CPU's
    cold-row spans to `path` and return the per-layer overlap summary."""
    handoff = getattr(model, "handoff", None)
    gen = Generator(model, ctx)
    tokens, _ = gen.generate(prompt, 2)
    entered = []
    if handoff is not None:
        run_cpu = handoff.run_cpu

        def labelled_run_cpu():
            with torch.profiler.record_function(STEP_RANGE):
                entered.append(time.perf_counter())
                run_cpu()

        handoff.run_cpu = labelled_run_cpu
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
            gen.decode(tokens[-1], len(prompt) + len(tokens) - 1)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        if handoff is not None:
            del handoff.run_cpu  # the bound method again
    prof.export_chrome_trace(path)
    if handoff is None:  # all on one device: nothing to overlap
        return {"layers": [], "note": "no layer is split between GPU and CPU"}
    with open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"]
    step = next(e for e in events if e.get("name") == STEP_RANGE and e.get("ph") == "X")
    offset_us = step["ts"] - entered[0] * 1e6
    for t0, t1 in handoff.cold_step.times.tolist():
        events.append({"name": COLD_RANGE, "ph": "X", "cat": "user_annotation", "pid": step["pid"],
                       "tid": step["tid"], "ts": t0 * 1e6 + offset_us, "dur": (t1 - t0) * 1e6})
    with open(path, "w") as f:
        json.dump(trace, f)
    return overlap_summary(events)


def overlap_summary(events: list[dict]) -> dict:
    """Per split layer, in microseconds: CPU cold-row time, GPU hot-kernel busy time and span (the hot rows'
    kernels that end after the layer's send_to_host starts and by the end of the kernel that adds the halves:
    add_parts, or the hot rows' last kernel where that adds them), the time both ran at once, how long the GPU
    waited for the CPU's result after its hot rows (fetch_from_host ending after them; None where the hot rows'
    last kernel waits for it inside), and the GPU-only time from the add to the next layer's send (attention,
    predictor)."""
    spans = [e for e in events if e.get("ph") == "X"]
    cold = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans if e.get("name") == COLD_RANGE)
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in spans if e.get("cat") == "kernel")
    sends, fetches, adds = ([k for k in kernels if k[2] == name] for name in HANDOFF_KERNELS)
    layers = []
    for i, ((c0, c1), send, fetch) in enumerate(zip(cold, sends, fetches)):
        nxt = sends[i + 1][0] if i + 1 < len(sends) else float("inf")
        mine = [k for k in kernels if send[0] < k[1] <= nxt]
        hot = [k for k in mine if any(name in k[2] for name in HOT_KERNELS) and k[2] not in HANDOFF_KERNELS]
        add = next((k for k in adds if send[0] <= k[0] < nxt), None)
        if add is not None:
            hot = [k for k in hot if k[1] <= add[0]]
        hot_end = max((k[1] for k in hot), default=send[1])
        done = add[1] if add is not None else hot_end
        layer = {"cpu_cold_us": c1 - c0, "gpu_hot_us": sum(k[1] - k[0] for k in hot), "gpu_hot_span_us": 0.0,
                 "overlap_us": 0.0, "gpu_wait_us": max(0.0, fetch[1] - hot_end) if add is not None else None,
                 "gpu_only_us": nxt - done if i + 1 < len(sends) else None}
        if hot:
            g0 = min(k[0] for k in hot)
            layer.update(gpu_hot_span_us=hot_end - g0, overlap_us=max(0.0, min(c1, hot_end) - max(c0, g0)))
        layers.append(layer)
    keys = ("cpu_cold_us", "gpu_hot_us", "gpu_hot_span_us", "overlap_us", "gpu_wait_us", "gpu_only_us")
    total = {key: sum(layer[key] or 0.0 for layer in layers) for key in keys}
    both = sum(min(layer["cpu_cold_us"], layer["gpu_hot_span_us"]) for layer in layers)
    gpu = [k[0] for k in kernels] + [k[1] for k in kernels]
    return {"layers": layers, "total": total, "step_us": max(gpu) - min(gpu) if gpu else 0.0,
            "overlap_share": total["overlap_us"] / both if both else None}
