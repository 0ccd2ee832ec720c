#!/usr/bin/env python3
"""Rebuild the small ReLU Llama that ships in powerinfer_py/demo_model/ (see its README.md).

Two stages, run from the repository root:

    PYTHONPATH=. python scripts/train_demo_model.py data --out .demo_data           # CPU, Debian
    PYTHONPATH=. python scripts/train_demo_model.py train --data .demo_data --out DIR  # one GPU

`data` downloads Debian documentation packages with `apt-get download` (run `apt-get update` once first),
turns them into plain-text documents, holds out one document in 50 (by a hash of its name), writes the
demo's calib.txt (training text) and heldout.txt (held-out prose paragraphs), and trains a byte-level BPE
tokenizer on the training documents. `train` trains powerinfer_py.model.Transformer (so the weights are
exactly what the runtime computes) with an L1 penalty on relu(gate) whose weight is raised until the chosen
share of FFN neurons is inactive, prints held-out perplexity, per-layer sparsity and greedy samples, and
writes a Hugging Face LlamaForCausalLM folder (fp16) with the tokenizer and the two text files.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import random
import re
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from powerinfer_py.config import ModelConfig
from powerinfer_py.model import Transformer

EOT = "<|endoftext|>"  # the only special token (id 0): bos, eos and document separator
PACKAGES = ("linux-doc-6.1", "python3.11-doc", "perl-doc", "fortunes", "fortunes-min")
HELDOUT_EVERY = 50
CALIB_BYTES = 150_000
HELDOUT_BYTES = 50_000
UNDERLINE = re.compile(r"^\s*([=\-~^*#\"+`'.:_])\1{3,}\s*$")  # reST title under/overlines


# ---------------------------------------------------------------- stage 1: documents and tokenizer

def download(debs: Path) -> dict[str, str]:
    """apt-get download each package into `debs` (once) and unpack it; returns {package: version}."""
    debs.mkdir(parents=True, exist_ok=True)
    versions = {}
    for pkg in PACKAGES:
        if not list(debs.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
        versions[pkg] = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                                       capture_output=True, text=True).stdout.strip()
        if not (debs / pkg).exists():
            subprocess.run(["dpkg-deb", "-x", str(deb), str(debs / pkg)], check=True)
    return versions


def clean_rst(text: str) -> str:
    """Drop reST title underlines; the rest of the markup stays (it is how these documents read)."""
    return "\n".join(line.rstrip() for line in text.splitlines() if not UNDERLINE.match(line)).strip()


def documents(debs: Path) -> list[tuple[str, str]]:
    """(name, text) of every document: a reST source page, a perl pod page as pod2text renders it, or one
    fortune cookie."""
    docs = []
    for pkg, sources in (("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources"),
                         ("python3.11-doc", "usr/share/doc/python3.11/html/_sources")):
        root = debs / pkg / sources
        for path in sorted(root.rglob("*.rst.txt")):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith("translations/"):  # English only
                docs.append((f"{pkg}/{rel}", clean_rst(path.read_text(errors="replace"))))
    for path in sorted((debs / "perl-doc").rglob("*.pod")):
        text = subprocess.run(["pod2text", str(path)], check=True, capture_output=True).stdout
        docs.append((f"perl-doc/{path.name}", text.decode("utf-8", "replace").strip()))
    for pkg in ("fortunes", "fortunes-min"):
        for path in sorted((debs / pkg / "usr/share/games/fortunes").iterdir()):
            if path.suffix or path.name == "ascii-art":  # .dat indexes, .u8 links; pictures are no text
                continue
            cookies = re.split(r"^%\s*$", path.read_text(errors="replace"), flags=re.M)
            docs += [(f"{pkg}/{path.name}#{i}", c.strip()) for i, c in enumerate(cookies)]
    return [(name, text) for name, text in docs if text]


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def prose_paragraphs(texts: list[str]) -> list[str]:
    """Paragraphs of running text (no code, tables or markup lines), each on one line."""
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            letters = sum(c.isalpha() or c == " " for c in para)
            if 200 <= len(para) <= 1500 and letters > 0.85 * len(para) and not para.startswith(".."):
                out.append(" ".join(para.split()))
    return out


def sample_texts(texts: list[str], n_bytes: int, seed: int) -> str:
    """A seeded sample of whole texts, up to n_bytes, separated by blank lines."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    picked, size = [], 0
    for text in texts:
        if size + len(text.encode()) + 2 <= n_bytes:
            picked.append(text)
            size += len(text.encode()) + 2
    return "\n\n".join(picked) + "\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def prepare_data(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = download(Path(args.debs))
    docs = documents(Path(args.debs))
    train = [text for name, text in docs if not is_heldout(name)]
    heldout = [text for name, text in docs if is_heldout(name)]
    for name, texts in (("train.txt.xz", train), ("heldout_all.txt.xz", heldout)):
        with lzma.open(out / name, "wt", preset=6) as f:
            f.write(EOT.join(texts))
    (out / "calib.txt").write_text(sample_texts(train, CALIB_BYTES, seed=0))
    (out / "heldout.txt").write_text(sample_texts(prose_paragraphs(heldout), HELDOUT_BYTES, seed=0))
    train_tokenizer(train, args.vocab_size).save(str(out / "tokenizer.json"))
    sources = {"packages": versions, "documents": {"train": len(train), "heldout": len(heldout)},
               "chars": {"train": sum(map(len, train)), "heldout": sum(map(len, heldout))}}
    (out / "sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    print(json.dumps(sources, indent=1))


# ---------------------------------------------------------------- stage 2: the model

HF_NAMES = {  # powerinfer_py.model module names -> Hugging Face Llama module names
    "tok_embeddings": "model.embed_tokens", "norm": "model.norm",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w_gate": "mlp.gate_proj", "feed_forward.w_up": "mlp.up_proj",
    "feed_forward.w_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    module, _, param = name.rpartition(".")
    if module.startswith("layers."):
        _, i, module = module.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[module]}.{param}"
    return f"{HF_NAMES[module]}.{param}"


def demo_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                       n_kv_heads=args.dim // 128, head_dim=64, n_ff=args.n_ff, norm_eps=1e-5,
                       rope_theta=10000.0, max_seq_len=args.seq_len, ffn_act="relu", tie_embeddings=True,
                       bos_token_id=0, eos_token_ids=(0,))


