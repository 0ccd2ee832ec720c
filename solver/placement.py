"""Which FFN neurons live on the GPU.

Each layer's neurons are sorted by activation count and cut into groups; a layer keeps a prefix of them on the
GPU, so a placement is one hot count per layer: 0, a prefix of whole groups of at least C_l neurons (the paper's
communication constraint) or all of n_ff. Layers compete only for the bytes the dense parts leave.

coverage maximises the activations the GPU serves; latency minimises the modelled token time (timing.py). Both
are one MILP for PuLP's bundled CBC (see _solve_milp): per layer a binary per hot count it may take. It starts
from the greedy placement, stops at the time limit with its incumbent, and the greedy placement is kept unless
CBC finds a strictly better one.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
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
    layer_time_s: np.ndarray  # per layer: modelled dense + max(GPU FFN, CPU FFN + hand-off)
    hit_rate: float  # share of all activations the GPU serves
    token_time_s: float  # modelled decode time of one token
    overlap_token_time_s: float  # the same with each layer's CPU half overlapping its dense part too (issue #7)
    ffn_bytes: int
    objective: str
    status: str  # optimal, time limit (CBC's incumbent), CBC failed (...) (the warm start), greedy
    # (greedy_placement), given (an existing index)
    gap: float | None  # relative optimality gap of a solve (0 when proven optimal); None for greedy and given
    solve_time_s: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.token_time_s


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
        # hot counts a layer may take: none, k_min..n_groups-1 whole groups, or all: a layer wholly on the GPU
        # hands nothing to the CPU, so C_l (which pays for the hand-off) does not bind it
        self.allowed_hot = np.array([0] + [k * group for k in range(k_min, n_groups)] + [self.n_ff])

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    def hot_mass(self, hot: np.ndarray) -> np.ndarray:
        """Activations of each layer's `hot` most active neurons."""
        return self.prefix[np.arange(self.n_layers), hot]

    def layer_times(self, hot: np.ndarray) -> np.ndarray:
        mass = self.hot_mass(hot)
        return self.timing.layer_times(hot, mass, self.prefix[:, -1] - mass, self.n_ff)

    def costs(self, objective: str) -> np.ndarray:
        """(layers, allowed hot counts): what the MILP minimises per layer, for each hot count it may take. coverage:
        minus the share of all activations the GPU serves, in parts per billion; latency: the layer's modelled
        time in nanoseconds. (Large units: CBC ignores improvements below 1e-5.)"""
        if objective == "coverage":
            return -1e9 * self.prefix[:, self.allowed_hot] / (self.prefix[:, -1].sum() or 1.0)
        return 1e9 * np.stack([self.layer_times(np.full(self.n_layers, h)) for h in self.allowed_hot], axis=1)

    def options(self, objective: str) -> np.ndarray:
        """(layers, allowed hot counts) bool: which hot counts each layer may take. For latency, partial prefixes
        past a layer's fastest one are dropped: below full a layer's time falls while its CPU side is the slower
        one and then rises with its GPU side, so they would only cost bytes and time."""
        every = np.ones((self.n_layers, len(self.allowed_hot)), dtype=bool)
        if objective == "coverage":
            return every
        partial = self.allowed_hot < self.n_ff
        fastest = np.argmin(np.where(partial, self.costs(objective), np.inf), axis=1)
        return (np.arange(len(self.allowed_hot)) <= fastest[:, None]) | ~partial

    def placement(self, masks: list[np.ndarray], objective: str, status: str, gap: float | None,
                  solve_time_s: float) -> Placement:
        """Per-layer statistics of any masks (prefix placements and existing indexes alike)."""
        masks = np.stack([np.asarray(m, dtype=bool) for m in masks])
        hot = masks.sum(1)
        gpu_counts = (self.counts * masks).sum(1)
        total = self.prefix[:, -1]
        cold = total - gpu_counts
        times = self.timing.layer_times(hot, gpu_counts, cold, self.n_ff)
        strict = self.timing.layer_times(hot, gpu_counts, cold, self.n_ff, overlap_dense=True)
        return Placement(
            gpu_masks=[torch.from_numpy(m) for m in masks], hot_neurons=hot,
            gpu_share=np.divide(gpu_counts, total, out=np.ones_like(total), where=total > 0),
            cpu_bytes_per_token=cold / self.timing.tokens * self.timing.cpu_bytes_per_neuron,
            layer_time_s=times, hit_rate=float(gpu_counts.sum() / max(total.sum(), 1e-300)),
            token_time_s=float(times.sum() + self.timing.head_s),
            overlap_token_time_s=float(strict.sum() + self.timing.head_s),
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
    layer_steps = [problem.allowed_hot[options] for options in problem.options(objective)]
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
    """The MILP's objective at `hot`: the sum of the layers' costs (PlacementProblem.costs)."""
    if objective == "coverage":
        return -1e9 * float(problem.hot_mass(hot).sum() / (problem.prefix[:, -1].sum() or 1.0))
    return 1e9 * float(problem.layer_times(hot).sum())


def solve_placement(problem: PlacementProblem, objective: str = "coverage", time_limit: float = 30.0) -> Placement:
    """The MILP optimum (or CBC's incumbent at the time limit), never worse than the greedy placement."""
    _check_objective(objective)
    t0 = time.perf_counter()
    greedy = greedy_hot(problem, objective)
    if problem.max_neurons == 0 or len(problem.allowed_hot) == 1:  # nothing can be placed
        return problem.prefix_placement(greedy, objective, "optimal", 0.0, time.perf_counter() - t0)
    hot, status, bound = _solve_milp(problem, objective, greedy, time_limit)
    if milp_value(problem, hot, objective) >= milp_value(problem, greedy, objective):
        hot = greedy  # nothing strictly better: keep the greedy placement
    value = milp_value(problem, hot, objective)
    gap = 0.0 if status == "optimal" else max(0.0, (value - bound) / max(abs(value), 1e-12))
    return problem.prefix_placement(hot, objective, status, gap, time.perf_counter() - t0)


def lagrangian(problem: PlacementProblem, objective: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(L, reduced costs (layers, allowed hot counts), a placement within the budget) for the budget multiplier
    lam >= 0 that maximises L(lam) = sum_l min_j (c_lj + lam n_j) - lam N, found by bisection on its subgradient.

    For any lam and feasible placement x, cost(x) >= L(lam) + sum_l rc_l(x_l) with the reduced costs
    rc_lj = c_lj + lam n_j - min_j' (c_lj' + lam n_j') >= 0: L is a lower bound, and an option whose reduced cost
    exceeds (a known placement's cost - L) is in no better placement. The placement returned, each layer's best
    option at the upper end of the bisection, is the LP relaxation's integral part: a second greedy start.
    """
    costs, options, neurons = problem.costs(objective), problem.options(objective), problem.allowed_hot

    def at(lam):
        shifted = np.where(options, costs + lam * neurons, np.inf)
        best = shifted.min(axis=1)
        return best.sum() - lam * problem.max_neurons, shifted - best[:, None], neurons[shifted.argmin(axis=1)]

    # above hi every layer's best option is 0 neurons (ties go to the fewest neurons), which fits
    lo, hi = 0.0, max(0.0, float(np.max((costs[:, :1] - costs[:, 1:]) / neurons[1:]))) * 2 + 1e-12
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid)[2].sum() > problem.max_neurons else (lo, mid)
    bound, reduced, _ = max(at(lo), at(hi), key=lambda r: r[0])
    return bound, reduced, at(hi)[2]


def _solve_milp(problem: PlacementProblem, objective: str, greedy: np.ndarray, time_limit: float):
    """(hot per layer, status, lower bound), warm-started at the better of `greedy` and the Lagrangian placement;
    should CBC return nothing, that start.

    A multiple-choice knapsack: per layer one binary per hot count it may take, exactly one chosen, their neurons
    within the budget. Its LP relaxation is each layer's convex hull of (neurons, cost), so CBC closes the gap at
    or near the root; reduced-cost fixing first leaves a few options per layer instead of hundreds.
    """
    costs = problem.costs(objective)
    lower, reduced, dual_hot = lagrangian(problem, objective)
    start = min((greedy, dual_hot), key=lambda hot: milp_value(problem, hot, objective))
    upper = milp_value(problem, start, objective)
    options = problem.options(objective) & (reduced <= upper - lower + 1e-9 * (1 + abs(upper)))
    options[np.arange(problem.n_layers), np.searchsorted(problem.allowed_hot, start)] = True  # against rounding
    lp = pulp.LpProblem("gpu_placement", pulp.LpMinimize)  # CBC 2.10 mis-signs warm starts of -max problems
    budget, goal, choices = [], [], []
    for i, layer_options in enumerate(options):
        hot = problem.allowed_hot[layer_options]
        z = [lp.add_variable(f"z{i}_{h}", cat="Binary") for h in hot]
        lp += pulp.LpAffineExpression([(v, 1) for v in z]) == 1
        budget += [(v, int(h)) for v, h in zip(z, hot) if h]
        goal += zip(z, costs[i, layer_options].tolist())
        for v, h in zip(z, hot):
            v.setInitialValue(int(h == start[i]))
        choices.append((z, hot))
    if budget:
        unit = math.gcd(*(n for _, n in budget))  # the budget in units of the sizes' gcd, rounded down: a tighter LP
        lp += pulp.LpAffineExpression([(v, n // unit) for v, n in budget]) <= problem.max_neurons // unit
    lp.setObjective(pulp.LpAffineExpression(goal))
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():  # PuLP 3.3 announces that 4.0 moves the bundled CBC to an extra
            warnings.simplefilter("ignore", DeprecationWarning)
            # CBC 2.10's preprocessing has called feasible instances of this model infeasible
            cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=True, logPath=log_path,
                                    options=["preprocess off"])
        lp.solve(cbc)
        with open(log_path) as f:
            log = f.read()
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return start, f"CBC failed ({pulp.LpStatus[lp.status]})", lower
    cbc_bound = re.search(r"^Lower bound:\s*(\S+)", log, re.M)
    hot = np.array([hot[np.argmax([v.value() or 0 for v in z])] for z, hot in choices], dtype=np.int64)
    bound = max(lower, float(cbc_bound.group(1))) if cbc_bound else lower
    return hot, "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "time limit", bound
