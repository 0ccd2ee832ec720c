import csv
import json
import os
import struct

import numpy as np
import pytest
import torch

from powerinfer_py.cli import main
from powerinfer_py.config import ModelConfig
from powerinfer_py.formats import read_gguf, read_gpuidx, save_activations, write_gpuidx
from solver import vram_ledger

CFG = ModelConfig(vocab_size=100, dim=64, n_layers=12, n_heads=4, n_kv_heads=2, n_ff=64, max_seq_len=256)


def write_model(tmp_path, cfg=CFG, seed=0):
    """A Hugging Face folder (config.json is all the solver reads) and activation counts in which layer i's
    hottest neurons are i..i+7, so a layer given another layer's counts would place the wrong ones."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg.to_hf()))
    rng = np.random.default_rng(seed)
    counts = []
    for i in range(cfg.n_layers):
        c = rng.integers(0, 50, cfg.n_ff).astype(np.float32)
        c[i:i + 8] = 1000 + np.arange(8)
        counts.append(torch.from_numpy(c))
    act = tmp_path / "activation"
    act.mkdir()
    save_activations(str(act), counts)
    return str(model), str(act), counts


def budget_for(neurons, cfg=CFG):
    ledger = vram_ledger(cfg, "f16", "f16", min(2048, cfg.max_seq_len), 1, None, embeddings_on_gpu=True)
    return ledger.dense_bytes + neurons * ledger.ffn_bytes_per_neuron


def run(capsys, *argv):
    code = main(["solve", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_writes_powerinfer_index(tmp_path, capsys):
    model, act, counts = write_model(tmp_path)
    budget = budget_for(8 * CFG.n_layers)  # one group of 8 per layer
    code, out, err = run(capsys, "-m", model, "--activation", act, "--vram-budget", f"{budget}B", "--group", "8",
                         "--min-gpu-neurons", "0", "--report")
    assert code == 0
    path = os.path.join(model, "model.generated.gpuidx")
    assert f"-> {path}" in err and "GPU hit rate" in out and "kv_cache" in out
    masks, capacity = read_gpuidx(path, CFG.n_layers, CFG.n_ff)
    assert capacity == budget
    for i, mask in enumerate(masks):  # numeric layer order: layer i holds its own hottest neurons
        assert np.flatnonzero(mask).tolist() == list(range(i, i + 8))
    raw = open(path, "rb").read()
    assert raw[:4] == b"PWRI" and struct.unpack_from("<I", raw, 4)[0] == 3
    key = b"split.vram_capacity"
    at = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<IQ", raw, at) == (10, budget)  # GGUF value type 10 = u64
    for name in (b"blk.0.gpu_idx", b"blk.11.gpu_bucket"):
        at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        n_dims, = struct.unpack_from("<I", raw, at)
        assert n_dims == 1 and struct.unpack_from("<I", raw, at + 4 + 8)[0] == 18  # PowerInfer's int32
    assert [t.type_id for t in read_gguf(path).tensors.values()] == [18] * 2 * CFG.n_layers


def test_never_overwrites_silently(tmp_path, capsys):
    model, act, _ = write_model(tmp_path)
    out_path = str(tmp_path / "x.gpuidx")
    args = ["-m", model, "--activation", act, "--vram-budget", f"{budget_for(200)}B", "-o", out_path]
    assert run(capsys, *args)[0] == 0
    before = open(out_path, "rb").read()
    code, _, err = run(capsys, *args[:-3], f"{budget_for(400)}B", "-o", out_path)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert open(out_path, "rb").read() == before
    assert run(capsys, *args[:-3], f"{budget_for(400)}B", "-o", out_path, "--force")[0] == 0
    assert open(out_path, "rb").read() != before
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_evaluate_an_index(tmp_path, capsys):
    model, act, _ = write_model(tmp_path)
    index = str(tmp_path / "given.gpuidx")
    write_gpuidx(index, [np.arange(CFG.n_ff) < 16] * CFG.n_layers, 12345)
    code, out, _ = run(capsys, "-m", model, "--activation", act, "--vram-budget", f"{budget_for(500)}B",
                       "--evaluate", index)
    assert code == 0 and "solved for 12.06 KiB" in out and f"ffn ({16 * CFG.n_layers} neurons" in out


@pytest.mark.parametrize("case,message", [
    ("unit", "budget '6XB'"),
    ("small", "short of"),
    ("missing", "missing layers [10]"),
    ("size", "the model has n_ff=64"),
    ("layers", "GPU index has 3 layers, the model has 12"),
    ("n_ff", "has 32 neurons, the model has n_ff=64"),
    ("group", "group size 0"),
    ("sweep-group", "--sweep-group '8,x'"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, case, message):
    model, act, counts = write_model(tmp_path)
    budget = f"{budget_for(100)}B"
    extra = []
    if case == "unit":
        budget = "6XB"
    elif case == "small":
        budget = f"{budget_for(0) - 1}B"
    elif case == "missing":
        os.remove(os.path.join(act, "activation_11.pt"))
        os.rename(os.path.join(act, "activation_10.pt"), os.path.join(act, "activation_11.pt"))
    elif case == "size":
        torch.save(counts[3][:-1], os.path.join(act, "activation_3.pt"))
    elif case in ("layers", "n_ff"):
        index = str(tmp_path / "other.gpuidx")
        write_gpuidx(index, [np.ones(64 if case == "layers" else 32, bool)] * (3 if case == "layers" else 12), 1)
        extra = ["--evaluate", index]
    elif case == "group":
        extra = ["--group", "0"]
    elif case == "sweep-group":
        budget, extra = None, ["--sweep-budget", "1GiB", "--sweep-group", "8,x"]
    argv = ["-m", model, "--activation", act] + (["--vram-budget", budget] if budget else []) + extra
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_sweep_table_and_csv(tmp_path, capsys):
    model, act, _ = write_model(tmp_path)
    table = str(tmp_path / "sweep.csv")
    budgets = [budget_for(n) for n in (100, 300, 700)]
    code, out, _ = run(capsys, "-m", model, "--activation", act, "--sweep-budget", f"{budgets[0]},{budgets[1]},"
                       f"{budgets[2]}B", "--sweep-group", "8,32", "--csv", table)
    assert code == 0 and len(out.strip().splitlines()) == 1 + 6
    rows = list(csv.DictReader(open(table)))
    assert [(int(r["budget"]), int(r["group"])) for r in rows] == [(b, g) for b in budgets for g in (8, 32)]
    hit = [float(r["hit_rate"]) for r in rows]
    assert hit[0] <= hit[2] <= hit[4] and all(r["status"] == "optimal" for r in rows)


def test_powerinfer_gguf_model(tmp_path, capsys):
    """A PowerInfer GGUF: the config and the predictor ranks come from the file, the index goes beside it."""
    from tiny_models import write_hf_llama, write_predictors

    write_hf_llama(str(tmp_path / "hf"))
    write_predictors(str(tmp_path / "pred"), ranks=(16, 32))
    gguf = str(tmp_path / "tiny.powerinfer.gguf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "pred"), "-o", gguf]) == 0
    act = tmp_path / "activation"
    act.mkdir()
    save_activations(str(act), [torch.rand(160) * 100 for _ in range(2)])
    capsys.readouterr()
    code, out, err = run(capsys, "-m", gguf, "--activation", str(act), "--vram-budget", "40MiB", "--report")
    assert code == 0 and os.path.exists(gguf + ".generated.gpuidx")
    predictor_bytes = 2 * sum(r * 64 + 160 * r for r in (16, 32))
    assert f"predictor {predictor_bytes / 1024:.2f} KiB".split() == next(
        line for line in out.splitlines() if line.startswith("predictor")).split()
