"""Tokenizers. Tiny configs use a word-level vocabulary built from the plan's own text (no
hub); real configs load the LM's transformers tokenizer by hub id or path. Both expose
the same few members: encode, decode, vocab_size, pad_id, eos_id, image_id.

Text never yields a special token: the conversation builder inserts `image_id` and
`eos_id` directly, and a caption that happens to contain "<image>" (or "<|endoftext|>",
"<|im_end|>", ...) is tokenized as plain characters: the word tokenizer splits "<" and
">" off every word, and the transformers tokenizer encodes with split_special_tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<eos>", "<image>"]
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    kind = "words"

    def __init__(self, vocab: list[str]):
        if vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError("vocabulary must start with the special tokens")
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.unk_id, self.eos_id, self.image_id = range(4)

    @classmethod
    def build(cls, texts: Iterable[str]) -> "WordTokenizer":
        words = set()
        for text in texts:
            words.update(WORD.findall((text or "").lower()))
        return cls(SPECIALS + sorted(words - set(SPECIALS)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in WORD.findall(text.lower())]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab}


class HFTokenizer:
    """A transformers tokenizer with `<image>` added as a special token."""

    kind = "hf"

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        self.name_or_path = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: "<image>" in a caption must not become the image slot
        # (training would then find more image positions than visual tokens)
        ids = self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        return [i for i in ids if i != self.image_id]  # belt and braces for tokenizers that ignore the flag

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name_or_path": self.name_or_path}


def tokenizer_from_dict(d: dict):
    return WordTokenizer(d["vocab"]) if d["kind"] == "words" else HFTokenizer(d["name_or_path"])


def save_tokenizer(tok, path: Path) -> None:
    Path(path).write_text(json.dumps(tok.to_dict()))


def load_tokenizer(path: Path):
    return tokenizer_from_dict(json.loads(Path(path).read_text()))
