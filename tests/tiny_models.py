"""Tiny random checkpoints for format and conversion tests: a byte-level BPE tokenizer trained in milliseconds,
a Hugging Face Llama folder written by transformers, and a predictor folder of the right shapes."""
import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ("The quick brown fox jumps over the lazy dog. Sparse inference keeps hot neurons on the GPU and cold "
        "neurons on the CPU; 12345 numbers, naïve café, 日本語 and émojis 🙂 too.\n") * 20
SPECIAL = ["<|endoftext|>", "<s>", "</s>"]


def write_bpe_tokenizer(folder: str, vocab_size: int = 300) -> None:
    """tokenizer.json (byte-level BPE, digits split, like SmolLM2's) and tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": False, "chat_template": "{{ messages }}"}, f)


def write_hf_llama(folder: str, seed: int = 0, safe_serialization: bool = True, max_shard_size=None,
                   dtype=torch.float32, **overrides):
    """A random transformers LlamaForCausalLM (ReLU by default, random norms) saved with a tokenizer."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, hidden_act="relu", max_position_embeddings=128, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=safe_serialization, **kw)
    write_bpe_tokenizer(folder)
    return model


def write_predictors(folder: str, n_layers=2, dim=64, n_ff=160, ranks=(16, 32), threshold=0.25, seed=1):
    from powerinfer_py.formats import save_predictors

    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    layers = [{"fc1.weight": torch.randn(ranks[i % len(ranks)], dim, generator=g),
               "fc2.weight": torch.randn(n_ff, ranks[i % len(ranks)], generator=g)} for i in range(n_layers)]
    save_predictors(folder, layers, threshold)
    return layers
