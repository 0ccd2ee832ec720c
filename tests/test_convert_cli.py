import argparse

import numpy as np
import pytest

from convert.cli import main, register
from powerinfer_py.formats import write_gpuidx
from tiny_models import write_hf_llama, write_predictors

pytest.importorskip("transformers")


def powerinfer_py(argv):
    """The subcommands as the main CLI registers them."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_hf_llama(str(root / "hf"))
    write_predictors(str(root / "pred"))
    return root


def test_console_script_converts_and_inspect_prints(folders, tmp_path, capsys):
    out = str(tmp_path / "m.powerinfer.gguf")
    assert main([str(folders / "hf"), str(folders / "pred"), "-o", out, "--outtype", "q4_0"]) == 0
    assert powerinfer_py(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "magic:     PWRI  version 3  alignment 32" in text
    assert "powerinfer.sparse_threshold" in text and "blk.1.ffn_down_t.weight" in text and "Q4_0" in text

    dense = str(tmp_path / "d.gguf")
    assert powerinfer_py(["convert", str(folders / "hf"), "-o", dense, "--dense"]) == 0
    idx = str(tmp_path / "m.generated.gpuidx")
    write_gpuidx(idx, [np.ones(160, bool), np.zeros(160, bool)], 10**9)
    for path, expected in [(dense, "blk.0.ffn_down.weight"), (idx, "blk.1.gpu_bucket")]:
        assert powerinfer_py(["inspect", path]) == 0
        assert expected in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(folders, tmp_path, capsys):
    out = str(tmp_path / "m.gguf")
    assert main([str(folders / "hf"), str(tmp_path / "nowhere"), "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert-to-sparse-gguf: error:") and "predictor folder not found" in err
    assert "\n" not in err and not (tmp_path / "m.gguf").exists()
    assert main([str(folders / "hf"), str(folders / "pred"), "-o", out, "--dense"]) == 2
    assert "--dense writes no predictors" in capsys.readouterr().err
