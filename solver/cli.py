"""`powerinfer-py solve`: place FFN neurons under a VRAM budget and write PowerInfer's .gpuidx."""
from __future__ import annotations

import argparse
import csv
import re
import sys

from tqdm import tqdm

from kernels import WEIGHT_TYPES
from powerinfer_py.atomic import atomic_file, check_writable
from powerinfer_py.errors import InputError
from powerinfer_py.formats import (default_gpuidx_path, load_activations, load_predictors, profiled_tokens, read_gguf,
                                   read_gpuidx, write_gpuidx)
from powerinfer_py.loader import detect_kind, read_config

from .ledger import DENSE_DTYPES, format_bytes, parse_budget, vram_ledger
from .placement import OBJECTIVES, Placement, PlacementProblem, solve_placement
from .timing import Bandwidths

DEFAULT_CTX = 2048  # the engine's (powerinfer_py/engine.py), so `run` reuses what `solve` writes


def parse_budget_list(text: str) -> list[int]:
    """'2,4,6,8GiB' or '512,1024MiB': a bare number takes the unit of the list's last entry."""
    items = [s.strip() for s in text.split(",")]
    unit = re.sub(r"^[\d.\s]*", "", items[-1])
    return [parse_budget(s if re.search(r"[a-zA-Z]", s) else s + unit) for s in items]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected integers separated by commas, e.g. 32,64,256") from None


def predictor_ranks(args, cfg) -> list[int] | None:
    """r per layer from --predictor-rank, --predictors DIR or a PowerInfer GGUF's fc1 tensors; None: no predictors."""
    if args.predictor_rank is not None:
        return [args.predictor_rank] * cfg.n_layers
    if args.predictors:
        layers, _ = load_predictors(args.predictors, cfg.n_layers, cfg.dim, cfg.n_ff)
        return [sd["fc1.weight"].shape[0] for sd in layers]
    if detect_kind(args.model) == "powerinfer":
        tensors = read_gguf(args.model).tensors
        return [tensors[f"blk.{i}.fc1.weight"].shape[0] for i in range(cfg.n_layers)]
    return None


def format_report(placement: Placement, ledger, budget: int, problem: PlacementProblem) -> str:
    lines = [f"{'layer':>5} {'hot':>7} {'hot %':>6} {'GPU share':>9} {'CPU MiB/token':>13} {'time us':>8}"]
    for i in range(len(placement.hot_neurons)):
        lines.append(f"{i:>5} {placement.hot_neurons[i]:>7} {100 * placement.hot_neurons[i] / problem.n_ff:>6.1f} "
                     f"{100 * placement.gpu_share[i]:>8.2f}% {placement.cpu_bytes_per_token[i] / 2**20:>13.3f} "
                     f"{1e6 * placement.layer_time_s[i]:>8.1f}")
    solved = "" if placement.gap is None else f", gap {100 * placement.gap:.3f}%, {placement.solve_time_s:.2f} s"
    lines += [
        f"GPU hit rate {100 * placement.hit_rate:.2f}%; modelled {placement.tokens_per_s:.2f} tok/s "
        f"({1e3 * placement.token_time_s:.2f} ms/token, CPU {placement.cpu_bytes_per_token.sum() / 2**20:.1f} "
        f"MiB/token); {placement.objective} objective, {placement.status}{solved}",
        f"C_l (communication constraint) {problem.min_gpu_neurons} neurons; counts over "
        f"{problem.timing.tokens:.0f} tokens; group {problem.group}",
        "",
        ledger.table(budget, int(placement.hot_neurons.sum())),
    ]
    return "\n".join(lines)


def cmd_solve(args) -> int:
    cfg = read_config(args.model)
    if (args.vram_budget is None) == (args.sweep_budget is None):
        raise InputError("give --vram-budget for one solve or --sweep-budget for a table (not both)")
    if args.time_limit <= 0:
        raise InputError(f"--time-limit {args.time_limit}: must be positive")
    ctx = args.ctx or min(DEFAULT_CTX, cfg.max_seq_len)
    ledger = vram_ledger(cfg, args.dtype, args.ffn_type or args.dtype, ctx, args.batch, predictor_ranks(args, cfg),
                         embeddings_on_gpu=not args.embeddings_on_cpu)
    bandwidths = Bandwidths(gpu=args.gpu_bw * 1e9, cpu=args.cpu_bw * 1e9, pcie=args.pcie_bw * 1e9,
                            sync_s=args.sync_us * 1e-6)
    if args.sweep_budget is not None:  # check every argument before the counts load
        groups = parse_int_list(args.sweep_group, "--sweep-group") if args.sweep_group else [args.group]
        settings = [(b, g) for b in parse_budget_list(args.sweep_budget) for g in groups]
        if args.csv:
            check_writable(args.csv, args.force)
    else:
        budget = parse_budget(args.vram_budget)
        output = args.output or default_gpuidx_path(args.model)
        if args.evaluate is None:
            check_writable(output, args.force)
    counts = load_activations(args.activation, cfg.n_layers, cfg.n_ff)
    tokens = args.tokens or profiled_tokens(args.activation)
    if args.sweep_budget is not None:
        return sweep(args, settings, counts, tokens, ledger, bandwidths)
    problem = PlacementProblem(counts, ledger, budget, args.group, bandwidths, tokens, args.min_gpu_neurons)
    if args.evaluate is not None:
        masks, capacity = read_gpuidx(args.evaluate, cfg.n_layers, cfg.n_ff)
        placement = problem.placement(masks, args.objective, "given", None, 0.0)
        print(f"{args.evaluate}: solved for {format_bytes(capacity)}")
        print(format_report(placement, ledger, budget, problem))
        return 0
    placement = solve_placement(problem, args.objective, args.time_limit)
    write_gpuidx(output, placement.gpu_masks, budget, force=args.force)
    if args.report:
        print(format_report(placement, ledger, budget, problem))
    print(f"solve: GPU hit rate {100 * placement.hit_rate:.2f}%, modelled {placement.tokens_per_s:.2f} tok/s, "
          f"{placement.status}, gap {100 * placement.gap:.3f}% in {placement.solve_time_s:.2f} s -> {output}",
          file=sys.stderr)
    return 0


