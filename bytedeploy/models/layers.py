"""GPT-2 building blocks shared by the GPT-2-shaped families (bGPT's two decoders, char GPT-2, sigma-GPT).

Parameter names follow Hugging Face's GPT-2 (``h.{i}.attn.c_attn`` ...) so that published weights map by name;
our projections are ``nn.Linear`` (out, in), theirs ``Conv1D`` (in, out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.kv_cache import KVCache


@dataclass
class GPT2StackConfig:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    dropout: float = 0.0
    bias: bool = True  # biases on the attention projections (GPT-2: yes; GPT-burn: no)
    mlp_bias: bool = True
    gelu: str = "tanh"  # GPT-2's gelu_new is the tanh approximation; "none" is the exact erf GELU
    layer_norm_eps: float = 1e-5


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Boolean mask (n_query, n_key): query i, the last n_query of n_key positions, sees keys up to its own."""
    offset = n_key - n_query
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=offset)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2StackConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache: KVCache | None = None, start: int = 0, attn_mask: torch.Tensor | None = None):
        """x (B, T, C). With a cache, the T new keys are written at [start, start+T) and attention spans
        [0, start+T). attn_mask (T, L) or (B, 1, T, L), True = may attend, overrides the causal default."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(start, k, v)
        n_key = k.size(2)
        is_causal = False
        if attn_mask is None and T > 1:
            if n_key == T:
                is_causal = True
            else:
                attn_mask = causal_mask(T, n_key, x.device)
        p = self.dropout if self.training else 0.0
        # the default scale, as a constant: an exported graph would otherwise compute it from q's shape (host values
        # on the device, which keeps ONNX Runtime from capturing the step in a CUDA graph)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal,
                                           scale=1.0 / math.sqrt(C // self.n_head))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2StackConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.mlp_bias)
        self.gelu = nn.GELU(approximate=cfg.gelu)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPT2StackConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, start=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cache, start, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Stack(nn.Module):
    """Learned positions + pre-LN blocks + final LayerNorm, over input embeddings the caller makes."""

    def __init__(self, cfg: GPT2StackConfig):
        super().__init__()
        self.cfg = cfg
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)

    def forward(self, embeds, caches: list[KVCache] | None = None, start: int = 0, attn_mask=None, pos_emb=None):
        """embeds (B, T, C) -> hidden (B, T, C). pos_emb overrides the learned positions start..start+T-1."""
        T = embeds.size(1)
        if start + T > self.cfg.n_positions:
            raise ValueError(f"sequence of {start + T} positions exceeds the model's {self.cfg.n_positions}")
        if pos_emb is None:
            pos_emb = self.wpe(torch.arange(start, start + T, device=embeds.device))
        x = self.drop(embeds + pos_emb)
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[i], start, attn_mask)
        return self.ln_f(x)

    def make_caches(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> list[KVCache]:
        cfg = self.cfg
        ref = self.wpe.weight
        return [
            KVCache(batch_size, cfg.n_head, max_len or cfg.n_positions, cfg.n_embd // cfg.n_head,
                    device=device or ref.device, dtype=dtype or ref.dtype)
            for _ in range(cfg.n_layer)
        ]


def init_gpt2_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
