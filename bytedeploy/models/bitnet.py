"""BitNet over bytes (BitNet arXiv 2310.11453; BitNet b1.58 arXiv 2402.17764): a LLaMA-like transformer whose
attention and FFN projections are all BitLinear layers (bytedeploy.models.bitlinear).

Model: byte embedding (vocab 256, full precision) -> n_layer blocks -> RMSNorm -> LM head (full precision, untied).
A block is x + Attention(x), then x + SwiGLU(x), no biases anywhere:
  Attention  q, k, v = BitLinear(x) each (own per-tensor weight scale, as in b1.58-2B4T's separate projections),
             rotary positions on q and k, causal softmax attention (F.scaled_dot_product_attention, the shared
             KVCache), output projection wo = BitLinear.
  SwiGLU     w2(silu(w1 x) * w3 x), all three BitLinear; width ffn_hidden.
Every BitLinear normalizes its own input with an RMSNorm (learned gain), so the LLaMA block's pre-attention and
pre-FFN RMSNorms are not repeated outside: q/k/v's and w1/w3's norms play their part, and wo's and w2's norms are
b1.58-2B4T's attention and FFN "sub-norms" (SubLN). mode = "b1.58" (ternary weights, the default) or "b1" (binary
weights, sign(W - mean W), the first BitNet paper, whose blocks were otherwise GPT-like: we keep the LLaMA block),
or "fp", the full-precision twin that the papers compare against: the same blocks and norms with plain linear
layers (BitLinear without its quantizers), a training baseline that export and the native runtime refuse.
Rotary embeddings use the rotate-half layout (first and second halves of each head rotate together, as Hugging
Face LLaMA), theta = rope_theta, positions start..start+T-1.

Data: the bytes of every file of --data (builtin:stdlib or a folder, via load_records) concatenated in path order,
with files split into train and eval by the shared path hash (split_records); TokenWindows cut the stream into
next-byte training windows. The loss is cross-entropy in nats, reported as bits per byte.

Generation backends:
  eager-reference  the seed-like loop: each new byte re-runs the model over the whole context (its last block_size
                   bytes, positions from 0), copies the probabilities to the host and samples with numpy.
  eager            KV-cache prefill, then one cached step per byte with sampling on the device; the only host
                   transfer is at the end. Once the context is full the window slides by one byte per step and each
                   step re-prefills the window from position 0: dropping the oldest byte changes every later hidden
                   state, so the cache is stale. That is the reference's computation, so greedy outputs are identical.
An empty prompt starts from a newline byte (10), which is not part of the output. Default: 256 new bytes.
Model.set_inference_int(True) runs every BitLinear through the integer reference path in eval mode.

Where we differ from the seed (kyegomez/BitNet): its newest BitLinear builds a fresh LayerNorm inside forward (so
the norm is never trained), binarizes the weights and uses GELU feed-forwards with learned absolute positions; we
follow the papers: a trained RMSNorm gain, ternary (b1.58) or binary (b1) weights with absmean scales, 8-bit absmax
activations per token, straight-through estimators, and LLaMA-like blocks (RMSNorm, SwiGLU, rotary, no biases).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.files import FileRecord, load_records, split_records
from bytedeploy.data.text import TokenWindows
from bytedeploy.errors import UserError
from bytedeploy.families.bitnet import DEFAULT_MAX_NEW, EMPTY_PROMPT, UNIT, Config
from bytedeploy.families.bitnet import PRESETS as PRESETS  # the registry's family interface (registry.py)
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.kv_cache import KVCache
from bytedeploy.models.bitlinear import BitLinear, RMSNorm, set_inference_int
from bytedeploy.models.layers import causal_mask
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.sampling import SamplingConfig, sample_host

BACKENDS = ("eager-reference", "eager")
LOSS_IS_NLL = True


# ----------------------------------------------------------------------------------------------- model


def rotary_tables(n_positions: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n_positions, head_dim) in the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], -1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated by the angles of its T positions (cos, sin: (T, D))."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        C = cfg.n_embd
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.wq = BitLinear(C, C, cfg.mode)
        self.wk = BitLinear(C, C, cfg.mode)
        self.wv = BitLinear(C, C, cfg.mode)
        self.wo = BitLinear(C, C, cfg.mode)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int = 0, attn_mask=None):
        """x (B, T, C) at positions start..start+T-1; with a cache, attention spans positions 0..start+T-1. attn_mask
        (additive or True = may attend) overrides the causal default (exported graphs with per-row positions)."""
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)
        mask, is_causal = attn_mask, False
        if T > 1 and attn_mask is None:
            if k.size(2) == T:
                is_causal = True
            else:
                mask = causal_mask(T, k.size(2), x.device)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=p,
                                           is_causal=is_causal, scale=1.0 / math.sqrt(C // self.n_head))  # constant
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = BitLinear(cfg.n_embd, cfg.ffn_hidden, cfg.mode)  # gate
        self.w3 = BitLinear(cfg.n_embd, cfg.ffn_hidden, cfg.mode)  # up
        self.w2 = BitLinear(cfg.ffn_hidden, cfg.n_embd, cfg.mode)  # down
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, start=0, attn_mask=None):
        x = x + self.attn(x, cos, sin, cache, start, attn_mask)
        return x + self.ffn(x)


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, cfg.n_layer)

    def logits(self, idx: torch.Tensor, caches: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """idx (B, T) bytes at positions start..start+T-1 -> logits (B, T, 256)."""
        T = idx.size(1)
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds the model's {self.cfg.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.drop(self.tok_emb(idx))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], start)
        return self.lm_head(self.norm(x).to(x.dtype))  # RMSNorm computes in float32

    def forward(self, batch: dict[str, torch.Tensor]):
        """-> (mean cross-entropy in nats per byte, number of targets)."""
        logits = self.logits(batch["idx"])
        targets = batch["targets"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, targets.numel()

    def make_caches(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> list[KVCache]:
        ref = self.tok_emb.weight
        return [KVCache(batch_size, self.cfg.n_head, max_len or self.cfg.block_size, self.cfg.head_dim,
                        device=device or ref.device, dtype=dtype or ref.dtype)
                for _ in range(self.cfg.n_layer)]

    def set_inference_int(self, enabled: bool = True) -> Model:
        """In eval mode, run every BitLinear through the integer reference path (int8 x ternary, int32 sums)."""
        set_inference_int(self, enabled)
        return self


def init_weights(model: Model, n_layer: int) -> None:
    """N(0, 0.02) for every matrix, the residual projections (wo, w2) scaled by 1/sqrt(2 n_layer) as in GPT-2;
    norm gains stay 1."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)


