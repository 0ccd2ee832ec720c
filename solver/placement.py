"""Which FFN neurons live on the GPU.

Each layer's neurons are sorted by activation count and cut into groups; a layer keeps a prefix of them on the
GPU, so a placement is one hot count per layer: 0, a prefix of whole groups of at least C_l neurons (the paper's
communication constraint) or all of n_ff. Layers compete only for the bytes the dense parts leave.

coverage maximises the activations the GPU serves; latency minimises the modelled token time (timing.py). Below
full, a layer's modelled time is convex in its hot count, so latency never gives a layer more than its
minimum-time prefix. The MILP (PuLP + CBC, see _solve_milp) has a handful of integers per layer instead of a
binary per group, starts from the greedy placement, stops at the time limit with its incumbent, and the greedy
placement is kept unless CBC finds a strictly better one.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pulp
import torch

from powerinfer_py.errors import InputError

from .ledger import Ledger
from .timing import Bandwidths, TokenModel

OBJECTIVES = ("coverage", "latency")


@dataclass
class Placement:
    gpu_masks: list[torch.Tensor]  # bool (n_ff,) per layer: True = the neuron's rows live on the GPU
    hot_neurons: np.ndarray  # per layer
    gpu_share: np.ndarray  # per layer: share of its activations the GPU serves
    cpu_bytes_per_token: np.ndarray  # per layer: expected cold-row bytes the CPU reads per token
    layer_time_s: np.ndarray  # per layer: modelled max(GPU, CPU + hand-off)
    hit_rate: float  # share of all activations the GPU serves
    token_time_s: float  # modelled decode time of one token
    ffn_bytes: int
    objective: str
    status: str  # optimal, time limit, greedy (CBC found nothing better), given (an existing index)
    gap: float | None  # CBC's relative optimality gap (None: unknown)
    solve_time_s: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_time_s

    @property
    def objective_value(self) -> float:
        return self.hit_rate if self.objective == "coverage" else self.token_time_s


class PlacementProblem:
    """Counts, budget and time model of one instance. counts: one 1-D tensor of n_ff activation counts per layer,
    in layer order; tokens: how many tokens they were counted over (default: the largest count, i.e. the most
    active neuron is taken as always active); min_gpu_neurons: C_l (None: from the time model, 0: off)."""

    def __init__(self, counts: list[torch.Tensor], ledger: Ledger, budget_bytes: int, group: int = 64,
                 bandwidths: Bandwidths = Bandwidths(), tokens: float | None = None,
                 min_gpu_neurons: int | None = None):
        cfg = ledger.config
        if len(counts) != cfg.n_layers:
            raise InputError(f"activation counts: {len(counts)} layers, the model has {cfg.n_layers}")
        for i, c in enumerate(counts):
            if c.dim() != 1 or c.numel() != cfg.n_ff:
                raise InputError(f"activation counts of layer {i}: shape {tuple(c.shape)}, expected ({cfg.n_ff},)")
            if not torch.isfinite(c).all() or (c < 0).any():
                raise InputError(f"activation counts of layer {i}: negative or non-finite values")
        if group < 1:
            raise InputError(f"group size {group}: must be at least 1")
        if tokens is not None and not tokens > 0:
            raise InputError(f"tokens {tokens}: must be positive")
        self.ledger, self.budget, self.group, self.n_ff = ledger, budget_bytes, group, cfg.n_ff
        self.counts = np.stack([c.detach().cpu().double().numpy() for c in counts])  # (L, n_ff)
        self.order = np.argsort(-self.counts, axis=1, kind="stable")  # hottest first, ties by index
        sorted_counts = np.take_along_axis(self.counts, self.order, axis=1)
        self.prefix = np.concatenate([np.zeros((cfg.n_layers, 1)), np.cumsum(sorted_counts, axis=1)], axis=1)
        self.max_neurons = ledger.ffn_budget(budget_bytes) // ledger.ffn_bytes_per_neuron
        tokens = tokens or max(float(self.counts.max()), 1.0)
        self.timing = TokenModel.build(ledger, tokens, bandwidths)
        self.min_gpu_neurons = self.timing.min_gpu_neurons if min_gpu_neurons is None else min_gpu_neurons
        n_groups = math.ceil(self.n_ff / group)
        k_min = max(1, math.ceil(self.min_gpu_neurons / group))
        # hot counts a layer may take: none, k_min..n_groups-1 whole groups, or all (if that meets C_l)
        steps = [0] + [k * group for k in range(k_min, n_groups)] + [self.n_ff]
        self.allowed_hot = np.array(steps if self.min_gpu_neurons <= self.n_ff else [0])

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    def hot_mass(self, hot: np.ndarray) -> np.ndarray:
        """Activations of each layer's `hot` most active neurons."""
        return self.prefix[np.arange(self.n_layers), hot]

    def layer_times(self, hot: np.ndarray) -> np.ndarray:
        return self.timing.layer_times(hot, self.prefix[:, -1] - self.hot_mass(hot), self.n_ff)

    def best_latency_hot(self) -> np.ndarray:
        """Per layer, the allowed hot count below full with the least modelled time. Layer time is convex in the
        hot count below full, so a latency placement never gives a layer more (it would cost time and bytes)."""
        partial = self.allowed_hot[self.allowed_hot < self.n_ff]
        hot = np.broadcast_to(partial, (self.n_layers, len(partial)))
        times = np.stack([self.layer_times(hot[:, j]) for j in range(len(partial))], axis=1)
        return partial[np.argmin(times, axis=1)]

    def steps(self, objective: str) -> list[np.ndarray]:
        """Per layer, the hot counts a placement may give it, ascending from 0."""
        if objective == "coverage":
            return [self.allowed_hot] * self.n_layers
        best = self.best_latency_hot()
        return [self.allowed_hot[(self.allowed_hot <= b) | (self.allowed_hot == self.n_ff)] for b in best]

    def placement(self, masks: list[np.ndarray], objective: str, status: str, gap: float | None,
                  solve_time_s: float) -> Placement:
        """Per-layer statistics of any masks (prefix placements and existing indexes alike)."""
        masks = np.stack([np.asarray(m, dtype=bool) for m in masks])
        hot = masks.sum(1)
        gpu_counts = (self.counts * masks).sum(1)
        total = self.prefix[:, -1]
        cold = total - gpu_counts
        times = self.timing.layer_times(hot, cold, self.n_ff)
        return Placement(
            gpu_masks=[torch.from_numpy(m) for m in masks], hot_neurons=hot,
            gpu_share=np.divide(gpu_counts, total, out=np.ones_like(total), where=total > 0),
            cpu_bytes_per_token=cold / self.timing.tokens * self.timing.cpu_bytes_per_neuron,
            layer_time_s=times, hit_rate=float(gpu_counts.sum() / max(total.sum(), 1e-300)),
            token_time_s=float(times.sum() + self.timing.head_s),
            ffn_bytes=int(hot.sum()) * self.ledger.ffn_bytes_per_neuron,
            objective=objective, status=status, gap=gap, solve_time_s=solve_time_s)

    def prefix_placement(self, hot: np.ndarray, objective: str, status: str, gap: float | None,
                         solve_time_s: float) -> Placement:
        masks = [np.zeros(self.n_ff, dtype=bool) for _ in range(self.n_layers)]
        for mask, order, n in zip(masks, self.order, hot):
            mask[order[:n]] = True
        return self.placement(masks, objective, status, gap, solve_time_s)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def greedy_hot(problem: PlacementProblem, objective: str = "coverage") -> np.ndarray:
    """PowerInfer's placement, kept feasible: the steps between a layer's allowed hot counts (its first step is
    its first C_l neurons) taken in order of activations per neuron while they fit, each layer's in its own
    order. With C_l inert and whole groups this is PowerInfer's top groups under one neuron budget."""
    layer_steps = problem.steps(objective)
    layer, step, size, density = [], [], [], []
    for i, steps in enumerate(layer_steps):
        gains = np.diff(problem.prefix[i, steps])
        sizes = np.diff(steps)
        layer.append(np.full(len(sizes), i))
        step.append(np.arange(len(sizes)))
        size.append(sizes)
        density.append(gains / sizes)
    layer, step, size, density = (np.concatenate(a) for a in (layer, step, size, density))
    taken = np.zeros(problem.n_layers, dtype=np.int64)  # steps taken per layer
    left = problem.max_neurons
    for i in np.lexsort((step, layer, -density)):  # densest first, ties by layer then step
        if taken[layer[i]] == step[i] and size[i] <= left:
            taken[layer[i]] += 1
            left -= size[i]
    return np.array([steps[n] for steps, n in zip(layer_steps, taken)], dtype=np.int64)


