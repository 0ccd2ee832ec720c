import os
import shutil
import struct
from collections import namedtuple

import numpy as np
import pytest
import tokenizers
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from convert import convert
from powerinfer_py.errors import InputError, ModelFormatError, UnsupportedModelError
from powerinfer_py.formats.gguf import from_gguf_layout, gguf_tensor_name, load_gguf_checkpoint, read_gguf, to_gguf_layout
from powerinfer_py.formats.hf import read_hf_tensors
from tiny_models import TEXT, write_hf_llama, write_predictors

transformers = pytest.importorskip("transformers")

Tiny = namedtuple("Tiny", "hf pred predictors state model")
BLOCK = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down_t",
         "fc1", "fc2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = write_hf_llama(str(root / "hf"))
    predictors = write_predictors(str(root / "pred"))
    return Tiny(str(root / "hf"), str(root / "pred"), predictors, read_hf_tensors(str(root / "hf")), model)


def run(tiny, tmp_path, name="m.powerinfer.gguf", **kw):
    out = str(tmp_path / name)
    kw.setdefault("predictor_dir", None if kw.get("dense") else tiny.pred)
    convert(kw.pop("hf", tiny.hf), out, progress=False, log=lambda msg: None, **kw)
    return out


def test_sparse_f16_file_follows_powerinfer_layout(tiny, tmp_path):
    out = run(tiny, tmp_path)
    raw = open(out, "rb").read(8)
    assert raw[:4] == b"PWRI" and struct.unpack("<I", raw[4:])[0] == 3
    f = read_gguf(out)
    assert f.alignment == 32 and all(t.offset % 32 == 0 for t in f.tensors.values())
    assert list(f.tensors) == ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(2) for n in BLOCK]
    md, types = f.metadata, {k: v[0].name for k, v in f.value_types.items()}
    assert md["general.architecture"] == "llama" and md["general.file_type"] == 1
    for key, value in {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 160,
                       "rope.dimension_count": 16, "attention.head_count": 4, "attention.head_count_kv": 2}.items():
        assert md[f"llama.{key}"] == value and types[f"llama.{key}"] == "UINT32"
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-5 and md["llama.rope.freq_base"] == 10000.0
    assert md["powerinfer.sparse_threshold"] == 0.25 and types["powerinfer.sparse_threshold"] == "FLOAT32"
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.merges"]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    for t in f.tensors.values():
        assert t.type_id == (0 if len(t.shape) == 1 else 1), t.name  # F32 vectors, F16 matrices (fc1/fc2 too)
    assert f.tensors["blk.0.fc1.weight"].shape == (16, 64) and f.tensors["blk.1.fc1.weight"].shape == (32, 64)
    assert f.tensors["blk.1.ffn_down_t.weight"].shape == (160, 64)


def test_sparse_f16_loads_back_exactly(tiny, tmp_path):
    cfg, tensors, tokenizer, predictors, special = load_gguf_checkpoint(run(tiny, tmp_path))
    assert (cfg.ffn_act, cfg.tie_embeddings, cfg.sparse_threshold, cfg.n_kv_heads) == ("relu", False, 0.25, 2)
    assert set(tensors) == set(tiny.state)
    for name, w in tiny.state.items():
        assert torch.equal(tensors[name], w.half() if w.dim() == 2 else w), name
    for got, want in zip(predictors, tiny.predictors):
        for key in want:
            assert torch.equal(got[key], want[key].half())
    ref = tokenizers.Tokenizer.from_file(os.path.join(tiny.hf, "tokenizer.json"))
    assert tokenizer.encode(TEXT, add_special_tokens=False).ids == ref.encode(TEXT, add_special_tokens=False).ids
    assert special == {"bos_id": 1, "eos_ids": (2,), "add_bos": False, "chat_template": "{{ messages }}"}