# ----------------------------------------------------------------------------------------------- data


def first_bytes(records: list[FileRecord], limit: int) -> list[FileRecord]:
    """The leading files that hold the first `limit` bytes (--first-mb)."""
    out, total = [], 0
    for r in records:
        if total >= limit:
            break
        out.append(r)
        total += len(r.data)
    return out


def byte_ids(records: list[FileRecord]) -> np.ndarray:
    return np.frombuffer(b"".join(r.data for r in records), dtype=np.uint8)


def make_data(cfg: Config, spec: str, options: dict) -> TokenWindows:
    """options: eval_split (0.05), eval_data (a folder of eval files), first_mb (keep the first N MB of files)."""
    records = load_records(spec)
    first_mb = options.get("first_mb")
    if first_mb is not None:
        if first_mb <= 0:
            raise UserError(f"--first-mb must be > 0, got {first_mb}")
        records = first_bytes(records, int(first_mb * 1e6))
    if options.get("eval_data"):
        train, evals = records, load_records(str(options["eval_data"]))
    else:
        train, evals = split_records(records, options.get("eval_split", 0.05))
    return TokenWindows(byte_ids(train), byte_ids(evals), cfg.block_size, unit=UNIT)


# ----------------------------------------------------------------------------------------------- generation


@stepwise
def generate(model: Model, cfg: Config, request: GenerateRequest, backend: str = "eager") -> GenerateResult:
    if backend not in BACKENDS:
        raise UserError(f"bitnet has no backend {backend!r} here; choose from {', '.join(BACKENDS)}")
    ids = list(request.prompt or EMPTY_PROMPT)
    max_new = request.max_new or DEFAULT_MAX_NEW
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    if backend == "eager-reference":
        rng = np.random.default_rng(request.sampling.seed)
        rows = [generate_reference(model, ids, max_new, request.sampling, rng) for _ in range(request.batch_size)]
    else:
        steps = generate_cached.steps(model, ids, max_new, request.sampling, request.batch_size)
        rows = (yield from map_steps(steps, lambda rows: [bytes(row) for row in rows.tolist()])).tolist()
    sync(device)
    seconds = time.perf_counter() - t0
    return GenerateResult([bytes(row) for row in rows], sum(len(r) for r in rows), seconds, UNIT)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_reference(model: Model, ids: list[int], max_new: int, sampling: SamplingConfig,
                       rng: np.random.Generator) -> list[int]:
    """The seed-like loop: each byte re-runs the model over the last block_size bytes, no cache; the
    probabilities go to the host and numpy draws the byte."""
    device = next(model.parameters()).device
    ids = list(ids)
    n_prompt = len(ids)
    for _ in range(max_new):
        window = torch.tensor([ids[-model.cfg.block_size:]], dtype=torch.long, device=device)
        probs = torch.softmax(model.logits(window)[0, -1].float(), -1).cpu().numpy()
        ids.append(sample_host(probs, sampling, rng))
    return ids[n_prompt:]


@stepwise
@torch.no_grad()
def generate_cached(model: Model, ids: list[int], max_new: int, sampling: SamplingConfig,
                    batch_size: int = 1) -> torch.Tensor:
    """Our loop: KV-cache prefill and one cached step per byte while the context has room, then a re-prefill of
    the sliding window per byte; sampling on the device; one host transfer at the end (by the caller).
    -> new bytes (batch_size, max_new) on the model's device. Stepwise: a byte per step."""
    device = next(model.parameters()).device
    T = model.cfg.block_size
    gen = make_generator(sampling.seed, device)
    window = ids[-T:]
    n0 = len(window)
    seq = torch.empty(batch_size, n0 + max_new, dtype=torch.long, device=device)
    seq[:, :n0] = torch.tensor(window, dtype=torch.long, device=device)
    caches = model.make_caches(batch_size, T)
    logits = model.logits(seq[:, :n0], caches, 0)[:, -1]
    n = n0
    for i in range(max_new):
        seq[:, n] = sample(logits, sampling, gen)
        n += 1
        if i + 1 == max_new:
            break
        yield lambda n=n: seq[:, n0:n]
        if n <= T:
            logits = model.logits(seq[:, n - 1:n], caches, n - 1)[:, -1]
        else:  # the window slid: every cached key belongs to a context that lost its first byte
            logits = model.logits(seq[:, n - T:n])[:, -1]
    return seq[:, n0:n]
