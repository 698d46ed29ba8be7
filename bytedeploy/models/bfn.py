"""Bayesian Flow Network language model (BFN, arXiv 2308.07037, discrete data; the bayesian-flow-lm seed).

Each of the seq_len positions holds a categorical input distribution theta over the K = vocab_size tokens.
Accuracy schedule beta(t) = beta_1 t². The network maps (theta, t) to output logits; e_hat = softmax(logits).

Training (the paper's continuous-time loss, per token): t ~ U(0, 1) per sequence, y ~ N(beta(t)(K e_x - 1),
beta(t) K I), theta = softmax(y), loss = K beta_1 t ||e_x - e_hat(theta, t)||². That is the paper's L^inf exactly,
(K/2) alpha(t) ||e_x - e_hat||² with alpha(t) = dbeta/dt = 2 beta_1 t: no further constant. (The seed's library
takes the mean over the K classes instead of the sum, which divides it by K.) Not a log-likelihood: LOSS_IS_NLL
is False and the CLI reports the plain loss.

Conditioning (the seed's, used for prompts and infilling): conditioned positions get a one-hot theta and time 1,
meaning "known for certain"; the network's time input is per position. Training draws the seed's random
conditioning masks (a random span of 0..seq_len-1 tokens, in half of the sequences scattered to random
positions) and conditioned positions carry no loss.

Sampling in n steps (the paper's algorithm): theta = uniform; for i = 1..n: t = (i-1)/n, k ~ softmax(net(theta, t))
per position, alpha = beta_1 (2i-1)/n², y ~ N(alpha(K e_k - 1), alpha K I), theta ∝ exp(y) theta (kept as
log theta and renormalised with log_softmax); finally k ~ softmax(net(theta, 1)). The categorical draws take the
request's sampling settings (temperature / top-k / top-p through bytedeploy.sampling); temperature 0 makes them
argmax. Conditioned positions keep their one-hot theta in every step and their token in the output.

Network: a bidirectional transformer: input embeddings = theta @ the embedding matrix (the distribution-weighted
sum of token embeddings, as in SSD-LM), rotary positions (full head dim), pre-LN blocks with FiLM time
conditioning (LayerNorm without affine, then x (1 + scale) + shift, scale and shift from a per-layer projection of
an MLP over learned Fourier features of t), a final LayerNorm and an untied output head.

Where we differ from the seed (following the paper or keeping it simple):
- the seed's attention is mixed-direction (even heads causal, odd heads anti-causal); ours is fully bidirectional,
  as in the paper; the seed rotates half of each head's dims, we rotate all.
- the seed's FiLM multiplies by scale; we multiply by (1 + scale) with the FiLM projections zero-initialised, so
  an untrained network starts as a plain transformer; we add a final LayerNorm (pre-LN convention).
- the seed returns the argmax of net(theta, 1); the paper samples it; we sample with the request's settings, so
  --temperature 0 gives the seed's argmax.
- the seed picks beta_1 = 0.005 by hand (for an ~8k vocabulary). beta_1 = 0 (the default) here means "matched to
  the paper's text8 setting" (K = 27, beta_1 = 0.75): the beta_1 at which a sample of theta(1) has its argmax on
  a wrong token with the same (union-bound) probability, about 2%. That gives 0.75 at K = 27, 0.112 at K = 256,
  0.061 at K = 512, 0.0052 at K = 8000 (the seed's choice) and 4.3 at K = 2 (the paper used 3 for binary MNIST).
- the seed trains on padded lines with BOS/EOS; we cut the token stream of the corpus into fixed windows.

Tokens: a sentencepiece BPE model (bytedeploy.data.sentencepiece_tokenizer): options["assets"]/tokenizer.model
(a checkpoint's), else options["tokenizer"] (from ``bytedeploy tokenizer train``), else one is trained on the
corpus with cfg.vocab_size pieces. It travels in the checkpoint as assets/tokenizer.model.

Generation (request): the prompt's tokens are fixed at positions 0..n-1 and max_new tokens (default: the rest of
the sequence, at most seq_len - n) are generated after them; the whole fixed-length sequence is sampled and the
new tokens are returned. Infilling: request.options["infill"] = ["text", 8, "more text", ...]: strings are fixed
text, integers holes of that many tokens; the output is the whole filled template. request.options["n_steps"]
overrides cfg.n_steps.

Backends:
  eager-reference  the seed's loop: per step, probabilities copied to the host and each position drawn with numpy
                   (sample_host); the Bayesian update in torch on the CPU.
  eager            everything on the device, the update noise included.
Both compute the Gaussian sender noise with update_noise (on the update's device), bit for bit the noise of the bundle
loop (bytedeploy.families.bfn.update_noise, numpy) and of the native runtime: with temperature 0 (no categorical
randomness) every backend gives the same tokens wherever the networks' outputs agree, on the CPU and on CUDA alike.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.sentencepiece_tokenizer import BUILTIN_DEFAULT_MB, load_sentencepiece, sentencepiece_model_bytes
from bytedeploy.data.text import TokenWindows
from bytedeploy.data.text import load_corpus as text_corpus
from bytedeploy.errors import UserError
from bytedeploy.families.bfn import PRESETS as PRESETS  # the registry's family interface (registry.py)
from bytedeploy.families.bfn import (
    TOKENIZER_FILE,
    UNIT,
    Config,
    matched_beta_1,
    noise_bins,
    noise_elements,
    noise_keys,
    normal_table,
    plan_generation,
    request_tokenizer,
    step_alpha,
    tokenizer_bytes,
)
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.models.layers import MLP, GPT2StackConfig
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.sampling import SamplingConfig, sample_host

BACKENDS = ("eager-reference", "eager")
LOSS_IS_NLL = False
CLI_ALIASES = {"context": "seq_len"}
EVAL_SEED = 1234  # fixed times, noise and conditioning masks of the eval batches


# ----------------------------------------------------------------------------------------------- network


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, head_dim / 2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D): rotate the pairs (x[i], x[i + D/2]) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with rotary positions (no mask: every position sees every other)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        B, L, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           scale=1.0 / math.sqrt(C // self.n_head))  # a constant in exported graphs
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, L, C)))


class FiLMBlock(nn.Module):
    """Pre-LN transformer block whose two normalised activations are scaled and shifted by the time embedding."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, elementwise_affine=False)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, elementwise_affine=False)
        self.mlp = MLP(GPT2StackConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.seq_len, cfg.dropout, gelu="none"))
        self.film = nn.Linear(cfg.time_dim, 4 * cfg.n_embd)  # -> scale_1, shift_1, scale_2, shift_2

    def forward(self, x, temb, cos, sin):
        scale_1, shift_1, scale_2, shift_2 = self.film(temb).chunk(4, dim=-1)
        x = x + self.attn(self.ln_1(x) * (1 + scale_1) + shift_1, cos, sin)
        return x + self.mlp(self.ln_2(x) * (1 + scale_2) + shift_2)


