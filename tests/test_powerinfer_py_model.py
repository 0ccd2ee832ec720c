"""Parity of the runtime's Llama with transformers.LlamaForCausalLM on small random configs: logits for
prefill and every decode step, and greedy token streams."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from powerinfer_py.config import ModelConfig  # noqa: E402
from powerinfer_py.generate import Generator  # noqa: E402
from powerinfer_py.loader import build_model, load_checkpoint  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CASES = {
    "mha-relu-tied": dict(num_key_value_heads=4, hidden_act="relu", tie_word_embeddings=True),
    "gqa-relu": dict(num_key_value_heads=2, hidden_act="relu"),
    "mqa-silu": dict(num_key_value_heads=1, hidden_act="silu"),
    "gqa-linear": dict(num_key_value_heads=2, hidden_act="relu", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gqa-dynamic": dict(num_key_value_heads=2, hidden_act="relu", max_position_embeddings=16,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "gqa-llama3": dict(num_key_value_heads=2, hidden_act="silu", rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "gqa-yarn": dict(num_key_value_heads=2, hidden_act="relu",
                     rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "head-dim": dict(num_key_value_heads=2, hidden_act="relu", head_dim=32),
}


def make_pair(tmp_path, case):
    torch.manual_seed(hash(case) % 1000)
    hf_cfg = transformers.LlamaConfig(**{**BASE, **CASES[case]})
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong norm cannot hide
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = build_model(load_checkpoint(str(tmp_path)))
    return ref, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    ref, ours = make_pair(tmp_path, case)
    tokens = torch.randint(3, 97, (1, 40))
    with torch.no_grad():
        want = ref(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # prefill 10 tokens into the cache, then decode the rest one at a time, against transformers' cache
    ours.setup_caches(1, 64)
    with torch.no_grad():
        cache = transformers.DynamicCache()
        out = ref(tokens[:, :10], past_key_values=cache, use_cache=True)
        got = ours(tokens[:, :10], torch.arange(10), kv_len=10)
        torch.testing.assert_close(got, out.logits, rtol=1e-4, atol=1e-4)
        for pos in range(10, 40):
            out = ref(tokens[:, pos:pos + 1], past_key_values=cache, use_cache=True)
            got = ours(tokens[:, pos:pos + 1], torch.tensor([pos]), kv_len=pos + 1)
            torch.testing.assert_close(got, out.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["gqa-relu", "mha-relu-tied"])
def test_greedy_tokens_match_transformers(tmp_path, case):
    ref, ours = make_pair(tmp_path, case)
    prompt = torch.randint(3, 97, (1, 5))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 5:].tolist()
    got, _ = Generator(ours, max_len=64).generate(prompt[0].tolist(), 32)
    assert got == want


def test_config_from_transformers_5_rope_parameters():
    cfg = ModelConfig.from_hf({**BASE, "num_key_value_heads": 2, "hidden_act": "relu",
                               "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.ffn_act == "relu" and cfg.n_kv_heads == 2 and cfg.head_dim == 16


def test_state_dicts_keep_separate_q_k_v():
    """wqkv is merged from wq/wk/wv on load and split back on save: checkpoints and exports keep Llama's names."""
    from powerinfer_py.model import Transformer

    cfg = ModelConfig(vocab_size=32, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=40, ffn_act="relu")
    torch.manual_seed(0)
    state = Transformer(cfg).state_dict()
    assert "layers.0.attention.wq.weight" in state and not any("wqkv" in name for name in state)
    assert state["layers.1.attention.wk.weight"].shape == (cfg.kv_dim, cfg.dim)
    state = {name: torch.randn_like(t) for name, t in state.items()}
    model = Transformer(cfg)
    model.load_state_dict(state)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())


def test_device_state_merges_q_k_v_before_moving():
    """build_model's tensors: wqkv already merged (on the host), the checkpoint left as it was."""
    from powerinfer_py.loader import Checkpoint, device_state
    from powerinfer_py.model import Transformer

    cfg = ModelConfig(vocab_size=32, dim=24, n_layers=2, n_heads=4, n_kv_heads=2, n_ff=40, ffn_act="relu")
    tensors = {name: torch.randn_like(t) for name, t in Transformer(cfg).state_dict().items()}
    ckpt = Checkpoint(cfg, tensors, None, None, "hf", "<random>")
    state = device_state(ckpt, [n for n in tensors if not n.startswith("layers.1.")], "cpu", torch.float16)
    assert "layers.0.attention.wqkv.weight" in state and "layers.0.attention.wq.weight" not in state
    assert not any(n.startswith("layers.1.") for n in state) and "layers.0.attention.wq.weight" in tensors
    want = torch.cat([tensors[f"layers.0.attention.{w}.weight"] for w in ("wq", "wk", "wv")]).half()
    assert torch.equal(state["layers.0.attention.wqkv.weight"], want)
