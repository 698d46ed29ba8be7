"""The sliding-window decode loop on a bundle's prefill and decode graphs, shared by char GPT-2 and BitNet.

The same algorithm as the families' eager generate_cached: the prompt's last `context` tokens are one prefill; while
the context has room each new token is one decode step on the cached keys and values (runner values, never copied
to the host); once it is full the window slides by one token per step and is re-prefilled from position 0
(absolute positions make every cached entry stale). Only the logits come to the host, where the shared sampler
draws with a seeded CPU generator, as eager does, so greedy output equals eager whenever the argmax does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bytedeploy.sampling import SamplingConfig, make_generator, sample


def generate_windowed(runner, context: int, ids: list[int], max_new: int, sampling: SamplingConfig, batch_size: int,
                      prefill_feeds: Callable[[np.ndarray], dict],
                      decode_feeds: Callable[[np.ndarray, int, dict], dict],
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """-> new tokens (batch_size, max_new). prefill_feeds(window (B, T)) and decode_feeds(token (B, 1), its position,
    the previous outputs) are the graphs' inputs; transform(logits) runs before each draw."""
    gen = make_generator(sampling.seed, "cpu")
    window = ids[-context:]
    n0 = len(window)
    seq = np.empty((batch_size, n0 + max_new), dtype=np.int64)
    seq[:, :n0] = window
    out = runner.run("prefill", prefill_feeds(seq[:, :n0]))
    n = n0
    for i in range(max_new):
        logits = torch.from_numpy(np.asarray(runner.to_numpy(out["logits"]), dtype=np.float32))
        seq[:, n] = sample(transform(logits) if transform else logits, sampling, gen).numpy()
        n += 1
        if i + 1 == max_new:
            break
        if n <= context:
            out = runner.run("decode", decode_feeds(seq[:, n - 1:n], n - 1, out))
        else:
            out = runner.run("prefill", prefill_feeds(seq[:, n - context:n]))
    return seq[:, n0:n]
