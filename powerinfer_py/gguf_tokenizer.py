"""Tokenizers in GGUF metadata, both ways: llama.cpp's tokenizer keys from a Hugging Face folder, and a
`tokenizers.Tokenizer` rebuilt from those keys.

Two vocabularies, as in llama.cpp: byte-level BPE (`gpt2`: tokens and merges, from tokenizer.json) and
SentencePiece (`llama`: tokens with scores, from tokenizer.model). llama.cpp's keys do not say how text is split
before BPE, so files we write also carry `powerinfer_py.tokenizer_pipeline`: tokenizer.json without its
vocabulary (normalizer, pre-tokenizer, decoder, model options), which makes the rebuilt tokenizer exact.
Files without it get the pipeline that `tokenizer.ggml.pre` names (gpt2's when unknown).
"""
from __future__ import annotations

import json
import os

import tokenizers
from gguf import GGUFValueType, TokenType

from .errors import ModelFormatError, UnsupportedModelError

PIPELINE_KEY = "powerinfer_py.tokenizer_pipeline"
V = GGUFValueType

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> tokenizer.json pre_tokenizer
    "default": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}
_GPT2_PIPELINE = {"normalizer": None, "decoder": _BYTE_LEVEL,
                  "model": {"type": "BPE", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}}
_SPM_PIPELINE = {  # SentencePiece with a dummy prefix and byte fallback, as llama.cpp's SPM tokenizer runs it
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "fuse_unk": True, "byte_fallback": True, "ignore_merges": False},
}


# ------------------------------------------------------------------------------------ HF folder -> keys

def tokenizer_metadata(folder: str, vocab_size: int, add_bos: bool) -> list[tuple]:
    """llama.cpp's tokenizer keys (plus our pipeline key) for the tokenizer in a Hugging Face folder, with the
    token list padded to the model's vocab_size. The bos/eos ids belong to the model's config (config_metadata)."""
    json_path, spm_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    tok = _read_json(json_path) if os.path.exists(json_path) else None
    if tok is not None and _is_byte_level_bpe(tok):
        keys = _gpt2_keys(tok, vocab_size, json_path)
    elif os.path.exists(spm_path):
        keys = _spm_keys(spm_path, vocab_size)
    else:
        raise UnsupportedModelError(f"{folder}: needs a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model")
    keys.append(("tokenizer.ggml.add_bos_token", V.BOOL, bool(add_bos)))
    template = _read_json(os.path.join(folder, "tokenizer_config.json"), {}).get("chat_template")
    if isinstance(template, str):
        keys.append(("tokenizer.chat_template", V.STRING, template))
    return keys


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e})") from None


def _is_byte_level_bpe(tok: dict) -> bool:
    return tok.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(tok.get("pre_tokenizer"))


def _padded(tokens: dict[int, str], types: dict[int, int], vocab_size: int, source: str):
    n = max(tokens) + 1
    if n > vocab_size:
        raise ModelFormatError(f"{source}: tokenizer has {n} tokens, the model's vocab_size is {vocab_size}")
    ids = range(vocab_size)
    return ([tokens.get(i, f"[PAD{i}]") for i in ids],
            [types.get(i, TokenType.NORMAL if i in tokens else TokenType.UNUSED) for i in ids])


def _gpt2_keys(tok: dict, vocab_size: int, source: str) -> list[tuple]:
    model = tok["model"]
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {}
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    token_list, type_list = _padded(tokens, types, vocab_size, source)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = next((name for name, p in PRE_TOKENIZERS.items() if p == tok.get("pre_tokenizer")), "default")
    pipeline = {"normalizer": tok.get("normalizer"), "pre_tokenizer": tok.get("pre_tokenizer"),
                "decoder": tok.get("decoder"),
                "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")}}
    return [("tokenizer.ggml.model", V.STRING, "gpt2"), ("tokenizer.ggml.pre", V.STRING, pre),
            ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, token_list)),
            ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [int(t) for t in type_list])),
            ("tokenizer.ggml.merges", V.ARRAY, (V.STRING, merges)),
            (PIPELINE_KEY, V.STRING, json.dumps(pipeline))]


def _spm_keys(path: str, vocab_size: int) -> list[tuple]:
    try:
        import sentencepiece
    except ImportError:
        raise UnsupportedModelError(f"{path}: reading a SentencePiece tokenizer needs the sentencepiece package") from None
    sp = sentencepiece.SentencePieceProcessor()
    if not sp.load(path):
        raise ModelFormatError(f"{path}: cannot read SentencePiece model")
    tokens, scores, types = {}, {}, {}
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                    else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    token_list, type_list = _padded(tokens, types, vocab_size, path)
    keys = [("tokenizer.ggml.model", V.STRING, "llama"),
            ("tokenizer.ggml.tokens", V.ARRAY, (V.STRING, token_list)),
            ("tokenizer.ggml.scores", V.ARRAY, (V.FLOAT32, [scores.get(i, -1e4) for i in range(vocab_size)])),
            ("tokenizer.ggml.token_type", V.ARRAY, (V.INT32, [int(t) for t in type_list]))]
    if sp.unk_id() >= 0:
        keys.append(("tokenizer.ggml.unknown_token_id", V.UINT32, sp.unk_id()))
    return keys


# ------------------------------------------------------------------------------------ keys -> tokenizer

def tokenizer_from_metadata(metadata: dict, source: str) -> tokenizers.Tokenizer | None:
    """The tokenizer the GGUF keys describe, or None when the file has no tokenizer."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        return None
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError(f"{source}: tokenizer.ggml.tokens is missing")
    types = metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if kind == "gpt2":
        pipeline = {**_GPT2_PIPELINE, "pre_tokenizer": PRE_TOKENIZERS.get(metadata.get("tokenizer.ggml.pre"), _BYTE_LEVEL)}
        merges = [m.split(" ", 1) for m in metadata.get("tokenizer.ggml.merges", [])]
    elif kind == "llama":
        pipeline = _SPM_PIPELINE
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges = _merges_from_scores(tokens, scores, types)
    else:
        raise UnsupportedModelError(f"{source}: tokenizer model {kind!r} is not supported (gpt2, llama)")
    if PIPELINE_KEY in metadata:
        pipeline = json.loads(metadata[PIPELINE_KEY])
    model = {**pipeline["model"], "vocab": {t: i for i, t in enumerate(tokens) if types[i] != TokenType.UNUSED},
             "merges": merges}
    if model.get("byte_fallback") and model.get("unk_token") is None and "tokenizer.ggml.unknown_token_id" in metadata:
        model["unk_token"] = tokens[metadata["tokenizer.ggml.unknown_token_id"]]
    special = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == TokenType.USER_DEFINED, "special": types[i] != TokenType.USER_DEFINED}
             for i in range(len(tokens)) if types[i] in special]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": pipeline["normalizer"], "pre_tokenizer": pipeline["pre_tokenizer"],
            "post_processor": None, "decoder": pipeline["decoder"], "model": model}
    try:
        return tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise ModelFormatError(f"{source}: cannot build the tokenizer from its metadata ({e})") from None


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[list[str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest; as ranked BPE merges that is
    every split of every normal piece into two pieces, ordered by the joined piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]
