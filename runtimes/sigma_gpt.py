"""sigma-GPT sampling loops on a bundle's graphs: the ordered KV-cache loop and burst (rejection) sampling.

request.options, as for the eager backends (bytedeploy.models.sigma_gpt.generate):
  order              "left-to-right" (default) or "random": the generation order of the ordered loop
  burst              True: burst sampling instead of the ordered loop (the eager family's --backend burst)
  n_orders           burst: scoring orders per pass (default 4)
  resample_rejected  burst: redraw a rejected proposal from the residual (default True)

The ordered loop is sigma_gpt.sample_cached step for step: one prefill of the prompt, then one single-token
decode per character, on runtimes/windowed.TokenSteps (caches, tokens and positions on the device; sampling in the
sample graph with the loop's uniforms). The burst loop is sigma_gpt.burst_loop in numpy, with
BundleBurstPasses making its passes on the prefill, burst_proposal and score graphs. Both burst loops take their
scoring orders and acceptance uniforms from families.sigma_gpt.burst_draws, so greedy burst output equals the eager
burst's wherever the logits agree closely enough not to flip an argmax; sampled tokens come from the numpy sampler
(reproducible from the seed, not the eager backend's torch draws). Burst keeps its caches on the host, because each
pass keeps a different scoring order's entries per sample.
"""

from __future__ import annotations

import time

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.families import sigma_gpt
from bytedeploy.families.sigma_gpt import filled_prefix
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.runtimes.windowed import cache_shapes, token_steps
from bytedeploy.sampling import SamplingConfig, probabilities, sample


@stepwise
def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    tokenizer = sigma_gpt.load_tokenizer({"assets": str(bundle.assets)})
    if tokenizer is None:
        raise UserError(f"bundle {bundle.path} has no sigma-gpt tokenizer (assets/{sigma_gpt.TOKENIZER_FILE})")
    prompt, n_new = sigma_gpt.plan_prompt(cfg, tokenizer, request)
    P, B, sampling, opts = len(prompt), request.batch_size, request.sampling, request.options
    rng = np.random.default_rng(sampling.seed)
    decode = lambda rows: [tokenizer.decode(r).encode("utf-8") for r in rows]
    t0 = time.perf_counter()
    if opts.get("burst"):
        n_orders = int(opts.get("n_orders", 4))
        if n_orders < 1:
            raise UserError(f"n_orders must be >= 1, got {n_orders}")
        passes = BundleBurstPasses(bundle, runner, B, n_orders)
        seq, n_passes = yield from map_steps(burst_loop.steps(
            passes, prompt, n_new, sampling, rng, sigma_gpt.order_rng(sampling.seed),
            bool(opts.get("resample_rejected", True))), decode)
        rows = seq[:, P:]
    else:
        orders = sigma_gpt.generation_orders(P, n_new, B, opts.get("order", "left-to-right"), sampling.seed)
        rows = (yield from map_steps(sample_cached.steps(bundle, runner, prompt, orders, sampling, rng),
                                     decode))[:, P:]
        n_passes = n_new
    seconds = time.perf_counter() - t0
    return GenerateResult(decode(rows), n_new * B, seconds, sigma_gpt.UNIT, passes=n_passes * B)


