"""The real relu-smollm2-135m through the converter: Hugging Face folder -> PowerInfer GGUF (f16, q8_0, q4_0) ->
load_checkpoint -> build_model, against the folder itself."""
import os

import pytest
import tokenizers
import torch

from convert import convert
from convert.inspect import describe
from powerinfer_py.eval import perplexity, read_documents
from powerinfer_py.formats import load_predictors, read_gguf
from powerinfer_py.formats.gguf import from_gguf_layout, gguf_tensor_name, to_gguf_layout
from powerinfer_py.loader import build_model, install_predictors, load_checkpoint
from tiny_models import write_predictors

THRESHOLD = 0.5  # predictor logits are large (random fc1/fc2), so about half the neurons stay active
PROBE_TOKENS = 96
CHAT = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"


class Converted:
    """The real model, its random predictor folder (ranks 64 and 128) and its conversions, each made once."""

    def __init__(self, hf_dir: str, root: str):
        self.hf_dir, self.root = hf_dir, root
        self.pred_dir = os.path.join(root, "pred")
        self.hf = load_checkpoint(hf_dir)
        cfg = self.hf.config
        write_predictors(self.pred_dir, cfg.n_layers, cfg.dim, cfg.n_ff, ranks=(64, 128), threshold=THRESHOLD)
        self.hf_model = build_model(self.hf)
        self.loaded = {}  # outtype -> Checkpoint

    def path(self, outtype: str) -> str:
        out = os.path.join(self.root, f"relu-smollm2.{outtype}.powerinfer.gguf")
        if not os.path.exists(out):  # the converter renames a complete file into place
            convert(self.hf_dir, out, self.pred_dir, outtype, progress=False, log=lambda msg: None)
        return out

    def load(self, outtype: str):
        if outtype not in self.loaded:
            self.loaded[outtype] = load_checkpoint(self.path(outtype))
        return self.loaded[outtype]


@pytest.fixture(scope="module")
def real(relu_smollm2_dir, tmp_path_factory):
    return Converted(relu_smollm2_dir, str(tmp_path_factory.mktemp("real")))


@pytest.fixture(scope="module")
def documents(wiki_dev_path):
    return read_documents(wiki_dev_path)


@pytest.fixture(scope="module")
def probe(real, documents):
    """Real text for the logits checks: the first wiki-dev documents, cut to PROBE_TOKENS tokens."""
    return torch.tensor([real.hf.tokenizer.encode("\n\n".join(documents[:2]))[:PROBE_TOKENS]])


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def test_f16_reproduces_the_folder_exactly(real, probe):
    ckpt = real.load("f16")
    assert ckpt.kind == "powerinfer" and read_gguf(ckpt.path).metadata["powerinfer.sparse_threshold"] == THRESHOLD
    assert ckpt.config == real.hf.config.replace(sparse_threshold=THRESHOLD)
    assert set(ckpt.tensors) == set(real.hf.tensors)
    for name, w in real.hf.tensors.items():  # the folder is fp16: F16 matrices and F32 vectors hold it exactly
        assert torch.equal(ckpt.tensors[name].float(), w.float()), name
    folder, _ = load_predictors(real.pred_dir)
    assert [p["fc1.weight"].shape[0] for p in ckpt.predictors[:2]] == [64, 128]
    for got, want in zip(ckpt.predictors, folder):
        for key in want:
            assert torch.equal(got[key], want[key].half())

    assert torch.equal(logits(build_model(ckpt), probe), logits(real.hf_model, probe))
    sparse = build_model(ckpt, predictors=True)
    reference = build_model(real.hf)
    install_predictors(reference, [{k: v.half() for k, v in p.items()} for p in folder], THRESHOLD)
    sparse_logits = logits(sparse, probe)
    assert torch.equal(sparse_logits, logits(reference, probe))
    assert relative_error(sparse_logits, logits(real.hf_model, probe)) > 0.1  # the predictors did drop neurons


