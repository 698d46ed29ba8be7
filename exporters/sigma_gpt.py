"""sigma-GPT export: prefill, decode-with-KV and burst-proposal graphs, all taking the order positions.

Every token comes with two positions (the double positional encoding): ``here``, where it sits, and
``following``, the position of the token it predicts. Slots in the cache are generation steps, not positions.

    prefill         tokens, here, following (B, T) int64         -> logits (B, V) of the last token,
                                                                   present_k, present_v (L, B, H, T, D)
    decode          tokens, here, following (B, T) int64,        -> logits (B, T, V), present_k, present_v
                    past_k, past_v (L, B, H, P, D)                  (L, B, H, P + T, D)
    burst_proposal  tokens, here, following (B, R) int64,        -> logits (B, R, V)
                    past_k, past_v (L, B, H, P, D)

decode's T new tokens attend to the whole past and causally among themselves: T = 1 is the ordered loop's step,
T = R the burst loop's scoring pass over the proposals in one order (rows = orders x samples). burst_proposal's
queries (the last known token once per remaining position) attend to the past and to themselves only, and write
no cache. All masks are built inside the graphs from their inputs (onnx_graphs.attention_mask), so no branch of
CausalSelfAttention that depends on traced shapes is taken. The loops are in runtimes/sigma_gpt.py.
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

TOKEN_AXES = {0: "batch", 1: "seq"}
INPUTS = ["tokens", "here", "following"]


class Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, here, following):
        caches = prefill_caches(self.model.cfg.n_layer)
        mask = attention_mask(None, tokens[0], self.model.wte.weight.dtype)
        logits = self.model.logits(tokens, here, following, caches, 0, mask)
        return (logits[:, -1], *stacked(caches))


class Decode(nn.Module):
    """T new tokens after the past, causal among themselves; or, diagonal=True, the burst proposal queries."""

    def __init__(self, model, diagonal: bool = False):
        super().__init__()
        self.model = model
        self.diagonal = diagonal

    def forward(self, tokens, here, following, past_k, past_v):
        caches = layer_caches(past_k, past_v)
        mask = attention_mask(past_k[0, 0, 0, :, 0], tokens[0], self.model.wte.weight.dtype, self.diagonal)
        logits = self.model.logits(tokens, here, following, caches, 0, mask)
        return logits if self.diagonal else (logits, *stacked(caches))


def export_graphs(model, cfg, folder: Path, precision: str, bitlinear: str | None, opset: int):
    model = model.eval()
    dtype = model.wte.weight.dtype
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    B, T, P = 2, 3, 2
    pos = torch.arange(T + 1).flip(0).expand(B, -1)  # any positions: the graphs take them as inputs
    example = (torch.arange(B * T).view(B, T) % cfg.vocab_size, pos[:, :-1], pos[:, 1:])
    axes = {name: TOKEN_AXES for name in INPUTS}
    prefill = export_graph(
        Prefill(model), "prefill", example, folder, INPUTS, ["logits", "present_k", "present_v"],
        {**axes, "logits": {0: "batch"}, "present_k": PRESENT_AXES, "present_v": PRESENT_AXES}, opset)
    past = torch.zeros(L, B, H, P, D, dtype=dtype)
    with_past = (*example, past, past.clone())
    axes.update(past_k=CACHE_AXES, past_v=CACHE_AXES)
    decode = export_graph(
        Decode(model), "decode", with_past, folder, [*INPUTS, "past_k", "past_v"],
        ["logits", "present_k", "present_v"],
        {**axes, "logits": TOKEN_AXES, "present_k": PRESENT_AXES, "present_v": PRESENT_AXES}, opset)
    proposal = export_graph(
        Decode(model, diagonal=True), "burst_proposal", with_past, folder, [*INPUTS, "past_k", "past_v"],
        ["logits"], {**axes, "logits": TOKEN_AXES}, opset)
    return [prefill, decode, proposal], {}


@torch.no_grad()
def verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]:
    """Random characters read in a random order per row: the prefill, decode_steps single-token steps (each fed the
    eager caches of the step before), then one burst proposal pass and one scoring pass (decode over R tokens) on
    the final cache. Expected outputs from the model's own KV-cache path (Model.logits with KVCache)."""
    model = model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    B, R = batch_size, min(4, max(1, cfg.block_size - 2))
    n_prompt = max(1, min(16, cfg.block_size - R - decode_steps))
    steps = max(0, min(decode_steps, cfg.block_size - R - n_prompt))
    n_total = n_prompt + steps
    tokens = rng.integers(0, cfg.vocab_size, (B, n_total + R))
    order = np.stack([rng.permutation(cfg.block_size + 1) for _ in range(B)])

    def feeds(tok, start, end):  # tokens at generation steps [start, end) with their two positions
        return {"tokens": tok, "here": order[:, start:end], "following": order[:, start + 1:end + 1]}

    def logits(f, start, mask=None):
        t = {k: torch.from_numpy(v).to(device) for k, v in f.items()}
        return model.logits(t["tokens"], t["here"], t["following"], caches, start, mask)

    caches = model.transformer.make_caches(B, n_total + R)
    f = feeds(tokens[:, :n_prompt], 0, n_prompt)
    out = logits(f, 0)[:, -1].cpu().numpy()
    k, v = cache_arrays(caches, n_prompt)
    cases = [VerifyCase("prefill", "prefill", f, {"logits": out, "present_k": k, "present_v": v})]
    for i in range(steps):
        n = n_prompt + i
        f = dict(feeds(tokens[:, n:n + 1], n, n + 1), past_k=k, past_v=v)
        out = logits(f, n).cpu().numpy()
        k, v = cache_arrays(caches, n + 1)
        cases.append(VerifyCase("decode", f"decode {i}", f, {"logits": out, "present_k": k, "present_v": v}))
    # the burst passes on the final cache: the last token queried for R positions, then R proposals in one order
    n = n_total
    f = {"tokens": np.repeat(tokens[:, n:n + 1], R, 1), "here": np.repeat(order[:, n:n + 1], R, 1),
         "following": order[:, n + 1:n + 1 + R], "past_k": k, "past_v": v}
    mask = torch.cat([torch.ones(R, n, dtype=torch.bool), torch.eye(R, dtype=torch.bool)], 1).to(device)
    out = logits({name: f[name] for name in INPUTS}, n, mask).cpu().numpy()
    cases.append(VerifyCase("burst_proposal", "burst proposal", f, {"logits": out}))
    f = dict(feeds(tokens[:, n:n + R], n, n + R), past_k=k, past_v=v)
    out = logits({name: f[name] for name in INPUTS}, n).cpu().numpy()
    k, v = cache_arrays(caches, n + R)
    cases.append(VerifyCase("decode", f"score {R}", f, {"logits": out, "present_k": k, "present_v": v}))
    return cases