def greedy_placement(problem: PlacementProblem, objective: str = "coverage") -> Placement:
    _check_objective(objective)
    t0 = time.perf_counter()
    hot = greedy_hot(problem, objective)
    return problem.prefix_placement(hot, objective, "greedy", None, time.perf_counter() - t0)


def milp_value(problem: PlacementProblem, hot: np.ndarray, objective: str) -> float:
    """The MILP's objective (minimised): coverage, minus the activations per token the GPU serves; latency, the
    layers' modelled time in microseconds."""
    if objective == "coverage":
        return -float(problem.hot_mass(hot).sum()) / problem.timing.tokens
    return 1e6 * float(problem.layer_times(hot).sum())


def solve_placement(problem: PlacementProblem, objective: str = "coverage", time_limit: float = 30.0) -> Placement:
    """The MILP optimum (or CBC's incumbent at the time limit), never worse than the greedy placement."""
    _check_objective(objective)
    t0 = time.perf_counter()
    start = greedy_hot(problem, objective)
    if problem.max_neurons == 0 or len(problem.allowed_hot) == 1:  # nothing can be placed
        return problem.prefix_placement(start, objective, "optimal", 0.0, time.perf_counter() - t0)
    hot, optimal, bound = _solve_milp(problem, objective, start, time_limit)
    if hot is None or milp_value(problem, hot, objective) >= milp_value(problem, start, objective):
        hot = start  # CBC found nothing strictly better: keep the greedy placement
    value = milp_value(problem, hot, objective)
    gap = 0.0 if optimal else None if bound is None else max(0.0, (value - bound) / max(abs(value), 1e-12))
    return problem.prefix_placement(hot, objective, "optimal" if optimal else "time limit", gap,
                                    time.perf_counter() - t0)