class TimeEmbedding(nn.Module):
    """t (..., ) in [0, 1] -> (..., time_dim): [t, sin, cos] of learned Fourier frequencies, then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(dim // 2))
        self.mlp = nn.Sequential(nn.Linear(dim + 1, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()[..., None]
        angles = 2 * math.pi * t * self.freqs.float()
        features = torch.cat([t, angles.sin(), angles.cos()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"vocab_size {cfg.vocab_size} is unset: prepare_config fills it from the tokenizer")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.time = TimeEmbedding(cfg.time_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(FiLMBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        cos, sin = rotary_tables(cfg.seq_len, cfg.n_embd // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's N(0, 0.02) (residual projections scaled by 1/sqrt(2 n_layer)), zero biases, zero FiLM."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)
        for block in self.h:
            nn.init.zeros_(block.film.weight)

    def logits(self, theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """theta (B, L, K) input distributions, t (B, L) times per position (or (B,)) -> logits (B, L, K) fp32."""
        B, L, _ = theta.shape
        if t.dim() == 1:
            t = t[:, None].expand(B, L)
        x = self.drop(theta.to(self.wte.weight.dtype) @ self.wte.weight)
        temb = self.time(t)
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for block in self.h:
            x = block(x, temb, cos, sin)
        return self.lm_head(self.ln_f(x)).float()

    def forward(self, batch: dict[str, torch.Tensor]):
        """batch: ids (B, L); optional cond (B, L) bool (conditioned positions), t (B,) and noise (B, L, K)
        (drawn here when absent). -> (mean L^inf loss per unconditioned token, number of those tokens)."""
        ids = batch["ids"]
        K, beta_1 = self.cfg.vocab_size, self.cfg.beta
        B = ids.size(0)
        cond = batch.get("cond")
        cond = torch.zeros_like(ids, dtype=torch.bool) if cond is None else cond.bool()
        t = batch.get("t")
        t = torch.rand(B, device=ids.device) if t is None else t.float()
        e_x = F.one_hot(ids, K).float()
        noise = batch.get("noise")
        noise = torch.randn_like(e_x) if noise is None else noise.float()
        beta = (beta_1 * t**2)[:, None, None]
        y = beta * (K * e_x - 1) + (beta * K).sqrt() * noise
        theta = torch.where(cond[..., None], e_x, y.softmax(-1))
        times = torch.where(cond, 1.0, t[:, None])
        e_hat = self.logits(theta, times).softmax(-1)
        per_token = K * beta_1 * t[:, None] * (e_x - e_hat).pow(2).sum(-1)  # (B, L)
        free = (~cond).float()
        n = free.sum()
        return (per_token * free).sum() / n.clamp(min=1), int(n)


# ----------------------------------------------------------------------------------------------- data


def conditioning_masks(rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """The seed's masks: a span of 0..seq_len-1 conditioned tokens at a random start; half of the rows scatter
    the same number of tokens to random positions instead. -> (B, L) bool."""
    length = rng.integers(0, seq_len, size=batch_size)
    start = rng.integers(0, seq_len - length + 1)
    pos = np.arange(seq_len)[None]
    masks = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    scatter = rng.random(batch_size) < 0.5
    masks[scatter] = rng.permuted(masks[scatter], axis=1)
    return masks


class FlowWindows:
    """Token windows of seq_len for training; each with a conditioning mask (when cfg.conditioning). Eval batches
    also carry fixed times and noise, so eval losses compare across steps."""

    unit = UNIT

    def __init__(self, train_ids, eval_ids, cfg: Config):
        self.cfg = cfg
        self.windows = TokenWindows(train_ids, eval_ids, cfg.seq_len - 1, unit=UNIT)  # idx + last target = L

    def describe(self) -> str:
        return self.windows.describe()

    def _batch(self, window: dict, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        ids = torch.cat([window["idx"], window["targets"][:, -1:]], 1)
        B, L = ids.shape
        cond = conditioning_masks(rng, B, L) if self.cfg.conditioning else np.zeros((B, L), dtype=bool)
        return {"ids": ids, "cond": torch.from_numpy(cond)}

    def train_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        return self._batch(self.windows.train_batch(rng, batch_size), rng)

    def eval_batches(self, batch_size: int, max_batches: int):
        rng = np.random.default_rng(EVAL_SEED)
        for window in self.windows.eval_batches(batch_size, max_batches):
            batch = self._batch(window, rng)
            B, L = batch["ids"].shape
            batch["t"] = torch.from_numpy(rng.random(B, dtype=np.float32))
            batch["noise"] = torch.from_numpy(rng.standard_normal((B, L, self.cfg.vocab_size), dtype=np.float32))
            yield batch


def load_corpus(spec: str, options: dict) -> tuple[str, str]:
    return text_corpus(spec, options, BUILTIN_DEFAULT_MB)


@lru_cache(maxsize=4)
def trained_tokenizer(text: str, vocab_size: int) -> bytes:
    """prepare_config and make_data both need the tokenizer trained on the corpus: train it once."""
    return sentencepiece_model_bytes(text, vocab_size)


def corpus_tokenizer(cfg: Config, spec: str, options: dict, train_text: str | None = None) -> bytes:
    data = tokenizer_bytes(options)
    if data is None:
        data = trained_tokenizer(train_text if train_text is not None else load_corpus(spec, options)[0],
                                 cfg.vocab_size)
    return data


def prepare_config(cfg: Config, spec: str, options: dict) -> Config:
    vocab_size = load_sentencepiece(corpus_tokenizer(cfg, spec, options)).vocab_size()
    return dataclasses.replace(cfg, vocab_size=vocab_size, beta_1=cfg.beta_1 or matched_beta_1(vocab_size))


def make_data(cfg: Config, spec: str, options: dict) -> FlowWindows:
    """options: eval_split, eval_data, first_mb, tokenizer, assets (see the module docstring)."""
    train, evals = load_corpus(spec, options)
    model_bytes = corpus_tokenizer(cfg, spec, options, train)
    sp = load_sentencepiece(model_bytes)
    if sp.vocab_size() != cfg.vocab_size:
        raise UserError(f"the tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}")
    data = FlowWindows(sp.encode(train), sp.encode(evals), cfg)
    data.assets = {TOKENIZER_FILE: model_bytes}
    data.meta = {"tokenizer": "sentencepiece-bpe", "vocab_size": cfg.vocab_size}
    return data


# ----------------------------------------------------------------------------------------------- sampling


def input_distribution(log_theta: torch.Tensor, fixed: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
    """theta = exp(log theta), one-hot at the fixed (conditioned) positions."""
    return torch.where(fixed[..., None], one_hot, log_theta.exp())


def step_times(fixed: torch.Tensor, t: float, batch_size: int) -> torch.Tensor:
    """(B, L) network times: t, and 1 at the fixed positions."""
    return torch.where(fixed, 1.0, t).expand(batch_size, -1)


def bayesian_update(log_theta: torch.Tensor, k: torch.Tensor, alpha: float, noise: torch.Tensor) -> torch.Tensor:
    """theta ∝ exp(y) theta with y = alpha (K e_k - 1) + sqrt(alpha K) noise, noise ~ N(0, I), in log space."""
    K = log_theta.size(-1)
    y = alpha * (K * F.one_hot(k, K).to(log_theta.dtype) - 1) + math.sqrt(alpha * K) * noise
    return torch.log_softmax(log_theta + y, dim=-1)


@cache  # never evicted: a captured CUDA graph (the native runtime's) reads these tensors
def noise_constants(n_elements: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The element counters and the inverse-CDF table (families.bfn.normal_table) on a device, made once (before a
    CUDA graph's capture: its warm-up run makes them)."""
    start, slope = normal_table()
    return (torch.arange(n_elements, device=device), torch.from_numpy(start).to(device),
            torch.from_numpy(slope).to(device))


