"""Model hyper-parameters in one dataclass, read from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UnsupportedModelError

FFN_ACTS = ("silu", "relu", "drelu")  # SwiGLU, ReGLU (ReluLLaMA/ProSparse), dReLU (Bamboo)
RELU_FAMILY = ("relu", "drelu")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_ff: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF style: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ...}
    max_seq_len: int = 2048
    ffn_act: str = "relu"
    ffn_threshold: float = 0.0  # FATReLU: activations at or below it count as zero (ProSparse)
    tie_embeddings: bool = False
    arch: str = "llama"  # "llama" or "bamboo" (dReLU)
    bos_token_id: int | None = 1
    eos_token_ids: tuple = (2,)
    sparse_threshold: float = 0.0  # predictor logit threshold (PowerInfer's powerinfer.sparse_threshold)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_act not in FFN_ACTS:
            raise UnsupportedModelError(f"FFN activation {self.ffn_act!r} is not supported (expected one of {FFN_ACTS})")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.eos_token_ids = tuple(self.eos_token_ids)

    @property
    def is_relu_family(self) -> bool:
        return self.ffn_act in RELU_FAMILY or self.ffn_threshold > 0

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Build from a Hugging Face LlamaConfig dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "bamboo"):
            raise UnsupportedModelError(f"config.json: model_type {model_type!r} is not supported (llama, bamboo)")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UnsupportedModelError(f"config.json: {key}=true is not supported")
        act = cfg.get("hidden_act", "silu")
        act = {"silu": "silu", "swish": "silu", "relu": "relu", "drelu": "drelu"}.get(act)
        if act is None:
            raise UnsupportedModelError(f"config.json: hidden_act {cfg.get('hidden_act')!r} is not supported (silu, relu, drelu)")
        if model_type == "bamboo":
            act = "drelu"
        rope_theta = cfg.get("rope_theta")
        scaling = cfg.get("rope_scaling")
        params = cfg.get("rope_parameters")
        if isinstance(params, dict):  # transformers 5.x
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = kind
            if kind == "default":
                scaling = None
        eos = cfg.get("eos_token_id", 2)
        n_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            n_ff=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            ffn_act=act,
            ffn_threshold=float(cfg.get("fatrelu_threshold", cfg.get("ffn_threshold", 0.0)) or 0.0),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            arch="bamboo" if act == "drelu" else "llama",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        )

    def to_hf(self) -> dict:
        """The matching transformers LlamaConfig dict (used for reference checks and the demo model)."""
        cfg = {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.n_ff, "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_seq_len,
            "hidden_act": self.ffn_act, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids[0],
            "attention_bias": False, "mlp_bias": False,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.ffn_threshold:
            cfg["fatrelu_threshold"] = self.ffn_threshold
        return cfg
