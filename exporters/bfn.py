"""Bayesian-flow LM -> two ONNX graphs, "step" and "step_greedy": the Bayesian update of the belief, then the network
on it, then the draw, all on the device.

The paper's sampler alternates network pass -> categorical draw k -> Bayesian update with k. A graph call runs them
in the order update -> network -> draw: it applies the previous call's draw to the belief (alpha and the noise's keys
are inputs; the noise itself is computed inside the graph), runs the network on the updated belief, and draws the
next tokens. A loop of n steps is n + 1 calls, as in eager: call 1 feeds alpha = 0 (no update yet), call i + 1 the
update of step i, and the last call runs at t = 1.

    step(log_theta (B, L, K) f32, tokens (B, L) i64, alpha (B,) f32, keys (B, 2) i64, t (B,) f32, fixed (B, L) bool,
         ids (B, L) i64, u (B, L) f32, temperature, top_k, top_p (B,))
      -> logits (B, L, K), log_theta_out (B, L, K) f32, tokens_out (B, L) i64
    step_greedy: the same without u and the settings; tokens_out is the argmax.

alpha, t and keys are per row, so rows of a batch may be at different steps. keys is a row's (offset, multiplier) of
bytedeploy.families.bfn.noise_keys for the update's step: the graph computes that step's N(0, 1) noise from them
with the counter-based generator documented there (integer Mul, Add, Div and Mod by powers of two, a Gather in the
inverse-CDF table, one float Mul and Add), the same bits as numpy's and torch's. The draw is onnx_graphs.sample_tokens
with the loop's uniforms u (settings per row); conditioned positions (fixed) keep their ids, take a one-hot theta and
the network's time 1. L is the model's fixed cfg.seq_len, B is dynamic. The belief stays float32 in both precisions:
an fp16 bundle runs the network in fp16 (bfn.Model casts theta to its weights' dtype) and the update in float32. The
outputs go to other buffers than the inputs they follow (the loop alternates two of each), so a call may run twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.exporters.onnx_graphs import (
    SAMPLING_INPUTS,
    export_graph,
    export_opset,
    sample_tokens,
    sampling_example,
)
from bytedeploy.families.bfn import MIX_CONSTANTS, NOISE_BINS, NOISE_MASK, noise_elements, normal_table
from bytedeploy.models import bfn
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.sampling import SamplingConfig
from bytedeploy.verify import VerifyCase

STATE_INPUTS = ["log_theta", "tokens", "alpha", "keys", "t", "fixed", "ids"]
OUTPUTS = ["logits", "log_theta_out", "tokens_out"]
BATCH_AXES = {name: {0: "batch"} for name in [*STATE_INPUTS, *SAMPLING_INPUTS, *OUTPUTS]}
MODULUS = NOISE_MASK + 1  # 2^31


def one_hot(ids: torch.Tensor, K: int) -> torch.Tensor:
    """F.one_hot as Equal + Cast: ONNX Runtime's OneHot kernel (int64 output, then a Cast) is several times slower."""
    return (ids[..., None] == torch.arange(K, device=ids.device)).float()


def mix31(x: torch.Tensor) -> torch.Tensor:
    """families.bfn.mix31 in ops every ONNX runtime has: a right shift by s is a Div by 2^s, a mask a Mod by 2^31
    (all values non-negative)."""
    for constant in MIX_CONSTANTS:
        x = x + constant
        x = x * x // (1 << 15) % MODULUS
    return x


class UpdateNoise(nn.Module):
    """families.bfn.update_noise of one step inside a graph: keys (B, 2) -> (B, L, K) float32."""

    def __init__(self, seq_len: int, vocab_size: int):
        super().__init__()
        self.shape = (seq_len, vocab_size)
        start, slope = normal_table()
        self.register_buffer("index", torch.arange(noise_elements(seq_len, vocab_size)), persistent=False)
        self.register_buffer("start", torch.from_numpy(start), persistent=False)
        self.register_buffer("slope", torch.from_numpy(slope), persistent=False)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        x = (self.index[None] * keys[:, 1:] + keys[:, :1]) % MODULUS
        h = mix31(x)
        bins, fraction = h // (1 << 19), h // (1 << 7) % NOISE_BINS
        return (self.start[bins] + fraction.float() * self.slope[bins]).view(-1, *self.shape)


class FlowStep(nn.Module):
    """The exported call: bfn.bayesian_update with the noise of keys, bfn.Model.logits on the new belief, the draw."""

    def __init__(self, model: bfn.Model, sampled: bool):
        super().__init__()
        self.model, self.sampled = model, sampled
        self.K = model.cfg.vocab_size
        self.noise = UpdateNoise(model.cfg.seq_len, self.K)

    def forward(self, log_theta, tokens, alpha, keys, t, fixed, ids, *sampling):
        k = torch.where(fixed, ids, tokens)
        a = alpha[:, None, None]
        y = a * (self.K * one_hot(k, self.K) - 1) + torch.sqrt(a * self.K) * self.noise(keys)
        log_theta = torch.log_softmax(log_theta + y, dim=-1)
        theta = bfn.input_distribution(log_theta, fixed, one_hot(ids, self.K))
        times = torch.where(fixed, torch.ones_like(log_theta[..., 0]), t[:, None])
        logits = self.model.logits(theta, times)
        if self.sampled:
            u, temperature, top_k, top_p = sampling
            L = logits.size(1)
            per_position = lambda x: x[:, None].expand(-1, L).reshape(-1)  # noqa: E731
            drawn = sample_tokens(logits.reshape(-1, self.K), u.reshape(-1), per_position(temperature),
                                  per_position(top_k), per_position(top_p), self.K).view_as(tokens)
        else:
            drawn = logits.argmax(-1)
        return logits, log_theta, torch.where(fixed, ids, drawn)