def update_noise(keys: torch.Tensor, seq_len: int, vocab_size: int) -> torch.Tensor:
    """keys (B, 2) int64: a step's rows of families.bfn.noise_keys, on the device -> that step's N(0, 1) noise
    (B, L, K) float32 there, the same bits as families.bfn.update_noise (the integer and float ops it documents, in
    the same order; no host synchronisation)."""
    index, start, slope = noise_constants(noise_elements(seq_len, vocab_size), keys.device)
    out = torch.empty((len(keys), len(index)), dtype=torch.float32, device=keys.device)
    rows = 1 if keys.device.type == "cpu" else len(keys)  # the CPU a row at a time, as numpy: 2x faster at batch 64
    for first in range(0, len(keys), rows):
        part = slice(first, first + rows)
        bins, fraction = noise_bins(keys[part, :1], keys[part, 1:], index)
        torch.mul(fraction.float(), slope[bins], out=out[part]).add_(start[bins])  # the product is exact: one rounding
    return out.view(-1, seq_len, vocab_size)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@stepwise
@torch.no_grad()
def generate_eager(model: nn.Module, ids: torch.Tensor, fixed: torch.Tensor, n_steps: int,
                   sampling: SamplingConfig, batch_size: int = 1) -> torch.Tensor:
    """ids, fixed (L,): tokens and which positions are conditioned. -> sampled tokens (batch_size, L) on the
    device; one static-shape network pass per step, no host synchronisation (the update noise is computed there).
    Stepwise: a network pass per step; the sample exists only after the last."""
    device = model_device(model)
    K, beta_1 = model.cfg.vocab_size, model.cfg.beta
    gen = make_generator(sampling.seed, device)
    keys = torch.from_numpy(noise_keys(sampling.seed, batch_size, n_steps)).to(device)  # the update noise's
    ids, fixed = ids.to(device), fixed.to(device)
    one_hot = F.one_hot(ids, K).float()
    log_theta = torch.full((batch_size, len(ids), K), -math.log(K), device=device)
    for i in range(1, n_steps + 1):
        theta = input_distribution(log_theta, fixed, one_hot)
        logits = model.logits(theta, step_times(fixed, (i - 1) / n_steps, batch_size))
        k = torch.where(fixed, ids, sample(logits, sampling, gen))
        noise = update_noise(keys[i - 1], len(ids), K)
        log_theta = bayesian_update(log_theta, k, step_alpha(beta_1, i, n_steps), noise)
        yield lambda: None
    logits = model.logits(input_distribution(log_theta, fixed, one_hot), step_times(fixed, 1.0, batch_size))
    return torch.where(fixed, ids, sample(logits, sampling, gen))