def _solve_milp(problem: PlacementProblem, objective: str, start: np.ndarray, time_limit: float):
    """(hot per layer or None, proven optimal, CBC's lower bound or None), warm-started at `start`.

    Per layer the allowed hot counts are 0, a block b (k_min groups: the communication constraint), b + G,
    ..., a largest partial prefix P, and n_ff. Variables: `some` (binary: the block), k (integer: the groups
    after it), d_g in [0, 1] with sum d_g = k (which groups), `full` (binary: the rest, n_ff - P); full <= some,
    m full <= k <= m some. At integer some, k, full the best d are the first k groups, so d is integral.
    """
    G, n_ff, timing = problem.group, problem.n_ff, problem.timing
    lp = pulp.LpProblem("gpu_placement", pulp.LpMinimize)  # CBC 2.10 mis-signs warm starts of -max problems
    budget, goal, start_values, layer_vars = [], [], [], []
    us_per_count = 1e6 * timing.cpu_s_per_neuron / timing.tokens
    handoff_us = 1e6 * timing.handoff_s
    for i, steps in enumerate(problem.steps(objective)):
        if len(steps) == 1:
            layer_vars.append(None)
            continue
        prefix, total = problem.prefix[i], float(problem.prefix[i, -1])
        partial = steps[1:-1]
        full = pulp.LpVariable(f"full{i}", cat="Binary")
        start_full = int(start[i] == n_ff)
        start_values.append((full, start_full))
        if len(partial):
            m = len(partial) - 1
            some = pulp.LpVariable(f"some{i}", cat="Binary")
            k = pulp.LpVariable(f"k{i}", 0, m, cat="Integer")
            d = [pulp.LpVariable(f"d{i}_{g}", 0, 1) for g in range(m)]
            lp += full - some <= 0
            lp += pulp.LpAffineExpression([(v, 1.0) for v in d] + [(k, -1.0)]) == 0
            lp += k - m * some <= 0
            lp += k - m * full >= 0
            neurons = [(some, partial[0]), (k, G), (full, n_ff - partial[-1])]
            gains = np.diff(prefix[partial]).tolist()
            counts = [(some, prefix[partial[0]])] + list(zip(d, gains)) + [(full, total - prefix[partial[-1]])]
            start_k = m if start_full else int(np.searchsorted(partial, start[i])) if start[i] else 0
            start_values += [(some, int(start[i] > 0)), (k, start_k)]  # CBC solves for d given these
        else:
            some = k = None
            neurons, counts = [(full, n_ff)], [(full, total)]
        layer_vars.append((some, k, full, partial))
        budget += neurons
        if objective == "coverage":
            goal += [(v, -float(c) / timing.tokens) for v, c in counts]
        else:  # t >= GPU time; t >= CPU time + hand-off, both 0 when full
            t = pulp.LpVariable(f"t{i}", 0)
            lp += pulp.LpAffineExpression([(t, 1.0)] + [(v, -1e6 * timing.gpu_s_per_neuron * n) for v, n in neurons]) \
                >= 1e6 * timing.layer_dense_s[i]
            cpu_rows = [(v, us_per_count * c) for v, c in counts]
            cpu_rows[-1] = (full, us_per_count * counts[-1][1] + handoff_us)
            lp += pulp.LpAffineExpression([(t, 1.0)] + cpu_rows) >= us_per_count * total + handoff_us
            goal.append((t, 1.0))
    unit = math.gcd(*(int(n) for _, n in budget))  # the budget in units of the sizes' gcd, rounded down:
    lp += pulp.LpAffineExpression([(v, n // unit) for v, n in budget]) <= problem.max_neurons // unit  # a tighter LP
    lp.setObjective(pulp.LpAffineExpression(goal))
    for var, value in start_values:
        var.setInitialValue(value)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=True, logPath=log_path))
        with open(log_path) as f:
            log = f.read()
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, False, None
    bound = re.search(r"^Lower bound:\s*(\S+)", log, re.M)
    hot = np.zeros(problem.n_layers, dtype=np.int64)
    for i, chosen in enumerate(layer_vars):
        if chosen is None:
            continue
        some, k, full, partial = chosen
        if round(full.value()):
            hot[i] = n_ff
        elif some is not None and round(some.value()):
            hot[i] = partial[round(k.value())]
    return hot, lp.sol_status == pulp.LpSolutionOptimal, float(bound.group(1)) if bound else None
