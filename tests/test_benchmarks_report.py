"""The suite's table and plot from hand-made results: ratios, reasons for missing numbers, perplexity."""
import json

import pytest

from benchmarks.report import load_results, part_table, write_report


def row(system, label, decode=None, status="ok", reason=None, budget=1 << 30, **extra):
    r = {"system": system, "budget": budget, "budget_label": label, "status": status, "reason": reason, **extra}
    if decode is not None:
        r.update(decode_tps=decode, prompt_tps=10 * decode)
    return r


def part(name="llama2-7b"):
    return {"benchmark": "suite", "part": name, "machine": {"cpu_count": 16, "torch": "2.11", "commit": "abc1234",
                                                            "gpu": "H100"},
            "bandwidths": {"gpu_copy": 3e12, "cpu_read": 1e11, "pcie": 5e10, "handoff_s": 2e-5, "cpu_threads": 16,
                           "assumed": []},
            "model": {"weights": "synthetic weights", "description": "A tiny model."}, "notes": ["a note"],
            "perplexity": {"documents": 3, "tokens": 100, "dense": 15.0, "dense_predicted": 15.1},
            "rows": [row("hybrid", "4 GiB", status="infeasible", reason="attention does not fit"),
                     row("bound", "8 GiB", 40.0, overlap_decode_tps=50.0),
                     row("hybrid", "8 GiB", 30.0, gpu_neuron_share=0.3, ppl=15.1),
                     row("layer_split", "8 GiB", 10.0), row("accelerate", "8 GiB", 1.0),
                     row("dense", "none", 100.0, budget=None)]}


def test_table_has_ratios_reasons_and_perplexity():
    table = part_table(part())
    line = next(line for line in table.splitlines() if line.startswith("| 8 GiB"))
    assert "30.0 (300)" in line and "3.00x" in line and "30.00x" in line and "0.75x" in line and "15.100" in line
    assert "| 40.0 | 50.0 |" in line and "| 0.75x | 0.60x |" in line  # the modelled and the strict bound
    assert "| 30% |" in line
    assert "infeasible [2]" in table and "2. hybrid (this engine) at 4 GiB: infeasible: attention does not fit" in table
    assert "1. a note" in table and "dense 15.000" in table and "100.0 (1000)" in table


def test_report_files(tmp_path):
    later = part()
    later["machine"] = {**later["machine"], "commit": "def5678"}
    later["command"] = "python -m benchmarks.run --only 7b"
    (tmp_path / "llama2-7b.json").write_text(json.dumps(later))
    (tmp_path / "relu-smollm2-135m.json").write_text(json.dumps(part("relu-smollm2-135m")))
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "dense_decode"}))
    assert [p["part"] for p in load_results(str(tmp_path))] == ["relu-smollm2-135m", "llama2-7b"]
    written = write_report(str(tmp_path))
    text = (tmp_path / "benchmarks.md").read_text()
    assert "H100, 16 CPU threads (16 used)" in text and "commit abc1234" in text
    assert text.index("### relu-smollm2-135m") < text.index("### llama2-7b")
    # a part from another run names its own commit and command; one from the header's run does not repeat them
    section = text[text.index("### llama2-7b"):]
    assert "commit def5678" in section and "Command: `python -m benchmarks.run --only 7b`" in section
    assert "Machine:" not in text[text.index("### relu-smollm2-135m"):text.index("### llama2-7b")]
    pytest.importorskip("matplotlib")
    assert str(tmp_path / "benchmarks.png") in written and (tmp_path / "benchmarks.png").stat().st_size > 10_000


def test_target_checks():
    table = part_table(part())
    assert "hybrid >= 3x layer split: met (lowest 3.00x)" in table
    assert "hybrid >= 20x accelerate: met (lowest 30.00x)" in table
    assert "hybrid >= 70% of the bound: met (lowest 0.75x)" in table
    assert "hybrid >= 70% of the strict bound: not met (lowest 0.60x)" in table
    assert "within 1% of dense at every budget: met (largest difference 0.67%)" in table
    assert "within 1% of the same predictors on one device at every budget: met (largest difference 0.00%)" in table
    smollm2 = part_table(part("relu-smollm2-135m"))
    assert "3x layer split" not in smollm2 and "70% of the bound" in smollm2


def test_results_without_the_strict_bound():
    """Results written before the strict bound existed: no number, no ratio and no check for it."""
    old = part()
    del old["rows"][1]["overlap_decode_tps"]
    table = part_table(old)
    line = next(line for line in table.splitlines() if line.startswith("| 8 GiB"))
    assert "| 40.0 | – |" in line and line.endswith("| 0.75x | – | 15.100 |")
    assert "strict bound" not in table.split("Targets")[1]
