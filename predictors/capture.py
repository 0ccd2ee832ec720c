"""See each layer's predictor input and FFN neuron activations during an ordinary forward pass, through hooks:
the model code stays untouched.

The predictor input is what goes into `ffn_norm` (the residual after attention, as PowerInfer feeds it); the
neuron activations are what goes into `w_down` (after any predicted-inactive neurons were zeroed)."""
from __future__ import annotations

import torch


def active_mask(act: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """A neuron is active for a token when its activation is nonzero, or above `threshold` in magnitude (the
    FATReLU-style cut used to profile a model whose activation is never exactly zero)."""
    return act.abs() > threshold if threshold > 0 else act != 0


class FFNCapture:
    """Context manager calling `on_layer(i, p, act)` for every layer i in each forward pass, where p is the
    predictor input (..., dim) and act the neuron activations (..., n_ff)."""

    def __init__(self, model, on_layer):
        self.on_layer = on_layer
        self.inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(model.layers):
            self.handles.append(layer.ffn_norm.register_forward_pre_hook(self._keep_input(i)))
            self.handles.append(layer.feed_forward.w_down.register_forward_pre_hook(self._report(i)))

    def _keep_input(self, i):
        def hook(module, args):
            self.inputs[i] = args[0]
        return hook

    def _report(self, i):
        def hook(module, args):
            self.on_layer(i, self.inputs.pop(i), args[0])
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.inputs.clear()


class _StopForward(Exception):
    pass


@torch.inference_mode()
def run_layers(model, tokens: torch.Tensor) -> None:
    """Run the decoder layers only: profiling needs no logits, and the LM head is about a fifth of a small
    model's work. A hook on the final norm ends the pass there."""
    def stop(module, args):
        raise _StopForward

    handle = model.norm.register_forward_pre_hook(stop)
    try:
        model(tokens)
    except _StopForward:
        pass
    finally:
        handle.remove()
