import math
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType as V, GGUFWriter
from gguf.quants import dequantize, quantize

from powerinfer_py.config import ModelConfig
from powerinfer_py.errors import ModelFormatError, UnsupportedModelError
from powerinfer_py.formats.gguf import (GGUF_TO_INTERNAL, PWRI_MAGIC, TensorSpec, config_metadata, encode,
                                        from_gguf_layout, gguf_tensor_name, load_gguf_checkpoint, read_gguf,
                                        read_gguf_config, rope_permute, rope_unpermute, to_gguf_layout, write_gguf)

rng = np.random.default_rng(0)

METADATA = [
    ("general.architecture", V.STRING, "llama"), ("a.u8", V.UINT8, 200), ("a.i8", V.INT8, -5),
    ("a.u16", V.UINT16, 60000), ("a.i16", V.INT16, -300), ("a.u32", V.UINT32, 4_000_000_000),
    ("a.i32", V.INT32, -2_000_000_000), ("a.f32", V.FLOAT32, 0.1), ("a.bool", V.BOOL, True),
    ("a.u64", V.UINT64, 2**40 + 3), ("a.i64", V.INT64, -(2**40)), ("a.f64", V.FLOAT64, math.pi),
    ("a.str", V.STRING, "héllo ▁ wörld"), ("a.strs", V.ARRAY, (V.STRING, ["x", "", "Ġy z"])),
    ("a.ints", V.ARRAY, (V.INT32, [1, -2, 3])), ("a.floats", V.ARRAY, (V.FLOAT32, [0.5, -1.25])),
]
ARRAYS = {"f32": (rng.standard_normal((3, 5, 8)).astype(np.float32), T.F32),
          "f16": (rng.standard_normal((7, 64)).astype(np.float32), T.F16),
          "q8": (rng.standard_normal((4, 96)).astype(np.float32), T.Q8_0),
          "q4": (rng.standard_normal((5, 64)).astype(np.float32), T.Q4_0),
          "i32": (rng.integers(-9, 9, 11).astype(np.int32), T.I32),
          "vec": (rng.standard_normal(33).astype(np.float32), T.F32)}


def write_sample(path, magic=b"GGUF"):
    tensors = [(TensorSpec(n, a.shape, t), lambda a=a, t=t: encode(a, t)) for n, (a, t) in ARRAYS.items()]
    write_gguf(path, METADATA, tensors, magic=magic)


def decoded(array, ggml_type):
    return array if ggml_type in (T.F32, T.I32) else dequantize(encode(array, ggml_type), ggml_type).reshape(array.shape)


def test_round_trip_and_layout(tmp_path):
    path = str(tmp_path / "s.gguf")
    write_sample(path)
    f = read_gguf(path)
    assert f.magic == b"GGUF" and f.version == 3 and f.alignment == 32 and f.data_offset % 32 == 0
    for key, vtype, value in METADATA:
        assert f.value_types[key][0] == vtype
        want = list(value[1]) if vtype == V.ARRAY else value
        assert f.metadata[key] == (pytest.approx(want) if key.endswith(("f32", "floats")) else want)
    assert list(f.tensors) == list(ARRAYS)
    for name, (array, ggml_type) in ARRAYS.items():
        t = f.tensors[name]
        assert t.shape == array.shape and t.ggml_type == ggml_type and t.offset % 32 == 0
        np.testing.assert_array_equal(f.array(name), decoded(array, ggml_type))


def test_package_reader_agrees_with_our_writer(tmp_path):
    """An independent implementation (the gguf package) reads what we write."""
    path = str(tmp_path / "s.gguf")
    write_sample(path)
    r = GGUFReader(path)
    assert r.fields["a.u64"].parts[-1][0] == 2**40 + 3
    assert bytes(r.fields["a.str"].parts[-1]).decode() == "héllo ▁ wörld"
    for t in r.tensors:
        array, ggml_type = ARRAYS[t.name]
        assert t.tensor_type == ggml_type and tuple(int(n) for n in t.shape) == array.shape[::-1]
        got = t.data if ggml_type in (T.F32, T.F16, T.I32) else dequantize(t.data, ggml_type)
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float32).reshape(array.shape),
                                      decoded(array, ggml_type).astype(np.float32))


