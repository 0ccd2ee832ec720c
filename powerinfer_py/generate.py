"""Prefill + decode loop. On CUDA the decode step is captured in CUDA graphs (static token/position buffers;
one graph per power-of-two bucket of attended cache length, masked), so a token costs one graph replay
instead of hundreds of launches. Each graph ends by writing its argmax into the next step's inputs, so greedy
decoding queues step N+1 before the host has read step N's token: the GPU never waits for sampling."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from kernels import use_decode_kernels
from kernels.decode import greedy_advance, greedy_advance_reference

from .errors import InputError
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward; the VRAM ledger charges the activations of one chunk


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tps(self):
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tps(self):
        """Decode steps per second (the first token comes from the prefill, as in llama.cpp's timings)."""
        steps = self.generated_tokens - 1
        return steps / self.generate_seconds if self.generate_seconds and steps > 0 else 0.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Runs a Transformer (dense or hybrid) with a preallocated KV cache of `max_len` positions."""

    def __init__(self, model, max_len: int, use_cuda_graph: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                 decode_kernels: bool = True):
        """decode_kernels: one-token CUDA steps run attention, norms and predictors on kernels.decode's fused
        kernels (the model's modules are switched in place)."""
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        model.setup_caches(1, max_len)
        # a split model's decode graph needs the kernels.Handoff (without one, each split layer waits on the host)
        host_steps = any(getattr(layer.feed_forward, "splits", False) for layer in model.layers) \
            and getattr(model, "handoff", None) is None
        self.use_graph = use_cuda_graph and self.device.type == "cuda" and not host_steps
        # the decode kernels' greedy end of step where CuPy's CUDA backend runs them, else torch's ops
        self.greedy_advance = greedy_advance_reference
        if decode_kernels and self.device.type == "cuda" and use_decode_kernels(model):
            self.greedy_advance = greedy_advance
        self.graphs = {}  # attended cache length -> its captured DecodeGraph
        # all GPU work on one stream of our own: graph capture needs a side stream, and every stream that runs a
        # matrix product holds a cuBLAS workspace (the VRAM ledger charges one)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def on_stream(self):
        """Run the block on the Generator's stream, ordered after and before the caller's stream's work."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    # -- one forward over a chunk of tokens at positions [start, start+T)
    def prefill(self, tokens: list[int], start: int = 0) -> torch.Tensor:
        logits = None
        with self.on_stream():
            for i in range(0, len(tokens), self.prefill_chunk):
                chunk = torch.tensor([tokens[i:i + self.prefill_chunk]], device=self.device)
                pos = torch.arange(start + i, start + i + chunk.shape[1], device=self.device)
                logits = self.model(chunk, pos, kv_len=start + i + chunk.shape[1], last_only=True)
        return logits[0, -1]

    def _bucket(self, pos: int) -> int:
        """The attended cache length for position `pos`: the next power of two (at least 256), so a decode
        step reads the filled part of the cache, not all of it, with one graph per bucket."""
        return min(self.max_len, max(256, 1 << pos.bit_length()))

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) after feeding `token` at position `pos`."""
        with self.on_stream():
            return self._decode(token, pos)

    def _decode(self, token: int, pos: int) -> torch.Tensor:
        if not self.use_graph:
            t = torch.tensor([[token]], device=self.device)
            return self.model(t, torch.tensor([pos], device=self.device), kv_len=pos + 1)[0, -1]
        self._set_inputs(token, pos)
        return self._graph(pos)()[0, -1]

    def _set_inputs(self, token: int, pos: int) -> None:
        if not self.graphs:
            self.static_token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self.static_pos = torch.zeros((1,), dtype=torch.long, device=self.device)
            # the argmax of the steps at even and odd positions (a step rewrites both slots, its own and the
            # unchanged one of the step before, which the host may still be about to read)
            self.argmax_ring = torch.zeros(2, dtype=torch.long, device=self.device)
            self.argmax_host = torch.zeros(2, dtype=torch.long, pin_memory=True)
            self.step_done = torch.cuda.Event()
            self.pool = torch.cuda.graph_pool_handle()  # graphs of all buckets share one memory pool
        self.static_token.fill_(token)
        self.static_pos.fill_(pos)

    def _graph(self, pos: int) -> "DecodeGraph":
        """The step graph for position `pos`, captured on first use (the static inputs must hold that step)."""
        kv_len = self._bucket(pos)
        if kv_len not in self.graphs:
            self.graphs[kv_len] = capture_decode(self.model, self.static_token, self.static_pos, kv_len, self.pool,
                                                 self._advance)
        return self.graphs[kv_len]

    def _advance(self, logits: torch.Tensor) -> None:
        """GPU, at the end of each captured step: its argmax becomes the next step's token (and goes to the host's
        ring slot of this position), the position moves on by one."""
        self.greedy_advance(logits[0, -1], self.static_token, self.static_pos, self.argmax_ring, self.argmax_host)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 eos_ids=(), on_token=None) -> tuple[list[int], GenerationStats]:
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) + max_new_tokens > self.max_len:
            raise InputError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the context "
                             f"length {self.max_len}")
        sampler = Sampler(params or SamplingParams())
        with self.on_stream():
            return self._generate(prompt, max_new_tokens, sampler, eos_ids, on_token)

    def _generate(self, prompt, max_new_tokens, sampler, eos_ids, on_token):
        stats = GenerationStats(prompt_tokens=len(prompt))
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        history = list(prompt)
        token = sampler(logits, history)
        _sync(self.device)
        stats.prompt_seconds = time.perf_counter() - t0
        out = []
        t0 = time.perf_counter()
        with contextlib.closing(self._tokens(token, history, sampler, max_new_tokens)) as tokens:
            for token in tokens:
                out.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos_ids or len(out) >= max_new_tokens:
                    break
        _sync(self.device)
        stats.generate_seconds = time.perf_counter() - t0
        stats.generated_tokens = len(out)
        return out, stats

    def _tokens(self, token: int, history: list[int], sampler, max_new_tokens: int):
        """The prefill's token, then each decode step's, computed when asked for: greedy ones on the GPU (see
        _greedy_tokens), others by the sampler on the host."""
        if self.use_graph and sampler.greedy:
            yield from self._greedy_tokens(token, len(history), max_new_tokens)
            return
        while True:
            yield token
            history.append(token)
            token = sampler(self._decode(token, len(history) - 1), history)

    def _greedy_tokens(self, token: int, pos: int, max_new_tokens: int):
        """Greedy decoding from `token` (the prefill's, at `pos`) with one step always queued ahead: step N+1 (its
        input is step N's argmax, on the GPU) is launched as soon as step N's CPU half is done, and only then
        does the host wait for step N's token. A consumer that stops early (an end-of-sequence token) costs the
        step already queued, which closing the generator runs out (its CPU half too)."""
        queued = None
        try:
            for n in range(1, max_new_tokens):
                yield token
                if queued is None:  # the first step, or a step to capture (its warm-up needs host inputs)
                    self._set_inputs(token, pos)
                    queued = self._graph(pos)
                    queued.launch()
                step, queued = queued, None
                step.finish()
                self.step_done.record()
                queued = self.graphs.get(self._bucket(pos + 1)) if n + 1 < max_new_tokens else None
                if queued is not None:
                    queued.launch()
                self.step_done.synchronize()
                token = int(self.argmax_host[pos % 2])
                pos += 1
            yield token
        finally:
            if queued is not None:
                queued.finish()


