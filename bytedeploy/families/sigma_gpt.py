"""sigma-GPT without torch: the model config, the character tokenizer of a checkpoint or bundle, prompt planning
and the random generation and scoring orders every backend draws alike (bytedeploy.models.sigma_gpt is the model
and its eager loops, runtimes/sigma_gpt.py the bundle loops)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.tokenizers import CharTokenizer

UNIT = "char"
TOKENIZER_FILE = "tokenizer.json"
START_TEXT = "\n"  # the known first character of an unprompted sample


@dataclass
class Config:
    vocab_size: int = 0  # set from the corpus's characters by prepare_config
    block_size: int = 256  # tokens the model reads; a training window holds block_size + 1
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    order: str = "shuffle"  # training order: "shuffle" (a fresh permutation per sequence) or "left-to-right"

    def __post_init__(self):
        if self.order not in ("shuffle", "left-to-right"):
            raise ValueError(f"order must be 'shuffle' or 'left-to-right', got {self.order!r}")
        if self.n_embd % self.n_head or self.n_embd % 2:
            raise ValueError(f"n_embd {self.n_embd} must be even and divide by n_head {self.n_head}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


PRESETS = {
    "tiny": dict(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0),
    "small": dict(),  # nanoGPT's shakespeare_char config, the paper's text setting
}


# ----------------------------------------------------------------------------------------------- generation


def load_tokenizer(options: dict) -> CharTokenizer | None:
    """The checkpoint's tokenizer (options["assets"]), or None before there is a checkpoint."""
    if options.get("tokenizer"):
        raise UserError("--tokenizer does not apply to sigma-gpt: it builds a character tokenizer from the data")
    if not options.get("assets"):
        return None
    path = Path(options["assets"]) / TOKENIZER_FILE
    if not path.is_file():
        return None
    return CharTokenizer.from_json(path.read_bytes(), str(path))


def order_rng(seed: int) -> np.random.Generator:
    """The random numbers of generation and scoring orders (and burst's acceptance tests): a stream of the seed
    apart from the sampler's, drawn on the host by every backend alike."""
    return np.random.default_rng([seed, 1])


def burst_draws(rng: np.random.Generator, n_orders: int, batch_size: int, n_remaining: int):
    """One burst iteration's random numbers: n_orders scoring orders of the R remaining positions per sample
    (N, B, R) int64 (each a permutation of 0..R-1) and the acceptance uniforms (B, R) float32. Every burst loop
    (eager, bundle) draws them here, so that a seed keeps the same orders and greedy burst output is the same."""
    perms = rng.random((n_orders, batch_size, n_remaining)).argsort(-1)
    u = rng.random((batch_size, n_remaining), dtype=np.float32)
    return perms, u


def generation_orders(n_prompt: int, n_new: int, batch_size: int, mode: str, seed: int) -> np.ndarray:
    """(batch_size, n_prompt + n_new) generation orders: the prompt left to right, then the new positions
    left to right or in a random order per row (seeded, the same for every backend)."""
    new = np.arange(n_prompt, n_prompt + n_new)
    if mode == "left-to-right":
        rows = [new] * batch_size
    elif mode == "random":
        rng = order_rng(seed)
        rows = [rng.permutation(new) for _ in range(batch_size)]
    else:
        raise UserError(f"unknown generation order {mode!r}; use 'left-to-right' or 'random'")
    return np.stack([np.concatenate([np.arange(n_prompt), r]) for r in rows])


def filled_prefix(seq: np.ndarray, filled: np.ndarray, start: int) -> list[np.ndarray]:
    """Each row's tokens (B, L) from start up to its first position not yet generated (filled (B, L)): what an
    any-order sample has made of its text so far, a prefix of the final one."""
    ends = [start + int(np.argmin(np.append(f[start:], False))) for f in filled]
    return [row[start:end] for row, end in zip(seq, ends)]


def plan_prompt(cfg: Config, tokenizer: CharTokenizer, request: GenerateRequest) -> tuple[list[int], int]:
    """-> (prompt ids cropped to fit, new characters). All of it lives in one context of block_size + 1."""
    try:
        text = request.prompt.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt is not valid UTF-8: byte 0x{request.prompt[e.start]:02x} at offset {e.start}") \
            from None
    ids = tokenizer.encode(text or START_TEXT)
    context = cfg.block_size + 1
    n_new = request.max_new or max(context - len(ids), context // 2)
    if n_new > cfg.block_size:
        raise UserError(f"sigma-gpt samples inside one context: at most {cfg.block_size} new characters "
                        f"(--max-new), asked for {n_new}")
    return ids[-(context - n_new):], n_new
