"""Synthetic ReLU Llamas with realistic activation statistics, written as PowerInfer GGUFs.

The weights are random, with a real model's shapes, made on the device layer by layer and streamed into the
file (never stored in the repository). A little structure gives the FFN the sparsity and skew of a real
ReluLLaMA through the model's own math, and predictors that foresee it through the real predictor math:

- Residual channel 0 holds the constant A for every token at every layer: the embedding holds A there, and
  row 0 of every attention output projection (wo) and down projection is zero, so nothing is added to it.
- Predictor hidden unit 0 reads that channel (fc1[0] = e_0 / A), so relu(fc1[0] . p) = 1 and fc2[:, 0] is a
  per-neuron offset. The other hidden units come in pairs (w_k, -w_k) with fc2 columns (a_ik, -a_ik), and
  relu(t) - relu(-t) = t, so the predictor's logit is offset_i + a_i . W p: linear in the residual p.
- Gate row i is offset_i / A on channel 0, plus a_i W, plus independent noise. ffn_norm's weight is 1, so
  the neuron fires iff offset_i + a_i . W h + noise_i . h > 0 (the norm's positive scale flips no sign): the
  predictor sees the true pre-activation minus the noise, as a trained predictor sees it minus its error.
- offset_i comes from the pre-activation's mean and spread over calibration tokens, through the real forward
  pass layer by layer, so that neuron i fires with probability q_i: about 70% of the neurons inactive per
  token and the hottest 26% carrying about 80% of the activations (published ReluLLaMA figures), in a random
  neuron order per layer. Each layer's predictor offsets are then shifted so that it recalls TARGET_RECALL of
  the calibration tokens' active neurons.

Every statistic reported (sparsity, skew, predictor recall and precision) and the activation files are
measured on separate evaluation tokens through the model's own forward pass, not copied from the targets."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, TokenType
from scipy.optimize import brentq
from scipy.special import ndtri

from convert.hf_to_gguf import file_order
from powerinfer_py.atomic import atomic_dir, atomic_file
from powerinfer_py.formats import save_activations
from powerinfer_py.formats.gguf import (PREDICTOR_TENSORS, PWRI_MAGIC, TensorSpec, config_metadata, encode,
                                        gguf_tensor_name, to_gguf_layout, write_gguf)
from powerinfer_py.loader import expected_shapes
from powerinfer_py.model import Block, Predictor, rope_cos_sin, rope_inv_freq
from predictors.profile import activation_stats
from predictors.train import calibrate_threshold

INACTIVE, HOT_SHARE, HOT_MASS = 0.70, 0.26, 0.80  # ReluLLaMA: ~70% inactive, hottest 26% carry ~80%
Q_MAX = 0.99  # the hottest neurons fire for 99% of tokens
NOISE = 0.4  # std of the gate's unpredictable part relative to its predictable part
TARGET_RECALL = 0.97
CONSTANT = 1.0  # A: the value of residual channel 0
WEIGHT_STD = 0.02
SEQ_LEN = 256  # tokens per calibration sequence


def activation_probabilities(n_ff: int, inactive=INACTIVE, hot_share=HOT_SHARE, hot_mass=HOT_MASS,
                             q_max=Q_MAX) -> np.ndarray:
    """Per-neuron firing probabilities, hottest first: q(u) = min(q_max, a (1 - u)^k) over the neuron quantile
    u, with a and k solved so that the mean is 1 - inactive and the hottest hot_share carry hot_mass."""
    u = (np.arange(n_ff) + 0.5) / n_ff
    top = max(1, round(hot_share * n_ff))

    def q_of(k):
        def q_at(log_a):
            return np.minimum(q_max, np.exp(log_a + k * np.log1p(-u)))

        return q_at(brentq(lambda log_a: q_at(log_a).mean() - (1 - inactive), -30, 500))

    k = brentq(lambda k: q_of(k)[:top].sum() / q_of(k).sum() - hot_mass, 0.1, 20)
    return q_of(k)


def expected_counts(n_layers: int, n_ff: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Activation counts as the target statistics predict them (no weights: for the ledger-only 70B part)."""
    rng = np.random.default_rng(seed)
    q = activation_probabilities(n_ff)
    return [torch.from_numpy(np.round(q[rng.permutation(n_ff)] * tokens)) for _ in range(n_layers)]


