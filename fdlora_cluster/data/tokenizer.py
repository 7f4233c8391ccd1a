"""Tokenizers: the model's own (from a local checkpoint) or a byte-level one that needs no download.

Both expose the same small surface the trainer uses: `encode(text) -> list[int]`, `decode(ids)`,
`pad_id`, `eos_id`, `vocab_size`, `save_pretrained(dir)`, and for chat rows `chat_template`
(None when there is none: the byte tokenizer never has one) and `render_chat(messages, ...)`.
"""

from __future__ import annotations

import json
import os


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus pad (256) and eos (257). Used with models built from config."""

    pad_id = 256
    eos_id = 257
    vocab_size = 258
    chat_template = None  # chat rows use the plain fallback (chat.py)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "byte_tokenizer.json"), "w") as f:
            json.dump({"type": "ByteTokenizer", "pad_id": self.pad_id, "eos_id": self.eos_id,
                       "vocab_size": self.vocab_size}, f)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local checkpoint directory."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer in {path} has no eos token; set one in its tokenizer_config.json")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)
        self.chat_template = getattr(self.tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def render_chat(self, messages, add_generation_prompt: bool) -> str:
        """(role, content) pairs as text, by the tokenizer's own chat template."""
        conv = [{"role": r, "content": c} for r, c in messages]
        return self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


def get_tokenizer(model_path: str | None):
    return HFTokenizer(model_path) if model_path else ByteTokenizer()
