"""PowerInfer's GPU index file (`<model>.generated.gpuidx`): which FFN neurons of each layer live on the GPU.

A PWRI-magic GGUF v3 file with keys general.architecture = "generic.gpu_index",
generic.gpu_index.block_count (u32) and split.vram_capacity (u64, the budget in bytes it was solved for), and,
read by position, for each layer i: blk.{i}.gpu_idx (int32 0/1 mask of n_ff) then blk.{i}.gpu_bucket (int32
ascending indices of the ones: GPU row j holds neuron bucket[j]). int32 is ggml type 18, as PowerInfer numbers it.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from ..atomic import atomic_file
from ..errors import InputError, ModelFormatError
from .gguf import PWRI_MAGIC, TensorSpec, read_gguf, write_gguf

GPU_INDEX_ARCH = "generic.gpu_index"
I32 = GGMLQuantizationType.I32


def _as_mask(mask, layer: int) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 1 or not np.isin(mask, (0, 1)).all():
        raise InputError(f"gpu mask of layer {layer}: expected a 1-D array of 0/1 (got shape {mask.shape})")
    return mask.astype(bool)


def write_gpuidx(path: str, gpu_masks: list, vram_capacity: int, force: bool = False) -> None:
    """Write the GPU index of `gpu_masks` (one (n_ff,) bool or 0/1 array per layer), atomically."""
    masks = [_as_mask(m, i) for i, m in enumerate(gpu_masks)]
    metadata = [
        ("general.architecture", GGUFValueType.STRING, GPU_INDEX_ARCH),
        (f"{GPU_INDEX_ARCH}.block_count", GGUFValueType.UINT32, len(masks)),
        ("split.vram_capacity", GGUFValueType.UINT64, int(vram_capacity)),
    ]
    tensors = []
    for i, mask in enumerate(masks):
        gpu_idx = mask.astype(np.int32)
        gpu_bucket = np.flatnonzero(mask).astype(np.int32)
        tensors += [(TensorSpec(f"blk.{i}.gpu_idx", gpu_idx.shape, I32), lambda a=gpu_idx: a),
                    (TensorSpec(f"blk.{i}.gpu_bucket", gpu_bucket.shape, I32), lambda a=gpu_bucket: a)]
    with atomic_file(path, force) as tmp:
        write_gguf(tmp, metadata, tensors, magic=PWRI_MAGIC)


def read_gpuidx(path: str, n_layers: int | None = None, n_ff: int | None = None) -> tuple[list[np.ndarray], int]:
    """(per-layer bool GPU masks, vram_capacity in bytes). Checks the layout and, when given, the model's shape."""
    try:
        f = read_gguf(path)
    except ModelFormatError as e:
        raise InputError(str(e)) from None
    if f.architecture != GPU_INDEX_ARCH:
        raise InputError(f"{path}: not a GPU index (general.architecture is {f.architecture!r})")
    n_blocks = f.metadata.get(f"{GPU_INDEX_ARCH}.block_count")
    vram_capacity = f.metadata.get("split.vram_capacity")
    if n_blocks is None or vram_capacity is None:
        raise InputError(f"{path}: missing {GPU_INDEX_ARCH}.block_count or split.vram_capacity")
    if n_layers is not None and n_blocks != n_layers:
        raise InputError(f"{path}: GPU index has {n_blocks} layers, the model has {n_layers}")
    infos = list(f.tensors.values())
    expected = [f"blk.{i}.{kind}" for i in range(n_blocks) for kind in ("gpu_idx", "gpu_bucket")]
    if [t.name for t in infos] != expected:
        raise InputError(f"{path}: tensors are not blk.{{i}}.gpu_idx, blk.{{i}}.gpu_bucket for i < {n_blocks} in order")
    masks = []
    for i in range(n_blocks):
        gpu_idx, gpu_bucket = infos[2 * i], infos[2 * i + 1]
        for t in (gpu_idx, gpu_bucket):
            if t.ggml_type != I32 or len(t.shape) != 1:
                raise InputError(f"{path}: {t.name} must be a 1-D int32 tensor (type id {t.type_id}, shape {t.shape})")
        if n_ff is not None and gpu_idx.shape[0] != n_ff:
            raise InputError(f"{path}: {gpu_idx.name} has {gpu_idx.shape[0]} neurons, the model has n_ff={n_ff}")
        idx = f.array(gpu_idx.name)
        if not np.isin(idx, (0, 1)).all():
            raise InputError(f"{path}: {gpu_idx.name} holds values other than 0 and 1")
        mask = idx.astype(bool)
        if not np.array_equal(f.array(gpu_bucket.name), np.flatnonzero(mask)):
            raise InputError(f"{path}: {gpu_bucket.name} is not the ascending list of {gpu_idx.name}'s ones")
        masks.append(mask)
    return masks, int(vram_capacity)


def default_gpuidx_path(model_path: str) -> str:
    """PowerInfer's <model file>.generated.gpuidx; for a Hugging Face folder, model.generated.gpuidx inside it."""
    if os.path.isdir(model_path):
        return os.path.join(model_path, "model.generated.gpuidx")
    return model_path + ".generated.gpuidx"
