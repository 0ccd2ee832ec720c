"""GGUF v3 files, plain (`GGUF` magic) and PowerInfer's (`PWRI` magic): one header reader and one writer.

The PyPI `gguf` package rejects the PWRI magic and numbers int32 as 26 where PowerInfer's ggml says 18, so the
header is parsed and written here; the package supplies the type tables and the block (de)quantizers.
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedModelError
from .hf import rename

GGUF_MAGIC = b"GGUF"
PWRI_MAGIC = b"PWRI"
GGUF_VERSION = 3
ALIGNMENT = 32

T = GGMLQuantizationType
# PowerInfer's ggml stops at Q8_K = 15 and then numbers I8, I16, I32 as 16, 17, 18 (the gguf package's
# 16..18 are IQ2_XXS, IQ2_XS, IQ3_XXS). PWRI files use these ids for integer tensors.
POWERINFER_INT_IDS = {T.I8: 16, T.I16: 17, T.I32: 18}

_SCALAR = {  # GGUFValueType -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {  # element types a tensor can be viewed as without decoding
    T.F32: np.float32, T.F16: np.float16, T.F64: np.float64,
    T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64,
}


def ggml_type_from_id(type_id: int, magic: bytes) -> GGMLQuantizationType:
    """The type of a tensor as numbered in a file with this magic. PWRI files also accept the package's ids
    for types PowerInfer's ggml lacks (int32 as 26 too), so files from either writer read."""
    if magic == PWRI_MAGIC:
        for t, i in POWERINFER_INT_IDS.items():
            if i == type_id:
                return t
    return GGMLQuantizationType(type_id)


