"""Native loop of BitNet: runtimes.native.WindowedLM over a static-cache forward of the model's modules.

BitLinear routes (request.options["bitlinear"]):
  w2a8   the W2A8 kernel of bytedeploy.plugins.bitlinear_kernels (int8 activations x packed 2-bit weights, int32
         sums): the integer path, equal to eager with Model.set_inference_int(True).
  fp     fake quantization as in eager (RMSNorm, 8-bit activations, float matmul) with the quantized weights
         computed once instead of per call: equal to the eager backend's numbers.
  auto   (default) w2a8 when the kernel is importable and runs here, else fp; extra["bitlinear"] says which and why.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bytedeploy.errors import UserError
from bytedeploy.families.bitnet import FP_MODE
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bitnet
from bytedeploy.models.bitlinear import BitLinear, fake_quantize_activations, fake_quantize_weights
from bytedeploy.runtimes.native import WindowedLM, attention_bias, cache_attention, cached_runner, sampling_key, sync

ROUTES = ("auto", "w2a8", "fp")


def load_kernel():
    """-> (bitlinear_w2a8 or None, why not)."""
    try:
        from bytedeploy.plugins.bitlinear_kernels import bitlinear_w2a8
    except Exception as e:  # not written yet, or its triton/cupy import fails on this machine
        return None, f"bytedeploy.plugins.bitlinear_kernels.bitlinear_w2a8 is unavailable ({type(e).__name__}: {e})"
    return bitlinear_w2a8, ""


class Linears:
    """Every BitLinear of the model as a function x -> y, with its weights prepared once."""

    def __init__(self, model, route: str):
        if route not in ROUTES:
            raise UserError(f"unknown bitlinear route {route!r}; choose {', '.join(ROUTES)}")
        self.note = "fp fake quantization, weights quantized once"
        kernel, why = (None, "fp asked for") if route == "fp" else load_kernel()
        layers = [m for m in model.modules() if isinstance(m, BitLinear)]
        if any(m.mode == FP_MODE for m in layers):
            raise UserError("this BitNet is the full-precision twin (mode=fp), a training baseline: the native "
                            "runtime runs BitLinear models; use --backend eager")
        if kernel is not None:
            try:
                self.weights = {id(m): m.export_int() for m in layers}
                probe = layers[0]
                kernel(torch.zeros(1, probe.in_features, device=probe.weight.device), self.weights[id(probe)].packed,
                       self.weights[id(probe)].scale, probe.in_features)
                self.kernel, self.note = kernel, "w2a8 kernel (bytedeploy.plugins.bitlinear_kernels)"
            except Exception as e:
                kernel, why = None, f"the W2A8 kernel failed here ({type(e).__name__}: {e})"
        if kernel is None:
            if route == "w2a8":
                raise UserError(f"--bitlinear w2a8: {why}")
            self.kernel = None
            self.weights = {id(m): fake_quantize_weights(m.weight, m.mode) for m in layers}
            if route == "auto":
                self.note += f" ({why})"

    def __call__(self, layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
        x_normed = layer.norm(x)
        if self.kernel is not None:
            w = self.weights[id(layer)]
            y = self.kernel(x_normed.reshape(-1, layer.in_features), w.packed, w.scale, layer.in_features)
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
            return y if layer.bias is None else y + layer.bias.to(y.dtype)
        w = self.weights[id(layer)]
        return F.linear(fake_quantize_activations(x_normed).to(w.dtype), w, layer.bias)  # the norm is float32


def forward(model, linear: Linears, tokens, slots, key_mask, caches):
    """bitnet.Model.logits for tokens (B, T) written at cache slots (T,) (also their rotary positions), attending
    over the whole cache under key_mask (T, L) -> logits (B, T, 256)."""
    cos, sin = model.rope_cos.index_select(0, slots), model.rope_sin.index_select(0, slots)
    x = model.tok_emb(tokens)
    bias = attention_bias(key_mask, x.dtype)
    for layer, cache in zip(model.layers, caches):
        attn, ffn = layer.attn, layer.ffn
        B, T, C = x.shape
        q, k, v = (linear(w, x).view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
                   for w in (attn.wq, attn.wk, attn.wv))
        q, k = bitnet.apply_rotary(q, cos, sin), bitnet.apply_rotary(k, cos, sin)
        cache.k.index_copy_(2, slots, k.to(cache.k.dtype))
        cache.v.index_copy_(2, slots, v.to(cache.v.dtype))
        y = cache_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), bias)
        x = x + linear(attn.wo, y.transpose(1, 2).reshape(B, T, C))
        x = x + linear(ffn.w2, F.silu(linear(ffn.w1, x)) * linear(ffn.w3, x))
    return model.lm_head(model.norm(x).to(x.dtype))  # RMSNorm computes in float32


def make_runner(model, batch_size: int, n0: int, max_new: int, sampling, route: str) -> WindowedLM:
    T = model.cfg.block_size
    device = model.tok_emb.weight.device
    linear = Linears(model, route)
    caches = model.make_caches(batch_size, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    positions = torch.arange(T, device=device)

    def step(tokens, slot, key_mask):
        return forward(model, linear, tokens, slot, key_mask, caches)[:, -1]

    def prefill(tokens):  # the prompt at slots 0..n-1, each query seeing the keys up to its own
        n = tokens.size(1)
        return forward(model, linear, tokens, positions[:n], causal[:n], caches)[:, -1]

    def window_pass(window):  # the whole window from position 0: the caches are rewritten, then read causally
        return forward(model, linear, window, positions, causal, caches)[:, -1]

    runner = WindowedLM(batch_size, n0, max_new, T, model.cfg.vocab_size, device, sampling, step, window_pass,
                        prefill)
    runner.note = linear.note
    return runner


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    route = request.options.get("bitlinear") or "auto"
    window = list(request.prompt or bitnet.EMPTY_PROMPT)[-cfg.block_size:]
    max_new = request.max_new or bitnet.DEFAULT_MAX_NEW
    B = request.batch_size
    sync()
    t0 = time.perf_counter()
    key = ("bitnet", B, len(window), max_new, sampling_key(request.sampling), route)
    runner = cached_runner(model, key, lambda: make_runner(model, B, len(window), max_new, request.sampling, route))
    rows = runner.run(window, request.sampling.seed).tolist()
    sync()
    seconds = time.perf_counter() - t0
    return GenerateResult([bytes(r) for r in rows], sum(len(r) for r in rows), seconds, bitnet.UNIT,
                          extra={"captured": runner.captured_now, "graphs": sorted(runner.graphs),
                                 "bitlinear": runner.note})
