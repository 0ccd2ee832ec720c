"""Hugging Face checkpoint folders: safetensors (single or sharded with an index) or pytorch_model*.bin.

Tensors are opened lazily and read one at a time, so a converter's memory stays near one tensor's size.
HF_TO_INTERNAL is the one table from Hugging Face Llama names to the runtime's names (see model.py).
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..errors import ModelFormatError

HF_TO_INTERNAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w_down.weight",
}
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # a buffer old checkpoints saved
_LAYER = re.compile(r"\.(\d+)\.")


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map `name` through a table whose keys may hold one `{i}` layer placeholder; None if it has no entry."""
    m = _LAYER.search(name)
    if m is None:
        return table.get(name)
    target = table.get(name[:m.start()] + ".{i}." + name[m.end():])
    return None if target is None else target.format(i=m.group(1))


class HFTensors:
    """Lazy, random access to the tensors of a Hugging Face folder by their HF names."""

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, str] = {}  # hf name -> file
        self._open: dict[str, object] = {}  # file -> safe_open handle or mmap'ed state dict
        for path in _weight_files(folder):
            handle = self._handle(path)
            for name in handle.keys():
                self._files[name] = path

    @property
    def names(self) -> list[str]:
        return [n for n in self._files if not IGNORED.match(n)]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._files[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        handle = self._handle(path)
        try:
            return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated data
            raise ModelFormatError(f"{path}: cannot read tensor {name} ({e})") from None

    def _handle(self, path: str):
        if path not in self._open:
            try:
                if path.endswith(".safetensors"):
                    from safetensors import safe_open

                    self._open[path] = safe_open(path, framework="pt")
                else:  # zip-format torch checkpoints memory-map, so this reads nothing yet
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelFormatError(f"{path}: cannot read weights ({e.__class__.__name__}: {e})") from None
        return self._open[path]


def _weight_files(folder: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ModelFormatError(f"{index}: invalid index ({e.__class__.__name__})") from None
            paths = [os.path.join(folder, s) for s in shards]
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise ModelFormatError(f"{index}: shard {missing[0]} is missing")
            return paths
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for pattern in (r"^model.*\.safetensors$", r"^pytorch_model.*\.bin$"):
        found = [os.path.join(folder, n) for n in names if re.match(pattern, n)]
        if found:
            return found
    raise ModelFormatError(f"{folder}: no model*.safetensors or pytorch_model*.bin weights")


def iter_hf_tensors(folder: str):
    """Yield (hf_name, tensor) one at a time, in file order."""
    source = HFTensors(folder)
    for name in source.names:
        yield name, source.get(name)


def read_hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors under the runtime's names, in their stored dtype."""
    out = {}
    for name, tensor in iter_hf_tensors(folder):
        internal = rename(name, HF_TO_INTERNAL)
        if internal is None:
            raise ModelFormatError(f"{folder}: unexpected tensor {name}")
        out[internal] = tensor
    return out