class GateStats:
    """Forward hooks on every w_gate. Per layer of the last forward: the mean of relu(gate) (the L1
    penalty) and the active mask gate > 0 (an inactive neuron's relu(gate) * up is exactly 0)."""

    def __init__(self, model):
        self.l1, self.active = [], []
        for layer in model.layers:
            layer.feed_forward.w_gate.register_forward_hook(self.hook)

    def hook(self, module, inputs, gate):
        self.l1.append(gate.float().relu().mean())
        self.active.append((gate > 0).detach())

    def pop(self):
        l1, active = self.l1, self.active
        self.l1, self.active = [], []
        return l1, active


def read_docs(path: Path) -> list[str]:
    """The documents of a train.txt.xz / heldout_all.txt.xz written by the data stage."""
    return lzma.decompress(path.read_bytes()).decode().split(EOT)


def autocast(device):
    """bf16 autocast on the GPU; fp32 on the CPU (where bf16 matmuls are slow), for dry runs."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def encode_stream(tok: Tokenizer, texts: list[str], device) -> torch.Tensor:
    """One token stream with EOT before every document (as bos), so the model learns document starts."""
    ids = np.concatenate([np.array([0] + e.ids, dtype=np.int64) for e in tok.encode_batch(texts)])
    return torch.from_numpy(ids).to(device)


def init_weights(model: Transformer):
    """GPT-2 style: N(0, 0.02), the residual output projections scaled down by 1/sqrt(2 * n_layers)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            scaled = name.endswith(("wo.weight", "w_down.weight"))
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * len(model.layers)) if scaled else 0.02)


@torch.no_grad()
def stream_perplexity(model, ids: torch.Tensor, stats: GateStats, seq_len: int, batch: int):
    """Token-level perplexity of a token stream cut into seq_len windows."""
    n = (len(ids) - 1) // seq_len
    x, y = ids[: n * seq_len].view(n, seq_len), ids[1 : n * seq_len + 1].view(n, seq_len)
    nll = 0.0
    for i in range(0, n, batch):
        with autocast(ids.device):
            logits = model(x[i : i + batch])
        nll += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum").item()
        stats.pop()
    return math.exp(nll / (n * seq_len)), n * seq_len


@torch.no_grad()
def doc_perplexity(model, tok: Tokenizer, docs: list[str], stats: GateStats, max_len: int):
    """Perplexity with each document scored alone after EOT (as wiki-dev is scored), and per layer the
    inactive share over its tokens and the neurons never active on them."""
    device = model.norm.weight.device
    cfg = model.config
    nll, count = 0.0, 0
    active_count = torch.zeros(cfg.n_layers, device=device)
    ever_active = torch.zeros(cfg.n_layers, cfg.n_ff, dtype=torch.bool, device=device)
    for doc in docs:
        ids = torch.tensor([[0] + tok.encode(doc).ids[: max_len - 1]], device=device)
        with autocast(device):
            logits = model(ids[:, :-1])
        nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        active = torch.stack(stats.pop()[1])[:, 0]  # (layers, tokens, n_ff)
        active_count += active.sum((1, 2))
        ever_active |= active.any(1)
        count += ids.shape[1] - 1
    inactive = (1 - active_count / (count * cfg.n_ff)).tolist()
    never = (~ever_active).sum(1).tolist()
    return math.exp(nll / count), count, inactive, never


@torch.no_grad()
def greedy(model, tok: Tokenizer, prompt: str, n_new: int) -> str:
    device = model.norm.weight.device
    ids = torch.tensor([[0] + tok.encode(prompt).ids], device=device)
    for _ in range(n_new):
        with autocast(device):
            nxt = model(ids, last_only=True)[0, -1].argmax()
        if nxt.item() == 0:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, 1:].tolist())


