"""BitLinear (BitNet arXiv 2310.11453, BitNet b1.58 arXiv 2402.17764) and its integer reference path.

BitLinear(x) = rescale(Q_w(W) · Q_a(RMSNorm(x))):

  norm         an RMSNorm with a learned gain (ones at init) inside the layer, on the input of every BitLinear, as
               in the b1.58 "training tips" reference code (``x_norm = RMSNorm(x)`` inside BitLinear). The b1 paper
               uses a LayerNorm there ("SubLN"); we use the RMSNorm in both modes. In a LLaMA-like block this norm
               takes the place of the pre-attention / pre-FFN norms and of b1.58-2B4T's attn/ffn sub-norms.
  activations  per token (last dim), 8-bit absmax: s = 127 / max(max|x|, 1e-5), x_int = clip(round(x s), -128, 127)
               as in the reference code. Since |x s| <= 127 the values really lie in [-127, 127] (a symmetric int8
               range, so -x quantizes to -x_int). The b1 paper's [0, Qb] variant for inputs of ReLU is not used.
  weights      per tensor, beta = max(mean|W|, 1e-5) (the reference code clamps; the paper adds eps: the same
               beta divides and rescales, so fake-quant and integer paths agree exactly).
               b1.58: W_int = RoundClip(W / beta, -1, 1) in {-1, 0, 1}.
               b1:    W_int = Sign(W - mean(W)) in {-1, 1}, with Sign(0) = -1 as in the paper (Sign(w) = +1 iff w > 0).
  output       y = (W_int x_int) · beta / s  (per-token times per-tensor scale), plus the bias in full precision
               when the layer has one (the papers' layers have none; replace_linears keeps existing biases).

Training keeps the latent float weights and passes gradients straight through both quantizers:
x_q = x + (Q(x) - x).detach(), and the same for W (straight-through estimator).

Integer reference path (what GPU kernels and ONNX/TensorRT exports are checked against):
  pack_ternary    int8 (out, in) in {-1, 0, 1} -> uint8 (out, ceil(in / 4)), 2 bits per value:
                  0 -> 0b00, +1 -> 0b01, -1 -> 0b10 (0b11 is never written and decodes to 0); little-endian within
                  a byte along the input dim: input 4j + i sits in bits 2i..2i+1 of byte j. When in_features is not
                  a multiple of 4 the last byte is padded with code 0b00 (value 0, contributes nothing to a dot
                  product); unpack_ternary needs in_features to drop the padding. b1 weights pack the same way,
                  using only the codes of -1 and +1. Decoding is branch-free: w = (c & 1) - (c >> 1).
  bitlinear_int   int8 activations x ternary weights with exact int32 accumulation (int_matmul), then rescale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.families.bitnet import ACT_QMAX, EPS, FP_MODE, MODES, PACK_SHIFTS

NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gain, computed in float32."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


# ----------------------------------------------------------------------------------------------- quantizers


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (int8 values (..., K) in [-127, 127], per-token scale s (..., 1) float32); x ~ x_int / s."""
    x = x.float()
    scale = ACT_QMAX / x.abs().amax(-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127).to(torch.int8), scale


def quantize_weights(w: torch.Tensor, mode: str = "b1.58") -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> (int8 values, per-tensor scale beta as a 0-dim float32 tensor); W ~ W_int * beta.

    b1.58: values in {-1, 0, 1}; b1: values in {-1, 1}. The scale stays a tensor (float(beta) for the number) so
    that training never waits on the host."""
    w = w.float()
    beta = w.abs().mean().clamp(min=EPS)
    if mode == "b1.58":
        values = (w / beta).round().clamp(-1, 1)
    elif mode == "b1":
        values = torch.where(w - w.mean() > 0, 1.0, -1.0)
    else:
        raise ValueError(f"BitLinear mode must be one of {MODES}, got {mode!r}")
    return values.to(torch.int8), beta


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient: x + (Q(x) - x).detach(), the difference computed
    under no_grad so that autograd records a single add."""
    with torch.no_grad():
        x_int, scale = quantize_activations(x)
        delta = (x_int.float() / scale).to(x.dtype) - x
    return x + delta


def fake_quantize_weights(w: torch.Tensor, mode: str) -> torch.Tensor:
    """W + (W_int beta - W).detach(), as above."""
    with torch.no_grad():
        w_int, beta = quantize_weights(w, mode)
        delta = (w_int.float() * beta).to(w.dtype) - w
    return w + delta


# ----------------------------------------------------------------------------------------------- packing


