"""`profile`, `train-predictors` and `eval --predictors` through the real CLI, on a tiny random Hugging Face
checkpoint (the real model's numbers are in predictors/BENCHMARKS_predictors.md)."""
import json
import os

import pytest
import torch

from powerinfer_py.cli import main
from powerinfer_py.formats import load_activations, load_predictors
from cli_errors import assert_one_line_error
from tiny_models import TEXT, write_hf_llama, write_predictors


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_hf_llama(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join([TEXT] * 4))  # about 8800 tokens with the tiny tokenizer
    return str(path)


@pytest.fixture(scope="module")
def profile_dir(tiny_model, text_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prof") / "profile")
    assert main(["profile", "-m", tiny_model, "--data", text_file, "-o", out, "--max-tokens", "3000",
                 "--window", "64", "--dump-dataset"]) == 0
    return out


def test_profile_writes_powerinfer_activation_files_and_stats(profile_dir):
    for i in range(2):
        counts = torch.load(os.path.join(profile_dir, f"activation_{i}.pt"), weights_only=True)
        assert counts.shape == (160,) and counts.dtype == torch.int64 and 0 < counts.sum() < 3000 * 160
    assert len(load_activations(profile_dir, n_layers=2, n_ff=160)) == 2
    with open(os.path.join(profile_dir, "stats.json")) as f:
        stats = json.load(f)
    assert stats["tokens"] == 3000 and not stats["interrupted"] and len(stats["layers"]) == 2
    assert 0 < stats["mean_sparsity"] < 1
    assert set(stats["layers"][0]["neurons_carrying"]) == {"0.5", "0.8", "0.9", "0.99"}
    with open(os.path.join(profile_dir, "dataset", "meta.json")) as f:
        assert json.load(f)["tokens"] == 3000
    assert not [n for n in os.listdir(os.path.dirname(profile_dir)) if n.endswith(".tmp")]


def test_existing_output_needs_force(tiny_model, text_file, profile_dir, capsys, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    rc = main(["profile", "-m", tiny_model, "--data", text_file, "-o", str(out), "--max-tokens", "200"])
    assert_one_line_error(capsys, rc, "already exists", "--force")
    assert main(["profile", "-m", tiny_model, "--data", text_file, "-o", str(out), "--max-tokens", "200",
                 "--force"]) == 0
    assert os.path.exists(out / "activation_1.pt")


def test_train_from_the_dumped_dataset_writes_a_powerinfer_predictor_folder(tiny_model, profile_dir, tmp_path):
    out = str(tmp_path / "pred")
    assert main(["train-predictors", "-m", tiny_model, "--data", profile_dir, "-o", out, "--epochs", "2",
                 "--min-rank", "16", "--max-rank", "32", "--max-error", "5e-4"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model_0.pt", "model_1.pt", "train_report.json"]
    with open(os.path.join(out, "train_report.json")) as f:
        assert all(layer["heldout"]["missed_error"] <= 5e-4 for layer in json.load(f)["layers"])  # ~1e-3 unbounded
    for i in range(2):
        sd = torch.load(os.path.join(out, f"model_{i}.pt"), weights_only=True)
        assert set(sd) == {"fc1.weight", "fc2.weight"}
        r = sd["fc1.weight"].shape[0]
        assert 16 <= r <= 32 and sd["fc1.weight"].shape == (r, 64) and sd["fc2.weight"].shape == (160, r)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == {"sparse_threshold": -1.0}
    layers, threshold = load_predictors(out, n_layers=2, dim=64, n_ff=160)
    assert threshold == -1.0 and len(layers) == 2


def test_train_profiles_text_on_the_fly_and_leaves_no_scratch(tiny_model, text_file, tmp_path):
    out = tmp_path / "pred"
    assert main(["train-predictors", "-m", tiny_model, "--data", text_file, "-o", str(out), "--max-tokens",
                 "2500", "--window", "64", "--epochs", "1", "--min-rank", "16", "--max-rank", "16"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["pred"]
    with open(out / "train_report.json") as f:
        assert [layer["rank"] for layer in json.load(f)["layers"]] == [16, 16]


def test_too_little_text_to_train(tiny_model, tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text(TEXT[:1500])  # about 970 tokens
    rc = main(["train-predictors", "-m", tiny_model, "--data", str(data), "-o", str(tmp_path / "pred")])
    assert_one_line_error(capsys, rc, "needs at least 2048")
    assert not (tmp_path / "pred").exists()


def test_text_without_tokens_is_refused(tiny_model, tmp_path, capsys):
    data = tmp_path / "one.txt"
    data.write_text("a")
    rc = main(["profile", "-m", tiny_model, "--data", str(data), "-o", str(tmp_path / "p")])
    assert_one_line_error(capsys, rc, "1 tokens", "profiling needs at least 2")


def test_silu_model_is_refused_without_a_threshold(tmp_path, text_file, capsys):
    folder = str(tmp_path / "silu")
    write_hf_llama(folder, hidden_act="silu")
    capsys.readouterr()
    rc = main(["profile", "-m", folder, "--data", text_file, "-o", str(tmp_path / "p"), "--max-tokens", "200"])
    assert_one_line_error(capsys, rc, "silu", "--fatrelu-threshold")
    assert main(["profile", "-m", folder, "--data", text_file, "-o", str(tmp_path / "p"), "--max-tokens", "200",
                 "--fatrelu-threshold", "0.01"]) == 0


def test_eval_with_predictors_prints_the_table_and_json(tiny_model, profile_dir, tmp_path, capsys):
    write_predictors(str(tmp_path / "pred"))
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox.\n\nSparse inference keeps hot neurons on the GPU.\n")
    assert main(["eval", "-m", tiny_model, "--data", str(data), "--predictors", str(tmp_path / "pred"),
                 "--activations", profile_dir]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split()[:3] == ["layer", "rank", "recall"] and "perplexity: dense" in out[-2]
    assert out[-3].startswith("profiled hot neurons")  # the activation files' hot set, on this text
    result = json.loads(out[-1])
    assert result["threshold"] == 0.25 and len(result["layers"]) == 2 and result["dense"]["ppl"] > 1
    assert all(0 < layer["profiled_hot"]["share_here"] <= 1 for layer in result["layers"])


@pytest.mark.parametrize("n_layers,n_ff,words", [(3, 160, ["extra layers [2]"]), (1, 160, ["missing layers [1]"]),
                                                 (2, 100, ["fc2.weight", "(160,"])])
def test_eval_refuses_predictors_that_do_not_match_the_model(tiny_model, tmp_path, capsys, n_layers, n_ff, words):
    write_predictors(str(tmp_path / "pred"), n_layers=n_layers, n_ff=n_ff)
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox.\n")
    rc = main(["eval", "-m", tiny_model, "--data", str(data), "--predictors", str(tmp_path / "pred")])
    assert_one_line_error(capsys, rc, *words)
