"""Fused GPT-2 decode kernels (Triton): one GPT-2 block's decode step for a few rows in five kernels.

A decode step at batch 1 reads every weight once and does little else, so its speed is set by how many kernels it
launches (each costs ~1-2 us even inside a CUDA graph) and how close each comes to the memory bandwidth. The torch
path of a block (runtimes.native.gpt2_step) launches about twenty; here a block is

    qkv = ln_linear(x, ln_1, c_attn)                     LayerNorm fused into the projection
    y   = cache_attention(qkv, cache, slot, key_mask)    writes k, v at the slot, attends over the written keys
    x   = ln_linear(y, None, attn.c_proj, residual=x)    bias and residual fused
    h   = ln_linear(x, ln_2, mlp.c_fc, act=GELU)         LayerNorm, bias and GELU fused
    x   = ln_linear(h, None, mlp.c_proj, residual=x)

ln_linear is a GEMV: one program per (BLOCK_N outputs, row); each program normalises its row itself (the row is a
few KB and stays in L1/L2) and streams its BLOCK_N weight rows, float32 accumulation. It is for a few rows
(MAX_ROWS): every row's programs read the weights again (from L2 after the first); larger batches keep cuBLAS.

cache_attention: one program per (row, head). The query's own key and value come from the qkv row (registers) and
are also stored at the cache slot for later steps; the cached keys before the slot are read in blocks with an
online softmax, and the loop stops at the slot (a device value), so a step reads only the keys written so far.
Keys after the query's slot are never attended: every caller decodes causally (key_mask = positions <= slot);
key_mask is still applied within that range.

Numerics: float32 accumulation in every dtype; LayerNorm's mean and variance in float32 (two passes, as exact as
torch's); results equal the torch path to float32 rounding (tested against it). With TRITON_INTERPRET=1 (set
before triton is imported) the kernels run on CPU tensors: how CI checks them.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch path runs instead
    triton = None

MAX_ROWS = 4  # ln_linear's one-program-per-row design pays off for a few rows; above it, cuBLAS
ACT_NONE, ACT_GELU_TANH, ACT_GELU_ERF = 0, 1, 2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Can the kernels run on tensors of this device here?"""
    if triton is None:
        return False
    return interpreting() if device.type == "cpu" else device.type == "cuda"