@pytest.mark.parametrize("outtype,qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_block_quantized_within_rounding(tiny, tmp_path, outtype, qtype):
    out = run(tiny, tmp_path, outtype=outtype)
    f = read_gguf(out)
    cfg, tensors, _, predictors, _ = load_gguf_checkpoint(out)
    for name, w in tiny.state.items():
        gguf_name = gguf_tensor_name(name, sparse=True)
        if w.dim() == 1:
            assert torch.equal(tensors[name], w)
            continue
        assert f.tensors[gguf_name].ggml_type == qtype
        stored = to_gguf_layout(gguf_name, w, cfg).contiguous().numpy()
        want = from_gguf_layout(gguf_name, dequantize(quantize(stored, qtype), qtype), cfg)
        np.testing.assert_array_equal(tensors[name].numpy(), want)
    assert f.tensors["blk.0.fc2.weight"].ggml_type == T.F16
    assert torch.equal(predictors[0]["fc2.weight"], tiny.predictors[0]["fc2.weight"].half())


def test_dense_file_reads_in_gguf_package(tiny, tmp_path):
    out = run(tiny, tmp_path, name="d.gguf", dense=True, outtype="f32")
    r = GGUFReader(out)
    names = [t.name for t in r.tensors]
    assert "blk.0.ffn_down.weight" in names and not any("ffn_down_t" in n or ".fc" in n for n in names)
    assert open(out, "rb").read(4) == b"GGUF"
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    cfg, tensors, _, predictors, _ = load_gguf_checkpoint(out)
    assert predictors is None
    for name, w in tiny.state.items():
        gguf_name = gguf_tensor_name(name, sparse=False)
        np.testing.assert_array_equal(data[gguf_name].reshape(w.shape), to_gguf_layout(gguf_name, w, cfg).numpy())
        assert torch.equal(tensors[name], w)


def test_gguf_model_gives_the_same_logits(tiny, tmp_path):
    from powerinfer_py.loader import build_model, load_checkpoint

    out = run(tiny, tmp_path, outtype="f32")
    model = build_model(load_checkpoint(out))
    tokens = torch.randint(3, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tiny.model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_tied_bf16_sharded_and_bin_sources(tmp_path):
    """Tied embeddings get an output.weight copy (PowerInfer needs it) and load back tied; bf16, sharded
    safetensors and pytorch_model.bin read the same."""
    write_predictors(str(tmp_path / "pred"), n_ff=96)
    common = dict(intermediate_size=96, tie_word_embeddings=True)
    write_hf_llama(str(tmp_path / "sharded"), max_shard_size="40KB", dtype=torch.bfloat16, **common)
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    write_hf_llama(str(tmp_path / "bin"), safe_serialization=False, dtype=torch.bfloat16, **common)
    outs = []
    for name in ("sharded", "bin"):
        out = str(tmp_path / f"{name}.gguf")
        convert(str(tmp_path / name), out, str(tmp_path / "pred"), progress=False, log=lambda m: None)
        f = read_gguf(out)
        np.testing.assert_array_equal(f.array("output.weight"), f.array("token_embd.weight"))
        cfg, tensors, *_ = load_gguf_checkpoint(out)
        assert cfg.tie_embeddings and "output.weight" not in tensors
        outs.append(tensors)
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name])


def test_bamboo_is_its_own_architecture(tiny, tmp_path):
    bamboo = str(tmp_path / "bamboo")
    shutil.copytree(tiny.hf, bamboo)
    edit_config(bamboo, '"model_type": "llama"', '"model_type": "bamboo"')
    out = run(tiny, tmp_path, hf=bamboo)
    f = read_gguf(out)
    assert f.architecture == "bamboo" and f.metadata["bamboo.block_count"] == 2
    cfg, *_ = load_gguf_checkpoint(out)
    assert (cfg.arch, cfg.ffn_act) == ("bamboo", "drelu")


def test_rows_that_cannot_be_blocked_fall_back_to_f16(tmp_path):
    write_hf_llama(str(tmp_path / "hf"), hidden_size=48, num_attention_heads=4, intermediate_size=64)
    notes = []
    convert(str(tmp_path / "hf"), str(tmp_path / "o.gguf"), dense=True, outtype="q8_0", progress=False, log=notes.append)
    f = read_gguf(str(tmp_path / "o.gguf"))
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == T.F16  # rows of 48
    assert f.tensors["blk.0.ffn_down.weight"].ggml_type == T.Q8_0  # rows of 64
    assert any("blk.0.ffn_up.weight: rows of 48" in n for n in notes)


def edit_config(folder, old, new):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def bad_input(tmp_path, tiny, **kw):
    """Run a conversion expected to fail; check that nothing is left in the output folder."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = sorted(os.listdir(out_dir))
    try:
        run(tiny, out_dir, **kw)
    finally:
        assert sorted(os.listdir(out_dir)) == before


def test_bad_inputs_raise_one_line_errors(tiny, tmp_path):
    few = str(tmp_path / "few")
    write_predictors(few, n_layers=1)
    wrong = str(tmp_path / "wrong")
    write_predictors(wrong, n_ff=150)
    silu = str(tmp_path / "silu")
    write_hf_llama(silu, hidden_act="silu")
    mistral = str(tmp_path / "mistral")
    shutil.copytree(tiny.hf, mistral)
    edit_config(mistral, '"model_type": "llama"', '"model_type": "mistral"')
    cases = [
        (dict(predictor_dir=few), InputError, "do not match the model's 2 layers"),
        (dict(predictor_dir=wrong), InputError, r"fc2.weight has shape \(150, 16\), expected \(160, 16\)"),
        (dict(hf=silu), UnsupportedModelError, "hidden_act silu"),
        (dict(hf=mistral), UnsupportedModelError, "model_type 'mistral'"),
        (dict(predictor_dir=None), InputError, "needs a predictor folder"),
        (dict(outtype="q5_k"), InputError, "--outtype"),
    ]
    for kw, error, message in cases:
        with pytest.raises(error, match=message) as e:
            bad_input(tmp_path, tiny, **kw)
        assert "\n" not in str(e.value)


def test_refuses_overwrite_and_full_disk(tiny, tmp_path, monkeypatch):
    out = run(tiny, tmp_path, name="x.gguf")
    with pytest.raises(InputError, match="already exists"):
        run(tiny, tmp_path, name="x.gguf")
    run(tiny, tmp_path, name="x.gguf", force=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(InputError, match="GiB free"):
        bad_input(tmp_path, tiny)
    assert os.path.exists(out)


def test_truncated_safetensors(tiny, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny.hf, broken)
    path = os.path.join(broken, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        bad_input(tmp_path, tiny, hf=broken)