class DecodeGraph:
    """One captured decode step. launch() queues it on the current stream; finish() runs its CPU half (in a
    hybrid model: blocks until the step's last split layer is done) and returns its logits."""

    def __init__(self, graph, handoff, logits):
        self.graph, self.handoff, self.logits = graph, handoff, logits

    def launch(self) -> None:
        self.graph.replay()

    def finish(self) -> torch.Tensor:
        if self.handoff is not None:
            self.handoff.run_cpu()
        return self.logits

    def __call__(self) -> torch.Tensor:
        self.launch()
        return self.finish()


def capture_decode(model, token, pos, kv_len: int, pool, advance=None) -> DecodeGraph:
    """A CUDA graph of one decode step, then advance(logits) if given (captured, not warmed up). In a hybrid
    model the split FFNs hand off through the model's kernels.Handoff (the GPU waits for the CPU on the GPU), so
    the step is still one graph, and its CPU half runs on the host while the graph runs.
    `token` and `pos` are the static inputs and must hold the step about to run: the warm-up runs that very
    step, so what it writes into the KV cache is what the replay writes."""
    handoff = getattr(model, "handoff", None)

    def step():
        if handoff is not None:
            handoff.begin_step()
        logits = model(token, pos, kv_len=kv_len)
        if handoff is not None:
            handoff.end_step()
        return logits

    stream = torch.cuda.current_stream()  # the Generator's own side stream: warm-up and capture both run on it
    with handoff.engage() if handoff is not None else contextlib.nullcontext():
        with handoff.cpu_alongside() if handoff is not None else contextlib.nullcontext():
            step()  # warm-up outside the graph, as torch's graph docs require
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            logits = step()
            if advance is not None:
                advance(logits)
    return DecodeGraph(graph, handoff, logits)