def synthetic_vocab(vocab_size: int) -> list[tuple]:
    """A SentencePiece-style vocabulary (unk, bos, eos, 256 byte tokens, placeholders) so that llama.cpp-family
    loaders, which require one, accept the file; the benchmarks feed token ids directly."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    tokens, types = tokens[:vocab_size], types[:vocab_size]
    n = vocab_size - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n)]
    types += [TokenType.NORMAL] * n
    V = GGUFValueType
    return [("tokenizer.ggml.model", V.STRING, "llama"), ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, tokens)),
            ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [0.0] * (vocab_size - n) + [-float(i) for i in range(n)])),
            ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [int(t) for t in types]))]


class SyntheticLlama:
    """Makes the tensors of one layer at a time (runtime names, torch layout, on `device`), running the
    calibration and evaluation tokens through each finished layer to set the next one's offsets."""

    def __init__(self, cfg, rank: int, device, dtype, seed: int = 0, calib_tokens: int = 1024,
                 eval_tokens: int = 1024):
        self.cfg, self.rank, self.device, self.dtype = cfg, rank, torch.device(device), dtype
        self.pairs = (rank - 1) // 2  # predictor hidden units 1..2*pairs carry a_i . W p
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.q = activation_probabilities(cfg.n_ff)
        seqs = [max(1, n // SEQ_LEN) for n in (calib_tokens, eval_tokens)]
        self.n_calib = seqs[0]
        self.tokens = torch.randint(0, cfg.vocab_size, (sum(seqs), SEQ_LEN), generator=self.gen, device=self.device)
        inv_freq, scale = rope_inv_freq(cfg)
        self.pos = torch.arange(SEQ_LEN, device=self.device)
        self.cos, self.sin = rope_cos_sin(cfg, inv_freq.to(self.device), scale, self.pos, dtype)
        self.x = None  # residual stream of all sequences, (sequences, SEQ_LEN, dim)
        self.counts, self.layer_stats = [], []

    def randn(self, *shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device).mul_(std)

    def global_tensors(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        embedding = self.randn(cfg.vocab_size, cfg.dim, std=1.0)
        embedding[:, 0] = CONSTANT
        self.x = embedding.to(self.dtype)[self.tokens]
        return {"tok_embeddings.weight": embedding, "norm.weight": torch.ones(cfg.dim, device=self.device),
                "output.weight": self.randn(cfg.vocab_size, cfg.dim, std=WEIGHT_STD)}

    def next_layer(self) -> dict[str, torch.Tensor]:
        """The tensors of the layer after the last one made (runtime names without the layers.{i}. prefix)."""
        cfg, d, k = self.cfg, self.cfg.dim, self.pairs
        t = {"attention_norm.weight": torch.ones(d, device=self.device),
             "ffn_norm.weight": torch.ones(d, device=self.device),
             "attention.wq.weight": self.randn(cfg.n_heads * cfg.head_dim, d, std=WEIGHT_STD),
             "attention.wk.weight": self.randn(cfg.kv_dim, d, std=WEIGHT_STD),
             "attention.wv.weight": self.randn(cfg.kv_dim, d, std=WEIGHT_STD),
             "attention.wo.weight": self.randn(d, cfg.n_heads * cfg.head_dim, std=WEIGHT_STD)}
        t["attention.wo.weight"][0] = 0
        with torch.device("meta"):
            block = Block(cfg)
        block.load_state_dict({n: w.to(self.dtype) for n, w in t.items()}, strict=False, assign=True)
        with torch.no_grad():
            h = block.attend(self.x, self.cos, self.sin, self.pos, None)[0]
        h_calib = h[:self.n_calib].reshape(-1, d).float()

        signal_std = WEIGHT_STD / math.sqrt(1 + NOISE ** 2)  # a_i W and the noise share the gate's variance
        W = self.randn(k, d, std=1 / math.sqrt(d))
        W[:, 0] = 0
        a = self.randn(cfg.n_ff, k, std=signal_std * math.sqrt(d / k))
        gate = a @ W + self.randn(cfg.n_ff, d, std=NOISE * signal_std)
        gate[:, 0] = 0
        pre = h_calib @ gate.T  # (tokens, n_ff): the pre-activation without the offset
        z = torch.from_numpy(ndtri(1 - self.q[self.rng.permutation(cfg.n_ff)])).to(pre)
        offset = -(pre.mean(0) + pre.std(0) * z)  # neuron i fires with probability q_i
        gate[:, 0] = offset / CONSTANT
        predictable = offset + (h_calib @ W.T) @ a.T
        shift = calibrate_threshold(predictable, pre + offset > 0, TARGET_RECALL)

        fc1 = torch.zeros(self.rank, d, device=self.device)
        fc1[0, 0] = 1 / CONSTANT
        fc1[1:2 * k + 1:2], fc1[2:2 * k + 2:2] = W, -W
        fc2 = torch.zeros(cfg.n_ff, self.rank, device=self.device)
        fc2[:, 0] = offset - shift
        fc2[:, 1:2 * k + 1:2], fc2[:, 2:2 * k + 2:2] = a, -a
        down = self.randn(d, cfg.n_ff, std=WEIGHT_STD)
        down[0] = 0
        up = self.randn(cfg.n_ff, d, std=WEIGHT_STD)
        t.update({"feed_forward.w_gate.weight": gate, "feed_forward.w_up.weight": up,
                  "feed_forward.w_down.weight": down, "predictor.fc1.weight": fc1, "predictor.fc2.weight": fc2})
        self._advance(block, h, t)
        return t

    @torch.no_grad()
    def _advance(self, block, h, tensors):
        """Run the finished layer (in the storage dtype) over every token: the next layer's input, and on the
        evaluation tokens the true ReLU activity, the predictor's guess and the activation counts."""
        cfg = self.cfg
        block.load_state_dict({n: w.to(self.dtype) for n, w in tensors.items() if not n.startswith("predictor.")},
                              strict=False, assign=True)
        with torch.device("meta"):
            block.predictor = Predictor(cfg.dim, self.rank, cfg.n_ff)
        block.predictor.load_state_dict({n.removeprefix("predictor."): w.to(self.dtype) for n, w in tensors.items()
                                         if n.startswith("predictor.")}, assign=True)
        x_ffn = block.ffn_norm(h)
        true = (block.feed_forward.w_gate(x_ffn[self.n_calib:]) > 0).reshape(-1, cfg.n_ff)
        predicted = block.predictor(h[self.n_calib:]).reshape(-1, cfg.n_ff)
        self.x = h + block.feed_forward(x_ffn)
        hits, n_true, n_pred = (true & predicted).sum().item(), true.sum().item(), predicted.sum().item()
        counts = true.sum(0).cpu()
        top = counts.sort(descending=True).values[:max(1, round(HOT_SHARE * cfg.n_ff))]
        self.counts.append(counts)
        self.layer_stats.append({"sparsity": 1 - n_true / true.numel(), "hot_mass": top.sum().item() / max(n_true, 1),
                                 "recall": hits / max(n_true, 1), "precision": hits / max(n_pred, 1),
                                 "predicted_ratio": n_pred / max(n_true, 1)})

    @property
    def eval_tokens(self) -> int:
        return (self.tokens.shape[0] - self.n_calib) * SEQ_LEN


def write_synthetic(path: str, cfg, rank: int, device, dtype, seed: int = 0, calib_tokens: int = 1024,
                    eval_tokens: int = 1024, log=print) -> dict:
    """Write `path` (a PowerInfer GGUF, F16 weights) and its activation folder `dirname(path)/activation`;
    returns what was made and measured: the statistics for every table that uses the model."""
    t0 = time.perf_counter()
    model = SyntheticLlama(cfg, rank, device, dtype, seed, calib_tokens, eval_tokens)
    current = {}  # the tensors of the layer being written (runtime names)

    def produce(name: str, gguf_name: str, ggml_type):
        def tensor():
            if name not in current:
                current.clear()
                if name.startswith("layers."):
                    layer = int(name.split(".")[1])
                    current.update({f"layers.{layer}.{n}": w for n, w in model.next_layer().items()})
                    if layer % 8 == 0 or layer == cfg.n_layers - 1:
                        log(f"  synthetic layer {layer + 1}/{cfg.n_layers} ({time.perf_counter() - t0:.0f} s)")
                else:
                    current.update(model.global_tensors())
            dtype = torch.float16 if ggml_type == GGMLQuantizationType.F16 else torch.float32
            w = to_gguf_layout(gguf_name, current[name], cfg).to(dtype).contiguous()
            return encode(w.cpu().numpy(), ggml_type)
        return tensor

    plan = []
    for name, gguf_name in file_tensors(cfg.n_layers):
        shape = _shape(name, cfg, rank)
        ggml_type = GGMLQuantizationType.F16 if len(shape) == 2 else GGMLQuantizationType.F32
        stored = tuple(to_gguf_layout(gguf_name, torch.empty(shape, device="meta"), cfg).shape)
        plan.append((TensorSpec(gguf_name, stored, ggml_type), produce(name, gguf_name, ggml_type)))
    statistics = {"inactive": INACTIVE, "hot_share": HOT_SHARE, "hot_mass": HOT_MASS, "q_max": Q_MAX,
                  "noise": NOISE, "target_recall": TARGET_RECALL, "predictor_rank": rank, "seed": seed}
    metadata = (config_metadata(cfg, LlamaFileType.MOSTLY_F16, os.path.basename(path), 0.0)
                + synthetic_vocab(cfg.vocab_size)
                + [("powerinfer_py.synthetic", GGUFValueType.STRING, json.dumps(statistics))])
    with atomic_file(path, force=True) as tmp:
        write_gguf(tmp, metadata, plan, magic=PWRI_MAGIC)
    with atomic_dir(os.path.join(os.path.dirname(path), "activation"), force=True) as tmp:
        save_activations(tmp, model.counts)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump({"tokens": model.eval_tokens, "synthetic": statistics,
                       "layers": activation_stats(model.counts, model.eval_tokens)}, f, indent=1)
    measured = {key: float(np.mean([s[key] for s in model.layer_stats])) for key in model.layer_stats[0]}
    return {"weights": f"synthetic (random, seed {seed})", "targets": statistics, "measured": measured,
            "per_layer": model.layer_stats, "eval_tokens": model.eval_tokens,
            "calib_tokens": model.n_calib * SEQ_LEN, "file_bytes": os.path.getsize(path),
            "write_s": time.perf_counter() - t0}


def file_tensors(n_layers: int):
    """(runtime name, GGUF name) in file order: the converter's, each layer's predictor after its FFN."""
    for name in file_order(n_layers):
        yield name, gguf_tensor_name(name, sparse=True)
        if name.endswith("w_down.weight"):
            i = name.split(".")[1]
            for p in PREDICTOR_TENSORS:
                yield f"layers.{i}.predictor.{p}", f"blk.{i}.{p}"


def _shape(name: str, cfg, rank: int) -> tuple[int, ...]:
    """Torch shape of a runtime tensor of the synthetic model, predictors included."""
    if name.endswith("predictor.fc1.weight"):
        return (rank, cfg.dim)
    if name.endswith("predictor.fc2.weight"):
        return (cfg.n_ff, rank)
    return expected_shapes(cfg)[name]
