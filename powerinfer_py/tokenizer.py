"""One tokenizer interface over the `tokenizers` library (tokenizer.json, or built from GGUF metadata) and
SentencePiece (tokenizer.model)."""
from __future__ import annotations

import json
import os

from .errors import InputError, ModelFormatError


class Tokenizer:
    def __init__(self, backend, bos_id: int | None, eos_ids, add_bos: bool, chat_template: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
        self.bos_id, self.eos_ids, self.add_bos = bos_id, tuple(eos_ids), add_bos
        self.chat_template = chat_template

    def apply_chat(self, user_message: str) -> str:
        """The prompt text for one user turn, rendered with the model's Jinja chat template."""
        if not self.chat_template:
            raise InputError("--chat: the model has no chat template")
        import jinja2

        template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template)
        return template.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                               bos_token="", eos_token="")

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if hasattr(self.backend, "encode_as_ids"):
            ids = self.backend.encode_as_ids(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        ids = list(ids)
        if hasattr(self.backend, "decode_ids"):
            return self.backend.decode_ids(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    @classmethod
    def from_hf_folder(cls, folder: str, bos_id, eos_ids) -> "Tokenizer":
        """tokenizer.json (fast tokenizer) or tokenizer.model (SentencePiece); add_bos from tokenizer_config.json."""
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = {}
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        json_path, spm_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
        if os.path.exists(json_path):
            import tokenizers

            try:
                backend = tokenizers.Tokenizer.from_file(json_path)
            except Exception as e:
                raise ModelFormatError(f"{json_path}: cannot read tokenizer ({e})") from None
            add_bos = cfg.get("add_bos_token", _post_processor_adds_bos(json_path))
        elif os.path.exists(spm_path):
            import sentencepiece

            backend = sentencepiece.SentencePieceProcessor()
            if not backend.load(spm_path):
                raise ModelFormatError(f"{spm_path}: cannot read SentencePiece model")
            add_bos = cfg.get("add_bos_token", True)
        else:
            raise ModelFormatError(f"{folder}: no tokenizer.json or tokenizer.model")
        return cls(backend, bos_id, eos_ids, bool(add_bos), cfg.get("chat_template"))


def _post_processor_adds_bos(json_path: str) -> bool:
    """Whether tokenizer.json's post-processor prepends a special token (Llama-2/3 style TemplateProcessing)."""
    with open(json_path) as f:
        post = json.load(f).get("post_processor") or {}
    single = post.get("single") or []
    return bool(single) and "SpecialToken" in single[0]
