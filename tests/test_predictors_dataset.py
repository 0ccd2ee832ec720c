import os

import numpy as np
import pytest
import torch

from powerinfer_py.errors import InputError
from predictors.dataset import DatasetWriter, PredictorDataset, pack_mask, unpack_mask


def test_pack_unpack_round_trip_with_n_ff_not_a_multiple_of_8():
    mask = torch.rand(37, 19) < 0.3
    packed = pack_mask(mask)
    assert packed.shape == (37, 3) and packed.dtype == np.uint8
    assert torch.equal(unpack_mask(packed, 19), mask)


def test_dataset_round_trips_batches_for_every_layer(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_layers, dim, n_ff = 3, 10, 13
    batches = []
    writer = DatasetWriter(str(tmp_path / "ds"), n_layers, dim, n_ff, active_threshold=0.25)
    for rows in (5, 1, 7):
        inputs = [torch.randn(rows, dim, generator=g) * 30 for _ in range(n_layers)]
        masks = [torch.rand(rows, n_ff, generator=g) < 0.4 for _ in range(n_layers)]
        writer.append(inputs, masks)
        batches.append((inputs, masks))
    writer.close()

    ds = PredictorDataset(str(tmp_path / "ds"))
    assert (ds.n_layers, ds.dim, ds.n_ff, ds.tokens, ds.active_threshold) == (3, 10, 13, 13, 0.25)
    for i in range(n_layers):
        inputs, masks = ds.layer(i)
        assert inputs.dtype == torch.float32 and masks.dtype == torch.bool
        assert torch.equal(inputs, torch.cat([b[0][i] for b in batches]).half().float())  # stored as fp16
        assert torch.equal(masks, torch.cat([b[1][i] for b in batches]))


def test_truncated_dataset_is_refused(tmp_path):
    writer = DatasetWriter(str(tmp_path), 2, 4, 8)
    writer.append([torch.ones(3, 4)] * 2, [torch.ones(3, 8, dtype=torch.bool)] * 2)
    writer.close()
    with open(tmp_path / "inputs_1.f16", "r+b") as f:
        f.truncate(10)
    with pytest.raises(InputError, match="inputs_1.f16: missing or truncated"):
        PredictorDataset(str(tmp_path))


def test_a_folder_without_meta_is_not_a_dataset(tmp_path):
    os.makedirs(tmp_path / "x")
    with pytest.raises(InputError, match="not a predictor dataset"):
        PredictorDataset(str(tmp_path / "x"))