@stepwise
def sample_cached(bundle, runner, prompt: list[int], orders: np.ndarray, sampling: SamplingConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Autoregressive sampling in the given orders (B, L): sigma_gpt.sample_cached on the bundle's step graphs
    (runtimes/windowed.TokenSteps: the tokens in generation order, the caches and positions stay on the device).
    -> (B, L) tokens by position. Stepwise: one token per step."""
    B, L = orders.shape
    P = len(prompt)
    draw = (lambda: None) if sampling.greedy else (lambda: rng.random(B).astype(np.float32))
    state = token_steps(bundle, runner, B, L, bundle.family_config().block_size)
    state.set_sampling([sampling] * B)
    runner.write(state.extra["orders"], orders)
    seq = np.zeros((B, L), dtype=np.int64)
    seq[:, :P] = prompt
    runner.write(state.seq, seq)
    logits = state.prefill(seq[:, :P], np.arange(B), {"here": orders[:, :P], "following": orders[:, 1:P + 1]})
    state.set_positions(np.full(B, P))
    state.first_token(logits, draw())
    for i in range(P + 1, L):
        yield lambda i=i: by_position(state.read(), orders, i, P)
        state.step(draw())
    return by_position(state.read(), orders, L, P, prefix=False)


def by_position(generated: np.ndarray, orders: np.ndarray, n: int, P: int, prefix: bool = True):
    """Tokens in generation order (B, L), the first n of them made -> (B, L) tokens by position, or (prefix) each
    row's text so far (filled_prefix)."""
    B, L = orders.shape
    rows = np.arange(B)[:, None]
    seq = np.zeros((B, L), dtype=np.int64)
    seq[rows, orders[:, :n]] = generated[:, :n]
    if not prefix:
        return seq
    filled = np.zeros((B, L), dtype=bool)
    filled[rows, orders[:, :n]] = True
    return filled_prefix(seq, filled, P)


@stepwise
def burst_loop(passes, prompt: list[int], n_new: int, sampling: SamplingConfig, rng: np.random.Generator,
               orders_rng: np.random.Generator, resample_rejected: bool = True) -> tuple[np.ndarray, int]:
    """sigma_gpt.burst_loop (its comments explain the steps) in numpy: rng draws the tokens, orders_rng the
    scoring orders and acceptance tests (burst_draws). -> ((B, P + n_new) tokens by position, batched passes).
    Stepwise: one proposal and scoring per step."""
    B, N, P = passes.batch_size, passes.n_orders, len(prompt)
    L = P + n_new
    rows = np.arange(B)
    seq = np.zeros((B, L), dtype=np.int64)
    seq[:, :P] = prompt
    filled = np.zeros((B, L), dtype=bool)
    n_passes, n_cached = 0, P - 1
    if n_cached:
        pos = np.arange(P)[None]
        passes.prefill(seq[:1, :P - 1], pos[:, :-1], pos[:, 1:])
        n_passes += 1
    last, last_pos = seq[:, P - 1], np.full(B, P - 1)
    remaining = np.tile(np.arange(P, L), (B, 1))
    while remaining.shape[1]:
        R = remaining.shape[1]
        logits = passes.propose(last, last_pos, remaining, n_cached)
        n_passes += 1
        proposals = sample(logits, sampling, rng)  # (B, R)
        if R == 1:
            seq[rows[:, None], remaining] = proposals
            break
        p_dist = probabilities(logits, sampling)  # (B, R, V)
        p = np.take_along_axis(p_dist, proposals[..., None], 2)[..., 0]
        perms, u = sigma_gpt.burst_draws(orders_rng, N, B, R)
        pos_in_order, tok_in_order = along_orders(remaining, perms), along_orders(proposals, perms)
        inputs = np.concatenate([np.broadcast_to(last[None, :, None], (N, B, 1)), tok_in_order[..., :-1]], 2)
        here = np.concatenate([np.broadcast_to(last_pos[None, :, None], (N, B, 1)), pos_in_order[..., :-1]], 2)
        scores = passes.score(inputs.reshape(N * B, R), here.reshape(N * B, R), pos_in_order.reshape(N * B, R),
                              n_cached)
        n_passes += 1
        q_dist = probabilities(scores, sampling).reshape(N, B, R, -1)
        q = np.take_along_axis(q_dist, tok_in_order[..., None], 3)[..., 0]
        accept = along_orders(u, perms) < q / along_orders(p, perms)
        accept[..., 0] = True
        run = np.cumprod(accept, 2).sum(2)  # (N, B) accepted prefix lengths
        best = run.argmax(0)
        n_accepted = run[best, rows]
        order_pos, order_tok = pos_in_order[best, rows], tok_in_order[best, rows]  # (B, R) along the kept order
        n_taken = n_accepted + (n_accepted < R) if resample_rejected else n_accepted
        m = int(n_taken.min())
        if resample_rejected:
            at = np.minimum(n_accepted, R - 1)
            q_rej = q_dist[best, rows, at]
            p_rej = p_dist[rows, perms[best, rows, at]]
            residual = np.maximum(q_rej - p_rej, 0)
            residual = np.where(residual.sum(-1, keepdims=True) > 0, residual, q_rej)
            with np.errstate(divide="ignore"):
                redrawn = sample(np.log(residual), SamplingConfig(), rng)
            use = (n_accepted == m - 1)[:, None] & (np.arange(R) == at[:, None])
            order_tok = np.where(use, redrawn[:, None], order_tok)
        seq[rows[:, None], order_pos[:, :m]] = order_tok[:, :m]
        filled[rows[:, None], order_pos[:, :m]] = True
        passes.keep(best, n_cached, m)
        n_cached += m
        last, last_pos, remaining = order_tok[:, m - 1], order_pos[:, m - 1], order_pos[:, m:]
        if remaining.shape[1]:
            yield lambda: filled_prefix(seq, filled, P)
    return seq, n_passes


def along_orders(x: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """x (B, R) read along each of the N scoring orders perms (N, B, R) -> (N, B, R)."""
    return np.take_along_axis(np.broadcast_to(x, perms.shape), perms, 2)


class BundleBurstPasses:
    """burst_loop's passes (see sigma_gpt.EagerBurstPasses) on the bundle's prefill, burst_proposal and score graphs.
    One static cache per sample (B, H, block_size, D) per layer, on the host: the scoring pass repeats it per order
    (rows j*B + b = order j, sample b) and keep() takes the kept order's cache, with its new entries, from the
    scoring pass's presents."""

    def __init__(self, bundle, runner, batch_size: int, n_orders: int):
        cfg = bundle.family_config()
        self.runner, self.batch_size, self.n_orders = runner, batch_size, n_orders
        self.caches = {name: np.zeros(shape, dtype) for name, shape, dtype in
                       cache_shapes(bundle, "score", batch_size, cfg.block_size)}
        self.scored = {}

    def prefill(self, tokens: np.ndarray, here: np.ndarray, following: np.ndarray) -> None:
        B = self.batch_size
        feeds = {name: np.repeat(x, B, 0) for name, x in (("tokens", tokens), ("here", here),
                                                          ("following", following))}
        out = self.runner.run("prefill", {**feeds, "rows": np.arange(B), **self.caches})
        self.caches = self.presents(out)

    def presents(self, out: dict) -> dict:
        return {name: self.runner.to_numpy(out[name.replace("past", "present")]) for name in self.caches}

    def propose(self, last: np.ndarray, last_pos: np.ndarray, remaining: np.ndarray, n_cached: int) -> np.ndarray:
        B, R = remaining.shape
        out = self.runner.run("burst_proposal", {
            "tokens": np.repeat(last[:, None], R, 1), "here": np.repeat(last_pos[:, None], R, 1),
            "following": remaining, "start": np.full(B, n_cached), **self.caches})
        return self.runner.to_numpy(out["logits"])

    def score(self, tokens: np.ndarray, here: np.ndarray, following: np.ndarray, n_cached: int) -> np.ndarray:
        N = self.n_orders
        out = self.runner.run("score", {
            "tokens": tokens, "here": here, "following": following, "start": np.full(len(tokens), n_cached),
            **{name: np.concatenate([c] * N, 0) for name, c in self.caches.items()}})
        self.scored = self.presents(out)
        return self.runner.to_numpy(out["logits"])

    def keep(self, best: np.ndarray, n_cached: int, m: int) -> None:
        """Each sample's cache becomes its kept order's: the shared past plus the scored entries (those past the
        first m are masked out of later passes and overwritten by them)."""
        B, N, rows = self.batch_size, self.n_orders, np.arange(self.batch_size)
        self.caches = {name: np.ascontiguousarray(s.reshape(N, B, *s.shape[1:])[best, rows])
                       for name, s in self.scored.items()}