def test_our_reader_agrees_with_package_writer(tmp_path):
    path = str(tmp_path / "w.gguf")
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_array("x.tokens", ["a", "b"])
    q = rng.standard_normal((2, 64)).astype(np.float32)
    w.add_tensor("q", quantize(q, T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("h", q.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)
    assert f.metadata == {"general.architecture": "llama", "llama.block_count": 3, "x.tokens": ["a", "b"]}
    assert f.tensors["q"].shape == (2, 64) and f.tensors["h"].ggml_type == T.F16
    np.testing.assert_array_equal(f.array("q"), dequantize(quantize(q, T.Q8_0), T.Q8_0))
    np.testing.assert_array_equal(f.array("h"), q.astype(np.float16))


def test_k_quant_and_bf16_tensors_decode(tmp_path):
    """Types we never write still read: K-quants (256-value blocks) and BF16, through the package's decoders."""
    q4k = rng.integers(0, 255, (3, 2 * 144), dtype=np.uint8)
    q4k.reshape(6, 144)[:, :4] = np.array([0.01, 0.001], np.float16).view(np.uint8)  # finite d, dmin per block
    bf16 = (rng.standard_normal((2, 8)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    path = str(tmp_path / "k.gguf")
    write_gguf(path, [], [(TensorSpec("q4k", (3, 512), T.Q4_K), lambda: q4k), (TensorSpec("bf", (2, 8), T.BF16), lambda: bf16)])
    f = read_gguf(path)
    np.testing.assert_array_equal(f.array("q4k"), dequantize(q4k, T.Q4_K))
    np.testing.assert_array_equal(f.array("bf"), (bf16.astype(np.uint32) << 16).view(np.float32))


def test_int32_type_id_depends_on_magic(tmp_path):
    path = str(tmp_path / "p.gguf")
    write_sample(path, magic=PWRI_MAGIC)
    f = read_gguf(path)
    assert f.magic == b"PWRI" and f.tensors["i32"].type_id == 18 and f.tensors["i32"].ggml_type == T.I32
    path = str(tmp_path / "g.gguf")
    write_sample(path)
    assert read_gguf(path).tensors["i32"].type_id == 26  # the package's numbering in plain GGUF files


def test_corrupt_files_raise_one_line_errors(tmp_path):
    path = str(tmp_path / "s.gguf")
    write_sample(path)
    raw = open(path, "rb").read()
    cases = {"bad magic": (b"GGML" + raw[4:], "not a GGUF file"),
             "short": (raw[:10], "too short"),
             "header": (raw[:200], "truncated header"),
             "data": (raw[:-40], "tensor vec extends past end of file"),
             "version": (raw[:4] + struct.pack("<I", 7) + raw[8:], "version 7")}
    for name, (data, message) in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        with pytest.raises(ModelFormatError, match=message) as e:
            read_gguf(str(bad))
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelFormatError, match="no such|cannot read"):
        read_gguf(str(tmp_path / "missing.gguf"))


def rope_halves(x, pos, theta=10000.0):
    """Hugging Face RoPE: dimension j rotates with j + d/2."""
    d = x.shape[-1]
    freq = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([freq.cos()] * 2), torch.cat([freq.sin()] * 2)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def rope_pairs(x, pos, theta=10000.0):
    """llama.cpp RoPE (mode 0): dimension 2j rotates with 2j + 1."""
    d = x.shape[-1]
    freq = pos / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * freq.cos() - b * freq.sin(), a * freq.sin() + b * freq.cos()], -1).flatten(-2)


def test_rope_permutation_turns_half_rotation_into_pair_rotation():
    n_heads, head_dim, dim = 3, 8, 12
    w = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(dim, dtype=torch.float64)
    want = rope_halves((w @ x).view(n_heads, head_dim), pos=5.0)
    got = rope_pairs((rope_permute(w, n_heads) @ x).view(n_heads, head_dim), pos=5.0)
    torch.testing.assert_close(rope_unpermute(got.reshape(-1, 1), n_heads).view(n_heads, head_dim), want)
    assert torch.equal(rope_unpermute(rope_permute(w, n_heads), n_heads), w)


CFG = ModelConfig(vocab_size=40, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=96, norm_eps=1e-6,
                  rope_theta=50000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, max_seq_len=512,
                  ffn_act="relu", ffn_threshold=0.1, tie_embeddings=False, bos_token_id=1, eos_token_ids=(2, 3))


def random_state(cfg):
    from powerinfer_py.loader import expected_shapes

    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in expected_shapes(cfg).items()}


def write_model(path, cfg, state, sparse, predictors=None, magic=None, metadata=None):
    """A model file written straight from runtime tensors (F32), the way the converter lays them out."""
    tensors = []
    for name, w in state.items():
        gguf_name = gguf_tensor_name(name, sparse)
        data = to_gguf_layout(gguf_name, w, cfg).contiguous().numpy()
        tensors.append((TensorSpec(gguf_name, data.shape, T.F32), lambda d=data: d))
    for i, p in enumerate(predictors or []):
        for key, w in p.items():
            tensors.append((TensorSpec(f"blk.{i}.{key}", tuple(w.shape), T.F16), lambda w=w: w.numpy().astype(np.float16)))
    if metadata is None:
        metadata = config_metadata(cfg, 0, "test", 0.25 if sparse else None)
    write_gguf(str(path), metadata, tensors, magic=magic or (PWRI_MAGIC if sparse else b"GGUF"))