def test_tokenizer_from_the_file_matches_tokenizer_json(real, wiki_dev_path):
    ours = real.load("f16").tokenizer
    ref = tokenizers.Tokenizer.from_file(os.path.join(real.hf_dir, "tokenizer.json"))
    with open(wiki_dev_path, encoding="utf-8") as f:
        wiki = f.read()
    for text in (wiki, CHAT):
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text
    hf = real.hf.tokenizer
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (hf.bos_id, hf.eos_ids, hf.add_bos) == (1, (2,), False)


def q8_0_reference(w):
    """ggml's quantize_row_q8_0_ref then dequantize: blocks of 32, d = absmax / 127, q = roundf(x * (1 / d))
    (half away from zero, in the float32 steps gguf-py uses), d stored as fp16."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    x = blocks * torch.where(d == 0, 0.0, 1 / d)
    a = x.abs()
    q = (a.floor() + (2 * (a - a.floor())).floor()).copysign(x)
    return (q * d.half().float()).reshape(w.shape)


def q4_0_reference(w):
    """ggml's quantize_row_q4_0_ref then dequantize: d = (the value of largest magnitude) / -8,
    q = min(15, trunc(x * (1 / d) + 8.5)), value (q - 8) * d with d stored as fp16."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)) / -8
    q = (blocks * torch.where(d == 0, 0.0, 1 / d) + 8.5).trunc().clamp(0, 15)
    return ((q - 8) * d.half().float()).reshape(w.shape)


# Relative error of the logits against the fp16 folder. The rounding moves each weight by 0.53% (Q8_0) / 8.8%
# (Q4_0) of its tensor's RMS; on the probe that gave 0.027 / 0.25 (top-1 agreement 98% / 60%), and random noise of
# the same size per tensor gives 0.024 / 0.37. A layout mistake (rows permuted, blocks misplaced) gives errors of
# order 1. Bounds: about twice the measured error for Q8_0; for Q4_0, the error of equal-sized random noise.
LOGIT_BOUND = {"q8_0": 0.06, "q4_0": 0.4}
REFERENCE = {"q8_0": q8_0_reference, "q4_0": q4_0_reference}


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_block_quantized_file_is_the_reference_rounding(real, probe, outtype):
    ckpt, cfg = real.load(outtype), real.hf.config
    last = f"layers.{cfg.n_layers - 1}."
    for name, w in real.hf.tensors.items():
        if w.dim() == 1:
            assert torch.equal(ckpt.tensors[name], w.float()), name
        elif name == "tok_embeddings.weight" or name.startswith(("layers.0.", last)):  # every kind of matrix
            gguf_name = gguf_tensor_name(name, sparse=True)
            stored = to_gguf_layout(gguf_name, w, cfg).contiguous()  # blocks run along the stored rows
            want = from_gguf_layout(gguf_name, REFERENCE[outtype](stored), cfg)
            assert torch.equal(ckpt.tensors[name], want), name
    assert ckpt.predictors[0]["fc2.weight"].dtype == torch.float16

    got, want = logits(build_model(ckpt), probe), logits(real.hf_model, probe)
    assert relative_error(got, want) < LOGIT_BOUND[outtype]
    if outtype == "q8_0":
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_q8_0_perplexity_within_one_percent(real, documents):
    docs = documents[:3]
    want = perplexity(real.hf_model, real.hf.tokenizer, docs, progress=False)
    got = perplexity(build_model(real.load("q8_0")), real.load("q8_0").tokenizer, docs, progress=False)
    assert got["tokens"] == want["tokens"] > 150
    assert abs(got["ppl"] / want["ppl"] - 1) < 0.01


def test_inspect_summarises_the_real_file(real):
    text = describe(read_gguf(real.path("f16")))
    lines = text.splitlines()
    assert lines[1] == "magic:     PWRI  version 3  alignment 32"
    assert "tensors:   333" in lines[3]  # 3 globals + 30 layers x 11 (ffn_down_t, fc1, fc2)
    assert max(len(line) for line in lines) < 200 and len(lines) < 400  # one line per key and per tensor
    tokens = next(line for line in lines if line.startswith("tokenizer.ggml.tokens"))
    assert "[49152 x STRING] '<|endoftext|>', '<|im_start|>'" in tokens and tokens.endswith(", ...")
    assert any(line.split()[:4] == ["blk.29.fc2.weight", "(1536,", "128)", "F16"] for line in lines)
