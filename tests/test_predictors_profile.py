import pytest
import torch

from powerinfer_py.errors import UnsupportedModelError
from predictors.dataset import DatasetWriter, PredictorDataset
from predictors.profile import activation_stats, check_profilable, profile, token_windows
from test_predictors_capture import expected_masks, known_model


class ByteTokenizer:
    def encode(self, text):
        return list(text.encode())


def random_windows(n, length, vocab=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def test_counts_are_exact_on_a_model_with_known_activations(tmp_path):
    model, signs = known_model()
    windows = random_windows(7, 6) + random_windows(1, 4, seed=2)  # a shorter last window too
    writer = DatasetWriter(str(tmp_path), 3, 8, 20)
    profiler, interrupted = profile(model, windows, batch_tokens=12, dataset=writer, progress=False)
    writer.close()
    tokens = torch.tensor([t for w in windows for t in w])
    expected = expected_masks(tokens, signs, 8)
    assert not interrupted and profiler.tokens == len(tokens)
    for i in range(3):
        assert profiler.counts[i].dtype == torch.int64
        assert torch.equal(profiler.counts[i], expected[i].sum(0))

    ds = PredictorDataset(str(tmp_path))
    assert ds.tokens == len(tokens)
    for i in range(3):  # rows come in batch order; compare as multisets of (input, mask) rows
        inputs, masks = ds.layer(i)
        assert torch.equal(masks.sum(0), expected[i].sum(0))
        assert torch.equal(inputs.argmax(1).bincount(minlength=8), tokens.bincount(minlength=8))
        assert torch.equal(masks, expected_masks(inputs.argmax(1), signs, 8)[i])


def test_ctrl_c_keeps_only_complete_batches(tmp_path):
    model, signs = known_model()
    windows = random_windows(6, 5)
    calls = []

    def interrupt_second_batch(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    model.layers[2].ffn_norm.register_forward_pre_hook(interrupt_second_batch)  # mid-batch, after layers 0-1
    writer = DatasetWriter(str(tmp_path), 3, 8, 20)
    profiler, interrupted = profile(model, windows, batch_tokens=10, dataset=writer, progress=False)
    writer.close()
    first = torch.tensor(windows[:2]).reshape(-1)
    assert interrupted and profiler.tokens == 10
    for i in range(3):
        assert torch.equal(profiler.counts[i], expected_masks(first, signs, 8)[i].sum(0))
    assert PredictorDataset(str(tmp_path)).tokens == 10


def test_fatrelu_threshold_counts_magnitudes_above_it():
    model, signs = known_model()
    windows = random_windows(4, 6)
    all_active, _ = profile(model, windows, progress=False)
    none_active, _ = profile(model, windows, active_threshold=1e6, progress=False)
    assert sum(c.sum() for c in all_active.counts) > 0
    assert all(c.sum() == 0 for c in none_active.counts)


def test_silu_model_needs_an_explicit_threshold():
    model, _ = known_model()
    cfg = model.config.replace(ffn_act="silu")
    with pytest.raises(UnsupportedModelError, match="--fatrelu-threshold"):
        check_profilable(cfg, 0.0)
    check_profilable(cfg, 0.1)


def test_windows_are_spread_over_the_whole_text():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    all_windows = token_windows(ByteTokenizer(), text, 100)
    assert [len(w) for w in all_windows] == [100] * 10
    some = token_windows(ByteTokenizer(), text, 100, max_tokens=250)
    assert [len(w) for w in some] == [100, 100, 50]
    assert some == [all_windows[0], all_windows[3], all_windows[6][:50]]


def test_stats_give_sparsity_and_hot_neuron_shares():
    counts = [torch.tensor([90, 5, 3, 2, 0], dtype=torch.int64)]  # 100 activations over 40 tokens x 5 neurons
    (layer,) = activation_stats(counts, tokens=40)
    assert layer["sparsity"] == pytest.approx(1 - 100 / 200)
    assert layer["neurons_carrying"] == {"0.5": 0.2, "0.8": 0.2, "0.9": 0.2, "0.99": 0.8}


@pytest.mark.gpu
def test_counts_on_cuda_equal_the_cpu_counts():
    model, signs = known_model()
    windows = random_windows(5, 6)
    cpu, _ = profile(model, windows, batch_tokens=12, progress=False)
    gpu, _ = profile(model.cuda(), windows, batch_tokens=12, progress=False)
    for a, b in zip(cpu.counts, gpu.counts):
        assert torch.equal(a, b.cpu())
