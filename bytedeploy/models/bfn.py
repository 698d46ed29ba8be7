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
  eager            everything on the device, no host synchronisation inside the loop.
Both draw the Gaussian sender noise from a torch.Generator seeded with the sampling seed, in the same order; with
temperature 0 (no categorical randomness) they give the same tokens when the model runs on the CPU. On CUDA the
eager loop's generator is the device's, so its noise (and tokens) differ from the reference's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.sentencepiece_tokenizer import (
    BUILTIN_DEFAULT_MB,
    load_sentencepiece,
    read_model_file,
    sentencepiece_model_bytes,
)
from bytedeploy.data.text import TokenWindows
from bytedeploy.data.text import load_corpus as text_corpus
from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models.layers import MLP, GPT2StackConfig
from bytedeploy.sampling import SamplingConfig, make_generator, sample, sample_host

BACKENDS = ("eager-reference", "eager")
UNIT = "token"
LOSS_IS_NLL = False
CLI_ALIASES = {"context": "seq_len"}
TOKENIZER_FILE = "tokenizer.model"
PAPER_K, PAPER_BETA_1 = 27, 0.75  # the paper's text8 setting
EVAL_SEED = 1234  # fixed times, noise and conditioning masks of the eval batches


@dataclass
class Config:
    vocab_size: int = 8000  # K; the size of a tokenizer trained on the corpus, then set from the tokenizer
    seq_len: int = 64  # fixed sequence length (the seed's)
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 1024
    time_dim: int = 128  # Fourier features and MLP width of the time embedding (the seed's 128)
    beta_1: float = 0.0  # 0 = matched_beta_1(vocab_size); prepare_config writes the number
    dropout: float = 0.1
    n_steps: int = 1000  # sampling steps (the seed samples with 1000)
    conditioning: bool = True  # train with the seed's random conditioning masks (prompts need them)

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must divide by n_head {self.n_head} into even head sizes")
        if self.seq_len < 2 or self.time_dim < 2 or self.time_dim % 2:
            raise ValueError("seq_len must be >= 2 and time_dim even")
        if self.beta_1 < 0 or self.n_steps < 1 or self.vocab_size < 0:
            raise ValueError("beta_1 must be >= 0, n_steps >= 1, vocab_size >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def beta(self) -> float:
        """beta(1), the accuracy at t = 1."""
        return self.beta_1 or matched_beta_1(self.vocab_size)


PRESETS = {
    "tiny": dict(vocab_size=256, seq_len=32, n_embd=64, n_layer=2, n_head=2, time_dim=32, dropout=0.0, n_steps=100),
    "small": dict(vocab_size=2048, seq_len=64, n_embd=256, n_layer=8, n_head=8, dropout=0.1),
    "base": dict(),  # the seed's: 8 layers, 8 heads, width 1024, sequence 64, 1000 sampling steps
}


def matched_beta_1(K: int) -> float:
    """beta(1) for K classes at which theta(1) = softmax(y) puts its argmax on a wrong class as often as in the
    paper's text8 setting. y_x - y_j ~ N(beta K, 2 beta K), so a given wrong j wins with probability
    1 - Phi(sqrt(beta K / 2)); summed over the K - 1 wrong classes (union bound) that is ~0.019 for text8."""
    if K < 2:
        raise ValueError(f"vocab_size {K} is unset: prepare_config fills it from the tokenizer")
    normal = NormalDist()
    miss = (PAPER_K - 1) * (1 - normal.cdf(math.sqrt(PAPER_BETA_1 * PAPER_K / 2)))
    z = normal.inv_cdf(1 - miss / (K - 1))
    return 2 * z * z / K


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
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
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


def tokenizer_bytes(options: dict) -> bytes | None:
    """The checkpoint's tokenizer (options["assets"]), else a --tokenizer file; None when neither is given."""
    if options.get("assets"):  # a checkpoint's: the model was trained with exactly this one
        path = Path(options["assets"]) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"checkpoint has no sentencepiece tokenizer: {path} is missing")
        return path.read_bytes()
    if options.get("tokenizer"):
        return read_model_file(options["tokenizer"])
    return None


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


