"""The torch sampler of the eager and native loops: sampling on the device, no host synchronisation.

The same settings and order of operations as the numpy sampler of the bundle loops (bytedeploy.sampling): top-k,
then top-p on the temperature-1 distribution, then temperature on what survives; temperature 0 is greedy. Greedy
draws equal the numpy sampler's; seeded draws come from a torch.Generator and differ from numpy's.
"""

from __future__ import annotations

import torch

from bytedeploy.sampling import SamplingConfig


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
