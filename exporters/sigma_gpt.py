"""sigma-GPT export: the ordered loop's step graphs over static KV caches, and the burst loop's passes.

Every token comes with two positions (the double positional encoding): ``here``, where it sits, and
``following``, the position of the token it predicts. Cache slots are generation steps, not positions.

    prefill         tokens, here, following (b, S) int64, rows (b,), past_k.i / past_v.i (B, H, T, D)
                    -> logits (b, V) of the last token, present caches (the rows' slots 0..S-1 written)
    decode          seq (B, N) the tokens in generation order, pos (B,) each row's step, orders (B, N) the positions
                    in generation order, past caches -> logits (B, V) of seq[b, pos[b]] at here = orders[pos],
                    following = orders[pos + 1], written at slot pos; seq_out (the argmax at pos + 1), pos_out,
                    present caches (onnx_graphs' token decode with sigma-GPT's positions)
    sample          logits, u, temperature, top_k, top_p, seq, pos -> seq_out
    score           tokens, here, following (B, S), start (B,), past caches -> logits (B, S, V), present caches:
                    S new tokens at slots start.. of each row, causal among themselves (burst's scoring pass)
    burst_proposal  the same inputs -> logits (B, S, V): each query sees the slots before start and itself, and no
                    cache is kept (burst's proposal pass: the last known token queried for every remaining position)

Masks are built inside the graphs from their inputs (onnx_graphs.slot_mask and attention_mask), so no branch of
CausalSelfAttention that depends on traced shapes is taken. The loops are in runtimes/sigma_gpt.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bytedeploy.exporters.onnx_graphs import (
    SEQ_AXES,
    attention_mask,
    cache_axes,
    cache_names,
    count_up,
    empty_caches,
    export_graph,
    export_opset,
    export_sample_graph,
    put,
    row_caches,
    slot_caches,
    slot_mask,
    take,
    written,
)
from bytedeploy.verify import VerifyCase

TOKEN_AXES = {0: "batch", 1: "seq"}
INPUTS = ["tokens", "here", "following"]


class Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, here, following, rows, *caches):
        step_caches = row_caches(list(caches), rows)
        mask = attention_mask(None, tokens[0], self.model.wte.weight.dtype)
        logits = self.model.logits(tokens, here, following, step_caches, 0, mask)
        return (logits[:, -1], *written(step_caches))


class Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, seq, pos, orders, *caches):
        at = torch.minimum(pos, count_up(caches[0][0, 0, :, 0])[-1])[:, None]
        step_caches = slot_caches(list(caches), at)
        mask = slot_mask(caches[0], at, self.model.wte.weight.dtype)
        logits = self.model.logits(take(seq, pos), take(orders, pos), take(orders, pos + 1), step_caches, 0,
                                   mask)[:, -1]
        return (logits, put(seq, pos + 1, logits.argmax(-1)), pos + 1, *written(step_caches))


class Extend(nn.Module):
    """S new tokens per row at slots start..start+S-1: causal among themselves (score), or each query on its own
    (diagonal: burst_proposal, which keeps no cache)."""

    def __init__(self, model, diagonal: bool = False):
        super().__init__()
        self.model = model
        self.diagonal = diagonal

    def forward(self, tokens, here, following, start, *caches):
        slots = start[:, None] + count_up(tokens[0])[None]
        step_caches = slot_caches(list(caches), slots)
        mask = slot_mask(caches[0], slots, self.model.wte.weight.dtype, self.diagonal)
        logits = self.model.logits(tokens, here, following, step_caches, 0, mask)
        return logits if self.diagonal else (logits, *written(step_caches))


def export_graphs(model, cfg, folder: Path, precision: str, bitlinear: str | None, opset: int):
    model = model.eval()
    dtype = model.wte.weight.dtype
    opset = export_opset(opset)
    L, H, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    B, S, T, N = 2, 3, 6, 7
    caches = empty_caches(L, B, H, T, D, dtype)
    past, present = cache_names(L), cache_names(L, "present")
    axes = cache_axes(L)
    pos = torch.arange(S + 1).flip(0).expand(B, -1)  # any positions: the graphs take them as inputs
    example = (torch.arange(B * S).view(B, S) % cfg.vocab_size, pos[:, :-1], pos[:, 1:])
    token_axes = {name: TOKEN_AXES for name in INPUTS}
    prefill = export_graph(
        Prefill(model), "prefill", (*example, torch.tensor([1, 0]), *caches), folder, [*INPUTS, "rows", *past],
        ["logits", *present], {**token_axes, "rows": {0: "batch"}, "logits": {0: "batch"}, **axes}, opset)
    seq = torch.arange(B * N).view(B, N) % cfg.vocab_size
    orders = torch.arange(N).flip(0).expand(B, -1)
    decode = export_graph(
        Decode(model), "decode", (seq, torch.tensor([2, 4]), orders, *caches), folder, ["seq", "pos", "orders", *past],
        ["logits", "seq_out", "pos_out", *present],
        {"seq": SEQ_AXES, "seq_out": SEQ_AXES, "orders": SEQ_AXES, "pos": {0: "batch"}, "pos_out": {0: "batch"},
         "logits": {0: "batch"}, **axes}, opset)
    extend_args = (*example, torch.tensor([1, 2]), *caches)
    extend_axes = {**token_axes, "start": {0: "batch"}, "logits": TOKEN_AXES, **axes}
    score = export_graph(Extend(model), "score", extend_args, folder, [*INPUTS, "start", *past],
                         ["logits", *present], extend_axes, opset)
    proposal = export_graph(Extend(model, diagonal=True), "burst_proposal", extend_args, folder,
                            [*INPUTS, "start", *past], ["logits"], extend_axes, opset)
    sample = export_sample_graph(folder, cfg.vocab_size, dtype, opset)
    return [prefill, decode, sample, score, proposal], {"opset": opset}


@torch.no_grad()
def verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]:
    """Random characters read in a random order per row: the prefill, decode_steps single-token steps (each fed the
    eager caches of the step before), then one burst proposal pass and one scoring pass on the final cache. Caches are
    static, of block_size slots. Expected outputs from the model's own KV-cache path (Model.logits with KVCache, whose
    buffers are the static caches)."""
    model = model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    B, R = batch_size, min(4, max(1, cfg.block_size - 2))
    n_prompt = max(1, min(16, cfg.block_size - R - decode_steps))
    steps = max(0, min(decode_steps, cfg.block_size - R - n_prompt))
    n_total = n_prompt + steps
    tokens = rng.integers(0, cfg.vocab_size, (B, n_total + R))
    order = np.stack([rng.permutation(cfg.block_size + 1) for _ in range(B)])
    names, present = cache_names(cfg.n_layer), cache_names(cfg.n_layer, "present")
    caches = model.transformer.make_caches(B, cfg.block_size)
    state = lambda: dict(zip(names, [t.cpu().numpy().copy() for t in [c.k for c in caches] + [c.v for c in caches]]))
    after = lambda: dict(zip(present, state().values()))

    def logits(tok, start, end, first, mask=None):  # tokens at generation steps [start, end) written at slot first
        t = [torch.from_numpy(x).to(device) for x in (tok, order[:, start:end], order[:, start + 1:end + 1])]
        return model.logits(*t, caches, first, mask).cpu().numpy()

    before = state()
    out = logits(tokens[:, :n_prompt], 0, n_prompt, 0)[:, -1]
    cases = [VerifyCase("prefill", "prefill", {"tokens": tokens[:, :n_prompt], "here": order[:, :n_prompt],
                                               "following": order[:, 1:n_prompt + 1], "rows": np.arange(B),
                                               **before}, {"logits": out, **after()})]
    for i in range(steps):
        n = n_prompt + i
        before = state()
        out = logits(tokens[:, n:n + 1], n, n + 1, n)[:, -1]
        cases.append(VerifyCase("decode", f"decode {i}", {"seq": tokens, "pos": np.full(B, n, dtype=np.int64),
                                                          "orders": order[:, :tokens.shape[1]], **before},
                                {"logits": out, **after()}))
    # the burst passes on the final cache: the last token queried for R positions, then R proposals in one order
    n = n_total
    start = np.full(B, n, dtype=np.int64)
    feeds = {"tokens": np.repeat(tokens[:, n:n + 1], R, 1), "here": np.repeat(order[:, n:n + 1], R, 1),
             "following": order[:, n + 1:n + 1 + R], "start": start, **state()}
    mask = torch.cat([torch.ones(R, n, dtype=torch.bool), torch.eye(R, dtype=torch.bool)], 1).to(device)
    t = [torch.from_numpy(feeds[k]).to(device) for k in INPUTS]
    proposal_caches = model.transformer.make_caches(B, cfg.block_size)
    for big, small in zip(caches, proposal_caches):
        small.k.copy_(big.k)
        small.v.copy_(big.v)
    out = model.logits(*t, proposal_caches, n, mask).cpu().numpy()
    cases.append(VerifyCase("burst_proposal", "burst proposal", feeds, {"logits": out}))
    before = state()
    out = logits(tokens[:, n:n + R], n, n + R, n)
    cases.append(VerifyCase("score", f"score {R}", {"tokens": tokens[:, n:n + R], "here": order[:, n:n + R],
                                                    "following": order[:, n + 1:n + R + 1], "start": start,
                                                    **before}, {"logits": out, **after()}))
    return cases
