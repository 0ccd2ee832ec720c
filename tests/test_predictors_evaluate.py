import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.model import Predictor, Transformer
from predictors.evaluate import evaluate_predictors, format_table
from predictors.metrics import confusion_counts, confusion_rates

DOCS = ["the quick brown fox jumps over the lazy dog", "sparse inference keeps hot neurons on the GPU",
        "a third document, a little longer than the others, about cold neurons on the CPU side of things"]


class ByteTokenizer:
    eos_ids = (2,)

    def encode(self, text):
        return [3 + b % 60 for b in text.encode()]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=48, ffn_act="relu")
    return Transformer(cfg).eval()


def random_predictors(seed=1, rank=8):
    g = torch.Generator().manual_seed(seed)
    return [{"fc1.weight": torch.randn(rank, 32, generator=g), "fc2.weight": torch.randn(48, rank, generator=g)}
            for _ in range(3)]


@torch.no_grad()
def reference_counts(model, predictors, threshold):
    """Per layer confusion counts by stepping through the blocks by hand, no hooks."""
    preds = []
    for sd in predictors:
        pred = Predictor(32, sd["fc1.weight"].shape[0], 48, threshold)
        pred.load_state_dict(sd)
        preds.append(pred)
    counts = [torch.zeros(4, dtype=torch.int64) for _ in preds]
    neuron_counts = [torch.zeros(48, dtype=torch.int64) for _ in preds]
    for doc in DOCS:
        tokens = torch.tensor([ByteTokenizer().encode(doc) + [2]])
        pos = torch.arange(tokens.shape[1])
        x, cos, sin, mask = model.embed(tokens, pos, use_cache=False)
        for i, block in enumerate(model.layers):
            h, x_ffn, _ = block.attend(x, cos, sin, pos, None, mask)
            true = block.feed_forward.activation(x_ffn) != 0
            counts[i] += confusion_counts(preds[i](h), true)
            neuron_counts[i] += true.reshape(-1, 48).sum(0)
            x = block(x, cos, sin, pos, None, mask)
    return counts, neuron_counts


def test_per_layer_numbers_match_a_hand_stepped_reference():
    model, predictors = tiny_model(), random_predictors()
    profiled = [torch.randperm(1000, generator=torch.Generator().manual_seed(i))[:48] for i in range(3)]  # no ties
    result = evaluate_predictors(model, ByteTokenizer(), DOCS, predictors, threshold=0.5, activations=profiled,
                                 progress=False)
    expected, neuron_counts = reference_counts(model, predictors, 0.5)
    for layer, c, here, prof in zip(result["layers"], expected, neuron_counts, profiled):
        rates = confusion_rates(c)
        for key in ("recall", "precision", "true_active", "predicted_active", "active_ratio"):
            assert abs(layer[key] - rates[key]) < 1e-12, key
        assert layer["rank"] == 8 and abs(layer["param_share"] - 8 * (32 + 48) / (3 * 32 * 48)) < 1e-12
        assert layer["time_share"] > 0
        hot = prof.argsort(descending=True)[:round(layer["profiled_hot"]["neurons"] * 48)]
        assert prof[hot].sum() >= 0.8 * prof.sum() > prof[hot[:-1]].sum()  # the fewest carrying 80%
        assert abs(layer["profiled_hot"]["share_here"] - here[hot].sum().item() / here.sum().item()) < 1e-12
    assert all(layer.predictor is None for layer in model.layers)  # the model is left dense
    assert "perplexity: dense" in format_table(result)


def test_predictors_marking_everything_active_give_the_dense_perplexity_exactly():
    model = tiny_model()
    everything = [{"fc1.weight": torch.zeros(4, 32), "fc2.weight": torch.randn(48, 4)} for _ in range(3)]
    result = evaluate_predictors(model, ByteTokenizer(), DOCS, everything, threshold=0.0, progress=False)
    assert result["sparse"]["ppl"] == result["dense"]["ppl"] and result["ppl_increase"] == 0
    assert result["mean_recall"] == 1.0 and result["predicted_active"] == 1.0


def test_predicted_inactive_neurons_give_exactly_zero():
    model = tiny_model()
    nothing = [{"fc1.weight": torch.zeros(4, 32), "fc2.weight": torch.randn(48, 4)} for _ in range(3)]
    result = evaluate_predictors(model, ByteTokenizer(), DOCS, nothing, threshold=1.0, progress=False)
    assert result["sparse"]["zero_frac"] == 1.0 and result["predicted_active"] == 0.0
    assert result["sparse"]["ppl"] != result["dense"]["ppl"]
