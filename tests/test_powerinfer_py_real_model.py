"""The real ReLU model from ../shared against transformers: greedy text and perplexity."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from powerinfer_py.eval import perplexity, read_documents  # noqa: E402
from powerinfer_py.generate import Generator  # noqa: E402
from powerinfer_py.loader import build_model, load_checkpoint  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def models(relu_smollm2_dir):
    ckpt = load_checkpoint(relu_smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(relu_smollm2_dir, dtype=torch.float32).eval()
    return ckpt, build_model(ckpt), ref


class _Reference(torch.nn.Module):
    """transformers' model behind the runtime's call signature, so both go through the same perplexity code."""

    def __init__(self, ref):
        super().__init__()
        self.ref, self.tok_embeddings, self.layers = ref, ref.model.embed_tokens, []

    def forward(self, tokens):
        return self.ref(tokens).logits


def test_greedy_text_matches_transformers(models):
    ckpt, ours, ref = models
    for prompt in PROMPTS:
        ids = ckpt.tokenizer.encode(prompt)
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=2)[0, len(ids):].tolist()
        got, _ = Generator(ours, max_len=128).generate(ids, 12, eos_ids=ckpt.tokenizer.eos_ids)
        assert ckpt.tokenizer.decode(got) == ckpt.tokenizer.decode(want), prompt


def test_perplexity_matches_transformers(models, wiki_dev_path):
    ckpt, ours, ref = models
    docs = read_documents(wiki_dev_path)[:8]
    got = perplexity(ours, ckpt.tokenizer, docs, progress=False)
    want = perplexity(_Reference(ref), ckpt.tokenizer, docs, progress=False)
    assert got["tokens"] == want["tokens"] > 500
    assert abs(got["ppl"] / want["ppl"] - 1) < 0.002
    assert 0.5 < got["zero_frac"] < 0.8  # the model card: 66% of FFN neurons inactive per token


@pytest.mark.gpu
def test_cuda_matches_cpu_and_graph_matches_eager(relu_smollm2_dir):
    ckpt = load_checkpoint(relu_smollm2_dir)
    cpu = build_model(ckpt)
    gpu = build_model(ckpt, device="cuda", dtype=torch.float16)
    tokens = torch.tensor([ckpt.tokenizer.encode(PROMPTS[0] + " Paris, the largest city of the country.")])
    with torch.no_grad():
        want = cpu(tokens)
        got = gpu(tokens.cuda()).cpu()
    assert (got - want).norm() / want.norm() < 1e-2
    ids = ckpt.tokenizer.encode(PROMPTS[1])
    eager, _ = Generator(build_model(ckpt, device="cuda", dtype=torch.float16), 256, use_cuda_graph=False).generate(ids, 48)
    graph, _ = Generator(gpu, 256, use_cuda_graph=True).generate(ids, 48)
    assert graph == eager