def example_inputs(cfg: bfn.Config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random feeds for one call: a prompt of 3 positions plus a scattered fixed position per row."""
    rng = np.random.default_rng(seed)
    B, L, K = batch_size, cfg.seq_len, cfg.vocab_size
    fixed = np.zeros((B, L), dtype=bool)
    fixed[:, :3] = True
    fixed[np.arange(B), rng.integers(3, L, size=B)] = True
    log_theta = torch.log_softmax(torch.from_numpy(rng.standard_normal((B, L, K), dtype=np.float32)), -1)
    return {"log_theta": log_theta.numpy(), "tokens": rng.integers(0, K, size=(B, L)),
            "alpha": np.full(B, cfg.beta * 3 / 100, dtype=np.float32), "keys": bfn.noise_keys(seed, B, 1)[0],
            "t": np.full(B, 0.37, dtype=np.float32), "fixed": fixed, "ids": rng.integers(0, K, size=(B, L))}


def export_graphs(model: bfn.Model, cfg: bfn.Config, folder: Path, precision: str, bitlinear: str | None,
                  opset: int):
    opset = export_opset(opset)
    feeds = example_inputs(cfg, 2, 0)
    args = tuple(torch.from_numpy(feeds[name]) for name in STATE_INPUTS)
    u = torch.full((2, cfg.seq_len), 0.5)
    graphs = [export_graph(FlowStep(model, sampled=False).eval(), "step_greedy", args, folder, STATE_INPUTS,
                           OUTPUTS, BATCH_AXES, opset),
              export_graph(FlowStep(model, sampled=True).eval(), "step", (*args, u, *sampling_example(2)[1:]),
                           folder, [*STATE_INPUTS, *SAMPLING_INPUTS], OUTPUTS, BATCH_AXES, opset)]
    return graphs, {"seq_len": cfg.seq_len, "opset": opset}


@torch.no_grad()
def verify_cases(model: bfn.Model, cfg: bfn.Config, bundle, batch_size: int, decode_steps: int,
                 seed: int) -> list[VerifyCase]:
    """An n = decode_steps sampler, teacher-forced from eager: n + 1 step_greedy calls (the first with no update, the
    last at t = 1), each fed eager's belief, draw and noise keys; expected = bfn.bayesian_update (with
    bfn.update_noise) and Model.logits. tokens_out is not compared here (a near-tie flips an argmax within fp16
    tolerances); the greedy tests cover it."""
    n = max(decode_steps, 1)
    device = bfn.model_device(model)
    example = example_inputs(cfg, batch_size, seed)
    fixed, ids = torch.from_numpy(example["fixed"]), torch.from_numpy(example["ids"])
    one_hot_ids = F.one_hot(ids, cfg.vocab_size).float()
    gen, keys = make_generator(seed, "cpu"), bfn.noise_keys(seed, batch_size, n)
    log_theta = torch.full((batch_size, cfg.seq_len, cfg.vocab_size), -math.log(cfg.vocab_size))
    tokens, alpha = ids.clone(), 0.0
    cases = []
    for i in range(1, n + 2):  # call i applies step i - 1's update
        step_keys = keys[i - 2] if i > 1 else np.zeros((batch_size, 2), dtype=np.int64)
        t = min((i - 1) / n, 1.0)
        feeds = {"log_theta": log_theta.numpy(), "tokens": tokens.numpy(),
                 "alpha": np.full(batch_size, alpha, np.float32), "keys": step_keys,
                 "t": np.full(batch_size, t, np.float32), "fixed": fixed.numpy(), "ids": ids.numpy()}
        if i > 1:  # eager's own update, with the noise of the keys we feed
            noise = bfn.update_noise(torch.from_numpy(step_keys), cfg.seq_len, cfg.vocab_size)
            log_theta = bfn.bayesian_update(log_theta, tokens, alpha, noise)
        logits = model.logits(bfn.input_distribution(log_theta, fixed, one_hot_ids).to(device),
                              torch.where(fixed, 1.0, t).to(device)).cpu()
        label = f"step {i}" if i <= n else "final (t = 1)"
        cases.append(VerifyCase("step_greedy", label, feeds, {"logits": logits.numpy(),
                                                              "log_theta_out": log_theta.numpy()}))
        tokens = torch.where(fixed, ids, sample(logits, SamplingConfig(temperature=1.0), gen))
        alpha = bfn.step_alpha(cfg.beta, i, n)
    return cases
