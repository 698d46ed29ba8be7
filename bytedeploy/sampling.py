"""The one sampling module, shared by every family and runtime.

Order of operations follows the seeds (bGPT's ``samplings`` helpers): top-k, then top-p on the
temperature-1 distribution, then temperature on what survives. temperature == 0 means greedy (argmax).
``sample`` runs on the device with a seeded ``torch.Generator``; ``sample_host`` is the seeds' host-side
numpy version kept for the eager-reference loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability reaches top_p."""
    logits = logits.float()
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution ``sample`` draws from (float32, last dim)."""
    logits = filter_logits(logits, cfg.top_k, cfg.top_p)
    return (logits / max(cfg.temperature, 1e-8)).softmax(-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (..., V) -> token ids (...), on the logits' device, no host synchronisation."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, cfg)
    flat = probs.reshape(-1, probs.size(-1))
    # Exponential-race sampling (argmax p/E, E ~ Exp(1)) is multinomial sampling without a host sync.
    noise = torch.empty_like(flat).exponential_(1.0, generator=generator)
    return (flat / noise).argmax(-1).reshape(probs.shape[:-1])


def make_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


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
