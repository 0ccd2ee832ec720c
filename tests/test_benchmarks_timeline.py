"""The overlap summary of a profiled hybrid decode step, on a hand-made trace with known answers."""
from benchmarks.timeline import COLD_RANGE, overlap_summary


def span(name, ts, dur, cat, correlation=None):
    event = {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_hot_kernels_are_those_launched_between_the_event_record_and_the_cold_rows():
    events = [
        # layer 0: event recorded, hot graph launched, its two kernels run 110-190 while the CPU works 120-170
        span("cudaEventRecord", 100, 1, "cuda_runtime", 1),
        span("cudaGraphLaunch", 105, 2, "cuda_runtime", 2),
        span("gate_up", 110, 40, "kernel", 2), span("down", 150, 40, "kernel", 2),
        span(COLD_RANGE, 120, 50, "user_annotation"),
        # layer 1: attention launched before the record (not hot), one hot kernel that ends before the CPU starts
        span("cudaGraphLaunch", 200, 2, "cuda_runtime", 9), span("attention", 210, 190, "kernel", 9),
        span("cudaEventRecord", 300, 1, "cuda_runtime", 3),
        span("cuLaunchKernel", 302, 1, "cuda_driver", 4), span("gate_up", 305, 10, "kernel", 4),
        span(COLD_RANGE, 320, 40, "user_annotation"),
    ]
    summary = overlap_summary(events)
    assert summary["layers"] == [
        {"cpu_cold_us": 50, "gpu_hot_us": 80, "gpu_hot_span_us": 80, "overlap_us": 50},
        {"cpu_cold_us": 40, "gpu_hot_us": 10, "gpu_hot_span_us": 10, "overlap_us": 0.0}]
    assert summary["overlap_share"] == 50 / (50 + 10)
    assert summary["step_us"] == 400 - 100


def test_cpu_only_trace_has_cold_ranges_and_no_gpu_figures():
    summary = overlap_summary([span(COLD_RANGE, 0, 5, "user_annotation"), span("aten::mm", 1, 2, "cpu_op")])
    assert summary["layers"] == [{"cpu_cold_us": 5, "gpu_hot_us": None, "gpu_hot_span_us": None, "overlap_us": None}]
    assert summary["overlap_share"] is None