SWEEP_FIELDS = ("budget", "group", "objective", "hot_neurons", "hit_rate", "tokens_per_s", "solve_s", "status", "gap")


def sweep(args, settings, counts, tokens, ledger, bandwidths) -> int:
    """One solve per (budget, group): a table on stdout and, with --csv, the same rows as CSV."""
    rows = []
    print(f"{'budget':>10} {'group':>5} {'hot':>9} {'hit rate':>8} {'tok/s':>8} {'solve s':>7}  status")
    for budget, group in tqdm(settings, desc="sweep", file=sys.stderr):
        problem = PlacementProblem(counts, ledger, budget, group, bandwidths, tokens, args.min_gpu_neurons)
        p = solve_placement(problem, args.objective, args.time_limit)
        rows.append(dict(budget=budget, group=group, objective=args.objective, hot_neurons=int(p.hot_neurons.sum()),
                         hit_rate=p.hit_rate, tokens_per_s=p.tokens_per_s, solve_s=p.solve_time_s, status=p.status,
                         gap=p.gap))
        tqdm.write(f"{format_bytes(budget):>10} {group:>5} {rows[-1]['hot_neurons']:>9} {100 * p.hit_rate:>7.2f}% "
                   f"{p.tokens_per_s:>8.2f} {p.solve_time_s:>7.2f}  {p.status}", file=sys.stdout)
    if args.csv:
        with atomic_file(args.csv, args.force) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, SWEEP_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("solve", help="place FFN neurons on the GPU under a VRAM budget (writes a .gpuidx)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="HF checkpoint folder, GGUF or PowerInfer GGUF file")
    p.add_argument("--activation", required=True, help="folder of activation_{i}.pt per-neuron counts")
    p.add_argument("--vram-budget", help="GPU memory to fill: 6GiB, 6GB, 512MiB, 0.5G, or 6 (GiB)")
    p.add_argument("-o", "--output", help="default: <model file>.generated.gpuidx, or model.generated.gpuidx "
                                          "inside a Hugging Face folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--group", type=int, default=64, help="neurons per MILP group (PowerInfer's code: 256, paper: 64)")
    p.add_argument("--objective", choices=OBJECTIVES, default="coverage")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds; CBC then returns its incumbent")
    p.add_argument("--report", action="store_true", help="per-layer table, hit rate, tok/s and the VRAM ledger")
    p.add_argument("--evaluate", metavar="GPUIDX", help="report an existing index instead of solving")
    g = p.add_argument_group("VRAM ledger")
    g.add_argument("--dtype", choices=list(DENSE_DTYPES), default="f16", help="dense weights, KV cache, activations")
    g.add_argument("--ffn-type", choices=WEIGHT_TYPES, help="FFN rows on the GPU (default: --dtype)")
    g.add_argument("--ctx", type=int, help=f"context length of the KV cache (default: min({DEFAULT_CTX}, model's))")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--predictors", help="predictor folder, to charge its ranks (PowerInfer GGUFs: read from the file)")
    g.add_argument("--predictor-rank", type=int, help="charge predictors of this rank in every layer")
    g.add_argument("--embeddings-on-cpu", action="store_true",
                   help="do not charge the token embeddings (the engine keeps them on the GPU)")
    g = p.add_argument_group("time model (defaults: measured on the H100 device, shared/docs/device-facts.md)")
    g.add_argument("--gpu-bw", type=float, default=3000.0, help="GB/s, HBM")
    g.add_argument("--cpu-bw", type=float, default=116.0, help="GB/s, DRAM read with all threads")
    g.add_argument("--pcie-bw", type=float, default=55.0, help="GB/s, pinned host<->device")
    g.add_argument("--sync-us", type=float, default=27.0, help="microseconds per H2D + D2H + synchronize")
    g.add_argument("--tokens", type=float, help="tokens the counts were collected over (default: stats.json "
                                                  "beside them, else the largest count)")
    g.add_argument("--min-gpu-neurons", type=int, help="C_l, the communication constraint (default: from the "
                                                       "bandwidths; 0: off)")
    g = p.add_argument_group("tuning")
    g.add_argument("--sweep-budget", help="solve for each budget, e.g. 2,4,6,8GiB, and print a table")
    g.add_argument("--sweep-group", help="with --sweep-budget, each group size, e.g. 32,64,256")
    g.add_argument("--csv", help="with --sweep-budget, also write the table as CSV")
    p.set_defaults(func=cmd_solve)
