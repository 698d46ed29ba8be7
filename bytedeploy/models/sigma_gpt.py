"""σ-GPT (arXiv 2404.09562): a character-level nanoGPT trained in random orders, with burst sampling.

Model: nanoGPT blocks (our GPT2Stack) with one change, the double positional encoding. The learned position table
(as in the official text code: nanoGPT's wpe at half width) has width n_embd/2; token i of a sequence read in
order ``order`` receives concat(pos(order[i]), pos(order[i+1])): where it is and where the next target is. With
the identity order this is a plain GPT whose position table is concat(pos(i), pos(i+1)).

Training (as the official text code, ``train.py`` + ``order.apply_order``): a window of block_size + 1 characters
(positions 0..block_size, so the table has block_size + 1 rows) and a permutation ``order`` of its positions, fresh
per sequence ("shuffle") or the identity ("left-to-right"); the inputs are x[order[:-1]] (block_size tokens), the
targets x[order[1:]], the loss the mean next-token cross-entropy along the order. The first token of an order is
never predicted: generation always starts from at least one known character (an empty prompt starts from "\\n",
which is not part of the output). Eval uses a fixed seed for its orders, so eval loss is repeatable and does not
touch the training RNG stream.

Sampling backends (the prompt sits at positions 0..P-1, new characters fill P..P+n_new-1 <= block_size):
  eager-reference  the seed's ``generate``: no KV cache, the whole known sequence re-run per character in the
                   chosen order, probabilities to the host, numpy sampling (``sample_host``).
  eager            the same order with a KV cache: each step appends the last token, whose "next position" is the
                   position to generate. ``options["order"]``: "left-to-right" (default) or "random" (seeded).
  burst            token-based rejection sampling. With the known tokens in the cache except the last one, query
                   the last token once per remaining position r (positions [pos(last), pos(r)]; each query sees the
                   cache and itself only) and sample a proposal x_r ~ p_r for every r in one pass. Score the
                   proposals under N = ``options["n_orders"]`` (default 4) random orders of the remaining positions
                   in one pass (teacher-forced along each order; queries see the cache and the preceding proposals
                   of their order), giving q. Along each order accept proposals while u_r < q/p (u_r per position,
                   shared by the orders as in the official code); keep the order with the longest accepted run, write
                   its entries to the cache and repeat with the rest. Temperature/top-k/top-p shape p and q alike.

Why at least one token is accepted per pass: the first query of every scoring order is the last known token with
next position = the order's first position, seeing exactly the cache: the same computation as that position's
proposal query, so q == p and the acceptance ratio is 1 (we accept it without comparing, which also removes
rounding noise from the two passes).

Where we differ from the paper and its code, and why:
- A rejected proposal is resampled from the residual norm(max(0, q - p)) and taken as one more token (the rule of
  speculative sampling, Leviathan et al. / Chen et al. 2023, from which the acceptance test u < q/p comes). The
  official code discards it. Discarding is biased: a proposal survives with probability min(p, q) and otherwise
  its position is drawn later, so the values taken are not the model's conditionals q (a chi-square test against
  enumeration detects it on small random models). With the residual and n_orders=1, burst sampling draws exactly
  from random-order autoregressive sampling (a uniform random order of the remaining positions, each character
  drawn from the model's conditional), which tests/test_sigma_gpt.py checks by enumeration and a chi-square test.
  ``options["resample_rejected"] = False`` gives the official behaviour.
- Keeping the longest run among N > 1 orders (the paper's speed-up) is not exact: the choice depends on the sampled
  values and favours proposals that look mutually consistent. It is the default (N=4) and close to exact when the
  model is confident; use n_orders=1 for exact samples.
- A batch of samples advances together: each iteration keeps the same number of new tokens for every row (the
  smallest row's count, as the official code's min over the batch), so the rows share one cache length. Cutting a
  row's run at a point set by the other rows keeps its samples exact.
- ``GenerateResult.passes`` counts model passes per sequence summed over the batch (a batched pass counts once per
  row), so the CLI's passes per character compares across batch sizes: eager makes one pass per character; burst
  one prompt pass (when the prompt has more than one character) and then two passes per iteration (one when a
  single position is left).
- Corpus: char tokens from ``load_text_split``; builtin:stdlib defaults to its first 2 MB (the whole library is
  ~30 MB, which makes the tokenizer and token stream slow to build for a character model); --first-mb overrides.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.text import TokenWindows, load_corpus
from bytedeploy.errors import UserError
from bytedeploy.families.sigma_gpt import PRESETS as PRESETS  # the registry's family interface (registry.py)
from bytedeploy.families.sigma_gpt import (
    TOKENIZER_FILE,
    UNIT,
    Config,
    burst_draws,
    filled_prefix,
    generation_orders,
    load_tokenizer,
    order_rng,
    plan_prompt,
)
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig, init_gpt2_weights
from bytedeploy.models.sampling import make_generator, probabilities, sample
from bytedeploy.sampling import SamplingConfig, sample_host
from bytedeploy.tokenizers import CharTokenizer

BACKENDS = ("eager-reference", "eager", "burst")
BUILTIN_DEFAULT_MB = 2.0
EVAL_ORDER_SEED = 0


# ----------------------------------------------------------------------------------------------- model


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("vocab_size must be set (prepare_config reads it from the corpus)")
        self.cfg = cfg
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.transformer = GPT2Stack(GPT2StackConfig(cfg.n_layer, cfg.n_head, C, cfg.block_size + 1, cfg.dropout))
        # the one architectural change: a half-width position table, read twice per token (see double_positions)
        self.transformer.wpe = nn.Embedding(cfg.block_size + 1, C // 2)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in nanoGPT
        init_gpt2_weights(self, cfg.n_layer)

    def double_positions(self, here: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
        """(B, T) positions of the tokens and of their next targets -> (B, T, n_embd) position embeddings."""
        wpe = self.transformer.wpe
        return torch.cat([wpe(here), wpe(following)], -1)

    def logits(self, tokens: torch.Tensor, here: torch.Tensor, following: torch.Tensor, caches=None, start: int = 0,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions here (B, T), each predicting the token at position following -> (B, T, V).
        With caches the T entries are written at slots [start, start+T) (slots are generation steps, not
        positions); attn_mask (T, start+T) overrides the causal mask."""
        pos = self.double_positions(here, following)
        h = self.transformer(self.wte(tokens), caches, start, attn_mask, pos_emb=pos)
        return self.lm_head(h)

    def sequence_logits(self, window: torch.Tensor, order: torch.Tensor):
        """window (B, L) by position, order (B, L) a permutation per row -> (logits (B, L-1, V), targets (B, L-1))."""
        seq = window.gather(1, order)
        return self.logits(seq[:, :-1], order[:, :-1], order[:, 1:]), seq[:, 1:]

    def forward(self, batch: dict[str, torch.Tensor]):
        """batch from TokenWindows (+ optional "order" (B, block_size+1)) -> (mean cross-entropy, targets)."""
        window = torch.cat([batch["idx"], batch["targets"][:, -1:]], 1)
        order = batch.get("order")
        if order is None:
            order = self.draw_orders(*window.shape, window.device)
        logits, targets = self.sequence_logits(window, order)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, targets.numel()

    def draw_orders(self, batch_size: int, length: int, device) -> torch.Tensor:
        if self.cfg.order == "left-to-right":
            return torch.arange(length, device=device).expand(batch_size, -1)
        gen = None if self.training else make_generator(EVAL_ORDER_SEED, device)
        return torch.rand(batch_size, length, device=device, generator=gen).argsort(-1)


