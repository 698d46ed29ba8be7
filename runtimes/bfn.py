"""Bayesian-flow LM sampler on a bundle's "step" graph (see exporters/bfn.py for the graph and its call order).

The belief (log theta) stays a runner value between steps. Each step's logits come to the host, where the shared
bytedeploy.sampling module draws k; greedy decoding reads the graph's argmax output instead (the same tokens,
without copying or reducing the (B, L, K) logits on the host). A CPU torch.Generator seeded with the sampling
seed draws the Gaussian noise of the next update: the same generator calls, in the same order and shapes, as
bfn.generate_eager. With the same seed the ORT loop therefore sees the same noise and categorical randomness as
eager on the CPU; its tokens equal eager's wherever the network's outputs agree to the last rounding-relevant digit
(tested: greedy and sampled generation on the tiny preset give identical tokens).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bfn
from bytedeploy.sampling import SamplingConfig, make_generator, sample


def sample_loop(runner, ids: np.ndarray, fixed: np.ndarray, vocab_size: int, beta_1: float, n_steps: int,
                sampling: SamplingConfig) -> np.ndarray:
    """ids, fixed (B, L): tokens and conditioned positions. -> sampled tokens (B, L), conditioned ones kept."""
    shape = (*ids.shape, vocab_size)
    gen = make_generator(sampling.seed, "cpu")
    ids_t, fixed_t = torch.from_numpy(ids), torch.from_numpy(fixed)
    log_theta = np.full(shape, -math.log(vocab_size), dtype=np.float32)
    tokens, alpha, noise = ids, 0.0, np.zeros(shape, dtype=np.float32)  # call 1: no update yet
    for i in range(1, n_steps + 2):
        out = runner.run("step", {"log_theta": log_theta, "tokens": tokens, "alpha": np.array([alpha], np.float32),
                                  "noise": noise, "t": np.array([min((i - 1) / n_steps, 1.0)], np.float32),
                                  "fixed": fixed, "ids": ids})
        log_theta = out["updated_log_theta"]  # stays on the runner's device
        if sampling.greedy:  # sample() would return logits.argmax(-1), which the graph computed
            drawn = torch.from_numpy(runner.to_numpy(out["argmax"]))
        else:
            drawn = sample(torch.from_numpy(runner.to_numpy(out["logits"])), sampling, gen)
        k = torch.where(fixed_t, ids_t, drawn)
        if i > n_steps:
            return k.numpy()
        tokens = k.numpy()
        noise = torch.randn(shape, generator=gen).numpy()  # bfn.bayesian_update's draw
        alpha = bfn.step_alpha(beta_1, i, n_steps)
    raise AssertionError("unreachable")


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    sp = bfn.request_tokenizer(GenerateRequest(options={"assets": str(bundle.assets)}))
    plan = bfn.plan_generation(cfg, request, sp)
    B = request.batch_size
    ids_np = np.tile(np.array(plan.ids, dtype=np.int64), (B, 1))
    fixed_np = np.tile(np.array(plan.fixed, dtype=bool), (B, 1))
    t0 = time.perf_counter()
    tokens = sample_loop(runner, ids_np, fixed_np, cfg.vocab_size, cfg.beta, plan.n_steps, request.sampling)
    seconds = time.perf_counter() - t0
    outputs = [sp.decode(row).encode("utf-8") for row in tokens[:, plan.out].tolist()]
    return GenerateResult(outputs, plan.n_new * B, seconds, bfn.UNIT, passes=plan.n_steps + 1,
                          extra={"n_steps": plan.n_steps})
