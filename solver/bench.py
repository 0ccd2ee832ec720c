"""Solver benchmark on Llama-2 shapes with synthetic power-law activation counts (no weights needed).

    python -m solver.bench [--shape llama2-70b] [--budgets 40,48GiB] [--groups 32,64,256] [--ffn-type f16] [--csv F]

For each budget and group: solve time (wall and CPU, CBC included), status and gap of both objectives, the GPU
hit rate and modelled tokens/s of the greedy, coverage and latency placements.
"""
from __future__ import annotations

import argparse
import csv
import resource
import sys
import time

import numpy as np
import torch

from kernels import WEIGHT_TYPES
from powerinfer_py.atomic import atomic_file
from powerinfer_py.config import ModelConfig

from .cli import parse_budget_list, parse_int_list
from .ledger import format_bytes, vram_ledger
from .placement import PlacementProblem, greedy_placement, solve_placement

SHAPES = {  # (config, predictor rank)
    "llama2-70b": (ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, n_ff=28672,
                               max_seq_len=4096), 1024),
    "llama2-7b": (ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, n_ff=11008,
                              max_seq_len=4096), 1024),
}


def power_law_counts(n_layers: int, n_ff: int, tokens: int = 10000, mean_active: float = 0.1, seed: int = 0):
    """Per layer, neuron r (in a random order) is active with probability min(1, (r / r0)^-a), a drawn around 1
    per layer and r0 set so that a mean_active share of neurons fire per token; counts are binomial over tokens."""
    rng = np.random.default_rng(seed)
    rank = np.arange(1, n_ff + 1, dtype=np.float64)
    counts = []
    for _ in range(n_layers):
        a = rng.uniform(0.8, 1.2)
        lo, hi = 1e-3, float(n_ff)
        for _ in range(60):  # bisection on r0 for the mean activation
            r0 = (lo * hi) ** 0.5
            lo, hi = (r0, hi) if np.minimum(1, (rank / r0) ** -a).mean() < mean_active else (lo, r0)
        p = np.minimum(1, (rank / r0) ** -a)
        counts.append(torch.from_numpy(rng.permutation(rng.binomial(tokens, p)).astype(np.float64)))
    return counts


def cpu_seconds() -> float:
    """This process's CPU time plus its finished children's (CBC runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


FIELDS = ("budget", "group", "ffn_type", "greedy_hit", "coverage_hit", "latency_hit", "greedy_tps", "coverage_tps",
          "latency_tps", "coverage_wall_s", "coverage_cpu_s", "coverage_status", "coverage_gap", "latency_wall_s",
          "latency_cpu_s", "latency_status", "latency_gap", "unused_bytes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solver.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-70b")
    parser.add_argument("--budgets", default="40,48,56,64,72GiB")
    parser.add_argument("--groups", default="64")
    parser.add_argument("--ffn-type", choices=WEIGHT_TYPES, default="q4_0")
    parser.add_argument("--tokens", type=int, default=10000)
    parser.add_argument("--csv")
    args = parser.parse_args(argv)
    cfg, rank = SHAPES[args.shape]
    counts = power_law_counts(cfg.n_layers, cfg.n_ff, args.tokens)
    ledger = vram_ledger(cfg, "f16", args.ffn_type, cfg.max_seq_len, 1, [rank] * cfg.n_layers)
    print(f"{args.shape} shapes, FFN {args.ffn_type} ({ledger.ffn_bytes_per_neuron} B/neuron), dense parts "
          f"{format_bytes(ledger.dense_bytes)}, all FFN rows "
          f"{format_bytes(ledger.ffn_bytes_per_neuron * cfg.n_layers * cfg.n_ff)}")
    print(f"{'budget':>10} {'group':>5} | hit rate: greedy coverage latency | tok/s: greedy coverage latency | "
          f"coverage: wall cpu s | latency: wall cpu s")
    rows = []
    for budget in parse_budget_list(args.budgets):
        for group in parse_int_list(args.groups, "--groups"):
            problem = PlacementProblem(counts, ledger, budget, group, tokens=args.tokens)
            greedy = greedy_placement(problem)
            row = dict(budget=budget, group=group, ffn_type=args.ffn_type, greedy_hit=greedy.hit_rate,
                       greedy_tps=greedy.tokens_per_s)
            for objective in ("coverage", "latency"):
                wall, cpu = time.perf_counter(), cpu_seconds()  # from the counts: sorting included
                p = solve_placement(PlacementProblem(counts, ledger, budget, group, tokens=args.tokens), objective)
                row.update({f"{objective}_hit": p.hit_rate, f"{objective}_tps": p.tokens_per_s,
                            f"{objective}_wall_s": time.perf_counter() - wall,
                            f"{objective}_cpu_s": cpu_seconds() - cpu,
                            f"{objective}_status": p.status, f"{objective}_gap": p.gap})
                if objective == "coverage":
                    row["unused_bytes"] = budget - ledger.dense_bytes - p.ffn_bytes
            rows.append(row)
            print(f"{format_bytes(budget):>10} {group:>5} | {100 * row['greedy_hit']:6.2f}% "
                  f"{100 * row['coverage_hit']:6.2f}% {100 * row['latency_hit']:6.2f}% | "
                  f"{row['greedy_tps']:6.2f} {row['coverage_tps']:6.2f} {row['latency_tps']:6.2f} | "
                  f"{row['coverage_wall_s']:5.2f} {row['coverage_cpu_s']:5.2f} {row['coverage_status']} | "
                  f"{row['latency_wall_s']:5.2f} {row['latency_cpu_s']:5.2f} {row['latency_status']}", flush=True)
    if args.csv:
        with atomic_file(args.csv, force=True) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