# ----------------------------------------------------------------------------------------------- data


def corpus(spec: str, options: dict) -> tuple[str, str]:
    return load_corpus(spec, options, BUILTIN_DEFAULT_MB)


def tokenizer_for(spec: str, options: dict) -> CharTokenizer:
    return load_tokenizer(options) or CharTokenizer.from_text(corpus(spec, options)[0])


def prepare_config(cfg: Config, spec: str, options: dict) -> Config:
    return dataclasses.replace(cfg, vocab_size=tokenizer_for(spec, options).vocab_size)


def make_data(cfg: Config, spec: str, options: dict) -> TokenWindows:
    """options: eval_split, eval_data, first_mb, assets (a checkpoint's tokenizer.json)."""
    tokenizer = tokenizer_for(spec, options)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the data has {tokenizer.vocab_size} symbols; the model knows {cfg.vocab_size}")
    train, evals = corpus(spec, options)
    data = TokenWindows(tokenizer.encode(train), tokenizer.encode(evals), cfg.block_size, unit=UNIT)
    data.assets = {TOKENIZER_FILE: tokenizer.to_json()}
    return data


# ----------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def sample_reference(model: Model, prompt: list[int], order: np.ndarray, sampling: SamplingConfig,
                     rng: np.random.Generator) -> list[int]:
    """The seed's loop: for each new position the whole known sequence is re-run in generation order (no cache);
    probabilities go to the host and numpy samples. -> tokens by position."""
    device = next(model.parameters()).device
    known = list(prompt) + [0] * (len(order) - len(prompt))
    for i in range(len(prompt), len(order)):
        tokens = torch.tensor([[known[j] for j in order[:i]]], device=device)
        here = torch.tensor(order[None, :i], device=device)
        following = torch.tensor(order[None, 1:i + 1], device=device)
        logits = model.logits(tokens, here, following)[0, -1]
        probs = torch.softmax(logits.float(), -1).cpu().numpy()
        known[order[i]] = sample_host(probs, sampling, rng)
    return known


