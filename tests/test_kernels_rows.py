import pytest
import torch

from kernels import FFNRows, quant
from kernels.cases import random_share


@pytest.mark.parametrize("weight_type,row_bytes", [("f32", 256), ("f16", 128), ("bf16", 128), ("q8_0", 80),
                                                   ("q4_0", 48)])
def test_cpu_nbytes_match_bytes_per_neuron(weight_type, row_bytes):
    """One layout on both devices: the CPU keeps the rows in their type (Q8_0: 68 bytes of blocks, padded)."""
    gate, up, down_t, idx = random_share(21, 64, 70)
    rows = FFNRows.pack(gate, up, down_t, idx, "cpu", weight_type)
    per_neuron = FFNRows.bytes_per_neuron(64, weight_type, device="cpu")
    assert rows.nbytes == 21 * per_neuron == 21 * (3 * row_bytes + 8)
    assert per_neuron == FFNRows.bytes_per_neuron(64, weight_type, device="cuda")


def test_cuda_layout_bytes():
    """Rows padded to 16 bytes; Llama-2-7B rows are already aligned."""
    assert FFNRows.bytes_per_neuron(4096, "f16") == 3 * 8192 + 8
    assert FFNRows.bytes_per_neuron(4096, "q8_0") == 3 * 4352 + 8
    assert FFNRows.bytes_per_neuron(4096, "q4_0") == 3 * 2304 + 8
    assert FFNRows.bytes_per_neuron(100, "f16", gated=False) == 2 * 208 + 8
    assert FFNRows.bytes_per_neuron(96, "q8_0") == 3 * 112 + 8  # 102 bytes of blocks, padded


def test_pack_takes_gguf_blocks_as_they_are():
    gate, up, down_t, idx = random_share(5, 64, 9)
    as_floats = FFNRows.pack(gate, up, down_t, idx, "cpu", "q4_0")
    as_blocks = FFNRows.pack(*(quant.quantize(w, "q4_0") for w in (gate, up, down_t)), idx, "cpu", "q4_0")
    assert as_blocks.d == 64
    for a, b in zip(as_floats.dense(), as_blocks.dense()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change,error,match", [
    (dict(weight_type="q5_k"), ValueError, "weight_type"),
    (dict(weight_type="q8_0", d=40), ValueError, "multiple of 32"),
    (dict(idx=torch.tensor([3, 1, 2])), ValueError, "ascending"),
    (dict(idx=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError, "neuron_idx"),
    (dict(up_m=2), ValueError, "gate_rows/up_rows/down_t_rows"),
    (dict(device="meta"), ValueError, "device"),
])
def test_pack_rejects_bad_input(change, error, match):
    d = change.get("d", 64)
    gate, up, down_t, _ = random_share(3, d, 10)
    up = up[: change.get("up_m", 3)]
    with pytest.raises(error, match=match):
        FFNRows.pack(gate, up, down_t, change.get("idx", torch.tensor([1, 4, 7])), change.get("device", "cpu"),
                      change.get("weight_type", "f16"))


def test_pack_rejects_integer_rows():
    with pytest.raises(TypeError, match="gate_rows"):
        FFNRows.pack(torch.ones(2, 32, dtype=torch.int32), torch.randn(2, 32), torch.randn(2, 32),
                     torch.tensor([0, 1]), "cpu", "f16")


def test_a_block_is_its_rows_and_copies_keep_them():
    rows = FFNRows.pack(*random_share(10, 64, 30), "cpu", "q8_0")
    block = rows.block(3, 7)
    assert torch.equal(block.neuron_idx, rows.neuron_idx[3:7]) and block.min_n_ff == int(rows.neuron_idx[6]) + 1
    for a, b in zip(block.dense(), rows.dense()):
        assert torch.equal(a, b[3:7])
    copy = block.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(copy.dense(), block.dense())) and copy.m == 4
    if torch.cuda.is_available():
        pinned = rows.pin_memory()
        assert pinned.gate.is_pinned() and torch.equal(pinned.to("cuda", non_blocking=True).dense()[2].cpu(),
                                                       rows.dense()[2])
