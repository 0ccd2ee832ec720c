"""The `powerinfer-py` CLI: generated text on stdout, figures on stderr, and one clear line with exit status 2
for bad input."""
import json

import pytest

from powerinfer_py.cli import main
from cli_errors import assert_one_line_error
from tiny_models import write_hf_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_hf_llama(str(folder))
    return str(folder)


def test_run_streams_text_and_reports_speed(tiny_model, capsys):
    assert main(["run", "-m", tiny_model, "-p", "The quick brown fox", "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # text from a random model: only that there is some
    assert "generation:" in err and "tok/s" in err and "load:" in err
    assert main(["run", "-m", tiny_model, "-p", "The quick brown fox", "-n", "12", "--temp", "0"]) == 0
    assert capsys.readouterr().out == out  # greedy output is reproducible byte for byte


def test_run_sampling_is_seeded(tiny_model, capsys):
    args = ["run", "-m", tiny_model, "-p", "jumps over", "-n", "16", "--temp", "0.9", "--top-k", "40",
            "--top-p", "0.9", "--min-p", "0.02", "--repeat-penalty", "1.1", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_eval_prints_one_json_line(tiny_model, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox.\n\nSparse inference keeps hot neurons on the GPU.\n")
    assert main(["eval", "-m", tiny_model, "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] > 1 and result["tokens"] > 10 and 0 < result["zero_frac"] < 1


def test_missing_model(capsys, tmp_path):
    rc = main(["run", "-m", str(tmp_path / "nope"), "-p", "hi"])
    assert_one_line_error(capsys, rc, "nope", "no such file")


def test_truncated_gguf(capsys, tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 11)
    rc = main(["run", "-m", str(path), "-p", "hi"])
    assert_one_line_error(capsys, rc, "broken.gguf")


def test_not_a_model(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_one_line_error(capsys, main(["run", "-m", str(path), "-p", "hi"]), "notes.txt", "magic")


def test_prompt_longer_than_context(tiny_model, capsys):
    rc = main(["run", "-m", tiny_model, "-p", "fox " * 200, "-n", "4"])
    assert_one_line_error(capsys, rc, "context")


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert_one_line_error(capsys, main(["run", "-m", str(tmp_path), "-p", "hi"]), "gpt2")


def test_wrong_tensor_shape(tmp_path, capsys):
    write_hf_llama(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert_one_line_error(capsys, main(["run", "-m", str(tmp_path), "-p", "hi"]), "w_gate", "shape")


def test_hybrid_run_of_a_powerinfer_gguf_on_the_cpu(tmp_path, capsys):
    from convert import convert
    from tiny_models import write_predictors

    write_hf_llama(str(tmp_path / "hf"))
    write_predictors(str(tmp_path / "pred"), threshold=-100.0)  # every neuron active: the dense model's tokens
    gguf = str(tmp_path / "tiny.powerinfer.gguf")
    convert(str(tmp_path / "hf"), gguf, str(tmp_path / "pred"), outtype="f32", progress=False)
    capsys.readouterr()
    args = ["-p", "The quick brown fox", "-n", "12", "--device", "cpu"]
    assert main(["run", "-m", gguf, "--vram-budget", "1GiB", *args]) == 0
    hybrid_out, err = capsys.readouterr()
    assert "FFN neurons on GPU: 0/320" in err and "generation:" in err
    assert main(["run", "-m", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out == hybrid_out
