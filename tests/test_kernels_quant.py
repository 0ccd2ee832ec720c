import numpy as np
import pytest
import torch

from kernels import quant

gguf = pytest.importorskip("gguf")
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


@pytest.mark.parametrize("weight_type", QTYPES)
def test_quantize_is_bit_exact_with_gguf(weight_type):
    w = torch.randn(37, 160) * 3
    w[0, :32] = 0  # an all-zero block (scale 0)
    w[1, 5] = -40  # a block whose largest magnitude is negative
    w[2, 40] = 0.5 / 127 * 7  # values near rounding ties
    ours = quant.quantize(w, weight_type).numpy()
    ref = gguf.quants.quantize(w.numpy(), QTYPES[weight_type])
    np.testing.assert_array_equal(ours, ref)
    assert ours.shape[1] == quant.row_bytes(160, weight_type)


@pytest.mark.parametrize("weight_type", QTYPES)
def test_dequantize_matches_gguf(weight_type):
    blocks = gguf.quants.quantize(torch.randn(9, 96).numpy(), QTYPES[weight_type])
    padded = np.zeros((9, blocks.shape[1] + 10), np.uint8)  # padding after the blocks is ignored
    padded[:, : blocks.shape[1]] = blocks
    ours = quant.dequantize(torch.from_numpy(padded), weight_type, 96).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(blocks, QTYPES[weight_type]))


def test_quantize_rejects_float_types():
    with pytest.raises(ValueError, match="weight_type"):
        quant.quantize(torch.randn(2, 32), "f16")
