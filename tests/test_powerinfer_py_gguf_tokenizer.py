import os

import pytest
import tokenizers

from powerinfer_py.gguf_tokenizer import PIPELINE_KEY, tokenizer_from_metadata, tokenizer_metadata
from tiny_models import TEXT, write_bpe_tokenizer

SAMPLES = [TEXT, "  leading spaces\tand tabs\n\nnew lines 2024-11-22 3.14159",
           "<s>special</s> tokens <|endoftext|> inline", "unseen: Ωμέγα ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u00a0nbsp"]


def metadata_of(folder, vocab_size, drop=()):
    return {k: (v[1] if t.name == "ARRAY" else v) for k, t, v in tokenizer_metadata(folder, vocab_size, False)
            if k not in drop}


def assert_same_encoding(ref, built, texts):
    for text in texts:
        want = ref.encode(text, add_special_tokens=False).ids
        assert built.encode(text, add_special_tokens=False).ids == want
        assert built.decode(want, skip_special_tokens=False) == ref.decode(want, skip_special_tokens=False)


@pytest.mark.parametrize("drop", [(), (PIPELINE_KEY,)], ids=["pipeline-key", "llama.cpp-keys-only"])
def test_byte_level_bpe_round_trip(tmp_path, drop):
    write_bpe_tokenizer(str(tmp_path))
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    md = metadata_of(str(tmp_path), vocab_size=320, drop=drop)
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    assert len(md["tokenizer.ggml.tokens"]) == 320 and md["tokenizer.ggml.tokens"][-1] == "[PAD319]"
    assert md["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and md["tokenizer.ggml.token_type"][-1] == 5
    assert md["tokenizer.ggml.merges"][0].count(" ") == 1
    assert md["tokenizer.chat_template"] == "{{ messages }}"
    assert_same_encoding(ref, tokenizer_from_metadata(md, "test"), SAMPLES)


def test_real_smollm2_tokenizer(tmp_path):
    from conftest import shared_path

    folder = os.path.dirname(shared_path("models", "relu-smollm2-135m", "tokenizer.json"))
    ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    with open(shared_path("data", "wiki-dev.txt"), encoding="utf-8") as f:
        text = f.read()[:100_000]
    for drop in [(), (PIPELINE_KEY,)]:
        built = tokenizer_from_metadata(metadata_of(folder, 49152, drop), "smollm2")
        assert_same_encoding(ref, built, [text] + SAMPLES)


def test_sentencepiece_round_trip(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 5 + "\n".join(SAMPLES), encoding="utf-8")
    # Llama's settings: BPE, byte fallback, no normalisation (what llama.cpp's SPM tokenizer assumes)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, minloglevel=2, bos_id=1, eos_id=2, unk_id=0)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    md = metadata_of(str(tmp_path), vocab_size=400)
    assert md["tokenizer.ggml.model"] == "llama" and len(md["tokenizer.ggml.scores"]) == 400
    assert md["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    built = tokenizer_from_metadata(md, "spm")
    for text in SAMPLES:
        if "<s>" in text:  # SentencePiece reads control tokens in text as characters; HF tokenizers (and ours) don't
            continue
        ids = sp.encode(text)
        assert built.encode(text, add_special_tokens=False).ids == ids
        assert built.decode(ids) == sp.decode(ids)


def test_no_tokenizer_keys_means_none():
    assert tokenizer_from_metadata({"general.architecture": "llama"}, "x") is None
