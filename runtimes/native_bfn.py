"""Native loop of the Bayesian-flow LM: one captured denoising step (network pass, categorical draw, Bayesian
update) replayed n_steps times, then the final draw. The step's time and accuracy come from device tables indexed
by a step counter that the graph advances, computed on the host in float64 exactly as the eager loop's Python
floats. The update noise is computed inside the graph (bfn.update_noise) from the step's row keys, read from a
device table of bytedeploy.families.bfn.noise_keys at the same counter: no host work or copy per step, and the same
bits as every other backend's noise, so that greedy outputs equal the eager backend's. The graph is plain CUDA graph
capture, no torch.compile; the noise's final Add would give the same bits fused into an FMA anyway (its product is
exact)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bfn
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.runtimes.native import cached_runner, capture, sampling_key, sync


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
        self.noise_keys = torch.zeros((n_steps, batch_size, 2), dtype=torch.long, device=device)  # per request
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
        alpha, scale = self.alphas.index_select(0, self.i), self.noise_scales.index_select(0, self.i)
        noise = bfn.update_noise(self.noise_keys.index_select(0, self.i)[0], self.log_theta.size(1), self.K)
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
        self.noise_keys.copy_(torch.from_numpy(bfn.noise_keys(seed, self.B, self.n_steps)))
        for _ in range(self.n_steps):
            self.graphs["step"].replay()
        theta = bfn.input_distribution(self.log_theta, self.fixed, self.one_hot)
        logits = self.model.logits(theta, bfn.step_times(self.fixed, 1.0, self.B))
        return torch.where(self.fixed, self.ids, sample(logits, self.sampling, self.generator))


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    sp = bfn.request_tokenizer(request)
    plan = bfn.plan_generation(cfg, request, sp)
    n_steps, out = plan.n_steps, plan.out
    device = model.wte.weight.device
    ids_t = torch.tensor(plan.ids, dtype=torch.long, device=device)
    fixed_t = torch.tensor(plan.fixed, dtype=torch.bool, device=device)
    B = request.batch_size
    sync()
    t0 = time.perf_counter()
    runner = cached_runner(model, ("bfn", B, n_steps, sampling_key(request.sampling)),
                           lambda: FlowRunner(model, B, n_steps, request.sampling))
    rows = runner.run(ids_t, fixed_t, request.sampling.seed)[:, out].tolist()
    sync()
    seconds = time.perf_counter() - t0
    outputs = [sp.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, plan.n_new * B, seconds, bfn.UNIT, passes=n_steps + 1,
                          extra={"n_steps": n_steps, "captured": runner.captured_now, "graphs": sorted(runner.graphs)})
