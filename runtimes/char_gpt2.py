"""Char GPT-2 sampling loop on a bundle's prefill and decode graphs: char_gpt2.generate_cached over a runner.

The same algorithm as the eager loop: the prompt's last block_size characters are one prefill; while the context
has room each new character is one decode step on the cached keys and values (kept as runner values, never copied
to the host); once it is full the window slides by one character per step and the last block_size characters are
re-prefilled from position 0 (learned absolute positions make every cached entry stale). Only the logits come to
the host, where the unknown symbol is masked and bytedeploy.sampling draws the token.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import char_gpt2
from bytedeploy.sampling import SamplingConfig, make_generator, sample


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    tokenizer = char_gpt2.load_tokenizer({"assets": str(bundle.assets)})
    ids = char_gpt2.prompt_ids(request, tokenizer)
    max_new = request.max_new or char_gpt2.DEFAULT_MAX_NEW
    t0 = time.perf_counter()
    rows = generate_cached(runner, cfg.block_size, ids, max_new, request.sampling, request.batch_size,
                           tokenizer.unknown_id)
    seconds = time.perf_counter() - t0
    outputs = [tokenizer.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, rows.size, seconds, char_gpt2.UNIT)


def generate_cached(runner, block_size: int, ids: list[int], max_new: int, sampling: SamplingConfig,
                    batch_size: int = 1, unknown_id: int = 0) -> np.ndarray:
    """-> new ids (batch_size, max_new); char_gpt2.generate_cached step for step."""
    T = block_size
    gen = make_generator(sampling.seed, "cpu")
    window = ids[-T:]
    n0 = len(window)
    seq = np.empty((batch_size, n0 + max_new), dtype=np.int64)
    seq[:, :n0] = window
    out = runner.run("prefill", {"idx": seq[:, :n0]})
    n = n0
    for i in range(max_new):
        logits = torch.from_numpy(runner.to_numpy(out["logits"]))
        seq[:, n] = sample(char_gpt2.mask_unknown(logits, unknown_id), sampling, gen).numpy()
        n += 1
        if i + 1 == max_new:
            break
        if n <= T:
            out = runner.run("decode", {"idx": seq[:, n - 1:n], "position": np.full((batch_size, 1), n - 1),
                                        "past_k": out["present_k"], "past_v": out["present_v"]})
        else:  # the window slid: every position moved, so the cache is stale; recompute the whole window
            out = runner.run("prefill", {"idx": seq[:, n - T:n]})
    return seq[:, n0:n]