@torch.no_grad()
def generate_reference(model: nn.Module, ids: torch.Tensor, fixed: torch.Tensor, n_steps: int,
                       sampling: SamplingConfig, batch_size: int = 1) -> torch.Tensor:
    """The seed's loop: each step's probabilities go to the host, numpy draws every free position, and the
    Bayesian update runs on the CPU. -> tokens (batch_size, L) on the CPU."""
    device = model_device(model)
    K, beta_1 = model.cfg.vocab_size, model.cfg.beta
    rng, keys = np.random.default_rng(sampling.seed), torch.from_numpy(noise_keys(sampling.seed, batch_size, n_steps))
    ids, fixed = ids.cpu(), fixed.cpu()
    one_hot = F.one_hot(ids, K).float()
    log_theta = torch.full((batch_size, len(ids), K), -math.log(K))

    def draw(log_theta: torch.Tensor, t: float) -> torch.Tensor:
        theta = input_distribution(log_theta, fixed, one_hot)
        logits = model.logits(theta.to(device), step_times(fixed, t, batch_size).to(device))
        probs = torch.softmax(logits, -1).cpu().numpy()
        k = ids.repeat(batch_size, 1)
        for b in range(batch_size):
            for j in np.flatnonzero(~fixed.numpy()):
                k[b, j] = sample_host(probs[b, j], sampling, rng)
        return k

    for i in range(1, n_steps + 1):
        k = draw(log_theta, (i - 1) / n_steps)
        noise = update_noise(keys[i - 1], len(ids), K)
        log_theta = bayesian_update(log_theta, k, step_alpha(beta_1, i, n_steps), noise)
    return draw(log_theta, 1.0)


