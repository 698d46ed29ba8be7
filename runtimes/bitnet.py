"""BitNet's sampling loop over a bundle's prefill and decode graphs (exporters/bitnet.py), any runner.

The same computation as bitnet.generate_cached (the eager backend): runtimes/windowed.py's loop with BitNet's feeds
(see tests/test_export_bitnet.py for greedy equality with eager).
"""

from __future__ import annotations

import time

import numpy as np

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bitnet
from bytedeploy.runtimes.windowed import generate_windowed


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    ids = list(request.prompt or bitnet.EMPTY_PROMPT)
    max_new = request.max_new or bitnet.DEFAULT_MAX_NEW
    t0 = time.perf_counter()
    rows = generate_rows(runner, cfg, ids, max_new, request)
    seconds = time.perf_counter() - t0
    return GenerateResult([bytes(row) for row in rows.tolist()], int(rows.size), seconds, bitnet.UNIT)


def generate_rows(runner, cfg: bitnet.Config, ids: list[int], max_new: int, request: GenerateRequest) -> np.ndarray:
    """-> new bytes (batch_size, max_new) as int64."""
    return generate_windowed(
        runner, cfg.block_size, ids, max_new, request.sampling, request.batch_size,
        prefill_feeds=lambda window: {"ids": window},
        decode_feeds=lambda token, pos, out: {"ids": token, "past_k": out["present_k"], "past_v": out["present_v"],
                                              "start": np.array([pos], dtype=np.int64)})
