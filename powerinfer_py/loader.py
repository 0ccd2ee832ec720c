"""Load any supported model: a Hugging Face folder, a llama.cpp GGUF or a PowerInfer GGUF (detected by content).

Every loader returns a Checkpoint whose tensors use the runtime's own names (see model.py), so the rest of
the engine never needs to know where the weights came from."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import ModelFormatError
from .model import Predictor, Transformer, merge_qkv, rope_inv_freq
from .tokenizer import Tokenizer


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict  # runtime name -> CPU tensor
    tokenizer: Tokenizer | None
    predictors: list | None  # per layer {'fc1.weight', 'fc2.weight'}, or None
    kind: str  # "hf", "gguf" or "powerinfer"
    path: str


def detect_kind(path: str) -> str:
    if not os.path.exists(path):
        raise ModelFormatError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelFormatError(f"{path}: folder has no config.json (not a Hugging Face checkpoint)")
        return "hf"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    kinds = {b"GGUF": "gguf", b"PWRI": "powerinfer"}
    if magic not in kinds:
        raise ModelFormatError(f"{path}: not a GGUF or PowerInfer file (magic {magic!r})")
    return kinds[magic]


def has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))


def read_hf_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return ModelConfig.from_hf(json.load(f))
    except (ValueError, KeyError) as e:
        raise ModelFormatError(f"{path}: invalid config ({e.__class__.__name__}: {e})") from None


def read_config(path: str) -> ModelConfig:
    """The model's hyper-parameters without loading its weights."""
    if detect_kind(path) == "hf":
        return read_hf_config(path)
    from .formats.gguf import read_gguf_config

    return read_gguf_config(path)


def load_checkpoint(path: str) -> Checkpoint:
    kind = detect_kind(path)
    if kind == "hf":
        from .formats.hf import read_hf_tensors

        cfg = read_hf_config(path)
        tensors = read_hf_tensors(path)
        tokenizer = Tokenizer.from_hf_folder(path, cfg.bos_token_id, cfg.eos_token_ids) if has_tokenizer(path) else None
        return Checkpoint(cfg, tensors, tokenizer, None, kind, path)
    from .formats.gguf import load_gguf_checkpoint

    cfg, tensors, backend, predictors, special = load_gguf_checkpoint(path)
    tokenizer = Tokenizer(backend, special.get("bos_id"), special.get("eos_ids", cfg.eos_token_ids),
                          special.get("add_bos", False), special.get("chat_template")) if backend is not None else None
    return Checkpoint(cfg, tensors, tokenizer, predictors, kind, path)


def expected_shapes(cfg: ModelConfig) -> dict:
    """Runtime tensor name -> shape, for checking what a file provides."""
    d, hd = cfg.dim, cfg.head_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (cfg.n_heads * hd, d), p + "attention.wk.weight": (cfg.kv_dim, d),
            p + "attention.wv.weight": (cfg.kv_dim, d), p + "attention.wo.weight": (d, cfg.n_heads * hd),
            p + "feed_forward.w_gate.weight": (cfg.n_ff, d), p + "feed_forward.w_up.weight": (cfg.n_ff, d),
            p + "feed_forward.w_down.weight": (d, cfg.n_ff),
        })
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict, source: str, skip=()) -> None:
    """One clear error for the first missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name in skip:
            continue
        if name not in tensors:
            raise ModelFormatError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ModelFormatError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    extra = sorted(set(tensors) - set(expected) - {"output.weight"})
    if extra:
        raise ModelFormatError(f"{source}: unexpected tensor {extra[0]}")


def device_state(ckpt: Checkpoint, names, device, dtype) -> dict:
    """The named checkpoint tensors on `device` in `dtype`, each layer's q, k and v merged into the model's wqkv
    on the host first: the device never holds the separate and the merged matrices at once (for a 13B model
    at a 14 GiB budget that transient alone went 290 MiB over)."""
    state = {name: ckpt.tensors[name] for name in names}
    for i in range(ckpt.config.n_layers):
        merge_qkv(state, f"layers.{i}.attention.")
    return {name: t.to(device=device, dtype=dtype) for name, t in state.items()}


def build_model(ckpt: Checkpoint, device="cpu", dtype=torch.float32, skip=(), predictors: bool = False) -> Transformer:
    """A Transformer on `device` in `dtype`, built without a throw-away random init. Tensors named in `skip`
    stay on the meta device (the hybrid engine places those itself). With predictors=True, the checkpoint's
    predictors are installed on each layer."""
    cfg = ckpt.config
    check_tensors(cfg, ckpt.tensors, ckpt.path, skip)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = device_state(ckpt, [name for name in ckpt.tensors if name not in skip], device, dtype)
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg)[0].to(device)
    if predictors and ckpt.predictors:
        install_predictors(model, ckpt.predictors, cfg.sparse_threshold)
    return model.eval()


def install_predictors(model: Transformer, layers: list[dict], threshold: float) -> None:
    """Attach one Predictor per layer (weights in the model's dtype and on its device)."""
    weight = model.layers[0].attention.wqkv.weight
    for block, sd in zip(model.layers, layers):
        r, dim = sd["fc1.weight"].shape
        with torch.device("meta"):
            pred = Predictor(dim, r, sd["fc2.weight"].shape[0], threshold)
        pred.load_state_dict({k: v.to(device=weight.device, dtype=weight.dtype) for k, v in sd.items()}, assign=True)
        block.predictor = pred.eval()
