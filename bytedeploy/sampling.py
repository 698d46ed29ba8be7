"""Sampling settings, and the numpy sampler that the bundle loops (runtimes/) draw with: no torch.

Order of operations follows the seeds (bGPT's ``samplings`` helpers): top-k, then top-p on the
temperature-1 distribution, then temperature on what survives. temperature == 0 means greedy (argmax).
``sample`` draws a batch of tokens from logits with a seeded ``np.random.Generator`` (the same seed gives the same
tokens on every run); ``sample_host`` is the seeds' one-token-at-a-time version kept for the eager-reference loops.
The eager and native loops sample on the device with the torch sampler of the same settings
(bytedeploy.models.sampling): greedy tokens are the same, seeded draws are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingConfig:
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    temperature: float = 1.0  # 0 = greedy
    seed: int = 0

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """A float32 copy with -inf for every logit outside the top-k and outside the smallest set whose probability
    reaches top_p."""
    logits = np.array(logits, dtype=np.float32)
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[..., V - top_k:V - top_k + 1]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, -1))
        drop_sorted = (np.cumsum(probs, -1) - probs) >= top_p  # keep the token that crosses top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits[drop] = -np.inf
    return logits


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution ``sample`` draws from (float32, last axis)."""
    return softmax(filter_logits(logits, cfg.top_k, cfg.top_p) / np.float32(max(cfg.temperature, 1e-8)))


def sample(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits (..., V) -> token ids (...) int64: argmax when greedy (no random numbers drawn), else one uniform per
    token through the inverse of the cumulative distribution."""
    if cfg.greedy:
        return np.asarray(logits).argmax(-1)
    cdf = np.cumsum(probabilities(logits, cfg), -1, dtype=np.float64)
    u = rng.random(cdf.shape[:-1])[..., None] * cdf[..., -1:]
    return np.minimum((cdf <= u).sum(-1), cdf.shape[-1] - 1)  # the first token whose cdf passes u


def sample_host(probs: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """The seeds' loop: probabilities copied to the host, filtered and drawn with numpy, one token at a time."""
    probs = np.asarray(probs, dtype=np.float64)
    if cfg.greedy:
        return int(np.argmax(probs))
    if cfg.top_k > 0:
        kth = np.sort(probs)[-min(cfg.top_k, probs.size)]
        probs = np.where(probs < kth, 0.0, probs)
        probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        drop = (cum - probs[order]) >= cfg.top_p
        probs = probs.copy()
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    with np.errstate(divide="ignore"):
        logits = np.log(probs) / cfg.temperature
    logits -= logits.max()
    p = np.exp(logits)
    p /= p.sum()
    return int(rng.choice(p.size, p=p))