@pytest.mark.parametrize("sparse", [True, False])
def test_load_checkpoint_round_trip(tmp_path, sparse):
    state = random_state(CFG)
    predictors = [{"fc1.weight": torch.randn(8, 64), "fc2.weight": torch.randn(96, 8)} for _ in range(2)] if sparse else None
    path = tmp_path / "m.gguf"
    write_model(path, CFG, state, sparse, predictors)
    cfg, tensors, tokenizer, preds, special = load_gguf_checkpoint(str(path))
    assert cfg == CFG.replace(sparse_threshold=0.25 if sparse else 0.0)
    assert tokenizer is None and special["bos_id"] == 1 and special["eos_ids"] == (2, 3)
    assert set(tensors) == set(state)
    for name, w in state.items():
        assert torch.equal(tensors[name], w), name
    if sparse:
        for p, q in zip(preds, predictors):
            assert torch.equal(p["fc1.weight"], q["fc1.weight"].half()) and p["fc2.weight"].dtype == torch.float16
        assert "blk.0.ffn_down_t.weight" in read_gguf(str(path)).tensors
    else:
        assert preds is None and "blk.0.ffn_down.weight" in read_gguf(str(path)).tensors


def test_activation_rule_without_our_keys(tmp_path):
    """Foreign files: PowerInfer llama is ReGLU, bamboo dReLU, plain llama.cpp llama SwiGLU; no output.weight
    means tied embeddings."""
    cfg = CFG.replace(rope_scaling=None, ffn_threshold=0.0, eos_token_ids=(2,))
    state = random_state(cfg)
    del state["output.weight"]
    for arch, magic, act in [("llama", PWRI_MAGIC, "relu"), ("bamboo", b"GGUF", "drelu"), ("llama", b"GGUF", "silu")]:
        md = [kv for kv in config_metadata(cfg.replace(arch=arch), 0, "x", None) if not kv[0].startswith("powerinfer_py.")]
        path = tmp_path / f"{arch}{magic.decode()}.gguf"
        write_model(path, cfg, state, sparse=False, magic=magic, metadata=md)
        got = read_gguf_config(str(path))
        assert (got.ffn_act, got.arch, got.tie_embeddings) == (act, arch, True)
        assert got.rope_scaling is None and got.norm_eps == 1e-6


def test_llama_cpp_rope_scaling_keys(tmp_path):
    md = [kv for kv in config_metadata(CFG, 0, "x", None) if kv[0] != "powerinfer_py.rope_scaling"]
    path = tmp_path / "r.gguf"
    write_model(path, CFG, random_state(CFG), sparse=False, metadata=md)
    assert read_gguf_config(str(path)).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unsupported_architecture_and_unexpected_tensor(tmp_path):
    md = [("general.architecture", V.STRING, "falcon")]
    path = tmp_path / "f.gguf"
    write_gguf(str(path), md, [(TensorSpec("token_embd.weight", (4, 8), T.F32), lambda: np.zeros((4, 8), np.float32))])
    with pytest.raises(UnsupportedModelError, match="architecture 'falcon'"):
        load_gguf_checkpoint(str(path))
    state = random_state(CFG)
    path = tmp_path / "x.gguf"
    write_model(path, CFG, state, sparse=False)
    raw = open(path, "rb").read().replace(b"blk.1.attn_v.weight", b"blk.1.attn_x.weight")
    (tmp_path / "y.gguf").write_bytes(raw)
    with pytest.raises(ModelFormatError, match="unexpected tensor blk.1.attn_x.weight"):
        load_gguf_checkpoint(str(tmp_path / "y.gguf"))


def test_name_table_and_layouts_invert():
    w = torch.randn(16, 64)
    for gguf_template in GGUF_TO_INTERNAL:
        name = gguf_template.format(i=3)
        assert torch.equal(from_gguf_layout(name, to_gguf_layout(name, w, CFG), CFG), w)
    assert gguf_tensor_name("layers.3.feed_forward.w_down.weight", sparse=True) == "blk.3.ffn_down_t.weight"
    assert gguf_tensor_name("layers.3.feed_forward.w_down.weight", sparse=False) == "blk.3.ffn_down.weight"
