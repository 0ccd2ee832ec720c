import csv

import numpy as np

from solver.bench import main, power_law_counts


def test_power_law_counts():
    counts = power_law_counts(3, 4096, tokens=1000, mean_active=0.1)
    assert len(counts) == 3 and all(c.shape == (4096,) for c in counts)
    for c in counts:
        assert abs(float(c.mean()) / 1000 - 0.1) < 0.01  # the asked share of neurons fire per token
        top = np.sort(c.numpy())[::-1]
        assert top[:410].sum() > 0.5 * top.sum()  # skewed: a tenth of the neurons carry most activations


def test_bench_runs(tmp_path, capsys):
    table = str(tmp_path / "bench.csv")
    assert main(["--shape", "llama2-7b", "--budgets", "12GiB", "--ffn-type", "f16", "--csv", table]) == 0
    row, = csv.DictReader(open(table))
    assert row["coverage_status"] == "optimal" and float(row["coverage_hit"]) >= float(row["greedy_hit"])
    assert float(row["latency_tps"]) >= float(row["coverage_tps"])
    assert 0 <= int(row["unused_bytes"]) < 64 * 24584
    assert "llama2-7b shapes" in capsys.readouterr().out
