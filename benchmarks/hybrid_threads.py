"""Hybrid decode speed of one model file under CPU thread settings, each in a fresh process (OpenMP reads its
environment once), to choose the engine's default `-t` and OpenMP wait policy.

    python -m benchmarks.hybrid_threads MODEL.powerinfer.gguf --vram-budget 8GiB [--threads 4,8,12,16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = [("default", {}), ("OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"})]


def measure(model: str, budget: str, threads: int) -> dict:
    import torch

    from powerinfer_py.engine import build_hybrid, get_predictors, resolve_budget
    from powerinfer_py.generate import Generator
    from powerinfer_py.loader import load_checkpoint

    torch.set_num_threads(threads)
    ckpt = load_checkpoint(model)
    predictors, threshold = get_predictors(ckpt, None)
    setup = build_hybrid(ckpt, "cuda", torch.float16, resolve_budget(budget, torch.device("cuda")), predictors,
                         threshold, ctx_len=512)
    gen = Generator(setup.model, max_len=512)
    prompt = list(range(100, 164))
    gen.generate(prompt, 4)
    setup.counters.reset()
    tps = sorted(gen.generate(prompt, 32)[1].generate_tps for _ in range(3))[1]
    return {"threads": threads, "decode_tps": tps, "cpu_seconds_per_token": setup.counters.cpu_seconds / 3 / 31,
            "hit_rate": setup.counters.hit_rate}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--vram-budget", required=True)
    ap.add_argument("--threads", default="4,8,12,16")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one measurement
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.model, args.vram_budget, args.one)))
        return
    for name, env in VARIANTS:
        for threads in map(int, args.threads.split(",")):
            out = subprocess.run([sys.executable, "-m", "benchmarks.hybrid_threads", args.model, "--vram-budget",
                                  args.vram_budget, "--one", str(threads)], env={**os.environ, **env},
                                 capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr.strip()[-300:]
            print(f"{name:<24} threads {threads:>2}: {line}", flush=True)


if __name__ == "__main__":
    main()