if triton is not None:

    @triton.jit
    def _gelu(v, ACT: tl.constexpr):
        if ACT == 1:  # tanh approximation (GPT-2's gelu_new); tanh(u) = 1 - 2 / (exp(2u) + 1)
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            return 0.5 * v * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        elif ACT == 2:
            return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        else:
            return v

    @triton.jit
    def _ln_linear_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, stride_xm, stride_wn,
                          stride_rm, stride_ym, eps,
                          HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[m, n-block] = act(LN(x[m]) @ W[n-block].T + b) (+ res[m, n-block]); grid (N / BLOCK_N, rows).
        BLOCK_ROW >= K: the LayerNorm statistics come from one load of the whole row."""
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
        # the first weight tile goes out before the LayerNorm statistics, so its DRAM latency overlaps them
        w_next = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        if HAS_LN:
            offs_row = tl.arange(0, BLOCK_ROW)
            row = tl.load(x_row + offs_row, mask=offs_row < K, other=0.0).to(tl.float32)
            mean = tl.sum(row, axis=0) / K
            centred = tl.where(offs_row < K, row - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # reduced once at the end
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            w = w_next
            w_next = tl.load(w_rows + (k + BLOCK_K)[None, :], mask=n_mask[:, None] & ((k + BLOCK_K) < K)[None, :],
                             other=0.0)
            x = tl.load(x_row + k, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_LN:
                g = tl.load(ln_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
                b = tl.load(ln_b_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
                x = (x - mean) * rstd * g + b
                x = x.to(x_ptr.dtype.element_ty).to(tl.float32)  # the LayerNorm output in the model's dtype
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = _gelu(y, ACT)
        if HAS_RES:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)  # the torch path rounds the branch, then adds
            y += tl.load(res_ptr + m.to(tl.int64) * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _cache_attention_kernel(qkv_ptr, k_ptr, v_ptr, slot_ptr, mask_ptr, y_ptr, C, stride_qm, stride_cb,
                                stride_ch, stride_cl, stride_ym, scale,
                                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        """Row b, head h: store the new k, v at the slot; y[b, head h] = softmax(q k^T * scale) v over keys
        0..slot that key_mask allows (online softmax over blocks of BLOCK_L keys: min(cache length, 128))."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        row = qkv_ptr + b.to(tl.int64) * stride_qm + h * D
        q = tl.load(row + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
        k_new = tl.load(row + C + offs_d, mask=d_mask, other=0.0)
        v_new = tl.load(row + 2 * C + offs_d, mask=d_mask, other=0.0)
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = v_new.to(v_ptr.dtype.element_ty)
        head = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
        tl.store(k_ptr + head + slot * stride_cl + offs_d, k_new, mask=d_mask)
        tl.store(v_ptr + head + slot * stride_cl + offs_d, v_new, mask=d_mask)

        m_i = tl.full([1], -1.0e30, tl.float32)  # finite: a fully masked block gives exp(-inf) = 0, never nan
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for l0 in range(0, slot + 1, BLOCK_L):  # one block covers a short cache: every load in flight at once
            offs_l = l0 + tl.arange(0, BLOCK_L)
            cached = (offs_l < slot)[:, None] & d_mask[None, :]
            kv_offs = head + offs_l[:, None] * stride_cl + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=cached, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=cached, other=0.0)
            allowed = (offs_l <= slot) & (tl.load(mask_ptr + offs_l, mask=offs_l <= slot, other=0) != 0)
            is_new = (offs_l == slot)[:, None]
            k = tl.where(is_new, k_new[None, :], k).to(tl.float32)
            v = tl.where(is_new, v_new[None, :], v).to(tl.float32)
            s = tl.where(allowed, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        y = acc / l_i
        tl.store(y_ptr + b.to(tl.int64) * stride_ym + h * D + offs_d, y.to(y_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _select_byte_kernel(logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                            x_ptr, V, C, i, stride_lm, stride_fm, stride_pm, stride_xm,
                            GREEDY: tl.constexpr, LAST: tl.constexpr, SPECIAL: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        """Row b of bGPT's byte step i: the byte (argmax of the logits, or the drawn token), replaced by the forced
        byte while i < n_forced and by SPECIAL once the row has emitted it; stored at patch[b, i]; the next step's
        input byte_wte[byte] + wpe[i + 1] into x[b] (unless LAST)."""
        b = tl.program_id(0)
        if GREEDY:
            offs_v = tl.arange(0, BLOCK_V)
            logits = tl.load(logits_ptr + b.to(tl.int64) * stride_lm + offs_v, mask=offs_v < V,
                             other=float("-inf"))
            token = tl.argmax(logits, axis=0, tie_break_left=True).to(tl.int64)  # torch.argmax: first maximum
        else:
            token = tl.load(token_ptr + b)
        forced = tl.load(forced_ptr + b.to(tl.int64) * stride_fm + i)
        token = tl.where(tl.load(n_forced_ptr) > i, forced, token)
        seen = tl.load(seen_ptr + b) != 0
        token = tl.where(seen, SPECIAL, token)
        tl.store(seen_ptr + b, (seen | (token == SPECIAL)).to(seen_ptr.dtype.element_ty))
        tl.store(patch_ptr + b.to(tl.int64) * stride_pm + i, token)
        if not LAST:
            offs_c = tl.arange(0, BLOCK_C)
            c_mask = offs_c < C
            e = tl.load(wte_ptr + token * C + offs_c, mask=c_mask, other=0.0)
            pos = tl.load(wpe_ptr + (i + 1) * C + offs_c, mask=c_mask, other=0.0)
            tl.store(x_ptr + b.to(tl.int64) * stride_xm + offs_c, e + pos, mask=c_mask)

    # Few output rows per program for the narrow layers (N = C: 768 outputs / 16 = 48 programs cannot keep an
    # H100's 132 SMs reading), whole rows in few chunks for the wide ones; the autotuner picks per shape.
    _LN_LINEAR_CONFIGS = [
        triton.Config({"BLOCK_N": 2, "BLOCK_K": 1024}, num_warps=4),
        triton.Config({"BLOCK_N": 4, "BLOCK_K": 512}, num_warps=4),
        triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=8),
        triton.Config({"BLOCK_N": 8, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 8, "BLOCK_K": 512}, num_warps=8),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=8),
    ]
    _ln_linear_tuned = triton.autotune(_LN_LINEAR_CONFIGS, key=["N", "K", "HAS_LN", "HAS_RES", "ACT"])(
        _ln_linear_kernel)

# Small blocks for the CPU interpreter: several blocks and partial tiles even at test sizes.
_INTERPRET_LN_LINEAR = {"BLOCK_N": 8, "BLOCK_K": 16}
_INTERPRET_BLOCK_L = 4


def _activation(module) -> int:
    """The ACT code of an nn.GELU (or None: no activation)."""
    if module is None:
        return ACT_NONE
    return ACT_GELU_TANH if module.approximate == "tanh" else ACT_GELU_ERF


def ln_linear(x: torch.Tensor, ln, linear, act=None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) -> act(linear(ln(x))) (+ residual) as (M, N), x's dtype. ln: an nn.LayerNorm or None; linear: an
    nn.Linear; act: an nn.GELU or None; residual (M, N) or None. x's rows must be contiguous."""
    M, K = x.shape
    weight, bias = linear.weight, linear.bias
    N = weight.size(0)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dummy = weight  # an unused pointer argument (its constexpr flag is off)
    args = (x, ln.weight if ln is not None else dummy, ln.bias if ln is not None else dummy, weight,
            bias if bias is not None else dummy, residual if residual is not None else dummy, y, N, K,
            x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            ln.eps if ln is not None else 0.0)
    flags = dict(HAS_LN=ln is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                 ACT=_activation(act), BLOCK_ROW=triton.next_power_of_2(K))
    if interpreting():
        meta = _INTERPRET_LN_LINEAR
        _ln_linear_kernel[(triton.cdiv(N, meta["BLOCK_N"]), M)](*args, **flags, **meta)
    else:
        _ln_linear_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), M)](*args, **flags)
    return y