def save_checkpoint(model: Transformer, cfg: ModelConfig, data: Path, out: Path):
    """A Hugging Face LlamaForCausalLM folder: fp16 weights (the tied head left out), configs, tokenizer,
    and the demo's text files."""
    tensors = {hf_name(k): v.detach().to(torch.float16).contiguous().cpu()
               for k, v in model.state_dict().items() if k != "output.weight"}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf() | {"torch_dtype": "float16", "pad_token_id": 0, "initializer_range": 0.02}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
         "pad_token": EOT, "model_max_length": cfg.max_seq_len, "add_bos_token": True}, indent=2) + "\n")
    for name in ("tokenizer.json", "calib.txt", "heldout.txt", "sources.json"):
        shutil.copy(data / name, out / name)


def train_model(args):
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    t0 = time.time()
    train_ids = encode_stream(tok, read_docs(data / "train.txt.xz"), device)
    heldout_ids = encode_stream(tok, read_docs(data / "heldout_all.txt.xz"), device)
    heldout_docs = (data / "heldout.txt").read_text().strip().split("\n\n")
    print(f"tokens: train {len(train_ids):,} held-out {len(heldout_ids):,} ({time.time() - t0:.0f} s to encode)")

    cfg = demo_config(args, tok.get_vocab_size())
    model = Transformer(cfg).to(device)
    init_weights(model)
    print(f"config: {json.dumps(cfg.to_hf())}\nparameters: {sum(p.numel() for p in model.parameters()):,}")
    stats = GateStats(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() == 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    offsets = torch.arange(args.seq_len + 1, device=device)
    l1_weight = torch.tensor(args.l1, device=device)  # a tensor, so the loop never waits for the GPU
    step, progress, start = 0, 0.0, time.time()
    model.train()
    while progress < 1.0:  # the schedule runs on steps or wall time, whichever ends first
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch, 1), device=device) + offsets
        batch = train_ids[rows]
        with autocast(device):
            logits = model(batch[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        l1, active = stats.pop()
        l1 = torch.stack(l1).mean()
        opt.zero_grad(set_to_none=True)
        (ce + l1_weight * l1).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        elapsed = time.time() - start
        progress = max(step / args.steps, elapsed / args.seconds)
        inactive = 1 - torch.stack([a.float().mean() for a in active]).mean()
        if args.target_inactive and step > args.warmup:  # dual ascent on "mean inactive share >= target"
            l1_weight = (l1_weight + args.l1_rate * (args.target_inactive - inactive)).clamp(min=0)
        if step % args.log_every == 0 or progress >= 1.0:
            print(f"step {step} ce {ce.item():.3f} l1 {l1.item():.4f} l1_weight {l1_weight.item():.3f} "
                  f"inactive {inactive.item():.3f} lr {lr:.2e} "
                  f"{step * args.batch * args.seq_len / elapsed:,.0f} tok/s {elapsed:.0f} s", flush=True)
    print(f"trained: {step} steps, {step * args.batch * args.seq_len:,} tokens, {time.time() - start:.0f} s")

    model.eval()
    ppl, n = stream_perplexity(model, heldout_ids, stats, args.seq_len, args.batch)
    print(f"held-out documents, {args.seq_len}-token windows: perplexity {ppl:.2f} over {n:,} tokens")
    ppl, n, inactive, never = doc_perplexity(model, tok, heldout_docs, stats, args.seq_len)
    print(f"heldout.txt, per document: perplexity {ppl:.2f} over {n:,} tokens")
    print("inactive share per layer on heldout.txt: " + " ".join(f"{s:.3f}" for s in inactive)
          + f" (mean {sum(inactive) / len(inactive):.3f}); never active: {never} of {cfg.n_ff}")
    for prompt in args.prompts:
        print(f"greedy {prompt!r} -> {greedy(model, tok, prompt, 60)!r}")
    save_checkpoint(model, cfg, data, out)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("data", help="download Debian docs, split them, train the tokenizer (CPU)")
    d.add_argument("--out", default=".demo_data")
    d.add_argument("--debs", default=".demo_debs", help="where the .deb files are downloaded and unpacked")
    d.add_argument("--vocab-size", type=int, default=4096)
    d.set_defaults(func=prepare_data)
    t = sub.add_parser("train", help="train the model and write the checkpoint folder (GPU)")
    t.add_argument("--data", default=".demo_data")
    t.add_argument("--out", required=True)
    t.add_argument("--dim", type=int, default=256)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--n-ff", type=int, default=704)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    t.add_argument("--seconds", type=float, default=200, help="at most this much training time")
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--l1", type=float, default=0.0, help="(starting) weight of mean(relu(gate)) in the loss")
    t.add_argument("--target-inactive", type=float, default=0.85,
                   help="raise the L1 weight while fewer FFN neurons are inactive (0: keep --l1 fixed)")
    t.add_argument("--l1-rate", type=float, default=0.01, help="L1 weight change per step per unit of miss")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--prompts", nargs="*", default=["The kernel", "Python is", "A list comprehension"])
    t.set_defaults(func=train_model)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
