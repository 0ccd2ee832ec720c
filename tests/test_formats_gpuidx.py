import os
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from powerinfer_py.errors import InputError
from powerinfer_py.formats import read_gguf, read_gpuidx, write_gpuidx


def random_masks(n_layers=3, n_ff=96, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(n_ff) < 0.3 for _ in range(n_layers)]


def test_round_trip_bool_and_torch(tmp_path):
    masks = random_masks()
    path = str(tmp_path / "m.generated.gpuidx")
    write_gpuidx(path, [masks[0], torch.tensor(masks[1]), masks[2].astype(np.int64)], vram_capacity=5 * 2**32 + 7)
    back, capacity = read_gpuidx(path, n_layers=3, n_ff=96)
    assert capacity == 5 * 2**32 + 7
    for a, b in zip(back, masks):
        assert a.dtype == bool and np.array_equal(a, b)


def test_file_layout(tmp_path):
    path = str(tmp_path / "x.gpuidx")
    masks = random_masks(2, 64)
    write_gpuidx(path, masks, 1000)
    raw = open(path, "rb").read()
    assert raw[:4] == b"PWRI" and struct.unpack("<I", raw[4:8])[0] == 3
    f = read_gguf(path)
    assert f.alignment == 32 and f.data_offset % 32 == 0
    assert list(f.metadata) == ["general.architecture", "generic.gpu_index.block_count", "split.vram_capacity"]
    assert f.metadata["general.architecture"] == "generic.gpu_index"
    assert f.value_types["generic.gpu_index.block_count"][0].name == "UINT32"
    assert f.value_types["split.vram_capacity"][0].name == "UINT64"
    assert [t.name for t in f.tensors.values()] == ["blk.0.gpu_idx", "blk.0.gpu_bucket", "blk.1.gpu_idx", "blk.1.gpu_bucket"]
    assert all(t.type_id == 18 for t in f.tensors.values())  # PowerInfer's ggml int32, not the package's 26
    assert np.array_equal(f.array("blk.1.gpu_bucket"), np.flatnonzero(masks[1]))


def test_same_bytes_as_powerinfer_exporter_recipe(tmp_path):
    """PowerInfer writes with GGUFWriter (int32 tensors, block_count, vram_capacity) and then overwrites the
    magic. With the package's int32 id (26) changed to 18, those bytes must equal ours."""
    masks = random_masks(2, 64, seed=1)
    ours = str(tmp_path / "ours.gpuidx")
    write_gpuidx(ours, masks, 4096)
    ref = str(tmp_path / "ref.gpuidx")
    w = GGUFWriter(ref, "generic.gpu_index")
    for i, m in enumerate(masks):
        w.add_tensor(f"blk.{i}.gpu_idx", m.astype(np.int32), raw_dtype=GGMLQuantizationType.I32)
        w.add_tensor(f"blk.{i}.gpu_bucket", np.flatnonzero(m).astype(np.int32), raw_dtype=GGMLQuantizationType.I32)
    w.add_block_count(len(masks))
    w.add_uint64("split.vram_capacity", 4096)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = bytearray(open(ref, "rb").read())
    expected[:4] = b"PWRI"
    for t in read_gguf(ours).tensors.values():  # patch each tensor info's type id (26 -> 18)
        at = expected.find(t.name.encode() + struct.pack("<I", 1))
        type_at = at + len(t.name) + 4 + 8
        assert struct.unpack_from("<I", expected, type_at)[0] == 26
        struct.pack_into("<I", expected, type_at, 18)
    assert open(ours, "rb").read() == bytes(expected)


def test_reads_package_int32_id(tmp_path):
    path = str(tmp_path / "a.gpuidx")
    masks = random_masks(1, 32)
    write_gpuidx(path, masks, 1)
    raw = bytearray(open(path, "rb").read())
    at = raw.find(b"blk.0.gpu_idx") + len("blk.0.gpu_idx") + 4 + 8
    struct.pack_into("<I", raw, at, 26)
    open(path, "wb").write(raw)
    back, _ = read_gpuidx(path)
    assert np.array_equal(back[0], masks[0])


def test_mismatch_and_corruption_raise_input_error(tmp_path):
    path = str(tmp_path / "b.gpuidx")
    write_gpuidx(path, random_masks(2, 64), 10)
    with pytest.raises(InputError, match="has 2 layers, the model has 3"):
        read_gpuidx(path, n_layers=3)
    with pytest.raises(InputError, match="n_ff=65"):
        read_gpuidx(path, n_ff=65)
    truncated = str(tmp_path / "t.gpuidx")
    open(truncated, "wb").write(open(path, "rb").read()[:-100])
    with pytest.raises(InputError, match="extends past end of file"):
        read_gpuidx(truncated)
    open(truncated, "wb").write(open(path, "rb").read()[:60])
    with pytest.raises(InputError, match="truncated header"):
        read_gpuidx(truncated)
    with pytest.raises(InputError, match="0/1"):
        write_gpuidx(str(tmp_path / "c.gpuidx"), [np.array([0, 2, 1])], 1)
    assert not os.path.exists(tmp_path / "c.gpuidx")


def test_refuses_overwrite_without_force(tmp_path):
    path = str(tmp_path / "d.gpuidx")
    write_gpuidx(path, random_masks(1, 32), 1)
    with pytest.raises(InputError, match="already exists"):
        write_gpuidx(path, random_masks(1, 32, seed=5), 2)
    write_gpuidx(path, random_masks(1, 32, seed=5), 2, force=True)
    assert read_gpuidx(path)[1] == 2


def test_layers_with_no_or_all_neurons_on_gpu(tmp_path):
    path = str(tmp_path / "e.gpuidx")
    masks = [np.zeros(40, bool), np.ones(40, bool)]
    write_gpuidx(path, masks, 0)
    back, _ = read_gpuidx(path, n_layers=2, n_ff=40)
    assert not back[0].any() and back[1].all()
