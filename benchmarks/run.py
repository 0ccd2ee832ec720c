"""The benchmark suite: this engine's hybrid GPU-CPU inference beside llama.cpp's layer split, accelerate
offload, the dense runtime on the GPU and the modelled bound, at the same VRAM budgets on the same model.

    python -m benchmarks.run --out results                          # every part (on the device)
    python -m benchmarks.run --only 7b,70b --trace --out results    # some parts; a 7B decode step traced per budget
    python -m benchmarks.run --smoke --out /tmp/bench               # tiny shapes, any machine, seconds

Parts: smollm2 (relu-smollm2-135m: real weights, predictors trained by `powerinfer-py train-predictors`,
budgets that force 25/50/75% of the FFN onto the CPU, perplexity beside speed), 7b and 13b (synthetic ReLU
Llama-2 fp16 PowerInfer GGUFs made on the device: benchmarks/synthetic.py), 70b (Llama-2-70B Q4_0: ledger
and bound only; its notes say why). Each part writes OUT/<model>.json as it measures (a run cut short keeps
what it measured), then OUT/benchmarks.md and OUT/benchmarks.png (benchmarks/report.py). --smoke runs the
same code on tiny shapes; without CUDA every system runs on the CPU and accelerate offload is skipped."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from benchmarks import systems
from benchmarks.common import SHAPES, machine_info, measure_bandwidths, write_json
from benchmarks.report import write_report
from benchmarks.synthetic import expected_counts, write_synthetic
from benchmarks.timeline import trace_decode_step
from kernels import FFNRows
from powerinfer_py.config import ModelConfig
from powerinfer_py.engine import get_predictors
from powerinfer_py.errors import BudgetError, PowerInferError
from powerinfer_py.eval import perplexity, read_documents
from powerinfer_py.formats import load_activations, profiled_tokens
from powerinfer_py.formats.gguf import encode, tensor_nbytes
from powerinfer_py.loader import (
    build_model,
    expected_shapes,
    install_predictors,
    load_checkpoint,
)
from solver import format_bytes, parse_budget, vram_ledger

Q4_0, F16, F32 = T.Q4_0, T.F16, T.F32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@dataclass
class Part:
    key: str  # the --only name
    name: str  # results file and table title
    cfg: ModelConfig | None  # synthetic shape; None: the real relu-smollm2
    budgets: tuple[str, ...]  # sizes ("8GiB"), or "ffn:75%": the dense parts plus 75% of the FFN neurons
    gpu_weight_type: str = "f16"
    rank: int = 1024  # synthetic predictors' width: hidden x 1024, about 6-9% of the weights as published


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 512, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "n_ff": 352,
                          "max_seq_len": 1024, "ffn_act": "relu", **kw})


PARTS = {
    "smollm2": Part("smollm2", "relu-smollm2-135m", None, ("ffn:75%", "ffn:50%", "ffn:25%")),
    "7b": Part("7b", "llama2-7b", SHAPES["llama2-7b"], ("4GiB", "8GiB", "ffn:67%")),  # ffn:67%: a third on the CPU
    "13b": Part("13b", "llama2-13b", SHAPES["llama2-13b"], ("8GiB", "14GiB")),
    "70b": Part("70b", "llama2-70b-q4_0", SHAPES["llama2-70b"], ("24GiB", "40GiB"), gpu_weight_type="q4_0"),
}
SMOKE_PARTS = {  # the same code on tiny shapes: an infeasible budget and one that holds part of the FFN
    "smollm2": PARTS["smollm2"],
    "7b": Part("7b", "llama2-7b", _tiny(), ("ffn:-10%", "ffn:30%"), rank=33),
    "13b": Part("13b", "llama2-13b", _tiny(dim=160, n_layers=5, n_heads=5, n_kv_heads=5, n_ff=432),
                ("ffn:-10%", "ffn:30%"), rank=33),
    "70b": Part("70b", "llama2-70b-q4_0", _tiny(n_kv_heads=2, n_ff=1024), ("ffn:-10%", "ffn:30%"),
                gpu_weight_type="q4_0", rank=33),
}


class Suite:
    """One run: the options, the bandwidths, the deadline, and the results file of the part being measured."""

    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.where = "GPU" if self.device == "cuda" else "CPU"
        self.deadline = time.monotonic() + args.deadline
        self.time_box = args.time_box or (2.0 if self.smoke else 20.0)
        self.systems = set(args.systems.split(","))  # the baselines to run beside the bound and the hybrid engine
        self.machine = machine_info()
        self.log(f"measuring bandwidths on {self.machine.get('gpu', 'the CPU')} ...")
        self.bandwidths, self.bandwidth_figures = measure_bandwidths(64 << 20 if self.smoke else 1 << 30)
        self.log("  " + ", ".join(f"{k} {v:.3g}" for k, v in self.bandwidth_figures.items() if k != "assumed"))
        self.results, self.path = None, None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # -- the results file of one part, rewritten after every row
    def start(self, part: Part, model: dict) -> None:
        self.path = os.path.join(self.args.out, f"{part.name}.json")
        self.results = {"benchmark": "suite", "part": part.name, "smoke": self.smoke, "machine": self.machine,
                        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
                        "bandwidths": self.bandwidth_figures, "model": model, "rows": [], "notes": []}
        if self.smoke:
            self.note("smoke run: tiny shapes" + ("" if self.device == "cuda" else
                      ", no CUDA: every system ran on the CPU") + "; the numbers test the harness, not the engine")
        self.save()

    def save(self) -> None:
        write_json(self.path, self.results)

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        self.save()

    def fail(self, part: Part, error: Exception) -> None:
        """Record a part that stopped with an error (after its last saved row)."""
        if self.results is None or self.results["part"] != part.name:
            self.start(part, {"weights": "not made", "description": "The part stopped before its model was ready."})
        self.note(f"stopped with {type(error).__name__}: {error}")

    def add(self, system: str, base: dict, status: str = "ok", reason: str | None = None, **row) -> None:
        row = {"system": system, **base, "status": status, "reason": reason, **row}
        self.results["rows"].append(row)
        self.save()
        speed = f"{row['decode_tps']:.2f} tok/s decode" if status == "ok" else f"{status}: {reason}"
        if "overlap_decode_tps" in row:
            speed += f" (strict bound {row['overlap_decode_tps']:.2f})"
        self.log(f"  {system:<12} {base['budget_label']:<32} {speed}")

    def measure(self, system: str, base: dict, fn, need: float) -> dict | None:
        """Run one system unless the deadline is too close; its row (or why there is none) is saved."""
        left = self.deadline - time.monotonic()
        if left < need:
            self.add(system, base, "skipped", f"out of time ({left:.0f} s left of --deadline {self.args.deadline:.0f})")
            return None
        try:
            row = fn()
        except BudgetError as e:
            self.add(system, base, "infeasible", str(e))
            return None
        except torch.OutOfMemoryError as e:
            self.add(system, base, "error", f"CUDA out of memory: {str(e).splitlines()[0]}")
            return None
        except Exception as e:  # one system failing must not cost the others their measurements
            traceback.print_exc()
            self.add(system, base, "error", f"{type(e).__name__}: {e}")
            return None
        finally:
            systems.free_memory()
        self.add(system, base, **row)
        return row

    # -- the systems at each budget
    def run_budgets(self, part: Part, ckpt, predictors, threshold, counts, tokens: float, prompt, total_bytes: int,
                    ppl_docs=None) -> None:
        """Bound, hybrid, layer split and accelerate at every budget of the part, then the dense ceiling."""
        ledger = systems.engine_ledger(ckpt, predictors, part.gpu_weight_type)
        cold_type = systems.cold_row_type(part.gpu_weight_type)
        for spec in part.budgets:
            budget = budget_bytes(spec, ledger)
            base = {"budget": budget, "budget_label": budget_label(spec, budget, total_bytes)}
            try:
                ledger.ffn_budget(budget)
            except BudgetError as e:
                self.add("hybrid", base, "infeasible", f"{e}; the other systems were not run at this budget")
                continue
            problem, placement = systems.solve(ledger, counts, tokens, budget, self.bandwidths,
                                               time_limit=2.0 if self.smoke else 10.0)
            masks = [m.numpy() for m in placement.gpu_masks]
            row = systems.bound(problem, masks, self.bandwidths, cold_type)
            if cold_type != part.gpu_weight_type:  # what reading the cold rows in the file's type would give
                row[f"decode_tps_cold_rows_{part.gpu_weight_type}"] = systems.bound(
                    problem, masks, self.bandwidths, part.gpu_weight_type)["decode_tps"]
            self.add("bound", base, **row, solver={"status": placement.status, "seconds": placement.solve_time_s})
            trace = self.args.trace and part.key == "7b"
            self.measure("hybrid", base, lambda: self.hybrid(part, ckpt, budget, predictors, threshold, masks,
                                                             prompt, ppl_docs, trace), 3 * self.time_box)
            if "layer_split" in self.systems:
                self.measure("layer_split", base, lambda: systems.layer_split(ckpt, budget, prompt, self.time_box,
                                                                              self.device), 3 * self.time_box)
            if "accelerate" in self.systems and self.device == "cuda":
                self.measure("accelerate", base, lambda: systems.accelerate_offload(ckpt, budget, prompt,
                                                                                    self.time_box), 3 * self.time_box)
            elif "accelerate" in self.systems:
                self.add("accelerate", base, "skipped", "needs CUDA: accelerate offloads CPU weights to a GPU")
        if "dense" in self.systems:
            self.measure("dense", {"budget": None, "budget_label": f"none (whole model on the {self.where})"},
                         lambda: systems.dense(ckpt, prompt, self.time_box, self.device), 2 * self.time_box)

    def hybrid(self, part, ckpt, budget, predictors, threshold, masks, prompt, ppl_docs, trace) -> dict:
        def after_timing(model):
            return {"ppl": perplexity(model, ckpt.tokenizer, ppl_docs, systems.CTX, progress=False)["ppl"]} \
                if ppl_docs else {}

        name = os.path.basename(ckpt.path.rstrip("/"))  # beside the synthetic model, as PowerInfer keeps it
        gpuidx = os.path.join(self.args.work, part.name, f"{name}.{budget}.gpuidx")
        row, setup = systems.hybrid(ckpt, budget, predictors, threshold, masks, gpuidx, part.gpu_weight_type, prompt,
                                    self.time_box, self.device, after_timing=after_timing)
        row["gpuidx"] = gpuidx
        if trace:
            path = os.path.join(self.args.out, f"trace-{part.name}-{budget >> 20}MiB.json")
            self.results.setdefault("timeline", {})[str(budget)] = {
                "trace": os.path.basename(path), **trace_decode_step(setup.model, prompt, systems.CTX, path)}
        return row

    # -- parts
    def synthetic(self, part: Part) -> None:
        folder = os.path.join(self.args.work, part.name)
        path = os.path.join(folder, f"{part.name}.powerinfer.gguf")
        made = os.path.join(folder, "synthetic.json")
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(path) and os.path.exists(made) and not self.args.regenerate:
            with open(made) as f:
                stats = {**json.load(f), "reused": True}
            self.log(f"{part.name}: reusing {path}")
        else:
            self.log(f"{part.name}: writing {path} ...")
            dtype = torch.float16 if self.device == "cuda" else torch.float32
            calib = 256 if self.smoke else 1024
            stats = write_synthetic(path, part.cfg, part.rank, self.device, dtype, calib_tokens=calib,
                                    eval_tokens=calib, log=self.log)
            write_json(made, stats)
        m = stats["measured"]
        self.start(part, {"weights": "synthetic weights", "statistics": stats, "description": (
            f"Synthetic ReLU Llama with {describe_shape(part.cfg)} (fp16), random weights (seed "
            f"{stats['targets']['seed']}, made on the {self.where}), "
            f"predictors of rank {part.rank}; written in {stats['write_s']:.0f} s "
            f"({stats['file_bytes'] / 2**30:.2f} GiB). Measured on {stats['eval_tokens']} held-out tokens: "
            f"{m['sparsity']:.1%} of FFN neurons inactive per token, the hottest 26% carry {m['hot_mass']:.1%} of "
            f"the activations, predictor recall {m['recall']:.1%} and precision {m['precision']:.1%} "
            f"({m['predicted_ratio']:.2f}x the true active neurons computed); targets 70%, 80%, recall 97%.")})
        t0 = time.perf_counter()
        ckpt = load_checkpoint(path)
        self.results["model"]["load_s"] = time.perf_counter() - t0
        self.log(f"  loaded in {self.results['model']['load_s']:.1f} s")
        predictors, threshold = get_predictors(ckpt, None)
        activation = os.path.join(folder, "activation")
        counts = load_activations(activation, part.cfg.n_layers, part.cfg.n_ff)
        prompt = torch.randint(0, part.cfg.vocab_size, (systems.PROMPT_TOKENS,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        self.run_budgets(part, ckpt, predictors, threshold, counts, profiled_tokens(activation), prompt,
                         model_bytes(ckpt))

    def smollm2(self, part: Part) -> None:
        args = self.args
        model_dir = find_smollm2(args.smollm2, args.work)
        docs_path = args.eval_data or os.path.join(SHARED, "data", "wiki-dev.txt")
        calib = args.calib or os.path.join(SHARED, "data", "calib.txt")
        needed = (("the model (--smollm2)", model_dir, True), (f"--eval-data {docs_path}", docs_path, True),
                  (f"--calib {calib}", calib, not (args.smollm2_predictors and args.smollm2_profile)))
        missing = [what for what, path, need in needed if need and not (path and os.path.exists(path))]
        if missing:
            self.start(part, {"weights": "real weights", "description": "relu-smollm2-135m: not run."})
            self.note(f"not run: {', '.join(missing)} not found")
            return
        profile_dir = args.smollm2_profile or os.path.join(args.work, part.name, "profile")
        pred_dir = args.smollm2_predictors or os.path.join(args.work, part.name, "predictors")
        os.makedirs(os.path.join(args.work, part.name), exist_ok=True)
        trained = not os.path.exists(pred_dir)
        t0 = time.perf_counter()
        tokens = 4096 if self.smoke else args.smollm2_tokens
        recall = ["--target-recall", str(args.smollm2_recall)] if args.smollm2_recall else []
        for cmd, out in ((["profile", "--dump-dataset", "--max-tokens", str(tokens), "--data", calib], profile_dir),
                         (["train-predictors", "--data", profile_dir] + recall, pred_dir)):
            if not os.path.exists(out):
                self.log(f"{part.name}: powerinfer-py {cmd[0]} -> {out}")
                run_cli(cmd + ["-m", model_dir, "-o", out])
        made = f"in this run ({time.perf_counter() - t0:.0f} s with profiling)" if trained else f"before ({pred_dir})"
        ckpt = load_checkpoint(model_dir)
        predictors, threshold = get_predictors(ckpt, pred_dir)
        with open(os.path.join(profile_dir, "stats.json")) as f:
            profiled = json.load(f)
        docs = read_documents(docs_path)[:8 if self.smoke else args.ppl_docs]
        self.start(part, {"weights": "real weights", "description": smollm2_description(pred_dir, profiled, made)})
        ppl = self.dense_perplexity(ckpt, predictors, threshold, docs)
        self.results["perplexity"] = {"documents": len(docs), "source": os.path.basename(docs_path), **ppl}
        self.save()
        counts = load_activations(profile_dir, ckpt.config.n_layers, ckpt.config.n_ff)
        prompt = ckpt.tokenizer.encode(" ".join(docs[:4]))[:systems.PROMPT_TOKENS]
        self.run_budgets(part, ckpt, predictors, threshold, counts, profiled_tokens(profile_dir), prompt,
                         model_bytes(ckpt), ppl_docs=docs)

    def dense_perplexity(self, ckpt, predictors, threshold, docs) -> dict:
        """Dense perplexity, and with the predictors' masks applied (all on one device): what the hybrid
        engine must equal at every budget, and what the predictors alone cost."""
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        model = build_model(ckpt, device=self.device, dtype=dtype)
        dense = perplexity(model, ckpt.tokenizer, docs, systems.CTX, progress=False)
        install_predictors(model, predictors, threshold)
        predicted = perplexity(model, ckpt.tokenizer, docs, systems.CTX, progress=False)
        del model
        systems.free_memory()
        self.log(f"  perplexity: dense {dense['ppl']:.3f}, with predicted masks {predicted['ppl']:.3f}")
        return {"dense": dense["ppl"], "dense_predicted": predicted["ppl"], "tokens": dense["tokens"]}

    def ledger_only(self, part: Part) -> None:
        """70B Q4_0: what the ledger and the bound say, and why nothing runs (every figure computed here)."""
        cfg, tokens = part.cfg, 1024
        self.start(part, {"weights": "no weights (ledger and bound only)", "description": (
            f"Llama-2-70B shapes ({describe_shape(cfg)}), FFN rows Q4_0 on the GPU, predictors of rank "
            f"{part.rank}; activation counts drawn from the target statistics (70% inactive, hottest 26% carry "
            f"80%) over {tokens} tokens, since no weights were made: see the notes.")})
        ledger = vram_ledger(cfg, "f16", part.gpu_weight_type, systems.CTX, 1, [part.rank] * cfg.n_layers,
                             embeddings_on_gpu=True)
        counts = expected_counts(cfg.n_layers, cfg.n_ff, tokens)
        block, block_bytes = GGML_QUANT_SIZES[Q4_0]
        cold_type = systems.cold_row_type(part.gpu_weight_type)
        attention = ledger.category_bytes()["attention"]
        q4_attention = attention // 2 // block * block_bytes
        first = budget_bytes(part.budgets[0], ledger)
        self.note(f"At {format_bytes(first)} the dense parts, which PowerInfer's order places first, need "
                  f"{format_bytes(ledger.dense_bytes)}, of which attention in fp16 (this engine keeps dense "
                  f"weights fp16) {format_bytes(attention)}; with attention in Q4_0, as PowerInfer stores it, they "
                  f"would need {format_bytes(ledger.dense_bytes - attention + q4_attention)}. Closing it needs "
                  f"quantized attention weights on the GPU.")
        for spec in part.budgets:
            budget = budget_bytes(spec, ledger)
            base = {"budget": budget, "budget_label": budget_label(spec, budget, None)}
            try:
                ledger.ffn_budget(budget)
            except BudgetError as e:
                self.add("bound", base, "infeasible", str(e))
                continue
            problem, placement = systems.solve(ledger, counts, tokens, budget, self.bandwidths, time_limit=10.0)
            masks = [m.numpy() for m in placement.gpu_masks]
            cold = cfg.n_layers * cfg.n_ff - int(placement.hot_neurons.sum())
            ram = {t: cold * FFNRows.bytes_per_neuron(cfg.dim, t, device="cpu") for t in (cold_type, "q4_0")}
            self.add("bound", base, **systems.bound(problem, masks, self.bandwidths, cold_type), cold_neurons=cold,
                     cpu_ram_cold_rows=ram[cold_type])
            if cold_type != "q4_0":
                self.add("bound", {**base, "budget_label": base["budget_label"] + ", Q4_0 CPU rows"},
                         **systems.bound(problem, masks, self.bandwidths, "q4_0"), cpu_ram_cold_rows=ram["q4_0"])
            as_q4 = f" ({format_bytes(ram['q4_0'])} as Q4_0)" if cold_type != "q4_0" else ""
            self.note(f"At {format_bytes(budget)} the engine's cold rows ({cold_type} on the CPU, as "
                      f"hybrid.split_rows packs them) need {format_bytes(ram[cold_type])} of RAM{as_q4}; this "
                      f"machine has {format_bytes(ram_bytes())}.")
        sample = np.random.default_rng(0).standard_normal((1024, cfg.dim), dtype=np.float32)
        encode(sample[:32], Q4_0)  # warm-up
        t0 = time.perf_counter()
        encode(sample, Q4_0)
        rate = sample.size / (time.perf_counter() - t0)
        values = sum(int(np.prod(s)) for s in expected_shapes(cfg).values())
        self.note(f"A Q4_0 PowerInfer file of these shapes takes {format_bytes(q4_0_file_bytes(cfg, part.rank))} "
                  f"({format_bytes(shutil.disk_usage(self.args.work).free)} free in {self.args.work}); gguf's numpy "
                  f"quantizer ran at {rate / 1e6:.1f}M values/s here, {values / rate / 60:.0f} min for its "
                  f"{values / 1e9:.1f}B values, and the loader (powerinfer_py/formats/gguf.py) decodes quantized "
                  f"tensors to fp32 in host memory: {format_bytes(4 * values)}.")


def budget_bytes(spec: str, ledger) -> int:
    """'8GiB' -> bytes; 'ffn:75%' -> the ledger's dense bytes plus 75% of the FFN neurons (negative: less
    than the dense parts, an infeasible budget)."""
    if spec.startswith("ffn:"):
        share = float(spec[4:].rstrip("%")) / 100
        cfg = ledger.config
        return int(ledger.dense_bytes + round(share * cfg.n_layers * cfg.n_ff) * ledger.ffn_bytes_per_neuron)
    return parse_budget(spec)


def budget_label(spec: str, budget: int, model_total: int | None) -> str:
    if spec.startswith("ffn:"):
        return f"{format_bytes(budget)} ({spec[4:]} of FFN on GPU)"
    return format_bytes(budget) + (f" ({budget / model_total:.0%} of the model)" if model_total else "")


def q4_0_file_bytes(cfg, rank: int) -> int:
    """A PowerInfer Q4_0 file of cfg: 2-D weights Q4_0, norms F32, predictors F16."""
    weights = sum(tensor_nbytes(shape, Q4_0 if len(shape) == 2 else F32) for shape in expected_shapes(cfg).values())
    return weights + cfg.n_layers * tensor_nbytes((cfg.n_ff + cfg.dim, rank), F16)


def model_bytes(ckpt) -> int:
    """The model's weights as stored (predictors included)."""
    tensors = list(ckpt.tensors.values()) + [t for p in (ckpt.predictors or []) for t in p.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def describe_shape(cfg) -> str:
    return (f"d={cfg.dim}, {cfg.n_layers} layers, n_ff={cfg.n_ff}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV "
            f"heads, vocabulary {cfg.vocab_size}")


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_cli(argv: list[str]) -> None:
    from powerinfer_py.cli import main

    if main(argv) != 0:
        raise PowerInferError(f"powerinfer-py {' '.join(argv)} failed")


def find_smollm2(given: str | None, work: str) -> str | None:
    """The Hugging Face folder of relu-smollm2-135m: --smollm2, the device copy, the test cache, or
    materialised from ../shared into the work folder."""
    for folder in ([given] if given else ["/tmp/relu-smollm2", os.path.join(ROOT, ".cache", "relu-smollm2-135m")]):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    script = os.path.join(SHARED, "models", "relu-smollm2-135m", "materialize.py")
    if given or not os.path.exists(script):
        return None
    import subprocess

    dest = os.path.join(work, "relu-smollm2-135m", "hf")
    subprocess.run([sys.executable, script, dest], check=True, stdout=subprocess.DEVNULL)
    return dest


def smollm2_description(pred_dir: str, profiled: dict, made: str) -> str:
    report_path = os.path.join(pred_dir, "train_report.json")
    quality = ""
    if os.path.exists(report_path):
        with open(report_path) as f:
            layers = json.load(f)["layers"]
        recall = np.mean([r["heldout"]["recall"] for r in layers])
        ratio = np.mean([r["heldout"]["active_ratio"] for r in layers])
        quality = f"; held-out predictor recall {recall:.1%}, {ratio:.2f}x the true active neurons computed"
    return (f"relu-smollm2-135m (../shared: real weights, fp16), predictors trained with `powerinfer-py "
            f"train-predictors` {made} on {profiled['tokens']} tokens of calib.txt{quality}; "
            f"{profiled['mean_sparsity']:.1%} of FFN neurons inactive per token in the profile.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON results, benchmarks.md and benchmarks.png")
    ap.add_argument("--only", default=None, help=f"comma-separated parts ({', '.join(PARTS)}); default: all")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness anywhere in seconds")
    ap.add_argument("--work", default=None, help="scratch folder for generated models (default: /tmp/powerinfer-bench)")
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole run; later systems are skipped")
    ap.add_argument("--time-box", type=float, default=None, help="seconds of timed generation per system (default 20)")
    ap.add_argument("--trace", action="store_true", help="profile one hybrid decode step of the 7b part at each budget")
    ap.add_argument("--systems", default="layer_split,accelerate,dense",
                    help="baselines run beside the bound and the hybrid engine (comma-separated)")
    ap.add_argument("--regenerate", action="store_true", help="write the synthetic models again even if present")
    ap.add_argument("--smollm2", default=None, help="relu-smollm2-135m Hugging Face folder")
    ap.add_argument("--smollm2-predictors", default=None, help="its predictor folder (default: trained in the run)")
    ap.add_argument("--smollm2-profile", default=None, help="its `profile --dump-dataset` folder (default: made)")
    ap.add_argument("--smollm2-tokens", type=int, default=32768, help="calibration tokens for profiling/training")
    ap.add_argument("--smollm2-recall", type=float, default=None,
                    help="train-predictors --target-recall (default: the trainer's); higher keeps perplexity closer "
                         "to dense at the cost of more active neurons")
    ap.add_argument("--calib", default=None, help="calibration text (default ../shared/data/calib.txt)")
    ap.add_argument("--eval-data", default=None, help="held-out documents (default ../shared/data/wiki-dev.txt)")
    ap.add_argument("--ppl-docs", type=int, default=64, help="documents for perplexity")
    args = ap.parse_args(argv)
    args.work = args.work or os.path.join("/tmp", "powerinfer-bench-smoke" if args.smoke else "powerinfer-bench")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    parts = SMOKE_PARTS if args.smoke else PARTS
    keys = args.only.split(",") if args.only else list(parts)
    unknown = [k for k in keys if k not in parts]
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(parts)}")
    suite = Suite(args)
    for key in keys:
        part = parts[key]
        t0 = time.perf_counter()
        run = {"smollm2": suite.smollm2, "70b": suite.ledger_only}.get(part.key, suite.synthetic)
        try:
            run(part)
        except Exception as e:  # a broken part must not cost the next ones their run
            traceback.print_exc()
            suite.fail(part, e)
        suite.log(f"{part.name}: done in {time.perf_counter() - t0:.0f} s")
        for path in write_report(args.out):
            suite.log(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