@stepwise
@torch.no_grad()
def sample_cached(model: Model, prompt: list[int], orders: torch.Tensor, sampling: SamplingConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """Autoregressive sampling in the given orders (B, L) with a KV cache: the prompt goes in with the first step,
    then each step appends the last token with the position to generate next. -> (B, L) tokens by position.
    Stepwise: a token per step."""
    B, L = orders.shape
    P = len(prompt)
    caches = model.transformer.make_caches(B, L)
    seq = torch.zeros(B, L, dtype=torch.long, device=orders.device)
    seq[:, :P] = torch.tensor(prompt, device=orders.device)
    filled = torch.zeros(B, L, dtype=torch.bool, device=orders.device)
    tokens, start = seq[:, :P], 0
    for i in range(P, L):
        T = tokens.size(1)  # the prompt at the first step, then the last token
        logits = model.logits(tokens, orders[:, i - T:i], orders[:, i - T + 1:i + 1], caches, start)[:, -1]
        token = sample(logits, sampling, gen)
        seq.scatter_(1, orders[:, i:i + 1], token[:, None])
        filled.scatter_(1, orders[:, i:i + 1], True)
        start += T
        tokens = token[:, None]
        if i + 1 < L:
            yield lambda: filled_prefix(seq.cpu().numpy(), filled.cpu().numpy(), P)
    return seq


@torch.no_grad()
def sample_burst(model: Model, prompt: list[int], n_new: int, batch_size: int, sampling: SamplingConfig,
                 gen: torch.Generator, rng: np.random.Generator, n_orders: int = 4, resample_rejected: bool = True):
    """Token-based rejection sampling (module docstring) on the eager model: gen draws the tokens, rng
    (order_rng) the scoring orders and acceptance tests.

    -> ((B, P + n_new) tokens by position, (B, P + n_new) the order positions were generated in, batched passes)."""
    passes = EagerBurstPasses(model, batch_size, n_orders, len(prompt) + n_new)
    return burst_loop(passes, prompt, n_new, sampling, gen, rng, resample_rejected)


class EagerBurstPasses:
    """The three kinds of model pass burst_loop makes, on the eager model with static KV caches holding one copy
    per scoring order (row j*B + b = order j, sample b). runtimes/sigma_gpt.py implements the same interface over
    a bundle's graphs."""

    def __init__(self, model: Model, batch_size: int, n_orders: int, length: int):
        self.model, self.batch_size, self.n_orders = model, batch_size, n_orders
        self.device = next(model.parameters()).device
        self.caches = model.transformer.make_caches(n_orders * batch_size, length)

    def prefill(self, tokens: torch.Tensor, here: torch.Tensor, following: torch.Tensor) -> None:
        """Cache the known tokens before the last one: (1, n) tokens, positions, next positions -> slots [0, n)."""
        N, B = self.n_orders, self.batch_size
        self.model.logits(tokens.expand(N * B, -1), here.expand(N * B, -1), following.expand(N * B, -1),
                          self.caches, 0)

    def propose(self, last: torch.Tensor, last_pos: torch.Tensor, remaining: torch.Tensor, n_cached: int):
        """The last token (B,) at last_pos (B,) queried once per remaining position (B, R), each query seeing the
        cache and itself only -> logits (B, R, V)."""
        B, R = remaining.shape
        mask = torch.cat([torch.ones(R, n_cached, dtype=torch.bool, device=self.device),
                          torch.eye(R, dtype=torch.bool, device=self.device)], 1)
        return self.model.logits(last[:, None].expand(B, R), last_pos[:, None].expand(B, R), remaining,
                                 self.caches, n_cached, mask)

    def score(self, tokens: torch.Tensor, here: torch.Tensor, following: torch.Tensor, n_cached: int):
        """(N*B, R) inputs teacher-forced along the scoring orders, after the cache -> logits (N*B, R, V)."""
        return self.model.logits(tokens, here, following, self.caches, n_cached)

    def keep(self, best: torch.Tensor, n_cached: int, m: int) -> None:
        """The kept order's first m scoring entries become the cache of the taken tokens, for every order."""
        keep_order_entries(self.caches, best, n_cached, m, self.n_orders, self.batch_size)


def burst_loop(passes, prompt: list[int], n_new: int, sampling: SamplingConfig, gen: torch.Generator,
               rng: np.random.Generator, resample_rejected: bool = True):
    """sample_burst's loop on the device. runtimes/sigma_gpt.py has the same loop in numpy for bundles; both take
    the scoring orders and acceptance uniforms from burst_draws, so that greedy burst output is the same."""
    device, B, N, P = passes.device, passes.batch_size, passes.n_orders, len(prompt)
    L = P + n_new
    rows = torch.arange(B, device=device)
    seq = torch.zeros(B, L, dtype=torch.long, device=device)
    seq[:, :P] = torch.tensor(prompt, device=device)
    n_passes, n_cached = 0, P - 1
    if n_cached:
        pos = torch.arange(P, device=device)[None]
        passes.prefill(seq[:1, :P - 1], pos[:, :-1], pos[:, 1:])
        n_passes += 1
    last, last_pos = seq[:, P - 1], torch.full((B,), P - 1, device=device)
    remaining = torch.arange(P, L, device=device).expand(B, -1)
    generated_at = [torch.arange(P, device=device).expand(B, -1)]
    while remaining.size(1):
        R = remaining.size(1)
        # 1. propose: the last token queried once per remaining position, each query seeing the cache and itself
        logits = passes.propose(last, last_pos, remaining, n_cached)
        n_passes += 1
        proposals = sample(logits, sampling, gen)  # (B, R)
        if R == 1:  # one position left: its proposal is an exact draw
            seq.scatter_(1, remaining, proposals)
            generated_at.append(remaining)
            break
        p_dist = probabilities(logits, sampling)  # (B, R, V)
        p = p_dist.gather(2, proposals[..., None])[..., 0]
        # 2. score: N random orders of the remaining positions, teacher-forced over the proposals, one pass
        perms, u = (torch.from_numpy(a).to(device) for a in burst_draws(rng, N, B, R))
        pos_in_order = remaining.expand(N, B, R).gather(2, perms)
        tok_in_order = proposals.expand(N, B, R).gather(2, perms)
        inputs = torch.cat([last.expand(N, B)[..., None], tok_in_order[..., :-1]], 2)
        here = torch.cat([last_pos.expand(N, B)[..., None], pos_in_order[..., :-1]], 2)
        scores = passes.score(inputs.reshape(N * B, R), here.reshape(N * B, R), pos_in_order.reshape(N * B, R),
                              n_cached)
        n_passes += 1
        q_dist = probabilities(scores, sampling).view(N, B, R, -1)
        q = q_dist.gather(3, tok_in_order[..., None])[..., 0]
        # 3. accept along each order while u < q/p; the first token of an order has q == p (module docstring)
        accept = u.expand(N, B, R).gather(2, perms) < q / p.expand(N, B, R).gather(2, perms)
        accept[..., 0] = True
        run = accept.long().cumprod(2).sum(2)  # (N, B) accepted prefix lengths
        best = run.argmax(0)
        n_accepted = run[best, rows]
        order_pos, order_tok = pos_in_order[best, rows], tok_in_order[best, rows]  # (B, R) along the kept order
        n_taken = n_accepted + (n_accepted < R).long() if resample_rejected else n_accepted
        m = int(n_taken.min())
        if resample_rejected:
            # a rejected proposal is redrawn from norm(max(0, q - p)); rows cut shorter than their run keep theirs
            at = n_accepted.clamp(max=R - 1)
            q_rej = q_dist[best, rows, at]
            p_rej = p_dist[rows, perms[best, rows, at]]
            residual = (q_rej - p_rej).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q_rej)
            redrawn = sample(residual.log(), SamplingConfig(), gen)
            use = (n_accepted == m - 1)[:, None] & (torch.arange(R, device=device) == at[:, None])
            order_tok = torch.where(use, redrawn[:, None], order_tok)
        seq.scatter_(1, order_pos[:, :m], order_tok[:, :m])
        generated_at.append(order_pos[:, :m])
        # 4. the kept order's first m scoring entries are the cache of the taken tokens: copy them to every order
        passes.keep(best, n_cached, m)
        n_cached += m
        last, last_pos, remaining = order_tok[:, m - 1], order_pos[:, m - 1], order_pos[:, m:]
    return seq, torch.cat(generated_at, 1), n_passes


