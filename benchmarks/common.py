"""What every benchmark shares: the model shapes, the machine description, measured ceilings, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.model import Transformer
from solver import Bandwidths

# Real models' shapes (weights in benchmarks are random unless a benchmark says otherwise)
SHAPES = {
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, n_ff=1536,
                                max_seq_len=8192, ffn_act="relu", tie_embeddings=True),
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, n_ff=11008,
                             max_seq_len=4096, ffn_act="relu"),
    "llama2-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, n_ff=13824,
                              max_seq_len=4096, ffn_act="relu"),
    "llama2-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, n_ff=28672,
                              max_seq_len=4096, ffn_act="relu"),
}


def git_commit() -> str:
    """The commit measured: $POWERINFER_COMMIT (the device gets no .git), else git."""
    if os.environ.get("POWERINFER_COMMIT"):
        return os.environ["POWERINFER_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "commit": git_commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in B/s, counting bytes read plus bytes written (median of 10)."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / sorted(times[2:])[len(times[2:]) // 2]


def random_dense_model(cfg: ModelConfig, dtype, device="cuda") -> Transformer:
    """A Transformer with random weights made directly on the device (never stored)."""
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model.eval()


def write_json(path: str | None, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


# -- the bandwidths the modelled bound uses, measured in the same run as the benchmark

def _median_seconds(fn, reps: int, cuda: bool) -> float:
    """Median wall time of fn() after one warm-up call (synchronising the GPU around each call when cuda)."""
    times = []
    for _ in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def cpu_read_bandwidth(n_bytes: int = 1 << 30) -> float:
    """DRAM read bandwidth in B/s: torch.sum over n_bytes of fp32 with torch's thread count, the threads the
    CPU kernels use (median of 5)."""
    x = torch.rand(n_bytes // 4)
    return n_bytes / _median_seconds(x.sum, 5, cuda=False)


def pcie_bandwidth(n_bytes: int = 1 << 30) -> tuple[float, float]:
    """Pinned (host-to-device, device-to-host) bandwidth in B/s (median of 5 each)."""
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    h2d = n_bytes / _median_seconds(lambda: dev.copy_(host, non_blocking=True), 5, cuda=True)
    d2h = n_bytes / _median_seconds(lambda: host.copy_(dev, non_blocking=True), 5, cuda=True)
    return h2d, d2h


def handoff_seconds(n_bytes: int = 8 << 10) -> float:
    """One pinned n_bytes host-to-device copy, one device-to-host copy and a synchronize (median of 50): the
    fixed cost of a layer's GPU-CPU hand-off."""
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")

    def round_trip():
        dev.copy_(host, non_blocking=True)
        host.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()

    return _median_seconds(round_trip, 50, cuda=False)


def measure_bandwidths(cpu_bytes: int = 1 << 30) -> tuple[Bandwidths, dict]:
    """(Bandwidths for solver.timing, the figures as a dict). Without CUDA the GPU-side figures are the
    defaults measured on the H100 device machine, marked as assumed."""
    cpu = cpu_read_bandwidth(cpu_bytes)
    if not torch.cuda.is_available():
        default = Bandwidths()
        return Bandwidths(cpu=cpu), {"cpu_read": cpu, "cpu_threads": torch.get_num_threads(), "gpu_copy": default.gpu,
                                     "pcie": default.pcie, "handoff_s": default.sync_s,
                                     "assumed": ["gpu_copy", "pcie", "handoff_s"]}
    gpu = copy_bandwidth()
    h2d, d2h = pcie_bandwidth()
    sync_s = handoff_seconds()
    return Bandwidths(gpu=gpu, cpu=cpu, pcie=max(h2d, d2h), sync_s=sync_s), {
        "cpu_read": cpu, "cpu_threads": torch.get_num_threads(), "gpu_copy": gpu, "pcie_h2d": h2d,
        "pcie_d2h": d2h, "pcie": max(h2d, d2h), "handoff_s": sync_s, "assumed": []}