def pack_ternary(w_int: torch.Tensor) -> torch.Tensor:
    """int8 (..., in) in {-1, 0, 1} -> uint8 (..., ceil(in / 4)); the code is in the module docstring."""
    if w_int.dtype.is_floating_point or ((w_int < -1) | (w_int > 1)).any():
        raise ValueError("pack_ternary takes integer values in {-1, 0, 1}")
    codes = (w_int > 0).to(torch.uint8) | ((w_int < 0).to(torch.uint8) << 1)
    pad = -codes.size(-1) % 4
    codes = F.pad(codes, (0, pad))  # code 0b00 = value 0
    groups = codes.view(*codes.shape[:-1], -1, 4)
    shifts = torch.tensor(PACK_SHIFTS, dtype=torch.uint8, device=w_int.device)
    return (groups << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: the sum is a bitwise or


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (..., ceil(in / 4)) -> int8 (..., in) in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed ternary weights are uint8, got {packed.dtype}")
    if packed.size(-1) != -(-in_features // 4):
        raise ValueError(f"{packed.size(-1)} packed bytes per row do not hold {in_features} values")
    shifts = torch.tensor(PACK_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    values = (codes & 1).to(torch.int8) - (codes >> 1).to(torch.int8)
    return values.flatten(-2)[..., :in_features]


# ----------------------------------------------------------------------------------------------- integer path


def int_matmul(x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (N, K)^T -> exact int32 (M, N).

    CPU: a real int32 matmul. Elsewhere (CUDA has no general integer matmul): float64, which is exact here because
    every product and every partial sum is an integer of magnitude <= 128 * K < 2^53 (float64 represents all
    integers below 2^53 exactly, whatever the summation order). The int32 result itself cannot overflow for
    K < 2^24."""
    if x_int.device.type == "cpu":
        return x_int.to(torch.int32) @ w_int.to(torch.int32).t()
    return (x_int.double() @ w_int.double().t()).to(torch.int32)


def bitlinear_int(x_normed: torch.Tensor, packed_w: torch.Tensor, w_scale, in_features: int) -> torch.Tensor:
    """The deployment computation of a BitLinear (without its norm and bias): int8 activations times ternary
    weights accumulated in int32, then rescaled by w_scale / act_scale per token. x_normed (..., in) -> float32
    (..., out)."""
    x_int, act_scale = quantize_activations(x_normed)
    w_int = unpack_ternary(packed_w, in_features)
    acc = int_matmul(x_int.reshape(-1, in_features), w_int)
    y = acc.float() * (torch.as_tensor(w_scale, dtype=torch.float32, device=acc.device) / act_scale.reshape(-1, 1))
    return y.reshape(*x_normed.shape[:-1], w_int.size(0))


class IntWeights(NamedTuple):
    """What an exporter needs of one BitLinear (plus its in_features and norm eps)."""

    packed: torch.Tensor  # uint8 (out, ceil(in / 4))
    scale: torch.Tensor  # 0-dim float32: beta
    norm_weight: torch.Tensor  # float32 (in,): the RMSNorm gain


# ----------------------------------------------------------------------------------------------- the layer


class BitLinear(nn.Module):
    """A drop-in nn.Linear replacement: RMSNorm, 8-bit activations, ternary (b1.58) or binary (b1) weights.
    mode "fp" is the full-precision twin: the RMSNorm, then a plain linear layer (no quantizer, no integer path)."""

    def __init__(self, in_features: int, out_features: int, mode: str = "b1.58", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if mode not in (*MODES, FP_MODE):
            raise ValueError(f"BitLinear mode must be one of {(*MODES, FP_MODE)}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.inference_int = False  # eval mode: run the integer path instead of fake quantization
        self.norm = RMSNorm(in_features)
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)  # nn.Linear's init
        self.weight = ref.weight
        self.bias = ref.bias
        if device is not None:
            self.norm.to(device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, " \
               f"bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_normed = self.norm(x)
        if self.mode == FP_MODE:
            return F.linear(x_normed.to(self.weight.dtype), self.weight, self.bias)
        if self.inference_int and not self.training:
            packed, scale, _ = self.export_int()
            y = bitlinear_int(x_normed, packed, scale, self.in_features).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        x_q = fake_quantize_activations(x_normed)
        w_q = fake_quantize_weights(self.weight, self.mode)
        return F.linear(x_q.to(w_q.dtype), w_q, self.bias)  # the norm computes in float32

    @torch.no_grad()
    def export_int(self) -> IntWeights:
        w_int, scale = quantize_weights(self.weight, self.mode)
        return IntWeights(pack_ternary(w_int), scale, self.norm.weight.detach().float())


def replace_linears(model: nn.Module, mode: str = "b1.58", skip: tuple[str, ...] = ("lm_head", "embed")) -> nn.Module:
    """Swap every nn.Linear of any torch model for a BitLinear holding the same weight and bias Parameters (ties
    survive), in place; returns the model. A Linear whose dotted name contains one of the skip strings stays in full
    precision: the papers keep embeddings and the LM head high precision. The new norms start at gain 1.
    Only modules of exactly nn.Linear are swapped: subclasses such as MultiheadAttention's out_proj, whose weight
    the parent reads directly instead of calling it, would silently stay unquantized."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or any(s in full for s in skip):
                continue
            bit = BitLinear(child.in_features, child.out_features, mode, bias=child.bias is not None,
                            device=child.weight.device, dtype=child.weight.dtype)
            bit.weight = child.weight
            bit.bias = child.bias
            setattr(module, child_name, bit)
    return model


def set_inference_int(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Route every BitLinear of the model through the integer path in eval mode (or back to fake quantization)."""
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.inference_int = enabled
    return model
