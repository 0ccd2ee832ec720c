"""Prefill strategies of the hybrid engine by prompt length: the cold rows computed on the CPU (C kernels up to
8 tokens, torch's matrix products beyond) against streamed to the GPU in blocks (hybrid.streamed_part).
`python -m benchmarks.prefill MODEL.powerinfer.gguf --out results/prefill.json` runs every `MODEL.<budget>.gpuidx`
beside the model (as benchmarks.run writes them) and prints prompt tokens/s per length and strategy; the engine
streams from hybrid.STREAM_MIN_TOKENS tokens on."""
from __future__ import annotations

import argparse
import glob
import statistics
import sys
import time

import torch

from benchmarks.common import machine_info, write_json
from benchmarks.systems import CTX
from powerinfer_py import hybrid
from powerinfer_py.engine import build_hybrid
from powerinfer_py.generate import Generator
from powerinfer_py.loader import load_checkpoint

LENGTHS = (2, 4, 8, 16, 32, 64, 128, 512)
NEVER = 1 << 30


def prefill_seconds(gen: Generator, tokens: list[int], stream: bool, reps: int = 3) -> float:
    """Median seconds of one prefill of `tokens` with the cold rows streamed or on the CPU."""
    hybrid.STREAM_MIN_TOKENS = 1 if stream else NEVER
    times = []
    for _ in range(reps + 1):  # the first one warms up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.prefill(tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a PowerInfer GGUF with predictors, its .<budget>.gpuidx files beside it")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args(argv)
    default = hybrid.STREAM_MIN_TOKENS
    ckpt = load_checkpoint(args.model)
    results = {"machine": machine_info(), "command": "python -m benchmarks.prefill " + " ".join(sys.argv[1:]),
               "stream_min_tokens": default, "budgets": []}
    for gpuidx in sorted(glob.glob(args.model + ".*.gpuidx")):
        budget = int(gpuidx.split(".")[-2])
        torch.cuda.empty_cache()
        setup = build_hybrid(ckpt, "cuda", torch.float16, budget, ckpt.predictors, ckpt.config.sparse_threshold,
                             ctx_len=CTX, gpuidx=gpuidx)
        gen = Generator(setup.model, CTX)
        rows = []
        print(f"budget {budget / 2**30:.2f} GiB: prompt tokens/s, cold rows on the CPU | streamed to the GPU")
        for n in LENGTHS:
            tokens = [(7 * i) % (ckpt.config.vocab_size - 10) + 5 for i in range(n)]
            cpu, streamed = (n / prefill_seconds(gen, tokens, stream) for stream in (False, True))
            rows.append({"tokens": n, "cpu_tps": cpu, "stream_tps": streamed})
            print(f"  {n:4d} tokens: {cpu:9.1f} | {streamed:9.1f}", flush=True)
        results["budgets"].append({"budget": budget, "rows": rows})
        del gen, setup
    hybrid.STREAM_MIN_TOKENS = default
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
