import itertools

import numpy as np
import pytest
import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import BudgetError, InputError
from solver import Bandwidths, PlacementProblem, greedy_placement, solve_placement, vram_ledger
from solver.placement import lagrangian

# small bandwidths so that attention, CPU rows and the hand-off all matter in the time model
BW = Bandwidths(gpu=1e9, cpu=5e7, pcie=1e9, sync_s=1e-6)


def make_problem(n_layers=3, n_ff=16, neurons=20, group=4, min_gpu_neurons=0, seed=0, ties=False, tokens=None):
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, n_ff=n_ff)
    ledger = vram_ledger(cfg, "f16", "f16", 16, 1, [4] * n_layers)
    rng = np.random.default_rng(seed)
    tokens = tokens or 100
    counts = []
    for _ in range(n_layers):
        p = rng.random(n_ff) ** rng.uniform(1, 4)  # skewed activation probabilities
        c = np.round(p * tokens) if ties else p * tokens
        counts.append(torch.from_numpy(c))
    budget = ledger.dense_bytes + neurons * ledger.ffn_bytes_per_neuron + int(rng.integers(ledger.ffn_bytes_per_neuron))
    return PlacementProblem(counts, ledger, budget, group, BW, tokens, min_gpu_neurons)


def brute_force(problem, objective):
    """The best over every per-layer prefix choice, from first principles."""
    n_ff, g, c = problem.n_ff, problem.group, problem.min_gpu_neurons
    sizes = [0] + [k for k in range(g, n_ff, g) if k >= c] + [n_ff]  # a whole layer pays no hand-off: C_l exempt
    sorted_counts = [np.sort(row)[::-1] for row in problem.counts]
    t = problem.timing
    best = None
    for hot in itertools.product(sizes, repeat=problem.n_layers):
        if sum(hot) * problem.ledger.ffn_bytes_per_neuron > problem.budget - problem.ledger.dense_bytes:
            continue
        gpu = np.array([s[:h].sum() for s, h in zip(sorted_counts, hot)])
        cpu = np.array([s[h:].sum() for s, h in zip(sorted_counts, hot)])
        if objective == "coverage":
            value = gpu.sum() / (gpu.sum() + cpu.sum())
        else:
            gpu_s = gpu / t.tokens * t.gpu_s_per_neuron
            cpu_s = np.array([0.0 if h == n_ff else x / t.tokens * t.cpu_s_per_neuron + t.handoff_s
                              for h, x in zip(hot, cpu)])
            value = -(t.layer_dense_s.sum() + np.maximum(gpu_s, cpu_s).sum() + t.head_s)
        best = value if best is None else max(best, value)
    return best


def score(placement):
    return placement.hit_rate if placement.objective == "coverage" else -placement.token_time_s


def check_feasible(problem, placement):
    ledger = problem.ledger
    assert placement.ffn_bytes == int(placement.hot_neurons.sum()) * ledger.ffn_bytes_per_neuron
    assert ledger.dense_bytes + placement.ffn_bytes <= problem.budget
    c = problem.min_gpu_neurons
    for mask, counts, hot in zip(placement.gpu_masks, problem.counts, placement.hot_neurons):
        mask = mask.numpy()
        assert mask.dtype == bool and mask.sum() == hot
        assert hot in (0, problem.n_ff) or hot >= c
        assert hot in (0, problem.n_ff) or hot % problem.group == 0
        if 0 < hot < problem.n_ff:  # the hottest neurons
            assert counts[mask].min() >= counts[~mask].max()


@pytest.mark.parametrize("objective", ["coverage", "latency"])
@pytest.mark.parametrize("n_ff,min_gpu_neurons", [(16, 0), (16, 6), (16, 9), (14, 0), (14, 10), (16, 17)])
def test_brute_force_agrees(objective, n_ff, min_gpu_neurons):
    for seed, neurons in itertools.product(range(3), (0, 5, 13, 22, 35, 48)):
        problem = make_problem(n_ff=n_ff, neurons=neurons, min_gpu_neurons=min_gpu_neurons, seed=seed,
                               ties=seed == 2)
        placement = solve_placement(problem, objective)
        check_feasible(problem, placement)
        assert score(placement) == pytest.approx(brute_force(problem, objective), rel=1e-12, abs=1e-15)
        assert placement.status == "optimal" and placement.gap == 0.0
        assert score(placement) >= score(greedy_placement(problem, objective))


