"""The sparse FFN entry points and the registry that picks a backend per device, once.

Every entry point checks its arguments (dtype, shape, device: TypeError/ValueError naming the argument)
before anything runs, then hands the work to rows' backend: CUDA kernels through CuPy ('cuda'), torch CPU
kernels ('cpu'), or the plain references ('reference') when CuPy or CUDA is missing.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .reference import sparse_down_reference, sparse_gate_up_reference
from .rows import FFNRows

ACTS = ("relu", "drelu", "silu")
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend:
    """What every backend does: gate_up and down (its kernels) and ffn, by default the two one after the other
    (a backend with a one-pass kernel overrides it). down's `active`, where given, is the mask h was computed
    under (h is 0 wherever it is off): a backend may start reading rows by it before h is ready; down returns
    True if it also added `cold` and `residual` (kernels.handoff.ColdPart, one token on CUDA)."""

    def ffn(self, x, rows, active, act, threshold, y, residual=None, beside=None, cold=None) -> bool:
        """y = the rows' FFN output; True if the kernels also added `residual` and `cold`, if given (else the
        caller adds them). beside and cold: as sparse_ffn takes them."""
        h = torch.empty((x.shape[0], rows.m), dtype=torch.float32, device=rows.device)
        self.gate_up(x, rows, active, act, threshold, h, False)
        if beside is not None:
            beside(True)
        return bool(self.down(h, rows, y, active, cold, residual))


class ReferenceBackend(Backend):
    """The references over the rows' exact values: correct anywhere, slow (dequantizes on every call)."""
    name = "reference"

    def gate_up(self, x, rows, active, act, threshold, h, full):
        gate, up, _ = rows.dense()
        hc = sparse_gate_up_reference(x, gate, up, rows.neuron_idx, active, act, threshold)
        if full:
            h[:, rows.neuron_idx] = hc
        else:
            h.copy_(hc)

    def down(self, h, rows, y, active=None, cold=None, residual=None) -> bool:
        y.copy_(sparse_down_reference(h, rows.dense()[2]))
        return False


@functools.cache
def get_backend(device_type: str):
    """The backend for 'cpu' or 'cuda'; for 'cuda' without CuPy or a GPU, the reference with a warning."""
    if device_type == "cpu":
        from .cpu import CpuBackend
        return CpuBackend()
    if device_type != "cuda":
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device_type!r}")
    try:
        if not torch.cuda.is_available():
            raise ImportError("torch sees no CUDA device")
        from .cuda import CudaBackend
        return CudaBackend()
    except ImportError as e:
        warnings.warn(f"kernels: CUDA kernels unavailable ({e}); using the slow torch reference", stacklevel=2)
        return ReferenceBackend()


def use_decode_kernels(model) -> bool:
    """Run the model's one-token CUDA steps on the fused kernels of kernels.decode (attention, norms, predictors)
    where CuPy's CUDA backend is available (True; a model switched before stays so); False (the model unchanged)
    otherwise."""
    if get_backend("cuda").name != "cuda":
        return False
    from .decode import use_decode_kernels as switch

    switch(model)
    return True


def _check_tensor(name, t, dtypes, shape, device):
    """shape: a tuple with None for any size."""
    if not torch.is_tensor(t):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def _check_inputs(x, rows, active, act):
    if not isinstance(rows, FFNRows):
        raise TypeError(f"rows: expected FFNRows, got {type(rows).__name__}")
    _check_tensor("x", x, X_DTYPES, (None, rows.d), rows.device)
    _check_tensor("active", active, (torch.bool,), (x.shape[0], None), rows.device)
    if active.shape[1] < rows.min_n_ff:
        raise ValueError(f"active: has {active.shape[1]} neurons, but rows hold neuron {rows.min_n_ff - 1}")
    if act not in ACTS:
        raise ValueError(f"act: expected one of {ACTS}, got {act!r}")


def _check_out(out, shape, dtypes, device):
    _check_tensor("out", out, dtypes, shape, device)
    if not out.is_contiguous():
        raise ValueError("out: must be contiguous")


def sparse_gate_up(x, rows: FFNRows, active, act="relu", threshold=0.0, full=False, out=None):
    """Activations of the rows' neurons, fp32: compact (T, m) in row order, or with full=True the layer's
    (T, n_ff) where only the rows' neuron columns are written (a new buffer starts as zeros).
    0 where a neuron is predicted inactive; rows no token needs are never read."""
    _check_inputs(x, rows, active, act)
    shape = (x.shape[0], active.shape[1] if full else rows.m)
    if out is None:  # the compact form is written whole; the full one only in the rows' columns
        out = (torch.zeros if full or not rows.m else torch.empty)(shape, dtype=torch.float32, device=rows.device)
    else:
        _check_out(out, shape, (torch.float32,), rows.device)
    if rows.m and x.shape[0]:
        get_backend(rows.device.type).gate_up(x, rows, active, act, float(threshold), out, full)
    return out


def sparse_down(h, rows: FFNRows, out=None):
    """(T, d) = h @ down_t_rows for compact fp32 h (T, m), fp32 accumulation, reading only rows with h != 0.
    out (f32/f16/bf16) receives the result; by default a new fp32 tensor."""
    if not isinstance(rows, FFNRows):
        raise TypeError(f"rows: expected FFNRows, got {type(rows).__name__}")
    _check_tensor("h", h, (torch.float32,), (None, rows.m), rows.device)
    if out is None:
        out = torch.empty((h.shape[0], rows.d), dtype=torch.float32, device=rows.device)
    else:
        _check_out(out, (h.shape[0], rows.d), X_DTYPES, rows.device)
    if rows.m == 0 or h.shape[0] == 0:
        return out.zero_()
    get_backend(rows.device.type).down(h, rows, out)
    return out


def sparse_ffn(x, rows: FFNRows, active, act="relu", threshold=0.0, out=None, residual=None, beside=None,
               cold=None):
    """The rows' share of the FFN output, (T, d) in x's dtype (or into out): sum over the active neurons j
    of ffn_activation(gate_j . x, up_j . x) * down_t_rows[j]; with residual (out's dtype and shape), residual
    plus that, rounded as the torch add would (a one-token kernel adds it as it writes). beside(listed), if given,
    is called once: right after the kernel that lists the rows off the mask is launched (listed True: that kernel
    lets the next one start only once the mask is complete), or first (False) where nothing is listed.
    kernels.Handoff launches its send there, to run beside the FFN's kernels. cold: the CPU's share of the same FFN
    (a kernels.handoff.ColdPart), added in as well, with the residual: by the down kernel where it can, else by
    cold.add."""
    _check_inputs(x, rows, active, act)
    if out is not None:
        _check_out(out, tuple(x.shape), X_DTYPES, rows.device)
    out = out if out is not None else x.new_empty(x.shape)
    if residual is not None:
        _check_tensor("residual", residual, (out.dtype,), tuple(x.shape), rows.device)
        residual = residual.contiguous()
    if rows.m == 0 or x.shape[0] == 0:
        if beside is not None:
            beside(False)
        if cold is None:
            return out.zero_() if residual is None else out.copy_(residual)
        return cold.add(out.zero_(), residual)
    added = get_backend(rows.device.type).ffn(x, rows, active, act, float(threshold), out, residual, beside, cold)
    if cold is not None and not added:
        return cold.add(out, residual)
    if residual is not None and not added:
        out.add_(residual)
    return out
