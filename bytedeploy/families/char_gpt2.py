"""Char GPT-2 without torch: the model config, the character tokenizer of a checkpoint or bundle, prompts
(bytedeploy.models.char_gpt2 is the model, runtimes/char_gpt2.py the bundle loop)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.tokenizers import CharTokenizer

UNIT = "char"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_NEW = 1000  # GPT-burn run's --n-new-tokens


@dataclass
class Config:
    block_size: int = 64  # context length
    vocab_size: int = 0  # set from the corpus (or the stored tokenizer) by prepare_config
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64  # d_model
    dropout: float = 0.2
    gelu: str = "none"  # "none" = exact erf GELU (Burn's); "tanh" = OpenAI GPT-2's approximation

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must divide by n_head {self.n_head}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gelu not in ("none", "tanh"):
            raise ValueError(f"gelu must be 'none' (erf) or 'tanh', got {self.gelu!r}")


PRESETS = {
    "tiny": dict(block_size=64, n_embd=64, n_layer=2, n_head=2),  # GPT-burn's train defaults
    "toy": dict(block_size=128, n_embd=768, n_layer=12, n_head=12),  # GPT-burn's published 83M toy model
}


# ----------------------------------------------------------------------------------------------- prompts and tokens


def load_tokenizer(options: dict) -> CharTokenizer | None:
    """The checkpoint's tokenizer (options["assets"]) or a --tokenizer file; None when neither is given."""
    if options.get("assets"):
        path = Path(options["assets"]) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"checkpoint has no char tokenizer: {path} is missing")
        return CharTokenizer.from_json(path.read_bytes(), str(path))
    if options.get("tokenizer"):
        path = Path(options["tokenizer"])
        if not path.is_file():
            raise UserError(f"tokenizer not found: {path}")
        return CharTokenizer.from_json(path.read_bytes(), str(path))
    return None


def prompt_ids(request: GenerateRequest, tokenizer: CharTokenizer) -> list[int]:
    try:
        text = request.prompt.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt is not valid UTF-8: byte 0x{request.prompt[e.start]:02x} at offset {e.start}") \
            from None
    return tokenizer.encode(text or "\n")


def mask_unknown(logits: np.ndarray, unknown_id: int) -> np.ndarray:
    """The unknown symbol stands for characters the model never saw: it must never be emitted. A float32 copy
    (bytedeploy.models.char_gpt2.mask_unknown is the same on a torch tensor)."""
    logits = np.array(logits, dtype=np.float32)
    logits[..., unknown_id] = -np.inf
    return logits
