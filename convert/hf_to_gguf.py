"""Hugging Face folder (+ predictor folder) -> PowerInfer sparse GGUF (`PWRI`) or plain llama.cpp GGUF.

Everything is checked before the first byte is written; tensors are then read, re-laid-out, encoded and
written one at a time into a temporary file that is renamed when complete.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch
from gguf import GGMLQuantizationType, LlamaFileType
from tqdm import tqdm

from powerinfer_py.atomic import atomic_file, check_writable
from powerinfer_py.errors import InputError, ModelFormatError, UnsupportedModelError
from powerinfer_py.formats.gguf import (GGUF_MAGIC, GGUF_TO_INTERNAL, PREDICTOR_TENSORS, PWRI_MAGIC, TensorSpec, can_encode,
                                        config_metadata, encode, gguf_tensor_name, to_gguf_layout, write_gguf)
from powerinfer_py.formats.hf import HF_TO_INTERNAL, HFTensors, rename
from powerinfer_py.formats.predictors import load_predictors
from powerinfer_py.gguf_tokenizer import tokenizer_metadata
from powerinfer_py.loader import check_tensors, read_hf_config
from powerinfer_py.tokenizer import Tokenizer

T = GGMLQuantizationType
OUTTYPES = {  # --outtype -> (type of 2-D weights, general.file_type)
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
HEADER_ALLOWANCE = 64 << 20  # room for the tokenizer metadata and padding when checking free disk space


def stored_type(gguf_name: str, shape: tuple, outtype: str, notes: list[str]) -> GGMLQuantizationType:
    """1-D tensors F32; predictors F16 (PowerInfer's sparse path wants F16 fc1/fc2) unless f32; others in
    outtype, or F16 when a row cannot be split into blocks."""
    if len(shape) == 1:
        return T.F32
    wanted = OUTTYPES[outtype][0]
    if gguf_name.endswith(("fc1.weight", "fc2.weight")) and wanted != T.F32:
        return T.F16
    if not can_encode(shape, wanted):
        notes.append(f"{gguf_name}: rows of {shape[-1]} are not a multiple of {wanted.name}'s block size; stored as F16")
        return T.F16
    return wanted


def file_order(n_layers: int) -> list[str]:
    """Runtime tensor names in the order they are written: globals, then each layer as in GGUF_TO_INTERNAL."""
    names = list(dict.fromkeys(GGUF_TO_INTERNAL.values()))
    layer = [n for n in names if "{i}" in n]
    return [n for n in names if "{i}" not in n] + [n.format(i=i) for i in range(n_layers) for n in layer]


def convert(hf_dir: str, out: str, predictor_dir: str | None = None, outtype: str = "f16", dense: bool = False,
            force: bool = False, progress: bool = True, log=lambda msg: print(msg, file=sys.stderr)) -> None:
    """Write `out` from the checkpoint in `hf_dir`: a PowerInfer sparse file with the predictors of
    `predictor_dir`, or with dense=True a plain llama.cpp GGUF."""
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    check_writable(out, force)
    cfg = read_hf_config(hf_dir)
    sparse = not dense
    predictors, threshold = [], None
    if sparse:
        if predictor_dir is None:
            raise InputError("a sparse file needs a predictor folder (or --dense for a plain GGUF)")
        if not cfg.is_relu_family:
            raise UnsupportedModelError(f"{hf_dir}: hidden_act {cfg.ffn_act} has no activation sparsity; a sparse file "
                                        "needs a ReLU-family model (relu, drelu) or a fatrelu_threshold")
        predictors, threshold = load_predictors(predictor_dir, cfg.n_layers, cfg.dim, cfg.n_ff)

    notes = []
    plan = plan_tensors(HFTensors(hf_dir), cfg, predictors, sparse, outtype, notes)
    size = sum(spec.nbytes for spec, _ in plan)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out))).free
    if free < size + HEADER_ALLOWANCE:
        raise InputError(f"{out}: needs about {size / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free")
    tokenizer = Tokenizer.from_hf_folder(hf_dir, cfg.bos_token_id, cfg.eos_token_ids)
    metadata = (config_metadata(cfg, OUTTYPES[outtype][1], os.path.basename(os.path.abspath(hf_dir)), threshold)
                + tokenizer_metadata(hf_dir, cfg.vocab_size, tokenizer.add_bos))
    for note in notes:
        log(f"note: {note}")
    if sparse and outtype == "q8_0":
        log("note: PowerInfer's sparse FFN kernels take F16 or Q4_0 weights; this Q8_0 file is for powerinfer-py")
    with tqdm(total=size, unit="B", unit_scale=True, desc="convert", disable=not progress, file=sys.stderr) as bar, \
            atomic_file(out, force) as tmp:
        write_gguf(tmp, metadata, plan, magic=PWRI_MAGIC if sparse else GGUF_MAGIC,
                   on_tensor=lambda spec: bar.update(spec.nbytes))


def plan_tensors(source: HFTensors, cfg, predictors: list[dict], sparse: bool, outtype: str, notes: list[str]) -> list:
    """(TensorSpec, produce) for every tensor of the output, in file order, after checking the checkpoint's
    names and shapes; nothing is read yet."""
    hf_names = {}  # runtime name -> hf name
    for name in source.names:
        internal = rename(name, HF_TO_INTERNAL)
        if internal is None:
            raise ModelFormatError(f"{source.folder}: unexpected tensor {name}")
        hf_names[internal] = name
    check_tensors(cfg, {n: torch.empty(source.shape(h), device="meta") for n, h in hf_names.items()}, source.folder)
    if cfg.tie_embeddings:
        hf_names.pop("output.weight", None)
        if sparse:  # PowerInfer's llama loader requires output.weight: store a copy of the embedding
            hf_names["output.weight"] = hf_names["tok_embeddings.weight"]

    def from_hf(hf_name, gguf_name, ggml_type):
        def produce():
            w = source.get(hf_name)
            if ggml_type == T.F32 or w.dtype not in (torch.float16, torch.float32):
                w = w.float()
            return encode(to_gguf_layout(gguf_name, w, cfg).contiguous().numpy(), ggml_type)
        return produce

    def from_predictor(layer, key, ggml_type):
        # popped once written: the predictor files are memory-mapped, and a layer's file is unmapped when both of
        # its tensors are gone, so memory stays near one tensor instead of every predictor
        return lambda: encode(predictors[layer].pop(key).float().numpy(), ggml_type)

    plan = []
    for internal in file_order(cfg.n_layers):
        if internal not in hf_names:  # output.weight of a tied dense model
            continue
        gguf_name = gguf_tensor_name(internal, sparse)
        meta = torch.empty(source.shape(hf_names[internal]), device="meta")
        shape = tuple(to_gguf_layout(gguf_name, meta, cfg).shape)
        ggml_type = stored_type(gguf_name, shape, outtype, notes)
        plan.append((TensorSpec(gguf_name, shape, ggml_type), from_hf(hf_names[internal], gguf_name, ggml_type)))
        if sparse and internal.endswith("w_down.weight"):  # the layer's predictor follows its FFN
            layer = int(internal.split(".")[1])
            for key in PREDICTOR_TENSORS:
                name, shape = f"blk.{layer}.{key}", tuple(predictors[layer][key].shape)
                ggml_type = stored_type(name, shape, outtype, notes)
                plan.append((TensorSpec(name, shape, ggml_type), from_predictor(layer, key, ggml_type)))
    return plan
