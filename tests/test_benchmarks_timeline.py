"""The overlap summary of a profiled hybrid decode step, on a hand-made trace with known answers."""
from benchmarks.timeline import COLD_RANGE, overlap_summary


def span(name, ts, dur, cat):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}


def test_hot_kernels_are_those_between_a_layers_send_and_add():
    events = [
        # layer 0: sent at 100-105, two hot kernels 105-185 while the CPU works 110-200, the GPU waits 185-205
        span("send_to_host", 100, 5, "kernel"), span(COLD_RANGE, 110, 90, "user_annotation"),
        span("gate_up", 105, 40, "kernel"), span("down", 145, 40, "kernel"),
        span("add_from_host", 185, 20, "kernel"),
        # attention 205-300 (GPU only), layer 1: send on its own stream beside one hot kernel that ends before
        # the CPU starts
        span("attention", 205, 95, "kernel"), span("send_to_host", 300, 5, "kernel"),
        span("gate_up", 301, 10, "kernel"), span(COLD_RANGE, 320, 40, "user_annotation"),
        span("add_from_host", 315, 50, "kernel"),
        span("aten::mm", 0, 500, "cpu_op"),  # host ops are not GPU time
    ]
    summary = overlap_summary(events)
    assert summary["layers"] == [
        {"cpu_cold_us": 90, "gpu_hot_us": 80, "gpu_hot_span_us": 80, "overlap_us": 75, "gpu_wait_us": 20,
         "gpu_only_us": 95},
        {"cpu_cold_us": 40, "gpu_hot_us": 10, "gpu_hot_span_us": 10, "overlap_us": 0.0, "gpu_wait_us": 50,
         "gpu_only_us": None}]
    assert summary["overlap_share"] == 75 / (80 + 10)
    assert summary["step_us"] == 365 - 100
    assert summary["total"]["gpu_only_us"] == 95
