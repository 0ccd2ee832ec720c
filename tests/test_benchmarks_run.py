"""The suite's entry point in smoke mode (tiny shapes, on the CPU here): every part it can run writes its
rows, the table and the plot; the 7B part's hybrid decode step is traced (its overlap needs a GPU)."""
import json

import pytest

from benchmarks.run import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    assert main(["--smoke", "--only", "7b,70b", "--trace", "--time-box", "0.3", "--out", str(out),
                 "--work", str(work)]) == 0
    return out


def test_synthetic_part_rows(smoke):
    result = json.loads((smoke / "llama2-7b.json").read_text())
    status = {(r["system"], r["budget_label"].split(" ")[0]): r["status"] for r in result["rows"]}
    infeasible, feasible = sorted({r["budget"] for r in result["rows"] if r["budget"]})
    assert [r["status"] for r in result["rows"] if r["budget"] == infeasible] == ["infeasible"]
    by_system = {r["system"]: r for r in result["rows"] if r["budget"] == feasible}
    assert set(by_system) == {"bound", "hybrid", "layer_split", "accelerate"}, status
    assert all(by_system[s]["status"] == "ok" and by_system[s]["decode_tps"] > 0 for s in ("bound", "hybrid",
                                                                                           "layer_split"))
    hybrid = by_system["hybrid"]
    assert len(hybrid["runs"]) == 3 and hybrid["new_tokens"] >= 4 and hybrid["prompt_tps"] > 0
    assert result["model"]["statistics"]["measured"]["sparsity"] > 0.6
    assert [r["status"] for r in result["rows"] if r["system"] == "dense"] == ["ok"]
    (timeline,) = result["timeline"].values()  # the one feasible budget
    assert (smoke / timeline["trace"]).exists()  # on the CPU nothing splits: no layers to overlap
    assert timeline["layers"] == []


def test_ledger_only_part_and_report(smoke):
    result = json.loads((smoke / "llama2-70b-q4_0.json").read_text())
    assert {r["system"] for r in result["rows"]} == {"bound"}
    statuses = [r["status"] for r in result["rows"]]
    assert statuses[0] == "infeasible" and statuses[1:] and set(statuses[1:]) == {"ok"}
    assert any("Q4_0 PowerInfer file" in n for n in result["notes"])
    table = (smoke / "benchmarks.md").read_text()
    assert "### llama2-7b: synthetic weights" in table and "### llama2-70b-q4_0" in table
