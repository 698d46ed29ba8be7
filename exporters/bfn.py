"""Bayesian-flow LM -> one ONNX graph, "step": the Bayesian update of the belief, then the network on it.

The paper's sampler alternates network pass -> categorical draw k -> Bayesian update with k. The draw takes the
request's sampling settings (temperature, top-k, top-p through bytedeploy.sampling) and sits between the two, so
the graph runs them in the other order: each call first applies the previous step's update (its draw k, alpha and
Gaussian noise are inputs) and then the network on the updated belief. A loop of n steps is n + 1 calls, as in
eager: call 1 feeds alpha = 0 and zero noise (no update yet), call i + 1 the update of step i, and the last call
runs at t = 1. The noise is an input so the host's seeded torch.Generator decides it, drawn exactly as
bfn.generate_eager draws it.

    step(log_theta (B, L, K) f32, tokens (B, L) i64, alpha (1,) f32, noise (B, L, K) f32, t (1,) f32,
         fixed (B, L) bool, ids (B, L) i64) -> logits (B, L, K) f32, updated_log_theta (B, L, K) f32,
                                                argmax (B, L) i64

L is the model's fixed cfg.seq_len, B is dynamic. The belief is log theta (as the eager loop keeps it) in float32
in both precisions: an fp16 bundle runs the network in fp16 (bfn.Model casts theta to its weights' dtype) and the
update in float32. Conditioned positions (fixed) take their ids as the draw and a one-hot theta at time 1.
argmax = logits.argmax(-1), what bytedeploy.sampling.sample returns for greedy decoding: a greedy loop reads
only that (B, L) output, not the logits, and runs no host-side reduction over (B, L, K).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.exporters.onnx_graphs import export_graph
from bytedeploy.models import bfn
from bytedeploy.sampling import SamplingConfig, make_generator, sample
from bytedeploy.verify import VerifyCase

INPUTS = ["log_theta", "tokens", "alpha", "noise", "t", "fixed", "ids"]
OUTPUTS = ["logits", "updated_log_theta", "argmax"]
BATCH_AXES = {name: {0: "batch"} for name in ["log_theta", "tokens", "noise", "fixed", "ids", *OUTPUTS]}


def one_hot(ids: torch.Tensor, K: int) -> torch.Tensor:
    """F.one_hot as Equal + Cast: ONNX Runtime's OneHot kernel (int64 output, then a Cast) is several times slower."""
    return (ids[..., None] == torch.arange(K, device=ids.device)).float()


class FlowStep(nn.Module):
    """The exported step: bfn.bayesian_update with its noise given, then bfn.Model.logits on the new belief."""

    def __init__(self, model: bfn.Model):
        super().__init__()
        self.model = model
        self.K = model.cfg.vocab_size

    def forward(self, log_theta, tokens, alpha, noise, t, fixed, ids):
        k = torch.where(fixed, ids, tokens)
        y = alpha * (self.K * one_hot(k, self.K) - 1) + torch.sqrt(alpha * self.K) * noise
        log_theta = torch.log_softmax(log_theta + y, dim=-1)
        theta = bfn.input_distribution(log_theta, fixed, one_hot(ids, self.K))
        times = torch.where(fixed, torch.ones_like(log_theta[..., 0]), t)
        logits = self.model.logits(theta, times)
        return logits, log_theta, logits.argmax(-1)


def example_inputs(cfg: bfn.Config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random feeds for one step: a prompt of 3 positions plus a scattered fixed position per row."""
    rng = np.random.default_rng(seed)
    B, L, K = batch_size, cfg.seq_len, cfg.vocab_size
    fixed = np.zeros((B, L), dtype=bool)
    fixed[:, :3] = True
    fixed[np.arange(B), rng.integers(3, L, size=B)] = True
    log_theta = torch.log_softmax(torch.from_numpy(rng.standard_normal((B, L, K), dtype=np.float32)), -1)
    return {"log_theta": log_theta.numpy(), "tokens": rng.integers(0, K, size=(B, L)),
            "alpha": np.array([cfg.beta * 3 / 100], dtype=np.float32),
            "noise": rng.standard_normal((B, L, K), dtype=np.float32),
            "t": np.array([0.37], dtype=np.float32), "fixed": fixed, "ids": rng.integers(0, K, size=(B, L))}


def export_graphs(model: bfn.Model, cfg: bfn.Config, folder: Path, precision: str, bitlinear: str | None,
                  opset: int):
    feeds = example_inputs(cfg, 2, 0)
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUTS)
    graph = export_graph(FlowStep(model).eval(), "step", args, folder, INPUTS, OUTPUTS, BATCH_AXES, opset)
    return [graph], {"seq_len": cfg.seq_len}


@torch.no_grad()
def verify_cases(model: bfn.Model, cfg: bfn.Config, bundle, batch_size: int, decode_steps: int,
                 seed: int) -> list[VerifyCase]:
    """An n = decode_steps sampler, teacher-forced from eager: n + 1 step calls (the first with no update, the
    last at t = 1), each fed eager's belief, draw and noise; expected = bfn.bayesian_update and Model.logits.
    argmax is not compared here (a near-tie flips it within fp16 tolerances); the greedy tests cover it."""
    n = max(decode_steps, 1)
    device = bfn.model_device(model)
    example = example_inputs(cfg, batch_size, seed)
    fixed, ids = torch.from_numpy(example["fixed"]), torch.from_numpy(example["ids"])
    one_hot = F.one_hot(ids, cfg.vocab_size).float()
    gen = make_generator(seed, "cpu")
    log_theta = torch.full((batch_size, cfg.seq_len, cfg.vocab_size), -math.log(cfg.vocab_size))
    tokens, alpha, noise = ids.clone(), 0.0, torch.zeros_like(log_theta)
    cases = []
    for i in range(1, n + 2):
        feeds = {"log_theta": log_theta.numpy(), "tokens": tokens.numpy(), "alpha": np.array([alpha], np.float32),
                 "noise": noise.numpy(), "t": np.array([min((i - 1) / n, 1.0)], np.float32),
                 "fixed": fixed.numpy(), "ids": ids.numpy()}
        if i > 1:  # eager's own update: the generator is rewound so it draws the same noise we feed
            state = gen.get_state()
            noise = torch.randn(log_theta.shape, generator=gen)
            feeds["noise"] = noise.numpy()
            gen.set_state(state)
            log_theta = bfn.bayesian_update(log_theta, tokens, alpha, gen)
        logits = model.logits(bfn.input_distribution(log_theta, fixed, one_hot).to(device),
                              torch.where(fixed, 1.0, float(feeds["t"][0])).to(device)).cpu()
        label = f"step {i}" if i <= n else "final (t = 1)"
        cases.append(VerifyCase("step", label, feeds, {"logits": logits.numpy(),
                                                       "updated_log_theta": log_theta.numpy()}))
        tokens = torch.where(fixed, ids, sample(logits, SamplingConfig(temperature=1.0), gen))
        alpha = bfn.step_alpha(cfg.beta, i, n)
    return cases
