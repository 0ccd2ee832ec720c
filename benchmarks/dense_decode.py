"""Dense decode speed of the runtime (CUDA graphs) beside transformers' eager `generate`, on the same GPU.

    python benchmarks/dense_decode.py [--shapes smollm2-135m,llama2-7b] [--out results/dense.json]

Weights are random (speed does not depend on their values) with the real models' shapes. The achieved
bandwidth is weight bytes x tokens/s, against the device-to-device copy bandwidth measured in the same run."""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import SHAPES, copy_bandwidth, machine_info, random_dense_model, write_json
from powerinfer_py.generate import Generator

PROMPT, NEW = 16, 128


def ours_tps(model, use_graph: bool) -> float:
    gen = Generator(model, max_len=PROMPT + NEW + 8, use_cuda_graph=use_graph)
    prompt = list(range(10, 10 + PROMPT))
    gen.generate(prompt, 16)  # warm-up: graph capture, cuBLAS handles
    runs = [gen.generate(prompt, NEW)[1].generate_tps for _ in range(3)]
    return sorted(runs)[1]


def transformers_tps(cfg) -> float:
    import transformers

    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    with torch.device("cuda"):
        ref = transformers.LlamaForCausalLM._from_config(hf_cfg, torch_dtype=torch.float16).eval()
    prompt = torch.arange(10, 10 + PROMPT, device="cuda")[None]
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ref.generate(prompt, max_new_tokens=8, min_new_tokens=8, **kw)
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        ref.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)  # the prefill alone, to subtract
        torch.cuda.synchronize()
        runs.append((NEW - 1) / ((t1 - t0) - (time.perf_counter() - t1)))
    del ref
    torch.cuda.empty_cache()
    return sorted(runs)[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    copy_bw = copy_bandwidth()
    rows = []
    for name in args.shapes.split(","):
        cfg = SHAPES[name]
        model = random_dense_model(cfg, torch.float16)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        graph, eager = ours_tps(model, True), ours_tps(model, False)
        del model
        torch.cuda.empty_cache()
        hf = transformers_tps(cfg)
        rows.append(dict(shape=name, weights="random", weight_bytes=weight_bytes, ours_graph_tps=graph,
                         ours_eager_tps=eager, transformers_eager_tps=hf, speedup_vs_transformers=graph / hf,
                         achieved_gbps=weight_bytes * graph / 1e9, copy_gbps=copy_bw / 1e9,
                         fraction_of_copy_bw=weight_bytes * graph / copy_bw))
    print(f"{'shape':<14}{'graph tok/s':>12}{'eager':>9}{'HF eager':>10}{'x HF':>7}{'GB/s':>8}{'of copy':>9}")
    for r in rows:
        print(f"{r['shape']:<14}{r['ours_graph_tps']:>12.1f}{r['ours_eager_tps']:>9.1f}{r['transformers_eager_tps']:>10.1f}"
              f"{r['speedup_vs_transformers']:>7.2f}{r['achieved_gbps']:>8.0f}{r['fraction_of_copy_bw']:>9.0%}")
    write_json(args.out, {"benchmark": "dense_decode", "machine": machine_info(), "prompt_tokens": PROMPT,
                          "new_tokens": NEW, "rows": rows})


if __name__ == "__main__":
    main()
