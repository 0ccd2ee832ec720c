import numpy as np
import pytest
import torch

from powerinfer_py.config import ModelConfig
from powerinfer_py.engine import build_hybrid
from powerinfer_py.generate import Generator
from powerinfer_py.loader import build_model
from powerinfer_py.sampling import SamplingParams
from test_powerinfer_py_engine import random_checkpoint, random_predictors

CFG = ModelConfig(vocab_size=101, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, n_ff=384, max_seq_len=512,
                  ffn_act="relu", head_dim=32, tie_embeddings=True)


def test_greedy_stops_at_the_first_end_of_sequence_token():
    model = build_model(random_checkpoint(CFG))
    full, _ = Generator(model, 64).generate([5, 17, 42], 12)
    eos = full[4]
    cut = full.index(eos) + 1
    got, stats = Generator(model, 64).generate([5, 17, 42], 12, eos_ids={eos})
    assert got == full[:cut] and stats.generated_tokens == cut


def test_sampling_is_greedy_only_without_temperature_or_penalty():
    from powerinfer_py.sampling import Sampler

    assert Sampler(SamplingParams()).greedy
    assert not Sampler(SamplingParams(temperature=0.7)).greedy
    assert not Sampler(SamplingParams(repetition_penalty=1.1)).greedy


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
def test_queued_greedy_steps_equal_eager_decoding(split):
    """Greedy decoding queues step N+1 on the GPU before step N's token is read: its tokens still equal eager
    decoding's across a graph bucket (256 positions) and at an end-of-sequence token (the queued step is run
    out, CPU half included, and the next generation on the same Generator is unaffected), dense and hybrid."""
    ckpt = random_checkpoint(CFG)
    dense = build_model(ckpt, device="cuda", dtype=torch.float16)
    model = dense
    if split:
        masks = [np.arange(CFG.n_ff) % 3 != 0 for _ in range(CFG.n_layers)]
        model = build_hybrid(ckpt, "cuda", torch.float16, budget=1 << 30, gpu_masks=masks,
                             predictors=random_predictors(CFG, all_active=True)).model
        assert model.handoff is not None
    prompt = (torch.arange(245) * 7 % CFG.vocab_size).tolist()
    want, _ = Generator(dense, 512, use_cuda_graph=False).generate(prompt, 24)
    gen = Generator(model, 512)
    got, _ = gen.generate(prompt, 24)
    assert got == want
    assert sorted(gen.graphs) == [256, 512]  # the steps crossed from one bucket's graph to the next
    eos = want[9]
    got, stats = gen.generate(prompt, 24, eos_ids={eos})
    assert got == want[:want.index(eos) + 1] and stats.generated_tokens < 24
    assert gen.generate(prompt, 24)[0] == want  # nothing of the dropped step is left behind
    # not greedy for the sampler (top-k 1 of a temperature): tokens sampled on the host, same tokens
    sampled, _ = gen.generate(prompt, 12, SamplingParams(temperature=1.0, top_k=1))
    assert sampled == want[:12]
