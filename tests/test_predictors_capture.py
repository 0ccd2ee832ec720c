import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.model import Transformer
from predictors.capture import FFNCapture, active_mask, run_layers


def known_model(seed=0, n_layers=3, dim=8, n_ff=20):
    """A tiny ReLU model whose activations are known: attention and FFN outputs are zeroed (wo = w_down = 0),
    so every layer's predictor input is the token's one-hot embedding; gate row j reads dimension j % dim
    with sign signs[l, j], so neuron j is active for token t iff j % dim == t and signs[l, j] > 0."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(vocab_size=dim, dim=dim, n_layers=n_layers, n_heads=2, n_kv_heads=1, n_ff=n_ff, ffn_act="relu")
    model = Transformer(cfg).eval()
    signs = torch.where(torch.rand(n_layers, n_ff, generator=g) < 0.5, -1.0, 1.0)
    reads = torch.nn.functional.one_hot(torch.arange(n_ff) % dim, dim).float()
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(dim))
        for layer, s in zip(model.layers, signs):
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w_down.weight.zero_()
            layer.feed_forward.w_gate.weight.copy_(reads * s[:, None])
            layer.feed_forward.w_up.weight.copy_(reads * (0.5 + torch.rand(n_ff, 1, generator=g)))
    return model, signs


def expected_masks(tokens, signs, dim):
    """(n_layers, tokens, n_ff) bool, from the construction of known_model."""
    n_ff = signs.shape[1]
    hit = (torch.arange(n_ff) % dim)[None, :] == tokens.reshape(-1, 1)
    return hit[None] & (signs[:, None, :] > 0)


def test_capture_sees_predictor_input_and_activations_of_every_layer():
    model, signs = known_model()
    tokens = torch.randint(0, 8, (2, 5), generator=torch.Generator().manual_seed(1))
    seen = {}
    with FFNCapture(model, lambda i, p, act: seen.setdefault(i, (p.clone(), act.clone()))):
        with torch.inference_mode():
            model(tokens)
    expected = expected_masks(tokens, signs, 8)
    assert sorted(seen) == [0, 1, 2]
    for i, (p, act) in seen.items():
        assert torch.equal(p.reshape(-1, 8), torch.eye(8)[tokens.reshape(-1)])
        assert torch.equal(active_mask(act).reshape(-1, 20), expected[i])


def test_capture_reports_the_residual_before_ffn_norm_and_the_neuron_outputs():
    """On a random model: act is the FFN activation of ffn_norm(p), and the block returns p + w_down(act)."""
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=24, ffn_act="relu")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    seen, outputs = {}, {}
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out.clone()))
    with FFNCapture(model, lambda i, p, act: seen.setdefault(i, (p.clone(), act.clone()))):
        with torch.inference_mode():
            model(torch.randint(0, 50, (1, 7)))
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            p, act = seen[i]
            assert torch.equal(act, block.feed_forward.activation(block.ffn_norm(p)))
            assert torch.equal(outputs[i], p + block.feed_forward.w_down(act))


def test_capture_removes_its_hooks():
    model, _ = known_model()
    with FFNCapture(model, lambda *a: None):
        pass
    assert not model.layers[0].ffn_norm._forward_pre_hooks
    assert not model.layers[0].feed_forward.w_down._forward_pre_hooks


def test_run_layers_skips_the_head_and_leaves_no_hook():
    model, _ = known_model()
    calls = []
    model.output.register_forward_hook(lambda *a: calls.append(1))
    run_layers(model, torch.zeros(1, 3, dtype=torch.long))
    assert calls == [] and not model.norm._forward_pre_hooks


def test_active_mask_threshold_is_on_magnitude():
    act = torch.tensor([0.0, 0.2, -0.7, 1e-8])
    assert active_mask(act).tolist() == [False, True, True, True]
    assert active_mask(act, 0.5).tolist() == [False, False, True, False]
