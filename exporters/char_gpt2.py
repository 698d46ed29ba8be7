"""Char GPT-2 export: a prefill graph and a decode-with-KV graph.

    prefill  idx (B, T) int64                                  -> logits (B, V) of the last position,
                                                                  present_k, present_v (L, B, H, T, D)
    decode   idx (B, 1), position (B, 1) int64, past_k, past_v  -> logits (B, V), present_k, present_v (P + 1)
             (L, B, H, P, D)

Positions are tensors in both graphs (prefill: 0..T-1 counted from idx, decode: the position input), so no traced
shape is frozen into the graph. The decode graph takes exactly one token: with one query, CausalSelfAttention
needs no mask (its shape-dependent branches only mask T > 1); the prefill passes its causal mask explicitly,
built from the input (onnx_graphs.attention_mask), so none of those branches is traced.
The runtime loop (runtimes/char_gpt2.py) re-prefills the last block_size tokens once the context is full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bytedeploy.exporters.onnx_graphs import (
    CACHE_AXES,
    PRESENT_AXES,
    attention_mask,
    cache_arrays,
    export_graph,
    layer_caches,
    prefill_caches,
    stacked,
)
from bytedeploy.verify import VerifyCase


def logits_at(model, idx, positions, caches, attn_mask=None):
    """char_gpt2.Model.logits with the positions (B, T) given as a tensor (GPT2Stack's pos_emb override)."""
    pos_emb = model.transformer.wpe(positions)
    return model.lm_head(model.transformer(model.wte(idx), caches, 0, attn_mask, pos_emb))


class Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        positions = torch.ones_like(idx).cumsum(1) - 1  # 0..T-1 from the input, not from a traced shape
        caches = prefill_caches(self.model.cfg.n_layer)
        mask = attention_mask(None, idx[0], self.model.wte.weight.dtype)
        logits = logits_at(self.model, idx, positions, caches, mask)
        return (logits[:, -1], *stacked(caches))


class Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, position, past_k, past_v):
        caches = layer_caches(past_k, past_v)
        logits = logits_at(self.model, idx, position, caches)
        return (logits[:, -1], *stacked(caches))


def export_graphs(model, cfg, folder: Path, precision: str, bitlinear: str | None, opset: int):
    model = model.eval()
    dtype = next(model.parameters()).dtype
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    B, T, P = 2, min(4, cfg.block_size), min(3, cfg.block_size - 1)
    idx = torch.arange(B * T).view(B, T) % cfg.vocab_size
    prefill = export_graph(
        Prefill(model), "prefill", (idx,), folder, ["idx"], ["logits", "present_k", "present_v"],
        {"idx": {0: "batch", 1: "seq"}, "logits": {0: "batch"}, "present_k": PRESENT_AXES,
         "present_v": PRESENT_AXES}, opset)
    past = torch.zeros(L, B, H, P, D, dtype=dtype)
    decode = export_graph(
        Decode(model), "decode", (idx[:, :1], torch.full((B, 1), P), past, past.clone()), folder,
        ["idx", "position", "past_k", "past_v"], ["logits", "present_k", "present_v"],
        {"idx": {0: "batch"}, "position": {0: "batch"}, "past_k": CACHE_AXES, "past_v": CACHE_AXES,
         "logits": {0: "batch"}, "present_k": PRESENT_AXES, "present_v": PRESENT_AXES}, opset)
    return [prefill, decode], {}


@torch.no_grad()
def verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]:
    """The prefill of random characters, then decode_steps single-token steps, each fed the eager caches of the
    step before; expected outputs from the model's own KV-cache path (model.logits with KVCache)."""
    model = model.eval()
    rng = np.random.default_rng(seed)
    n_prompt = max(2, min(16, cfg.block_size - decode_steps))
    steps = max(0, min(decode_steps, cfg.block_size - n_prompt))
    idx = rng.integers(1, cfg.vocab_size, (batch_size, n_prompt + steps))
    device = next(model.parameters()).device
    caches = model.transformer.make_caches(batch_size, n_prompt + steps)
    logits = model.logits(torch.from_numpy(idx[:, :n_prompt]).to(device), caches, 0)[:, -1]
    k, v = cache_arrays(caches, n_prompt)
    cases = [VerifyCase("prefill", "prefill", {"idx": idx[:, :n_prompt]},
                        {"logits": logits.cpu().numpy(), "present_k": k, "present_v": v})]
    for i in range(steps):
        n = n_prompt + i
        past_k, past_v = k, v
        logits = model.logits(torch.from_numpy(idx[:, n:n + 1]).to(device), caches, n)[:, -1]
        k, v = cache_arrays(caches, n + 1)
        cases.append(VerifyCase(
            "decode", f"decode {i}",
            {"idx": idx[:, n:n + 1], "position": np.full((batch_size, 1), n, dtype=np.int64),
             "past_k": past_k, "past_v": past_v},
            {"logits": logits.cpu().numpy(), "present_k": k, "present_v": v}))
    return cases
