import json
import os

import pytest
import torch
from safetensors.torch import save_file

from powerinfer_py.errors import ModelFormatError
from powerinfer_py.formats.hf import HF_TO_INTERNAL, HFTensors, iter_hf_tensors, read_hf_tensors, rename


def test_rename_table():
    assert rename("model.layers.12.mlp.down_proj.weight", HF_TO_INTERNAL) == "layers.12.feed_forward.w_down.weight"
    assert rename("lm_head.weight", HF_TO_INTERNAL) == "output.weight"
    assert rename("model.layers.0.mlp.bias", HF_TO_INTERNAL) is None


def test_sharded_safetensors_lazily(tmp_path):
    a = {"model.embed_tokens.weight": torch.randn(5, 4), "model.norm.weight": torch.randn(4)}
    b = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(2), "lm_head.weight": torch.randn(5, 4)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = HFTensors(str(tmp_path))
    assert source.shape("lm_head.weight") == (5, 4)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in source.names
    assert {n: t.shape for n, t in iter_hf_tensors(str(tmp_path))} == {n: t.shape for n, t in {**a, **b}.items() if "inv_freq" not in n}
    tensors = read_hf_tensors(str(tmp_path))
    assert torch.equal(tensors["tok_embeddings.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(tensors["output.weight"], b["lm_head.weight"])
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelFormatError, match="shard .*00002-of-00002.safetensors is missing"):
        HFTensors(str(tmp_path))


def test_pytorch_bin_and_errors(tmp_path):
    torch.save({"model.norm.weight": torch.randn(4), "model.extra.weight": torch.randn(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(HFTensors(str(tmp_path)).get("model.norm.weight"), torch.load(tmp_path / "pytorch_model.bin")["model.norm.weight"])
    with pytest.raises(ModelFormatError, match="unexpected tensor model.extra.weight"):
        read_hf_tensors(str(tmp_path))
    with pytest.raises(ModelFormatError, match="no model.*safetensors or pytorch_model.*bin"):
        HFTensors(str(tmp_path / "empty"))
