"""BitNet's sampling loop over a bundle's prefill and decode graphs (exporters/bitnet.py), any runner.

The same computation as bitnet.generate_cached (the eager backend): prefill the prompt's last block_size bytes, then
one decode step per byte with the presents fed back as the next pasts (they stay runner values: ORT values on the
device), and once the context is full a re-prefill of the sliding window per byte. Sampling is
bytedeploy.sampling.sample on the logits, with the same seeded CPU generator as eager on the CPU, so greedy output
is identical to eager whenever the logits' argmax is (see tests/test_export_bitnet.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bitnet
from bytedeploy.sampling import make_generator, sample


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
    T = cfg.block_size
    gen = make_generator(request.sampling.seed, "cpu")
    window = ids[-T:]
    n0 = len(window)
    seq = np.empty((request.batch_size, n0 + max_new), dtype=np.int64)
    seq[:, :n0] = window
    out = runner.run("prefill", {"ids": seq[:, :n0]})
    n = n0
    for i in range(max_new):
        logits = torch.from_numpy(np.asarray(runner.to_numpy(out["logits"]), dtype=np.float32))
        seq[:, n] = sample(logits, request.sampling, gen).numpy()
        n += 1
        if i + 1 == max_new:
            break
        if n <= T:
            out = runner.run("decode", {"ids": seq[:, n - 1:n], "past_k": out["present_k"],
                                        "past_v": out["present_v"], "start": np.array([n - 1], dtype=np.int64)})
        else:  # the window slid: every cached key belongs to a context that lost its first byte
            out = runner.run("prefill", {"ids": seq[:, n - T:n]})
    return seq[:, n0:n]