# ----------------------------------------------------------------------------------------------- generate


@stepwise
def generate(model: Model, cfg: Config, request: GenerateRequest, backend: str = "eager") -> GenerateResult:
    if backend not in BACKENDS:
        raise UserError(f"bfn has no backend {backend!r} here; choose from {', '.join(BACKENDS)}")
    sp = request_tokenizer(request)
    plan = plan_generation(cfg, request, sp)
    ids_t = torch.tensor(plan.ids, dtype=torch.long)
    fixed_t = torch.tensor(plan.fixed, dtype=torch.bool)
    device = model_device(model)
    sync(device)
    t0 = time.perf_counter()
    if backend == "eager-reference":
        tokens = generate_reference(model, ids_t, fixed_t, plan.n_steps, request.sampling, request.batch_size)
    else:
        steps = generate_eager.steps(model, ids_t, fixed_t, plan.n_steps, request.sampling, request.batch_size)
        tokens = yield from map_steps(steps, lambda _: [b""] * request.batch_size)
    rows = tokens[:, plan.out].tolist()
    sync(device)
    seconds = time.perf_counter() - t0
    outputs = [sp.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, plan.n_new * request.batch_size, seconds, UNIT, passes=plan.n_steps + 1,
                          extra={"n_steps": plan.n_steps})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