def bayesian_update(log_theta: torch.Tensor, k: torch.Tensor, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """theta ∝ exp(y) theta with y ~ N(alpha (K e_k - 1), alpha K I), in log space."""
    K = log_theta.size(-1)
    noise = torch.randn(log_theta.shape, generator=gen, device=log_theta.device, dtype=log_theta.dtype)
    y = alpha * (K * F.one_hot(k, K).to(log_theta.dtype) - 1) + math.sqrt(alpha * K) * noise
    return torch.log_softmax(log_theta + y, dim=-1)


def step_alpha(beta_1: float, i: int, n_steps: int) -> float:
    return beta_1 * (2 * i - 1) / n_steps**2


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_eager(model: nn.Module, ids: torch.Tensor, fixed: torch.Tensor, n_steps: int,
                   sampling: SamplingConfig, batch_size: int = 1) -> torch.Tensor:
    """ids, fixed (L,): tokens and which positions are conditioned. -> sampled tokens (batch_size, L) on the
    device; one static-shape network pass per step, no host synchronisation."""
    device = model_device(model)
    K, beta_1 = model.cfg.vocab_size, model.cfg.beta
    gen = make_generator(sampling.seed, device)
    ids, fixed = ids.to(device), fixed.to(device)
    one_hot = F.one_hot(ids, K).float()
    log_theta = torch.full((batch_size, len(ids), K), -math.log(K), device=device)
    for i in range(1, n_steps + 1):
        theta = input_distribution(log_theta, fixed, one_hot)
        logits = model.logits(theta, step_times(fixed, (i - 1) / n_steps, batch_size))
        k = torch.where(fixed, ids, sample(logits, sampling, gen))
        log_theta = bayesian_update(log_theta, k, step_alpha(beta_1, i, n_steps), gen)
    logits = model.logits(input_distribution(log_theta, fixed, one_hot), step_times(fixed, 1.0, batch_size))
    return torch.where(fixed, ids, sample(logits, sampling, gen))


@torch.no_grad()
def generate_reference(model: nn.Module, ids: torch.Tensor, fixed: torch.Tensor, n_steps: int,
                       sampling: SamplingConfig, batch_size: int = 1) -> torch.Tensor:
    """The seed's loop: each step's probabilities go to the host, numpy draws every free position, and the
    Bayesian update runs on the CPU. -> tokens (batch_size, L) on the CPU."""
    device = model_device(model)
    K, beta_1 = model.cfg.vocab_size, model.cfg.beta
    rng = np.random.default_rng(sampling.seed)
    gen = make_generator(sampling.seed, "cpu")
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
        log_theta = bayesian_update(log_theta, k, step_alpha(beta_1, i, n_steps), gen)
    return draw(log_theta, 1.0)


# ----------------------------------------------------------------------------------------------- generate


def request_tokenizer(request: GenerateRequest):
    data = tokenizer_bytes(request.options)
    if data is None:
        raise UserError("bfn generation needs the checkpoint's tokenizer (options['assets'])")
    return load_sentencepiece(data)


def build_sequence(cfg: Config, request: GenerateRequest, sp) -> tuple[list[int], list[bool], slice]:
    """-> (token ids, fixed flags) over the used positions, and the slice of positions the output returns."""
    template = request.options.get("infill")
    if template:
        if request.prompt:
            raise UserError("give either a prompt or an infill template, not both")
        ids: list[int] = []
        fixed: list[bool] = []
        for part in template:
            if isinstance(part, str):
                piece = sp.encode(part)
                ids += piece
                fixed += [True] * len(piece)
            elif isinstance(part, int) and not isinstance(part, bool) and part > 0:
                ids += [0] * part
                fixed += [False] * part
            else:
                raise UserError(f"infill template parts are text or hole sizes > 0, got {part!r}")
        if len(ids) > cfg.seq_len:
            raise UserError(f"the infill template takes {len(ids)} tokens; the model's sequence has {cfg.seq_len}")
        return ids, fixed, slice(0, len(ids))
    try:
        prompt = sp.encode(request.prompt.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt is not valid UTF-8: byte 0x{request.prompt[e.start]:02x} at offset {e.start}") \
            from None
    room = cfg.seq_len - len(prompt)
    if room < 1:
        raise UserError(f"the prompt takes {len(prompt)} tokens; the model's sequence has {cfg.seq_len}")
    max_new = request.max_new or room
    if max_new > room:
        raise UserError(f"--max-new {max_new} does not fit: the sequence has {cfg.seq_len} tokens and the prompt "
                        f"takes {len(prompt)}, leaving {room}")
    return prompt, [True] * len(prompt), slice(len(prompt), len(prompt) + max_new)


def sampling_steps(cfg: Config, request: GenerateRequest) -> int:
    """The request's n_steps option, else the model's; every backend reads it here."""
    n_steps = int(request.options.get("n_steps") or cfg.n_steps)
    if n_steps < 1:
        raise UserError(f"the Bayesian-flow sampler needs at least 1 step, not {n_steps}")
    return n_steps


@dataclass
class Plan:
    """A generate request laid out on the model's seq_len positions (every backend samples from one)."""
    ids: list[int]  # prompt / template tokens, 0 elsewhere; seq_len long
    fixed: list[bool]  # positions the sampler keeps (conditioning); seq_len long
    out: slice  # the positions returned
    n_steps: int
    n_new: int  # sampled tokens per row inside out


def plan_generation(cfg: Config, request: GenerateRequest, sp) -> Plan:
    if sp.vocab_size() != cfg.vocab_size:
        raise UserError(f"the tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}")
    ids, fixed, out = build_sequence(cfg, request, sp)
    pad = cfg.seq_len - len(ids)  # positions after the used ones are sampled too: the network knows L tokens
    n_new = sum(not f for f in fixed[out]) if request.options.get("infill") else out.stop - out.start
    return Plan(ids + [0] * pad, fixed + [False] * pad, out, sampling_steps(cfg, request), n_new)


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
    loop = generate_reference if backend == "eager-reference" else generate_eager
    tokens = loop(model, ids_t, fixed_t, plan.n_steps, request.sampling, request.batch_size)
    rows = tokens[:, plan.out].tolist()
    sync(device)
    seconds = time.perf_counter() - t0
    outputs = [sp.decode(row).encode("utf-8") for row in rows]
    return GenerateResult(outputs, plan.n_new * request.batch_size, seconds, UNIT, passes=plan.n_steps + 1,
                          extra={"n_steps": plan.n_steps})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
