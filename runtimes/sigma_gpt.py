"""sigma-GPT sampling loops on a bundle's graphs: the ordered KV-cache loop and burst (rejection) sampling.

request.options, as for the eager backends (bytedeploy.models.sigma_gpt.generate):
  order              "left-to-right" (default) or "random": the generation order of the ordered loop
  burst              True: burst sampling instead of the ordered loop (the eager family's --backend burst)
  n_orders           burst: scoring orders per pass (default 4)
  resample_rejected  burst: redraw a rejected proposal from the residual (default True)

The ordered loop is sigma_gpt.sample_cached step for step: one prefill of the prompt, then one single-token
decode per character with the caches kept as runner values. The burst loop is sigma_gpt.burst_loop itself, with
BundleBurstPasses making its passes on the prefill, burst_proposal and decode graphs, so both backends draw the
same random numbers in the same order (a fixed seed gives the eager burst's output wherever the logits agree
closely enough not to flip a draw). Burst keeps its caches on the host, because each pass keeps a different
scoring order's entries per sample.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import sigma_gpt
from bytedeploy.sampling import SamplingConfig, make_generator, sample


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    tokenizer = sigma_gpt.load_tokenizer({"assets": str(bundle.assets)})
    if tokenizer is None:
        raise UserError(f"bundle {bundle.path} has no sigma-gpt tokenizer (assets/{sigma_gpt.TOKENIZER_FILE})")
    prompt, n_new = sigma_gpt.plan_prompt(cfg, tokenizer, request)
    P, B, sampling, opts = len(prompt), request.batch_size, request.sampling, request.options
    t0 = time.perf_counter()
    if opts.get("burst"):
        n_orders = int(opts.get("n_orders", 4))
        if n_orders < 1:
            raise UserError(f"n_orders must be >= 1, got {n_orders}")
        passes = BundleBurstPasses(bundle, runner, B, n_orders)
        gen = make_generator(sampling.seed, "cpu")
        seq, _, n_passes = sigma_gpt.burst_loop(passes, prompt, n_new, sampling, gen,
                                                bool(opts.get("resample_rejected", True)))
        rows = seq[:, P:].numpy()
    else:
        orders = sigma_gpt.generation_orders(P, n_new, B, opts.get("order", "left-to-right"), sampling.seed)
        rows = sample_cached(runner, prompt, orders, sampling, make_generator(sampling.seed, "cpu"))[:, P:]
        n_passes = n_new
    seconds = time.perf_counter() - t0
    outputs = [tokenizer.decode(r).encode("utf-8") for r in rows]
    return GenerateResult(outputs, n_new * B, seconds, sigma_gpt.UNIT, passes=n_passes * B)


def sample_cached(runner, prompt: list[int], orders: np.ndarray, sampling: SamplingConfig,
                  gen: torch.Generator) -> np.ndarray:
    """Autoregressive sampling in the given orders (B, L): sigma_gpt.sample_cached over the bundle's prefill and
    decode graphs. -> (B, L) tokens by position."""
    B, L = orders.shape
    P = len(prompt)
    rows = np.arange(B)
    seq = np.zeros((B, L), dtype=np.int64)
    seq[:, :P] = prompt
    out = runner.run("prefill", {"tokens": seq[:, :P], "here": orders[:, :P], "following": orders[:, 1:P + 1]})
    logits = runner.to_numpy(out["logits"])
    for i in range(P, L):
        token = sample(torch.from_numpy(logits), sampling, gen).numpy()
        seq[rows, orders[:, i]] = token
        if i + 1 == L:
            break
        out = runner.run("decode", {"tokens": token[:, None], "here": orders[:, i:i + 1],
                                    "following": orders[:, i + 1:i + 2], "past_k": out["present_k"],
                                    "past_v": out["present_v"]})
        logits = runner.to_numpy(out["logits"])[:, -1]
    return seq


class BundleBurstPasses:
    """sigma_gpt.burst_loop's passes (see sigma_gpt.EagerBurstPasses) on the bundle's graphs. One cache per sample
    (L, B, H, n, D) on the host: the scoring pass repeats it per order (rows j*B + b = order j, sample b) and keep()
    takes the kept order's new entries from the scoring pass's presents."""

    device = torch.device("cpu")

    def __init__(self, bundle, runner, batch_size: int, n_orders: int):
        cfg = bundle.family_config()
        dtype = bundle.input_dtype("decode", "past_k")
        self.runner, self.batch_size, self.n_orders = runner, batch_size, n_orders
        empty = np.zeros((cfg.n_layer, batch_size, cfg.n_head, 0, cfg.n_embd // cfg.n_head), dtype=dtype)
        self.past_k, self.past_v = empty, empty
        self.scored_k = self.scored_v = None

    def prefill(self, tokens: torch.Tensor, here: torch.Tensor, following: torch.Tensor) -> None:
        B = self.batch_size
        out = self.runner.run("prefill", {"tokens": tokens.expand(B, -1).numpy(), "here": here.expand(B, -1).numpy(),
                                          "following": following.expand(B, -1).numpy()})
        self.past_k, self.past_v = (self.runner.to_numpy(out[name]) for name in ("present_k", "present_v"))

    def propose(self, last: torch.Tensor, last_pos: torch.Tensor, remaining: torch.Tensor, n_cached: int):
        B, R = remaining.shape
        out = self.runner.run("burst_proposal", {
            "tokens": last[:, None].expand(B, R).numpy(), "here": last_pos[:, None].expand(B, R).numpy(),
            "following": remaining.numpy(), "past_k": self.past_k, "past_v": self.past_v})
        return torch.from_numpy(self.runner.to_numpy(out["logits"]))

    def score(self, tokens: torch.Tensor, here: torch.Tensor, following: torch.Tensor, n_cached: int):
        N = self.n_orders
        out = self.runner.run("decode", {
            "tokens": tokens.numpy(), "here": here.numpy(), "following": following.numpy(),
            "past_k": np.concatenate([self.past_k] * N, 1), "past_v": np.concatenate([self.past_v] * N, 1)})
        self.scored_k, self.scored_v = (self.runner.to_numpy(out[name]) for name in ("present_k", "present_v"))
        return torch.from_numpy(self.runner.to_numpy(out["logits"]))

    def keep(self, best: torch.Tensor, n_cached: int, m: int) -> None:
        """Each sample's cache becomes its kept order's: the shared past plus the first m scored entries."""
        B, N, best, rows = self.batch_size, self.n_orders, best.numpy(), np.arange(self.batch_size)
        self.past_k, self.past_v = (
            np.ascontiguousarray(s.reshape(s.shape[0], N, B, *s.shape[2:])[:, best, rows, :, :n_cached + m])
            for s in (self.scored_k, self.scored_v))
