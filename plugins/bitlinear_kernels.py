"""BitLinear W2A8 GPU kernels (Triton): per-token int8 activations x packed ternary (2-bit) weights, int32 sums.

    y = bitlinear_w2a8(x, packed_weight, weight_scale, in_features)   # == bitlinear_int(...).to(x.dtype), bitwise

Two kernels, picked by the number of tokens M (all leading dims of x flattened):

  decode GEMV (M <= GEMV_MAX_TOKENS)  one fused kernel; grid (N / BLOCK_N, M). Each program computes its token's
        absmax over the whole row (x is tiny and stays in L1/L2), quantizes x on the fly into int8x4 words and
        reads its weight rows as int32 words (16 ternary values each). Per word and bit plane i, two masks give the
        +1 and -1 bytes, ``lo + hi * 255`` turns them into four signed int8 in one register, and one ``dp4a``
        (4 int8 products summed into int32) accumulates them: about 1.5 integer instructions per weight, so the
        kernel stays bound by the 2 bits per weight it reads. The first weight chunk is loaded before the absmax
        pass so that its DRAM latency overlaps it.
  batch GEMM (M > GEMV_MAX_TOKENS)    a row-quantization kernel writes x_int as int8 in a plane-major layout
        (M, 4, ceil(K/4)) — x_q[m, i, j] = x_int[m, 4j + i], the order in which the packed bytes hold the weights —
        then a tiled kernel decodes each (BLOCK_B, BLOCK_N) byte tile into four int8 planes and multiplies them on
        the tensor cores (tl.dot int8 x int8 -> int32).

Exactness. The integer parts are exact: int32 accumulation (dp4a / int8 MMA) of products of integers. The float
parts repeat bitlinear_int's IEEE float32 operations in the same order, so y is bitwise equal to
``bitlinear_int(x, packed, scale, K).to(x.dtype)`` (tested with torch.equal on the GPU):
  s     = (1 / max(max|x|, 1e-5)) * 127   (torch computes ``127.0 / t`` as ``t.reciprocal() * 127``: two roundings;
                                           the division is correctly rounded, div.rn, not Triton's default approx)
  x_int = clip(rint(x * s), -128, 127)    (round half to even like torch.round)
  y     = float(acc) * (beta / s)         (float(acc) is exact: |acc| <= 127 K < 2^24)

Packing (bitlinear.pack_ternary): value 4j + i in bits 2i..2i+1 of byte j, codes 0 -> 00, +1 -> 01, -1 -> 10.
Rows whose byte count is not a multiple of 4 (K % 16 != 0) are zero-padded to whole int32 words on each call (a
copy; every real model size avoids it).

Without a GPU, ``TRITON_INTERPRET=1`` (set before triton is imported) runs the same kernels on CPU tensors with
numpy; there the PTX-only steps (libdevice rint, dp4a) take portable Triton forms with the same results.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bytedeploy.errors import UserError

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # the CPU-only install: bitlinear_w2a8 says what is missing
    triton = None

GEMV_MAX_TOKENS = 4  # up to this many tokens each token's program decodes the weights itself (from L2 after the first)
ACT_QMAX = 127.0
EPS = 1e-5  # bitlinear.EPS


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def missing_requirement(device: torch.device | None = None) -> str | None:
    """Why the kernels cannot run here (a one-line message naming what is missing), or None."""
    if triton is None:
        return "the BitLinear W2A8 kernel needs Triton, which is not installed (pip install triton)"
    if interpreting():
        return None
    if not torch.cuda.is_available():
        return "the BitLinear W2A8 kernel needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
    if device is not None and device.type != "cuda":
        return f"the BitLinear W2A8 kernel runs on CUDA tensors, got tensors on {device}"
    return None


# ----------------------------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _act_scale(amax):
        """s = (1 / max(amax, EPS)) * 127 with a correctly rounded division, as torch computes 127.0 / t."""
        return tl.math.div_rn(1.0, tl.maximum(amax, 1e-5)) * 127.0

    @triton.jit
    def _quantize(x, scale, PTX: tl.constexpr):
        """float32 x -> int32 rint(x * s), rounding half to even like torch.round. The reference's clip to
        [-128, 127] never acts: |x| <= amax and s = fl(fl(1 / amax) * 127), so |x * s| <= 127 (1 + 2^-24)^3 < 127.5."""
        v = x * scale
        if PTX:
            return libdevice.float2int_rn(v)  # cvt.rni.s32.f32: round and convert in one instruction
        else:
            return ((v + 12582912.0) - 12582912.0).to(tl.int32)  # 1.5 * 2^23: rounds |v| < 2^22 half to even

    @triton.jit
    def _dp4a(a, b, acc, PTX: tl.constexpr):
        """acc + sum over the 4 bytes of signed int8 a_byte * b_byte (a, b: int32 words holding int8x4)."""
        if PTX:
            a, b = tl.broadcast(a, b)
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            for t in tl.static_range(4):
                acc += ((a << (24 - 8 * t)) >> 24) * ((b << (24 - 8 * t)) >> 24)  # arithmetic >> sign-extends
            return acc

    @triton.jit
    def _row_absmax(x_row, K, BLOCK_AMAX: tl.constexpr):
        amax = tl.zeros([BLOCK_AMAX], tl.float32)
        for k0 in range(0, K, BLOCK_AMAX):
            offs = k0 + tl.arange(0, BLOCK_AMAX)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        return tl.max(amax, axis=0)

    @triton.jit
    def _x_plane_words(x_row, words, K, scale, i: tl.constexpr, PTX: tl.constexpr):
        """int8x4 words of x_int for bit plane i: byte b of word j holds x_int[16 j + 4 b + i], the value that
        meets bits 2i..2i+1 of weight byte 4 j + b."""
        packed = tl.zeros(words.shape, tl.int32)
        for b in tl.static_range(4):
            k = 16 * words + 4 * b + i
            q = _quantize(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), scale, PTX)
            packed |= (q & 255) << (8 * b)
        return packed

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, beta_ptr, y_ptr, N, K, KW, stride_xm, stride_wn, stride_ym,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_AMAX: tl.constexpr, PTX: tl.constexpr):
        """y[m, n-block] for one token m; w_ptr: the packed weights as int32 words (N, KW)."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        n_mask = offs_n[:, None] < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn

        w_next = tl.load(w_rows + offs_w[None, :], mask=n_mask & (offs_w[None, :] < KW), other=0)
        scale = _act_scale(_row_absmax(x_row, K, BLOCK_AMAX))

        acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
        for w0 in range(0, KW, BLOCK_W):
            w = w_next
            nxt = w0 + BLOCK_W + offs_w
            w_next = tl.load(w_rows + nxt[None, :], mask=n_mask & (nxt[None, :] < KW), other=0)
            w_shifted = w >> 1  # arithmetic shift: the sign bits it brings in are masked off below
            for i in tl.static_range(4):
                x_words = _x_plane_words(x_row, w0 + offs_w, K, scale, i, PTX)
                plus = (w >> (2 * i)) & 0x01010101  # code 01 -> byte 1
                minus = (w_shifted >> (2 * i)) & 0x01010101  # code 10 -> byte 1
                signed = plus + minus * 255  # int8x4 in {-1, 0, 1}: the bytes are disjoint, no carries
                acc = _dp4a(signed, x_words[None, :], acc, PTX)

        beta = tl.load(beta_ptr)
        y = tl.sum(acc, axis=1).to(tl.float32) * tl.math.div_rn(beta, scale)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, xq_ptr, scale_ptr, K, KB, stride_xm,
                              BLOCK_B: tl.constexpr, BLOCK_AMAX: tl.constexpr, PTX: tl.constexpr):
        """x (M, K) -> x_q int8 (M, 4, KB) with x_q[m, i, j] = x_int[m, 4 j + i], and the scales s (M,)."""
        m = tl.program_id(0)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        scale = _act_scale(_row_absmax(x_row, K, BLOCK_AMAX))
        tl.store(scale_ptr + m, scale)
        xq_row = xq_ptr + m.to(tl.int64) * 4 * KB
        for j0 in range(0, KB, BLOCK_B):
            j = j0 + tl.arange(0, BLOCK_B)
            for i in tl.static_range(4):
                k = 4 * j + i
                q = _quantize(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), scale, PTX)
                tl.store(xq_row + i * KB + j, q.to(tl.int8), mask=j < KB)

    @triton.jit
    def _gemm_kernel(xq_ptr, scale_ptr, w_ptr, beta_ptr, y_ptr, M, N, KB, stride_wn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """y (M, N) from x_q (M, 4, KB) and the packed weight bytes (N, KB): four int8 MMAs per byte tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        xq_rows = xq_ptr + offs_m[:, None].to(tl.int64) * 4 * KB
        w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
        n_mask = offs_n[None, :] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        wb_next = tl.load(w_cols + offs_b[:, None], mask=(offs_b[:, None] < KB) & n_mask, other=0)
        for j0 in range(0, KB, BLOCK_B):
            j = j0 + offs_b
            wb = wb_next  # the next tile's loads go out before this tile's decode and MMAs
            nxt = j + BLOCK_B
            wb_next = tl.load(w_cols + nxt[:, None], mask=(nxt[:, None] < KB) & n_mask, other=0)
            for i in tl.static_range(4):
                code = ((wb >> (2 * i)) & 3).to(tl.int8)
                w_plane = (code & 1) - (code >> 1)  # (BLOCK_B, BLOCK_N) int8 in {-1, 0, 1}
                x_plane = tl.load(xq_rows + i * KB + j[None, :], mask=(offs_m[:, None] < M) & (j[None, :] < KB),
                                  other=0)
                acc = tl.dot(x_plane, w_plane, acc, out_dtype=tl.int32)
        scale = tl.load(scale_ptr + offs_m, mask=offs_m < M, other=1.0)
        beta = tl.load(beta_ptr)
        y = acc.to(tl.float32) * tl.math.div_rn(beta, scale)[:, None]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    _GEMV_CONFIGS = [  # BLOCK_W 256 words = a whole 4096-wide row in one chunk: all its loads in flight at once
        triton.Config({"BLOCK_N": 16, "BLOCK_W": 256}, num_warps=8),
        triton.Config({"BLOCK_N": 16, "BLOCK_W": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 8, "BLOCK_W": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_W": 128}, num_warps=8),
        triton.Config({"BLOCK_N": 16, "BLOCK_W": 128}, num_warps=4),
    ]
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_N": 32, "BLOCK_B": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32, "BLOCK_B": 128}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_B": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_B": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 16, "BLOCK_B": 128}, num_warps=4, num_stages=2),
    ]
    _gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["N", "KB", "BLOCK_M"])(_gemm_kernel)

# Small blocks for the CPU interpreter: several chunks and partial tiles even at test sizes.
_INTERPRET_GEMV = {"BLOCK_N": 8, "BLOCK_W": 4}
_INTERPRET_GEMM = {"BLOCK_N": 16, "BLOCK_B": 32}


def _amax_block(K: int) -> int:
    """The whole row in one load when it fits: the absmax pass then costs one round trip to L2, not K / block."""
    return min(triton.next_power_of_2(K), 16384)


# ----------------------------------------------------------------------------------------------- entry point


def _check_inputs(x: torch.Tensor, packed_weight: torch.Tensor, weight_scale: torch.Tensor, in_features: int):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"BitLinear input must be float32, float16 or bfloat16, got {x.dtype}")
    if x.size(-1) != in_features:
        raise UserError(f"BitLinear input has {x.size(-1)} features, the layer takes {in_features}")
    if packed_weight.dtype != torch.uint8 or packed_weight.dim() != 2 \
            or packed_weight.size(1) != -(-in_features // 4):
        raise UserError(f"packed BitLinear weights must be uint8 (out_features, {-(-in_features // 4)}), got "
                        f"{packed_weight.dtype} {tuple(packed_weight.shape)}")
    if weight_scale.numel() != 1:
        raise UserError(f"BitLinear weight_scale must hold one value, got shape {tuple(weight_scale.shape)}")
    devices = {x.device, packed_weight.device, weight_scale.device}
    if len(devices) != 1:
        raise UserError(f"BitLinear tensors must be on one device, got {sorted(map(str, devices))}")


def _weight_words(packed_weight: torch.Tensor) -> torch.Tensor:
    """The packed bytes (N, KB) as int32 words (N, ceil(KB / 4)); byte 4w + b of a row is byte b of word w."""
    pad = -packed_weight.size(1) % 4
    if pad or packed_weight.stride(1) != 1 or packed_weight.data_ptr() % 4 or packed_weight.stride(0) % 4:
        packed_weight = F.pad(packed_weight, (0, pad)).contiguous()  # code 00 = value 0
    return packed_weight.view(torch.int32)


def bitlinear_w2a8(x: torch.Tensor, packed_weight: torch.Tensor, weight_scale: torch.Tensor, in_features: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32/float16 (the BitLinear's RMSNorm output) -> y (..., N) in x's dtype, bitwise equal to
    bitlinear_int(x, packed_weight, weight_scale, K).to(x.dtype). packed_weight: uint8 (N, ceil(K/4)) in
    pack_ternary's layout; weight_scale: float32 with one value (beta). out: optional (..., N) tensor to fill."""
    problem = missing_requirement(x.device)
    if problem:
        raise UserError(problem)
    _check_inputs(x, packed_weight, weight_scale, in_features)
    K, N = in_features, packed_weight.size(0)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.size(0)
    beta = weight_scale.reshape(1).to(torch.float32)
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], N) or out.dtype != x.dtype or not out.is_contiguous():
        raise UserError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], N)}")
    if M == 0:
        return out
    y2 = out.view(M, N)
    ptx = not interpreting()
    if M <= GEMV_MAX_TOKENS:
        words = _weight_words(packed_weight)
        kernel, meta = (_gemv_kernel, _INTERPRET_GEMV) if interpreting() else (_gemv_tuned, {})
        grid = lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), M)
        kernel[grid](x2, words, beta, y2, N, K, words.size(1), x2.stride(0), words.stride(0), y2.stride(0),
                     BLOCK_AMAX=_amax_block(K), PTX=ptx, **meta)
        return out
    KB = packed_weight.size(1)
    x_q = torch.empty(M, 4, KB, dtype=torch.int8, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(M,)](x2, x_q, scales, K, KB, x2.stride(0), BLOCK_B=min(triton.next_power_of_2(KB), 2048),
                                BLOCK_AMAX=_amax_block(K), PTX=ptx, num_warps=8)  # one pass over a row
    w = packed_weight if packed_weight.stride(1) == 1 else packed_weight.contiguous()
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    kernel, meta = (_gemm_kernel, _INTERPRET_GEMM) if interpreting() else (_gemm_tuned, {})
    grid = lambda cfg: (triton.cdiv(M, block_m), triton.cdiv(N, cfg["BLOCK_N"]))
    kernel[grid](x_q, scales, w, beta, y2, M, N, KB, w.stride(0), y2.stride(0), BLOCK_M=block_m, **meta)
    return out
