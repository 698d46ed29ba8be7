"""Native loop of the Bayesian-flow LM: one captured denoising step (network pass, categorical draw, Bayesian
update) replayed n_steps times, then the final draw. The step's time and accuracy come from device tables indexed
by a step counter that the graph advances, computed on the host in float64 exactly as the eager loop's Python
floats, so that greedy outputs equal the eager backend's (same generator, same draws in the same order)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bfn
from bytedeploy.runtimes.native import cached_runner, capture, sampling_key, sync
from bytedeploy.sampling import make_generator, sample


class FlowRunner:
    def __init__(self, model, batch_size: int, n_steps: int, sampling):
        cfg = model.cfg
        device = model.wte.weight.device
        K, L = cfg.vocab_size, cfg.seq_len
        self.model, self.B, self.K, self.n_steps, self.sampling = model, batch_size, K, n_steps, sampling
        self.generator = make_generator(sampling.seed, device)
        self.ids = torch.zeros(L, dtype=torch.long, device=device)
        self.fixed = torch.zeros(L, dtype=torch.bool, device=device)
        self.one_hot = torch.zeros(L, K, device=device)
        self.log_theta = torch.full((batch_size, L, K), -math.log(K), device=device)
        steps = range(1, n_steps + 1)
        alphas = [bfn.step_alpha(cfg.beta, i, n_steps) for i in steps]
        self.times = torch.tensor([(i - 1) / n_steps for i in steps], dtype=torch.float32, device=device)
        self.alphas = torch.tensor(alphas, dtype=torch.float32, device=device)
        self.noise_scales = torch.tensor([math.sqrt(a * K) for a in alphas], dtype=torch.float32, device=device)
        self.i = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs = {"step": capture(self.step, self.generator)}

    def step(self) -> None:
        """bfn.generate_eager's loop body with the step's t, alpha and sqrt(alpha K) read at index i."""
        theta = bfn.input_distribution(self.log_theta, self.fixed, self.one_hot)
        t = torch.where(self.fixed, 1.0, self.times.index_select(0, self.i)).expand(self.B, -1)
        logits = self.model.logits(theta, t)
        k = torch.where(self.fixed, self.ids, sample(logits, self.sampling, self.generator))
        noise = torch.randn(self.log_theta.shape, generator=self.generator, device=self.log_theta.device,
                            dtype=self.log_theta.dtype)
        alpha, scale = self.alphas.index_select(0, self.i), self.noise_scales.index_select(0, self.i)
        y = alpha * (self.K * F.one_hot(k, self.K).to(self.log_theta.dtype) - 1) + scale * noise
        self.log_theta.copy_(torch.log_softmax(self.log_theta + y, dim=-1))
        self.i.add_(1)

    def run(self, ids: torch.Tensor, fixed: torch.Tensor, seed: int) -> torch.Tensor:
        self.generator.manual_seed(seed)
        self.ids.copy_(ids)
        self.fixed.copy_(fixed)
        self.one_hot.copy_(F.one_hot(self.ids, self.K).float())
        self.log_theta.fill_(-math.log(self.K))
        self.i.zero_()
        for _ in range(self.n_steps):
            self.graphs["step"].replay()
        theta = bfn.input_distribution(self.log_theta, self.fixed, self.one_hot)
        logits = self.model.logits(theta, bfn.step_times(self.fixed, 1.0, self.B))
        return torch.where(self.fixed, self.ids, sample(logits, self.sampling, self.generator))


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    from bytedeploy.errors import UserError

    sp = bfn.request_tokenizer(request)
    if sp.vocab_size() != cfg.vocab_size:
        raise UserError(f"the tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}")
    ids, fixed, out = bfn.build_sequence(cfg, request, sp)
    n_steps = bfn.sampling_steps(cfg, request)
    pad = cfg.seq_len - len(ids)
    device = model.wte.weight.device
    ids_t = torch.tensor(ids + [0] * pad, dtype=torch.long, device=device)
    fixed_t = torch.tensor(fixed + [False] * pad, dtype=torch.bool, device=device)
    B = request.batch_size
    sync()
    t0 = time.perf_counter()
    runner = cached_runner(model, ("bfn", B, n_steps, sampling_key(request.sampling)),
                           lambda: FlowRunner(model, B, n_steps, request.sampling))
    rows = runner.run(ids_t, fixed_t, request.sampling.seed)[:, out].tolist()
    sync()
    seconds = time.perf_counter() - t0
    n_new = sum(not f for f in fixed[out]) if request.options.get("infill") else out.stop - out.start
    outputs = [sp.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, n_new * B, seconds, bfn.UNIT, passes=n_steps + 1,
                          extra={"n_steps": n_steps, "captured": runner.captured_now, "graphs": sorted(runner.graphs)})
