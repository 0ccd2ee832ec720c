"""Activation files and predictor folders: PowerInfer's names, numeric layer order, one-line errors."""
import pytest
import torch

from powerinfer_py.errors import InputError
from powerinfer_py.formats import load_activations, load_predictors, save_activations, save_predictors


def test_activations_load_in_numeric_layer_order(tmp_path):
    counts = [torch.full((8,), float(i)) for i in range(12)]  # >10 layers: string order would put 10 after 1
    save_activations(str(tmp_path), counts)
    loaded = load_activations(str(tmp_path), n_layers=12, n_ff=8)
    assert [int(c[0]) for c in loaded] == list(range(12))
    assert torch.load(tmp_path / "activation_3.pt", weights_only=True).shape == (8,)


def test_activation_errors_name_the_problem(tmp_path):
    save_activations(str(tmp_path), [torch.zeros(8), torch.zeros(8)])
    with pytest.raises(InputError, match="missing layers \\[2\\]"):
        load_activations(str(tmp_path), n_layers=3)
    with pytest.raises(InputError, match="n_ff=16"):
        load_activations(str(tmp_path), n_ff=16)
    with pytest.raises(InputError, match="not found"):
        load_activations(str(tmp_path / "nope"))


def test_predictor_folder_round_trip_with_powerinfer_names(tmp_path):
    layers = [{"fc1.weight": torch.randn(4, 6), "fc2.weight": torch.randn(10, 4)} for _ in range(3)]
    save_predictors(str(tmp_path), layers, 0.5)
    loaded, threshold = load_predictors(str(tmp_path), n_layers=3, dim=6, n_ff=10)
    assert threshold == 0.5
    for a, b in zip(layers, loaded):
        assert set(b) == {"fc1.weight", "fc2.weight"} and torch.equal(a["fc1.weight"], b["fc1.weight"])
    with pytest.raises(InputError, match="extra layers \\[2\\]"):
        load_predictors(str(tmp_path), n_layers=2)
    with pytest.raises(InputError, match="fc2.weight has shape"):
        load_predictors(str(tmp_path), n_ff=11)