def cache_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                    key_mask: torch.Tensor, n_head: int) -> torch.Tensor:
    """qkv (B, 3C) of one new token per row at cache slot (1,) (a device tensor); caches (B', H, L, D) with
    B' >= B; key_mask (1, L) or (L,) bool. Stores k, v at the slot; returns the attention output (B, C)."""
    B, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    y = torch.empty(B, C, dtype=qkv.dtype, device=qkv.device)
    mask = key_mask.reshape(-1)
    block_l = _INTERPRET_BLOCK_L if interpreting() else min(triton.next_power_of_2(k_cache.size(2)), 128)
    _cache_attention_kernel[(B, n_head)](qkv, k_cache, v_cache, slot, mask, y, C, qkv.stride(0), k_cache.stride(0),
                                         k_cache.stride(1), k_cache.stride(2), y.stride(0), 1.0 / math.sqrt(D),
                                         D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_L=block_l,
                                         num_warps=1 if interpreting() else 4)
    return y


def block_step(block, x: torch.Tensor, cache, slot: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """layers.Block for one new token per row: x (B, C) at cache slot (1,) -> x (B, C); five kernels."""
    qkv = ln_linear(x, block.ln_1, block.attn.c_attn)
    y = cache_attention(qkv, cache.k, cache.v, slot, key_mask, block.attn.n_head)
    x = ln_linear(y, None, block.attn.c_proj, residual=x)
    h = ln_linear(x, block.ln_2, block.mlp.c_fc, act=block.mlp.gelu)
    return ln_linear(h, None, block.mlp.c_proj, residual=x)


def blocks_step(stack, x: torch.Tensor, caches, slot: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Every block of a layers.GPT2Stack for one new token per row: x (B, C) (positions added) -> x (B, C), before
    the final LayerNorm."""
    for block, cache in zip(stack.h, caches):
        x = block_step(block, x, cache, slot, key_mask)
    return x


def select_byte(logits: torch.Tensor, token: torch.Tensor | None, forced: torch.Tensor, n_forced: torch.Tensor,
                seen: torch.Tensor, patch: torch.Tensor, i: int, byte_wte: torch.Tensor, wpe: torch.Tensor,
                special: int, x_next: torch.Tensor | None) -> None:
    """bGPT's byte step i after the logits (B, V), in one kernel: the byte (argmax when token is None, else the drawn
    token (B,)), forced while i < n_forced (a () device tensor), SPECIAL once seen (B,) says the row emitted it
    (updated); written to patch[:, i]; x_next (B, C) <- byte_wte[byte] + wpe[i + 1] unless x_next is None."""
    B, V = logits.shape
    C = byte_wte.size(1)
    last = x_next is None
    _select_byte_kernel[(B,)](logits, token if token is not None else patch, forced, n_forced, seen, patch, byte_wte,
                              wpe, x_next if not last else logits, V, C, i, logits.stride(0), forced.stride(0),
                              patch.stride(0), x_next.stride(0) if not last else 0, GREEDY=token is None, LAST=last,
                              SPECIAL=special, BLOCK_V=triton.next_power_of_2(V), BLOCK_C=triton.next_power_of_2(C),
                              num_warps=1 if interpreting() else 4)
