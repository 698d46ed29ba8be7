"""Char GPT-2 sampling loop on a bundle's prefill and decode graphs: char_gpt2.generate_cached over a runner.

runtimes/windowed.py's loop with char GPT-2's feeds; the unknown symbol is masked on the host before each draw.
"""

from __future__ import annotations

import time

import numpy as np

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import char_gpt2
from bytedeploy.runtimes.windowed import generate_windowed
from bytedeploy.sampling import SamplingConfig


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
    return generate_windowed(
        runner, block_size, ids, max_new, sampling, batch_size,
        prefill_feeds=lambda window: {"idx": window},
        decode_feeds=lambda token, pos, out: {"idx": token, "position": np.full((batch_size, 1), pos),
                                              "past_k": out["present_k"], "past_v": out["present_v"]},
        transform=lambda logits: char_gpt2.mask_unknown(logits, unknown_id))
