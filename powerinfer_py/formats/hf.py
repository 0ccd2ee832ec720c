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
    """Lazy, random access to the tensors of a Hugging Face folder by their HF names.

    A safetensors file is opened anew for each read: a handle kept open keeps every page it has read mapped,
    so a converter's resident memory would grow to the size of the model."""

    def __init__(self, folder: str):
        self.folder = folder
        self._files: dict[str, str] = {}  # hf name -> file
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bins: dict[str, dict] = {}  # pytorch_model*.bin -> its memory-mapped state dict
        for path in _weight_files(folder):
            if path.endswith(".safetensors"):
                with _safe_open(path) as f:
                    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            else:
                shapes = {name: tuple(t.shape) for name, t in self._bin(path).items()}
            self._shapes.update(shapes)
            self._files.update(dict.fromkeys(shapes, path))

    @property
    def names(self) -> list[str]:
        return [n for n in self._files if not IGNORED.match(n)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if not path.endswith(".safetensors"):
            return self._bin(path)[name]
        with _safe_open(path) as f:
            try:
                return f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types for truncated data
                raise ModelFormatError(f"{path}: cannot read tensor {name} ({e})") from None

    def _bin(self, path: str) -> dict:
        if path not in self._bins:  # zip-format torch checkpoints memory-map, so this reads nothing yet
            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelFormatError(f"{path}: cannot read weights ({e.__class__.__name__}: {e})") from None
        return self._bins[path]


def _safe_open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise ModelFormatError(f"{path}: cannot read weights ({e.__class__.__name__}: {e})") from None


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
