"""The overlap summary of a profiled hybrid decode step, on a hand-made trace with known answers."""
from benchmarks.timeline import COLD_RANGE, overlap_summary


def span(name, ts, dur, cat):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}


def test_hot_kernels_are_those_between_a_layers_send_and_add():
    events = [
        # layer 0: sent at 100-105, two hot kernels 105-185 while the CPU works 110-200, its result fetched by 205,
        # so the GPU waits 185-205 before the add at 205-207
        span("send_to_host", 100, 5, "kernel"), span("fetch_from_host", 105, 100, "kernel"),
        span(COLD_RANGE, 110, 90, "user_annotation"),
        span("gate_up", 105, 40, "kernel"), span("down", 145, 40, "kernel"),
        span("add_parts", 205, 2, "kernel"),
        # attention 207-300 (GPU only), layer 1: one hot kernel that ends before the CPU starts; the CPU's result
        # comes at 365
        span("attention", 207, 93, "kernel"), span("send_to_host", 300, 5, "kernel"),
        span("fetch_from_host", 305, 60, "kernel"), span("gate_up", 301, 10, "kernel"),
        span(COLD_RANGE, 320, 40, "user_annotation"), span("add_parts", 365, 2, "kernel"),
        span("aten::mm", 0, 500, "cpu_op"),  # host ops are not GPU time
    ]
    summary = overlap_summary(events)
    assert summary["layers"] == [
        {"cpu_cold_us": 90, "gpu_hot_us": 80, "gpu_hot_span_us": 80, "overlap_us": 75, "gpu_wait_us": 20,
         "gpu_only_us": 93},
        {"cpu_cold_us": 40, "gpu_hot_us": 10, "gpu_hot_span_us": 10, "overlap_us": 0.0, "gpu_wait_us": 54,
         "gpu_only_us": None}]
    assert summary["overlap_share"] == 75 / (80 + 10)
    assert summary["step_us"] == 367 - 100
    assert summary["total"]["gpu_only_us"] == 93


def test_where_the_hot_rows_last_kernel_adds_the_halves():
    events = [
        # layer 0: gate_up_one launched before the send, down_partial resident early and ending after the fetch (it
        # waits for it inside and adds the halves): no add_parts, so no visible wait
        span("gate_up_one", 95, 40, "kernel"), span("send_to_host", 100, 10, "kernel"),
        span("fetch_from_host", 101, 60, "kernel"), span(COLD_RANGE, 110, 40, "user_annotation"),
        span("down_partial", 100, 70, "kernel"), span("attention", 171, 100, "kernel"),
        # layer 1: no hot rows (all its neurons on the CPU): add_parts adds the CPU's result to zeros
        span("send_to_host", 300, 5, "kernel"), span("fetch_from_host", 305, 60, "kernel"),
        span(COLD_RANGE, 310, 40, "user_annotation"), span("add_parts", 365, 2, "kernel"),
    ]
    summary = overlap_summary(events)
    assert summary["layers"] == [
        {"cpu_cold_us": 40, "gpu_hot_us": 110, "gpu_hot_span_us": 75, "overlap_us": 40, "gpu_wait_us": None,
         "gpu_only_us": 130},
        {"cpu_cold_us": 40, "gpu_hot_us": 0, "gpu_hot_span_us": 0.0, "overlap_us": 0.0, "gpu_wait_us": 60,
         "gpu_only_us": None}]
