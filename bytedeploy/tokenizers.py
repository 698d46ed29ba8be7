"""Character tokenizer (char GPT-2, sigma-GPT): the corpus's characters plus an unknown symbol never sampled."""

from __future__ import annotations

import json
from dataclasses import dataclass

from bytedeploy.errors import UserError

UNKNOWN = "\ufffd"


@dataclass
class CharTokenizer:
    chars: list[str]  # index 0 is the unknown symbol

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls([UNKNOWN] + sorted(set(text) - {UNKNOWN}))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def unknown_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        return [index.get(c, 0) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> bytes:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: str = "tokenizer") -> CharTokenizer:
        try:
            doc = json.loads(data)
            assert doc["type"] == "char" and doc["chars"][0] == UNKNOWN
            return cls(list(doc["chars"]))
        except (ValueError, KeyError, AssertionError, TypeError):
            raise UserError(f"corrupt char tokenizer: {source}") from None
