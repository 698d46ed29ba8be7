"""Char-level GPT-2 (GPT-burn, a Rust + Burn re-implementation of GPT-2; the GPT-2 paper).

Model: token embedding + learned positions, pre-LN blocks whose attention projections have no bias and whose
GELU feed-forward (4 x d_model) has biases, a final LayerNorm and an untied LM head (a Linear with bias, as
Burn's default Linear), dropout 0.2. GELU is the exact erf form: Burn's Gelu computes x/2 (1 + erf(x / sqrt 2));
OpenAI's GPT-2 code uses the tanh approximation (``--set gelu=tanh``).

Tokenizer: one token per character of the training corpus (train and eval text), plus an unknown symbol (id 0)
for characters outside it. The unknown symbol is never sampled: its logit is set to -inf in both generation
loops (GPT-burn drops its probability the same way). The tokenizer travels in the checkpoint as
``assets/tokenizer.json``.

Data: --first-mb N keeps the first N megabytes of the corpus (GPT-burn's --n-mega-bytes, which counts MiB and
defaults to 10). builtin:stdlib without --first-mb uses the first 4 MB so that a default run starts in seconds;
files and folders are used whole.

Where we differ from the seed:
- GPT-burn's vocabulary is a fixed list of ~100 ASCII and German characters and it deletes every other character
  from the corpus; ours is the corpus's own characters, so source code and any language train unchanged.
- GPT-burn applies its residual dropout before the attention output projection and trains with a constant
  learning rate, counting each of its "steps" as many optimizer updates; we use GPT-2's order (dropout after the
  projection) and the shared loop (warmup + cosine, --steps counts optimizer updates).
- GPT-burn's run always starts from a prompt (an example sentence by default); an empty prompt here starts from
  a newline, which is not part of the output.

GPT-burn's train defaults are context 64, d_model 64, 2 layers, 2 heads (preset "tiny"), 50 steps, batch 32,
learning rate 3e-3; its run generates 1000 new tokens with seed 0. Preset "toy" is its published 83M model.

Generation backends:
  eager-reference  the seed's loop: no KV cache; every token re-runs the model over the last block_size tokens
                   and samples on the host from the copied probabilities.
  eager            KV cache and sampling on the device. Until the context is full each token is one cached
                   decode step. After that the window slides by one token per step, and with learned absolute
                   positions every cached key and value belongs to a shifted position, so each step re-prefills
                   the last block_size tokens from position 0: exactly the reference's computation, so the
                   logits match the reference (and greedy output is identical) at any length.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.text import TokenWindows
from bytedeploy.data.text import load_corpus as text_corpus
from bytedeploy.errors import UserError
from bytedeploy.families.char_gpt2 import DEFAULT_MAX_NEW, TOKENIZER_FILE, UNIT, Config, load_tokenizer, prompt_ids
from bytedeploy.families.char_gpt2 import PRESETS as PRESETS  # the registry's family interface (registry.py)
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig, init_gpt2_weights
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.sampling import SamplingConfig, sample_host
from bytedeploy.tokenizers import CharTokenizer

BACKENDS = ("eager-reference", "eager")
BUILTIN_DEFAULT_MB = 4.0  # builtin:stdlib without --first-mb


# ----------------------------------------------------------------------------------------------- model


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"vocab_size {cfg.vocab_size} is unset: prepare_config fills it from the corpus")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.transformer = GPT2Stack(GPT2StackConfig(
            cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout,
            bias=False, mlp_bias=True, gelu=cfg.gelu))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)  # untied
        init_gpt2_weights(self, cfg.n_layer)

    def logits(self, idx: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        """idx (B, T) at positions start.. -> logits (B, T, vocab)."""
        return self.lm_head(self.transformer(self.wte(idx), caches, start))

    def forward(self, batch: dict[str, torch.Tensor]):
        """-> (mean cross-entropy in nats per character, number of targets)."""
        logits = self.logits(batch["idx"])
        targets = batch["targets"]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return loss, targets.numel()


# ----------------------------------------------------------------------------------------------- data


def load_corpus(spec: str, options: dict) -> tuple[str, str]:
    return text_corpus(spec, options, BUILTIN_DEFAULT_MB)


def prepare_config(cfg: Config, spec: str, options: dict) -> Config:
    tokenizer = load_tokenizer(options) or CharTokenizer.from_text("".join(load_corpus(spec, options)))
    return dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)


def make_data(cfg: Config, spec: str, options: dict) -> TokenWindows:
    """options: eval_split, eval_data, first_mb, tokenizer, assets (see the module docstring)."""
    train, evals = load_corpus(spec, options)
    tokenizer = load_tokenizer(options) or CharTokenizer.from_text(train + evals)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"the char tokenizer has {tokenizer.vocab_size} symbols, the model {cfg.vocab_size}")
    data = TokenWindows(tokenizer.encode(train), tokenizer.encode(evals), cfg.block_size, unit=UNIT)
    data.assets = {TOKENIZER_FILE: tokenizer.to_json()}
    data.meta = {"tokenizer": "char", "vocab_size": tokenizer.vocab_size}
    return data


# ----------------------------------------------------------------------------------------------- generation


def mask_unknown(logits: torch.Tensor, unknown_id: int) -> torch.Tensor:
    """The unknown symbol stands for characters the model never saw: it must never be emitted."""
    logits = logits.float().clone()
    logits[..., unknown_id] = float("-inf")
    return logits


@stepwise
def generate(model: Model, cfg: Config, request: GenerateRequest, backend: str = "eager") -> GenerateResult:
    if backend not in BACKENDS:
        raise UserError(f"char-gpt2 has no backend {backend!r} here; choose from {', '.join(BACKENDS)}")
    tokenizer = load_tokenizer(request.options)
    if tokenizer is None:
        raise UserError("char-gpt2 generation needs the checkpoint's tokenizer (options['assets'])")
    ids = prompt_ids(request, tokenizer)
    max_new = request.max_new or DEFAULT_MAX_NEW
    device = next(model.parameters()).device
    decode = lambda rows: [tokenizer.decode(row).encode("utf-8") for row in rows]
    sync(device)
    t0 = time.perf_counter()
    if backend == "eager-reference":
        rng = np.random.default_rng(request.sampling.seed)
        rows = [generate_reference(model, ids, max_new, request.sampling, rng, tokenizer.unknown_id)
                for _ in range(request.batch_size)]
    else:
        steps = generate_cached.steps(model, ids, max_new, request.sampling, request.batch_size, tokenizer.unknown_id)
        rows = (yield from map_steps(steps, lambda rows: decode(rows.tolist()))).tolist()
    sync(device)
    seconds = time.perf_counter() - t0
    return GenerateResult(decode(rows), sum(len(r) for r in rows), seconds, UNIT)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_reference(model: Model, ids: list[int], max_new: int, sampling: SamplingConfig,
                       rng: np.random.Generator, unknown_id: int = 0) -> list[int]:
    """The seed's loop: each token re-runs the model over the last block_size tokens, no cache; the
    probabilities go to the host and numpy draws the token."""
    device = next(model.parameters()).device
    ids = list(ids)
    n_prompt = len(ids)
    for _ in range(max_new):
        window = torch.tensor([ids[-model.cfg.block_size:]], dtype=torch.long, device=device)
        logits = mask_unknown(model.logits(window)[0, -1], unknown_id)
        probs = torch.softmax(logits, -1).cpu().numpy()
        ids.append(sample_host(probs, sampling, rng))
    return ids[n_prompt:]


@stepwise
@torch.no_grad()
def generate_cached(model: Model, ids: list[int], max_new: int, sampling: SamplingConfig, batch_size: int = 1,
                    unknown_id: int = 0) -> torch.Tensor:
    """Our loop: KV cache while the context has room, then a re-prefill of the sliding window per token; sampling
    on the device; one host transfer at the end. -> new ids (batch_size, max_new). Stepwise: a token per step."""
    device = next(model.parameters()).device
    T = model.cfg.block_size
    gen = make_generator(sampling.seed, device)
    window = ids[-T:]
    n0 = len(window)
    seq = torch.empty(batch_size, n0 + max_new, dtype=torch.long, device=device)
    seq[:, :n0] = torch.tensor(window, dtype=torch.long, device=device)
    caches = model.transformer.make_caches(batch_size, T)
    logits = model.logits(seq[:, :n0], caches, 0)[:, -1]
    n = n0
    for i in range(max_new):
        seq[:, n] = sample(mask_unknown(logits, unknown_id), sampling, gen)
        n += 1
        if i + 1 == max_new:
            break
        yield lambda n=n: seq[:, n0:n]
        if n <= T:
            logits = model.logits(seq[:, n - 1:n], caches, n - 1)[:, -1]
        else:  # the window slid: every position moved, so the cache is stale; recompute the whole window
            logits = model.logits(seq[:, n - T:n])[:, -1]
    return seq[:, n0:n]
