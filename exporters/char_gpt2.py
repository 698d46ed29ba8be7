"""Char GPT-2 export: the token step graphs of onnx_graphs (prefill, decode, sample) over static KV caches.

    prefill  tokens (b, S) int64 at positions 0..S-1, rows (b,), past_k.i / past_v.i (B, H, T, D)
             -> logits (b, V) of the last position, present_k.i / present_v.i (the rows' slots 0..S-1 written)
    decode   seq (B, N), pos (B,) int64, past caches -> logits (B, V) of seq[b, pos[b]] at position pos[b],
             seq_out (the argmax at pos + 1, the unknown symbol excluded), pos_out, present caches
    sample   logits, u, temperature, top_k, top_p, seq, pos -> seq_out (a draw at pos, the unknown symbol excluded)

Positions are tensors (count_up in the prefill, the pos input in decode) given to GPT2Stack's pos_emb, and the masks
are built from tensors, so no traced shape is frozen and no shape-dependent branch of CausalSelfAttention is taken.
The runtime loop (runtimes/char_gpt2.py) re-prefills the last block_size tokens once the context is full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bytedeploy.exporters.onnx_graphs import cache_names, export_opset, export_token_graphs
from bytedeploy.families.char_gpt2 import load_tokenizer
from bytedeploy.verify import VerifyCase


def logits_at(model, idx, positions, caches, attn_mask=None):
    """char_gpt2.Model.logits with the positions given as a tensor (GPT2Stack's pos_emb override)."""
    pos_emb = model.transformer.wpe(positions)
    return model.lm_head(model.transformer(model.wte(idx), caches, 0, attn_mask, pos_emb))


def mask_symbol(symbol: int, vocab_size: int):
    """The graphs' transform of the logits before a token is chosen: the unknown symbol is never emitted. A constant
    mask and one Where (index_fill exports as a scatter into the logits' shape, which symbolic shape inference, and
    so ONNX Runtime's fusions of the whole graph, cannot follow)."""
    blocked = torch.arange(vocab_size) == symbol

    def transform(logits):
        return logits.float().masked_fill(blocked, float("-inf"))
    return transform


def export_graphs(model, cfg, folder: Path, precision: str, bitlinear: str | None, opset: int):
    model = model.eval()
    dtype = next(model.parameters()).dtype
    tokenizer = load_tokenizer({"assets": str(folder / "assets")}) if (folder / "assets").is_dir() else None
    unknown = tokenizer.unknown_id if tokenizer is not None else 0
    opset = export_opset(opset)
    graphs = export_token_graphs(model, logits_at, folder, cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head,
                                 cfg.vocab_size, dtype, opset, transform=mask_symbol(unknown, cfg.vocab_size))
    return graphs, {"opset": opset}


@torch.no_grad()
def verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]:
    """The prefill of random characters into static caches of the context's length, then decode_steps single-token
    steps, each fed the eager caches of the step before; expected outputs from the model's own KV-cache path
    (model.logits with KVCache, whose buffers are the static caches' contents)."""
    model = model.eval()
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    n_prompt = max(2, min(16, T - decode_steps))
    steps = max(0, min(decode_steps, T - n_prompt))
    idx = rng.integers(1, cfg.vocab_size, (batch_size, n_prompt + steps))
    device = next(model.parameters()).device
    caches = model.transformer.make_caches(batch_size, T)
    names, present = cache_names(cfg.n_layer), cache_names(cfg.n_layer, "present")
    state = lambda: [t.cpu().numpy().copy() for t in [c.k for c in caches] + [c.v for c in caches]]
    before = state()
    logits = model.logits(torch.from_numpy(idx[:, :n_prompt]).to(device), caches, 0)[:, -1]
    cases = [VerifyCase("prefill", "prefill",
                        {"tokens": idx[:, :n_prompt], "rows": np.arange(batch_size), **dict(zip(names, before))},
                        {"logits": logits.cpu().numpy(), **dict(zip(present, state()))})]
    for i in range(steps):
        n = n_prompt + i
        before = state()
        logits = model.logits(torch.from_numpy(idx[:, n:n + 1]).to(device), caches, n)[:, -1]
        cases.append(VerifyCase(
            "decode", f"decode {i}",
            {"seq": idx, "pos": np.full(batch_size, n, dtype=np.int64), **dict(zip(names, before))},
            {"logits": logits.cpu().numpy(), **dict(zip(present, state()))}))
    return cases