def ggml_type_id(ggml_type: GGMLQuantizationType, magic: bytes) -> int:
    if magic == PWRI_MAGIC and ggml_type in POWERINFER_INT_IDS:
        return POWERINFER_INT_IDS[ggml_type]
    return int(ggml_type)


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (torch order: the last dimension is the contiguous row)."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"row length {row} is not a multiple of the {ggml_type.name} block size {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (row // block) * type_size


def can_encode(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> bool:
    return shape[-1] % GGML_QUANT_SIZES[ggml_type][0] == 0


def encode(array: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Convert a float or integer array to the bytes (or elements) stored for `ggml_type`. Block types are
    quantized a few million values at a time, so the float32 temporaries stay small."""
    if ggml_type in _NUMPY:
        return np.ascontiguousarray(array, dtype=_NUMPY[ggml_type])
    rows = array.reshape(-1, array.shape[-1])
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    out = np.empty((len(rows), rows.shape[1] // block * type_size), dtype=np.uint8)
    step = max(1, (4 << 20) // rows.shape[1])
    for start in range(0, len(rows), step):
        out[start:start + step] = quants.quantize(rows[start:start + step].astype(np.float32), ggml_type)
    return out.reshape(*array.shape[:-1], -1)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF's ne reversed)
    ggml_type: GGMLQuantizationType
    type_id: int  # the id as written in the file
    offset: int  # absolute position of the data in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF/PWRI header; tensor data stays on disk and is read through a memory map on demand."""

    def __init__(self, path: str):
        self.path = path
        self._mm = _map(path)
        self._buf = memoryview(self._mm)  # header parsing slices this (much faster than numpy slices)
        self._pos = 0
        self.magic = bytes(self._take(4, "the magic"))
        if self.magic not in (GGUF_MAGIC, PWRI_MAGIC):
            raise ModelFormatError(f"{path}: not a GGUF file (magic {self.magic!r}, expected b'GGUF' or b'PWRI')")
        self.version, n_tensors, n_kv = self._unpack("<IQQ")
        if self.version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {self.version} is not supported (expected 3)")
        self.metadata: dict = {}
        self.value_types: dict[str, tuple] = {}  # key -> (GGUFValueType, element type for arrays or None)
        for _ in range(n_kv):
            key = self._string()
            vtype = self._value_type(key)
            elem = self._value_type(key) if vtype == GGUFValueType.ARRAY else None
            self.metadata[key] = self._array(key, elem) if elem is not None else self._value(key, vtype)
            self.value_types[key] = (vtype, elem)
        self.alignment = int(self.metadata.get("general.alignment", ALIGNMENT))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 4:
                raise ModelFormatError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
            ne = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            try:
                ggml_type = ggml_type_from_id(type_id, self.magic)
            except ValueError:
                raise ModelFormatError(f"{path}: tensor {name} has unknown ggml type id {type_id}") from None
            shape = tuple(int(n) for n in reversed(ne))
            try:
                nbytes = tensor_nbytes(shape, ggml_type)
            except ValueError as e:
                raise ModelFormatError(f"{path}: tensor {name}: {e}") from None
            infos.append((name, shape, ggml_type, type_id, offset, nbytes))
        self.data_offset = _pad(self._pos, self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, type_id, offset, nbytes in infos:
            start = self.data_offset + offset
            if start + nbytes > len(self._mm):
                raise ModelFormatError(f"{path}: tensor {name} extends past end of file "
                                       f"(needs {start + nbytes} bytes, file has {len(self._mm)})")
            if name in self.tensors:
                raise ModelFormatError(f"{path}: tensor {name} appears twice")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, type_id, start, nbytes)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as uint8 rows (a view of the memory map, as a plain ndarray: the
        dequantizers slice it thousands of times, and each np.memmap slice costs a Python-level finalizer)."""
        t = self.tensors[name]
        data = np.asarray(self._mm[t.offset:t.offset + t.nbytes])
        rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if t.shape else 1
        return data.reshape(rows, -1) if t.nbytes else data

    def array(self, name: str) -> np.ndarray:
        """The tensor in torch shape: a memory-map view for plain types, a float32 copy for quantized ones."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.ggml_type in _NUMPY:
            return raw.view(_NUMPY[t.ggml_type]).reshape(t.shape)
        try:
            return quants.dequantize(raw, t.ggml_type).reshape(t.shape)
        except NotImplementedError:
            raise ModelFormatError(f"{self.path}: tensor {name} has type {t.ggml_type.name}, which cannot be decoded") from None

    # -- header parsing: every read is bounds-checked so a truncated header is one clear error
    def _take(self, n: int, what: str) -> memoryview:
        if self._pos + n > len(self._buf):
            raise ModelFormatError(f"{self.path}: truncated header while reading {what}")
        out = self._buf[self._pos:self._pos + n]
        self._pos += n
        return out

    def _unpack(self, fmt: str, what: str = "header fields") -> tuple:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))

    def _string(self) -> str:
        (n,) = self._unpack("<Q", "a string length")
        return bytes(self._take(n, "a string")).decode("utf-8", errors="surrogateescape")

    def _value_type(self, key: str) -> GGUFValueType:
        (v,) = self._unpack("<I", f"the type of {key}")
        try:
            return GGUFValueType(v)
        except ValueError:
            raise ModelFormatError(f"{self.path}: key {key} has unknown value type {v}") from None

    def _value(self, key: str, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return self._string()
        value = self._unpack(_SCALAR[vtype], f"the value of {key}")[0]
        # the shortest decimal that rounds to this float32 (1e-06, not 9.99999997e-07): what the writer meant
        return float(str(np.float32(value))) if vtype == GGUFValueType.FLOAT32 else value

    def _array(self, key: str, elem: GGUFValueType) -> list:
        (n,) = self._unpack("<Q", f"the length of {key}")
        if elem == GGUFValueType.STRING:
            return [self._string() for _ in range(n)]
        if elem == GGUFValueType.ARRAY:
            raise ModelFormatError(f"{self.path}: key {key} is an array of arrays (not supported)")
        fmt = _SCALAR[elem]
        size = struct.calcsize(fmt)
        return np.frombuffer(self._take(n * size, f"the values of {key}"), dtype=fmt).tolist()


def _map(path: str) -> np.ndarray:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None
    if size < 24:
        raise ModelFormatError(f"{path}: file too short for a GGUF header ({size} bytes)")
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_gguf(path: str) -> GGUFFile:
    return GGUFFile(str(path))


# ---------------------------------------------------------------------------------------------- writing

@dataclass
class TensorSpec:
    """What the header needs before the data exists, so tensors can be produced one at a time."""
    name: str
    shape: tuple[int, ...]  # torch order
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.ggml_type)


def _pack_value(vtype: GGUFValueType, value) -> bytes:
    if vtype == GGUFValueType.STRING:
        data = value.encode("utf-8", errors="surrogateescape")
        return struct.pack("<Q", len(data)) + data
    if vtype == GGUFValueType.ARRAY:
        elem, items = value
        head = struct.pack("<IQ", elem, len(items))
        if elem == GGUFValueType.STRING:
            return head + b"".join(_pack_value(elem, v) for v in items)
        return head + np.asarray(items, dtype=_SCALAR[elem]).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def write_gguf(path: str, metadata: list[tuple[str, GGUFValueType, object]],
               tensors: Iterable[tuple[TensorSpec, Callable[[], np.ndarray]]], magic: bytes = GGUF_MAGIC,
               on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
    """Write a GGUF v3 file (alignment 32). `metadata` is (key, value type, value); an array value is
    (element type, items). Each tensor comes with a function returning its data already encoded (see `encode`),
    called only when the tensor is written, so memory stays near one tensor's size."""
    tensors = list(tensors)
    header = [magic, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, vtype, value in metadata:
        header += [_pack_value(GGUFValueType.STRING, key), struct.pack("<I", vtype), _pack_value(vtype, value)]
    offset = 0
    for spec, _ in tensors:
        header += [_pack_value(GGUFValueType.STRING, spec.name), struct.pack("<I", len(spec.shape)),
                   struct.pack(f"<{len(spec.shape)}Q", *reversed(spec.shape)),
                   struct.pack("<IQ", ggml_type_id(spec.ggml_type, magic), offset)]
        offset = _pad(offset + spec.nbytes, ALIGNMENT)
    header = b"".join(header)
    with open(path, "wb") as f:
        f.write(header + bytes(_pad(len(header), ALIGNMENT) - len(header)))
        for spec, produce in tensors:
            data = produce()
            if data.nbytes != spec.nbytes:
                raise ValueError(f"tensor {spec.name}: produced {data.nbytes} bytes, header says {spec.nbytes}")
            f.write(np.ascontiguousarray(data).data)
            f.write(bytes(_pad(spec.nbytes, ALIGNMENT) - spec.nbytes))
            if on_tensor is not None:
                on_tensor(spec)


# ---------------------------------------------------------------------------------------------- models

# llama.cpp tensor names -> the runtime's names (model.py). ffn_down_t is PowerInfer's down projection stored
# transposed (one row per neuron); a file has either it (sparse) or ffn_down (dense).
GGUF_TO_INTERNAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w_gate.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w_up.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w_down.weight",
    "blk.{i}.ffn_down_t.weight": "layers.{i}.feed_forward.w_down.weight",
}
PREDICTOR_TENSORS = ("fc1.weight", "fc2.weight")  # blk.{i}.fc1.weight (r, d), blk.{i}.fc2.weight (n_ff, r)
ARCHITECTURES = ("llama", "bamboo")

# What llama.cpp's keys cannot say, written by us so that our files round-trip exactly.
FFN_ACT_KEY = "powerinfer_py.ffn_act"
FFN_THRESHOLD_KEY = "powerinfer_py.ffn_threshold"
TIE_KEY = "powerinfer_py.tie_embeddings"  # PowerInfer needs output.weight, so tied models store a copy
ROPE_SCALING_KEY = "powerinfer_py.rope_scaling"  # the Hugging Face rope_scaling dict as JSON
EOS_IDS_KEY = "powerinfer_py.eos_token_ids"
SPARSE_THRESHOLD_KEY = "powerinfer.sparse_threshold"


def gguf_tensor_name(internal: str, sparse: bool) -> str | None:
    """The llama.cpp name of a runtime tensor (ffn_down_t for the down projection of a sparse file)."""
    other = "blk.{i}.ffn_down.weight" if sparse else "blk.{i}.ffn_down_t.weight"
    return rename(internal, {name: gguf_name for gguf_name, name in GGUF_TO_INTERNAL.items() if gguf_name != other})


def rope_permute(w, n_heads: int):
    """Hugging Face Q/K rows (each head's rotated halves apart) -> llama.cpp's (rotated pairs adjacent)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w, n_heads: int):
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(gguf_name: str, w, cfg: ModelConfig):
    """A runtime tensor as llama.cpp/PowerInfer store it under `gguf_name`."""
    if gguf_name.endswith("attn_q.weight"):
        return rope_permute(w, cfg.n_heads)
    if gguf_name.endswith("attn_k.weight"):
        return rope_permute(w, cfg.n_kv_heads)
    if gguf_name.endswith("ffn_down_t.weight"):
        return w.T
    return w


def from_gguf_layout(gguf_name: str, w, cfg: ModelConfig):
    if gguf_name.endswith("attn_q.weight"):
        return rope_unpermute(w, cfg.n_heads)
    if gguf_name.endswith("attn_k.weight"):
        return rope_unpermute(w, cfg.n_kv_heads)
    if gguf_name.endswith("ffn_down_t.weight"):
        return w.T
    return w


def config_metadata(cfg: ModelConfig, file_type: int, name: str, sparse_threshold: float | None) -> list[tuple]:
    """llama.cpp's model keys for `cfg` (plus PowerInfer's sparse threshold and our own keys); the inverse of
    read_gguf_config."""
    V, a = GGUFValueType, cfg.arch
    keys = [("general.architecture", V.STRING, a), ("general.name", V.STRING, name),
            (f"{a}.context_length", V.UINT32, cfg.max_seq_len), (f"{a}.embedding_length", V.UINT32, cfg.dim),
            (f"{a}.block_count", V.UINT32, cfg.n_layers), (f"{a}.feed_forward_length", V.UINT32, cfg.n_ff),
            (f"{a}.rope.dimension_count", V.UINT32, cfg.head_dim),
            (f"{a}.attention.head_count", V.UINT32, cfg.n_heads),
            (f"{a}.attention.head_count_kv", V.UINT32, cfg.n_kv_heads),
            (f"{a}.attention.layer_norm_rms_epsilon", V.FLOAT32, cfg.norm_eps),
            (f"{a}.rope.freq_base", V.FLOAT32, cfg.rope_theta)]
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        keys += [(f"{a}.attention.key_length", V.UINT32, cfg.head_dim),
                 (f"{a}.attention.value_length", V.UINT32, cfg.head_dim)]
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") in ("linear", "yarn"):
        keys += [(f"{a}.rope.scaling.type", V.STRING, scaling["rope_type"]),
                 (f"{a}.rope.scaling.factor", V.FLOAT32, float(scaling["factor"]))]
        if scaling.get("original_max_position_embeddings"):
            keys.append((f"{a}.rope.scaling.original_context_length", V.UINT32,
                         int(scaling["original_max_position_embeddings"])))
    keys.append(("general.file_type", V.UINT32, file_type))
    if cfg.bos_token_id is not None:
        keys.append(("tokenizer.ggml.bos_token_id", V.UINT32, cfg.bos_token_id))
    if cfg.eos_token_ids and cfg.eos_token_ids[0] is not None:
        keys.append(("tokenizer.ggml.eos_token_id", V.UINT32, cfg.eos_token_ids[0]))
    if sparse_threshold is not None:
        keys.append((SPARSE_THRESHOLD_KEY, V.FLOAT32, sparse_threshold))
    keys.append((FFN_ACT_KEY, V.STRING, cfg.ffn_act))
    if cfg.ffn_threshold:
        keys.append((FFN_THRESHOLD_KEY, V.FLOAT32, cfg.ffn_threshold))
    if cfg.tie_embeddings:
        keys.append((TIE_KEY, V.BOOL, True))
    if cfg.rope_scaling:
        keys.append((ROPE_SCALING_KEY, V.STRING, json.dumps(cfg.rope_scaling)))
    if len(cfg.eos_token_ids) > 1:
        keys.append((EOS_IDS_KEY, V.ARRAY, (V.UINT32, list(cfg.eos_token_ids))))
    return keys


def read_gguf_config(source: str | GGUFFile) -> ModelConfig:
    """The model's hyper-parameters from llama.cpp's keys. Activation when no key of ours says: bamboo is
    dReLU, llama in a PWRI file is ReLU (ReGLU, what PowerInfer runs), llama in a plain GGUF is SiLU."""
    f = source if isinstance(source, GGUFFile) else read_gguf(source)
    md, arch = f.metadata, f.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{f.path}: architecture {arch!r} is not supported ({', '.join(ARCHITECTURES)})")

    def key(name, default=None):
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFormatError(f"{f.path}: key {arch}.{name} is missing")
        if isinstance(value, list):
            raise UnsupportedModelError(f"{f.path}: per-layer {arch}.{name} is not supported")
        return value

    if "token_embd.weight" not in f.tensors:
        raise ModelFormatError(f"{f.path}: tensor token_embd.weight is missing")
    if "rope_freqs.weight" in f.tensors and ROPE_SCALING_KEY not in md:
        raise UnsupportedModelError(f"{f.path}: RoPE frequency factors (rope_freqs, Llama 3 scaling) are not supported")
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    default_act = "drelu" if arch == "bamboo" else "relu" if f.magic == PWRI_MAGIC else "silu"
    eos = md.get(EOS_IDS_KEY) or [md.get("tokenizer.ggml.eos_token_id", 2)]
    return ModelConfig(
        vocab_size=f.tensors["token_embd.weight"].shape[0],
        dim=dim, n_layers=key("block_count"), n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads), n_ff=key("feed_forward_length"),
        head_dim=key("attention.key_length", key("rope.dimension_count", dim // n_heads)),
        norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=key("rope.freq_base", 10000.0),
        rope_scaling=json.loads(md[ROPE_SCALING_KEY]) if ROPE_SCALING_KEY in md else _rope_scaling(md, arch),
        max_seq_len=key("context_length", 2048),
        ffn_act=md.get(FFN_ACT_KEY, default_act),
        ffn_threshold=md.get(FFN_THRESHOLD_KEY, 0.0),
        tie_embeddings=md.get(TIE_KEY, "output.weight" not in f.tensors),
        arch=arch,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(eos),
        sparse_threshold=md.get(SPARSE_THRESHOLD_KEY, 0.0),
    )


def _rope_scaling(md: dict, arch: str) -> dict | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if kind is None and md.get(f"{arch}.rope.scale_linear"):  # the key before rope.scaling.*
        kind, factor = "linear", md[f"{arch}.rope.scale_linear"]
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"{arch}.rope.scaling.type {kind!r} is not supported (linear, yarn)")
    scaling = {"rope_type": kind, "factor": factor}
    if md.get(f"{arch}.rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = md[f"{arch}.rope.scaling.original_context_length"]
    return scaling


def _owned_tensor(array: np.ndarray) -> torch.Tensor:
    """A C-order torch copy of a (possibly read-only, possibly transposed) memory-map view; torch copies a
    transpose several times faster than numpy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # from_numpy on a read-only view: we copy it at once
        view = torch.from_numpy(array)
    return view.clone(memory_format=torch.contiguous_format) if view.is_contiguous() else view.contiguous()


def load_gguf_checkpoint(path: str):
    """(ModelConfig, tensors, tokenizer, predictors, special) from a GGUF or PowerInfer file.

    tensors: runtime names -> CPU tensors in Hugging Face layout (F16 stays fp16, F32 and every quantized type
    become fp32). tokenizer: a `tokenizers.Tokenizer` or None. predictors: per-layer {'fc1.weight',
    'fc2.weight'} or None. special: {'bos_id', 'eos_ids', 'add_bos', 'chat_template'}."""
    from ..gguf_tokenizer import tokenizer_from_metadata

    f = read_gguf(path)
    cfg = read_gguf_config(f)
    tensors, predictors = {}, [dict() for _ in range(cfg.n_layers)]
    for name in f.tensors:
        internal = rename(name, GGUF_TO_INTERNAL)
        m = re.fullmatch(r"blk\.(\d+)\.(fc[12]\.weight)", name)
        if internal is None and m is None:
            raise ModelFormatError(f"{path}: unexpected tensor {name}")
        data = from_gguf_layout(name, f.array(name), cfg)
        # a C-order copy: ffn_down_t's transpose would otherwise stay a strided view, and matmuls over it sum in
        # another order than over the Hugging Face tensor (logits then differ in the last bits)
        dtype = np.float16 if data.dtype == np.float16 else np.float32
        tensor = _owned_tensor(np.asarray(data, dtype=dtype))
        if m is not None:
            if int(m.group(1)) >= cfg.n_layers:
                raise ModelFormatError(f"{path}: tensor {name} is beyond the {cfg.n_layers} layers")
            predictors[int(m.group(1))][m.group(2)] = tensor
        else:
            if internal in tensors:
                raise ModelFormatError(f"{path}: both ffn_down and ffn_down_t for {internal}")
            tensors[internal] = tensor
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)
    found = [p for p in predictors if p]
    if (found and len(found) < cfg.n_layers) or any(len(p) == 1 for p in predictors):
        raise ModelFormatError(f"{path}: predictors (blk.N.fc1/fc2) are missing for some layers")
    md = f.metadata
    special = {"bos_id": md.get("tokenizer.ggml.bos_token_id"), "eos_ids": cfg.eos_token_ids,
               "add_bos": md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama"),
               "chat_template": md.get("tokenizer.chat_template")}
    return cfg, tensors, tokenizer_from_metadata(md, path), (predictors if found else None), special
