"""Bayesian-flow LM sampler on a bundle's step graphs (see exporters/bfn.py for the graphs and their call order).

Everything a step touches stays on the runner's device (FlowSteps, bound once per batch size; CUDA graphs on
ort-cuda): the belief log theta and the drawn tokens, in two buffers each that the calls alternate between, and the
conditioning. Each call the host writes a few numbers per row: the update's alpha, the network's time and the noise's
keys (bytedeploy.families.bfn.noise_keys: the graph computes the noise from them, bit for bit every backend's noise),
and when sampling the call's uniforms, drawn from np.random.default_rng(seed), one per position. Greedy calls run
step_greedy, whose draw is the argmax. The host reads the tokens once, after the last call, so greedy tokens equal
eager's wherever the network's outputs agree to the last rounding-relevant digit (tested on the tiny preset).
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from bytedeploy.families import bfn
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.runtimes.windowed import sampling_arrays, workspace
from bytedeploy.sampling import SamplingConfig


class FlowSteps:
    """The sampler's state on the device for batch_size rows and its calls: greedy[p] / sampled[p] read log_theta[p]
    and tokens[p] and write log_theta[1 - p] and tokens[1 - p]."""

    def __init__(self, bundle, runner, batch_size: int):
        cfg = bundle.family_config()
        B, L, K = batch_size, cfg.seq_len, cfg.vocab_size
        self.runner, self.parity, self.vocab_size = runner, 0, K
        self.log_theta = [runner.zeros((B, L, K), np.float32) for _ in range(2)]
        self.tokens = [runner.zeros((B, L), np.int64) for _ in range(2)]
        self.logits = runner.zeros((B, L, K), bundle.graph("step").outputs[0].dtype)
        self.inputs = {"alpha": runner.zeros((B,), np.float32), "keys": runner.zeros((B, 2), np.int64),
                       "t": runner.zeros((B,), np.float32), "fixed": runner.zeros((B, L), np.bool_),
                       "ids": runner.zeros((B, L), np.int64)}
        self.u = runner.zeros((B, L), np.float32)
        self.settings = {name: runner.value(a) for name, a in sampling_arrays([SamplingConfig()] * B).items()}
        self.greedy = self.bind("step_greedy", {})

    @functools.cached_property
    def sampled(self) -> list:
        """The step graph's bound calls, made on the first sampled call (a greedy loop never loads the graph)."""
        return self.bind("step", {"u": self.u, **self.settings})

    def bind(self, graph: str, extra: dict) -> list:
        """The graph bound twice: reading buffers p, writing buffers 1 - p."""
        return [self.runner.bind(graph, {"log_theta": self.log_theta[p], "tokens": self.tokens[p], **self.inputs,
                                         **extra},
                                 {"logits": self.logits, "log_theta_out": self.log_theta[1 - p],
                                  "tokens_out": self.tokens[1 - p]}, capture=True) for p in (0, 1)]

    def start(self, ids: np.ndarray, fixed: np.ndarray, samplings: list[SamplingConfig]) -> None:
        """A uniform belief and the conditioning for every row."""
        B, L = ids.shape
        K = self.vocab_size
        write = self.runner.write
        write(self.log_theta[self.parity], np.full((B, L, K), -math.log(K), dtype=np.float32))
        write(self.tokens[self.parity], ids)
        write(self.inputs["ids"], ids)
        write(self.inputs["fixed"], fixed)
        for name, a in sampling_arrays(samplings).items():
            write(self.settings[name], a)

    def call(self, alpha: np.ndarray, t: np.ndarray, keys: np.ndarray, u: np.ndarray | None) -> None:
        write = self.runner.write
        write(self.inputs["alpha"], alpha.astype(np.float32))
        write(self.inputs["t"], t.astype(np.float32))
        write(self.inputs["keys"], keys)
        if u is not None:
            write(self.u, u)
        (self.greedy if u is None else self.sampled)[self.parity]()
        self.parity = 1 - self.parity

    def read(self) -> np.ndarray:
        return np.asarray(self.runner.to_numpy(self.tokens[self.parity]))


@stepwise
def sample_loop(bundle, runner, ids: np.ndarray, fixed: np.ndarray, n_steps: int,
                sampling: SamplingConfig) -> np.ndarray:
    """ids, fixed (B, L): tokens and conditioned positions. -> sampled tokens (B, L), conditioned ones kept.
    Stepwise: one network call per step; the sample exists only after the last."""
    cfg = bundle.family_config()
    B, L = ids.shape
    rng, keys = np.random.default_rng(sampling.seed), bfn.noise_keys(sampling.seed, B, n_steps)
    state = workspace(runner, ("flow", B), lambda: FlowSteps(bundle, runner, B))
    state.start(ids, fixed, [sampling] * B)
    no_keys = np.zeros((B, 2), dtype=np.int64)
    for i in range(1, n_steps + 2):  # call i applies the update of step i - 1 and draws step i's tokens
        alpha = bfn.step_alpha(cfg.beta, i - 1, n_steps) if i > 1 else 0.0
        u = None if sampling.greedy else rng.random((B, L)).astype(np.float32)
        state.call(np.full(B, alpha), np.full(B, min((i - 1) / n_steps, 1.0)), keys[i - 2] if i > 1 else no_keys,
                   u)
        if i > n_steps:
            return state.read()
        yield lambda: None
    raise AssertionError("unreachable")


@stepwise
def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    sp = bfn.request_tokenizer(GenerateRequest(options={"assets": str(bundle.assets)}))
    plan = bfn.plan_generation(cfg, request, sp)
    B = request.batch_size
    ids_np = np.tile(np.array(plan.ids, dtype=np.int64), (B, 1))
    fixed_np = np.tile(np.array(plan.fixed, dtype=bool), (B, 1))
    t0 = time.perf_counter()
    tokens = yield from map_steps(sample_loop.steps(bundle, runner, ids_np, fixed_np, plan.n_steps, request.sampling),
                                  lambda _: [b""] * B)
    seconds = time.perf_counter() - t0
    outputs = [sp.decode(row).encode("utf-8") for row in tokens[:, plan.out].tolist()]
    return GenerateResult(outputs, plan.n_new * B, seconds, bfn.UNIT, passes=plan.n_steps + 1,
                          extra={"n_steps": plan.n_steps})