def powerinfer_top_groups(problem):
    """PowerInfer's solver with its inert constraint: the globally largest group sums under a neuron budget."""
    g = problem.group
    sums = [(np.sort(row)[::-1].reshape(-1, g).sum(1), i) for i, row in enumerate(problem.counts)]
    pooled = sorted(((s, i) for row, i in sums for s in row), reverse=True)[:problem.max_neurons // g]
    hot = np.zeros(problem.n_layers, dtype=int)
    for _, i in pooled:
        hot[i] += g
    return [torch.topk(torch.from_numpy(row), int(k)).indices for row, k in zip(problem.counts, hot)]


@pytest.mark.parametrize("neurons", [0, 50, 130, 300, 384])
def test_inert_constraint_is_greedy_is_powerinfer(neurons):
    problem = make_problem(n_layers=6, n_ff=64, neurons=neurons, group=8, seed=neurons)
    solved, greedy = solve_placement(problem), greedy_placement(problem)
    for a, b, top in zip(solved.gpu_masks, greedy.gpu_masks, powerinfer_top_groups(problem)):
        assert torch.equal(a, b)
        assert set(torch.nonzero(a).flatten().tolist()) == set(top.tolist())


def test_active_constraint_never_worse_than_greedy():
    worse = 0
    for seed in range(30):
        problem = make_problem(n_layers=8, n_ff=64, neurons=100 + 7 * seed, group=4, min_gpu_neurons=30, seed=seed)
        for objective in ("coverage", "latency"):
            solved, greedy = solve_placement(problem, objective), greedy_placement(problem, objective)
            check_feasible(problem, solved)
            check_feasible(problem, greedy)
            assert score(solved) >= score(greedy)
            worse += score(greedy) < score(solved) - 1e-12
    assert worse > 0  # the constraint does bind: greedy is not always optimal


def test_latency_and_coverage_each_win_their_objective():
    for seed in range(10):
        problem = make_problem(n_layers=10, n_ff=128, neurons=400 + 50 * seed, group=8, seed=seed)
        coverage, latency = solve_placement(problem, "coverage"), solve_placement(problem, "latency")
        assert latency.token_time_s <= coverage.token_time_s * (1 + 1e-12)
        assert coverage.hit_rate >= latency.hit_rate - 1e-12


def test_statistics_of_any_masks():
    problem = make_problem(n_layers=4, n_ff=32, neurons=40, seed=1)
    rng = np.random.default_rng(0)
    masks = [rng.random(32) < 0.4 for _ in range(4)]
    masks[3][:] = True
    placement = problem.placement(masks, "coverage", "given", None, 0.0)
    counts = problem.counts
    assert placement.hit_rate == pytest.approx(sum(c[m].sum() for c, m in zip(counts, masks)) / counts.sum())
    assert np.allclose(placement.gpu_share, [c[m].sum() / c.sum() for c, m in zip(counts, masks)])
    t = problem.timing
    cold = np.array([c[~m].sum() for c, m in zip(counts, masks)])
    assert np.allclose(placement.cpu_bytes_per_token, cold / t.tokens * t.cpu_bytes_per_neuron)
    assert placement.layer_time_s[3] == t.layer_dense_s[3] + counts[3].sum() / t.tokens * t.gpu_s_per_neuron
    strict = t.layer_times(placement.hot_neurons, counts.sum(1) - cold, cold, 32, overlap_dense=True)
    assert placement.overlap_token_time_s == pytest.approx(strict.sum() + t.head_s)
    assert placement.overlap_token_time_s <= placement.token_time_s


def test_default_tokens_and_constraint():
    problem = make_problem(neurons=10, tokens=100, min_gpu_neurons=None)
    assert problem.min_gpu_neurons == problem.timing.min_gpu_neurons
    cfg, ledger = problem.ledger.config, problem.ledger
    counts = [torch.tensor([5.0] * cfg.n_ff)] * cfg.n_layers
    assert PlacementProblem(counts, ledger, problem.budget).timing.tokens == 5.0


def test_bad_input():
    problem = make_problem()
    ledger, budget = problem.ledger, problem.budget
    counts = [torch.from_numpy(c) for c in problem.counts]
    with pytest.raises(InputError, match="2 layers, the model has 3"):
        PlacementProblem(counts[:2], ledger, budget)
    with pytest.raises(InputError, match="layer 1: shape"):
        PlacementProblem([counts[0], counts[1][:-1], counts[2]], ledger, budget)
    with pytest.raises(InputError, match="negative"):
        PlacementProblem([counts[0], -counts[1], counts[2]], ledger, budget)
    with pytest.raises(InputError, match="group size"):
        PlacementProblem(counts, ledger, budget, group=0)
    with pytest.raises(BudgetError, match="short of"):
        PlacementProblem(counts, ledger, ledger.dense_bytes - 1)
    with pytest.raises(InputError, match="objective"):
        solve_placement(problem, "speed")


class FakeCBC:
    """Stands in for CBC: keeps the warm start and reports a status and a bound, as CBC at its time limit."""
    status, sol_status, log = 1, 2, "Lower bound: {bound}\n"

    def __init__(self, logPath, **_):
        self.log_path = logPath

    def actualSolve(self, lp):
        with open(self.log_path, "w") as f:
            f.write(self.log.format(bound=FakeCBC.bound))
        lp.assignStatus(self.status, self.sol_status)
        return self.status


@pytest.mark.parametrize("status,sol_status,expected", [(1, 2, "time limit"), (-1, 0, "CBC failed (Infeasible)")])
def test_time_limit_keeps_the_incumbent_and_reports_the_gap(monkeypatch, status, sol_status, expected):
    problem = make_problem(n_layers=6, n_ff=64, neurons=150, group=8, min_gpu_neurons=20)
    optimum = solve_placement(problem)
    monkeypatch.setattr(FakeCBC, "status", status)
    monkeypatch.setattr(FakeCBC, "sol_status", sol_status)
    monkeypatch.setattr(FakeCBC, "bound", -1e9 * (optimum.hit_rate + 0.01), raising=False)
    monkeypatch.setattr("solver.placement.pulp.PULP_CBC_CMD", FakeCBC)
    placement = solve_placement(problem)
    check_feasible(problem, placement)
    assert placement.status == expected
    assert placement.hit_rate <= optimum.hit_rate
    lower = lagrangian(problem, "coverage")[0]
    bound = max(lower, FakeCBC.bound) if status == 1 else lower
    assert placement.gap == pytest.approx((-1e9 * placement.hit_rate - bound) / (1e9 * placement.hit_rate))
    assert placement.gap > 0