def keep_order_entries(caches, best: torch.Tensor, start: int, m: int, n_orders: int, batch_size: int) -> None:
    """Copy cache slots [start, start+m) of order best[b] into every order's copy of sample b."""
    rows = torch.arange(batch_size, device=best.device)
    for cache in caches:
        for buf in (cache.k, cache.v):
            view = buf[:n_orders * batch_size].view(n_orders, batch_size, *buf.shape[1:])
            view[:, :, :, start:start + m] = view[best, rows, :, start:start + m]


@stepwise
def generate(model: Model, cfg: Config, request: GenerateRequest, backend: str = "eager") -> GenerateResult:
    """options: assets (the tokenizer), order ("left-to-right"/"random", eager backends), n_orders (burst, 4),
    resample_rejected (burst, True)."""
    if backend not in BACKENDS:
        raise UserError(f"sigma-gpt has no backend {backend!r}; choose from {', '.join(BACKENDS)}")
    tokenizer = load_tokenizer({"assets": request.options.get("assets")})
    if tokenizer is None:
        raise UserError("sigma-gpt generation needs the checkpoint's tokenizer (assets/tokenizer.json)")
    prompt, n_new = plan_prompt(cfg, tokenizer, request)
    P, B, sampling = len(prompt), request.batch_size, request.sampling
    opts = request.options
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    if backend == "burst":
        n_orders = int(opts.get("n_orders", 4))
        if n_orders < 1:
            raise UserError(f"n_orders must be >= 1, got {n_orders}")
        gen = make_generator(sampling.seed, device)
        resample = bool(opts.get("resample_rejected", True))
        seq, _, passes = sample_burst(model, prompt, n_new, B, sampling, gen, order_rng(sampling.seed), n_orders,
                                      resample)
        rows = seq[:, P:].cpu().tolist()
    else:
        orders = generation_orders(P, n_new, B, opts.get("order", "left-to-right"), sampling.seed)
        passes = n_new
        if backend == "eager-reference":
            rng = np.random.default_rng(sampling.seed)
            rows = [sample_reference(model, prompt, o, sampling, rng)[P:] for o in orders]
        else:
            gen = make_generator(sampling.seed, device)
            steps = sample_cached.steps(model, prompt, torch.tensor(orders, device=device), sampling, gen)
            decode = lambda rows: [tokenizer.decode(r.tolist()).encode("utf-8") for r in rows]
            rows = (yield from map_steps(steps, decode))[:, P:].tolist()
    sync(device)
    seconds = time.perf_counter() - t0
    outputs = [tokenizer.decode(r).encode("utf-8") for r in rows]
    return GenerateResult(outputs, n_new * B, seconds, UNIT, passes=passes * B)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
