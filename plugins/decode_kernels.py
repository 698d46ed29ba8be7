"""Fused GPT-2 decode kernels (Triton): one GPT-2 block's decode step for a few rows in four kernels.

A decode step at batch 1 reads every weight once and does little else, so its speed is set by how many kernels it
launches (each costs ~1-2 us even inside a CUDA graph) and how close each comes to the memory bandwidth. The torch
path of a block (runtimes.native.gpt2_step) launches about twenty; here a block is

    y = qkv_attention(x, ln_1, c_attn, cache, slot, key_mask)   LayerNorm + QKV projection, then attention
    x = ln_linear(y, None, attn.c_proj, residual=x)              bias and residual fused
    h = ln_linear(x, ln_2, mlp.c_fc, act=GELU)                   LayerNorm, bias and GELU fused
    x = ln_linear(h, None, mlp.c_proj, residual=x)

ln_linear is a GEMV: one program per (BLOCK_N outputs, row); each program loads its BLOCK_N whole weight rows at
once, normalises its input row itself (a few KB, from L2), float32 accumulation. Whole rows (K <= MAX_K) leave no
loop: with programmatic dependent launch (plugins/pdl.py) the weights are requested before the previous kernel has
finished, and afterwards one round trip (the input row, the residual) remains. It is for a few rows (MAX_ROWS):
every row's programs read the weights again (from L2 after the first); larger batches keep cuBLAS.

qkv_attention is ln_linear for the QKV projection whose programs count, per (row, head), how many of that head's
q, k and v columns are done (an atomic counter, as in a split-K reduction); the program that completes a head then
attends for it: the new key and value are stored at the cache slot for later steps, the cached keys before the
slot are read in blocks with an online softmax, and the loop stops at the slot (a device value), so a step reads
only the keys written so far. Keys after the query's slot are never attended: every caller decodes causally
(key_mask = positions <= slot); key_mask is still applied within that range. One kernel fewer per block than a
separate attention kernel, whose launch cost more than the attention itself.

Numerics: float32 accumulation in every dtype; LayerNorm's mean and variance in float32 (two passes, as exact as
torch's); results equal the torch path to float32 rounding (tested against it). With TRITON_INTERPRET=1 (set
before triton is imported) the kernels run on CPU tensors: how CI checks them.
"""

from __future__ import annotations

import math
import os
import weakref

import torch

from bytedeploy.plugins.pdl import launch_options

try:
    import triton
    import triton.language as tl

    from bytedeploy.plugins.pdl import let_next_kernel_launch, wait_for_previous_kernel
except ImportError:  # the CPU-only install: the torch path runs instead
    triton = None

MAX_ROWS = 4  # ln_linear's one-program-per-row design pays off for a few rows; above it, cuBLAS
MAX_K = 16384  # ln_linear holds whole input rows in registers: GPT-2 blocks up to n_embd 4096 (MLP 4 x n_embd)
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
    def _ln_gemv(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, res_ptr, y_dtype, m, pid_n, N, K, stride_xm, stride_wn,
                 stride_rm, eps, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 ACT: tl.constexpr, PDL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """act(LN(x[m]) @ W[n-block].T + b) (+ res[m, n-block]) in float32 -> (y, offs_n, n_mask). BLOCK_K >= K:
        whole rows, no loop, so that after the wait there is one round trip to memory (x and the residual, in
        parallel); the weights, LayerNorm parameters and bias were all requested before it."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_LN:
            g = tl.load(ln_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        wait_for_previous_kernel(PDL)
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_RES:
            res = tl.load(res_ptr + m.to(tl.int64) * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(x, axis=0) / K
            centred = tl.where(k_mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
            x = centred * rstd * g + beta
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)  # the LayerNorm output in the model's dtype
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if HAS_BIAS:
            y += bias
        y = _gelu(y, ACT)
        if HAS_RES:
            y = y.to(y_dtype).to(tl.float32)  # the torch path rounds the branch, then adds
            y += res
        return y, offs_n, n_mask

    @triton.jit
    def _ln_linear_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, stride_xm, stride_wn,
                          stride_rm, stride_ym, eps,
                          HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                          PDL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[m, n-block] = act(LN(x[m]) @ W[n-block].T + b) (+ res[m, n-block]); grid (N / BLOCK_N, rows)."""
        let_next_kernel_launch(PDL)
        m = tl.program_id(1)
        y, offs_n, n_mask = _ln_gemv(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, res_ptr, y_ptr.dtype.element_ty, m,
                                     tl.program_id(0), N, K, stride_xm, stride_wn, stride_rm, eps, HAS_LN, HAS_BIAS,
                                     HAS_RES, ACT, PDL, BLOCK_K, BLOCK_N)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _attend(qkv_row, k_ptr, v_ptr, head, slot, mask_ptr, y_row, C, stride_cl, scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        """One head of one row: store the new k, v (from the qkv row, written by other programs of this kernel:
        read from L2, .cg) at the slot; y_row[head] = softmax(q k^T * scale) v over keys 0..slot that key_mask
        allows (online softmax over blocks of BLOCK_L keys). head: the (row, head) offset into the caches."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(qkv_row + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg").to(tl.float32) * scale
        k_new = tl.load(qkv_row + C + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg")
        v_new = tl.load(qkv_row + 2 * C + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg")
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = v_new.to(v_ptr.dtype.element_ty)
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
        tl.store(y_row + offs_d, y.to(y_row.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _qkv_attention_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, qkv_ptr, k_ptr, v_ptr, slot_ptr, mask_ptr,
                              y_ptr, count_ptr, C, K, stride_xm, stride_wn, stride_qm, stride_cb, stride_ch,
                              stride_cl, stride_ym, eps, scale,
                              HAS_BIAS: tl.constexpr, PDL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """qkv[m, n-block] = LN(x[m]) @ W[n-block].T + b, as ln_linear (N = 3 C); then the program that finishes
        the last of a head's q, k and v columns of row m attends for that head (_attend). BLOCK_N divides D, so a
        program's columns lie in one head's q, k or v: 3 D / BLOCK_N programs per (row, head), counted in
        count_ptr (zero before; the last program sets it back to zero)."""
        let_next_kernel_launch(PDL)
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        qkv_row = qkv_ptr + m.to(tl.int64) * stride_qm
        y, offs_n, n_mask = _ln_gemv(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, w_ptr, qkv_ptr.dtype.element_ty, m,
                                     pid_n, 3 * C, K, stride_xm, stride_wn, 0, eps, True, HAS_BIAS, False, 0, PDL,
                                     BLOCK_K, BLOCK_N)
        tl.store(qkv_row + offs_n, y.to(qkv_ptr.dtype.element_ty), mask=n_mask)
        h = (pid_n * BLOCK_N) % C // D
        counter = count_ptr + m * (C // D) + h
        tl.debug_barrier()  # every thread's stores are issued before the counter's release
        if tl.atomic_add(counter, 1, sem="acq_rel") == 3 * (D // BLOCK_N) - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed")
            head = m.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
            _attend(qkv_row + h * D, k_ptr, v_ptr, head, tl.load(slot_ptr), mask_ptr,
                    y_ptr + m.to(tl.int64) * stride_ym + h * D, C, stride_cl, scale, D, BLOCK_D, BLOCK_L)

    @triton.jit
    def _select_byte(b, logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                     x_ptr, V, C, i, stride_lm, stride_fm, stride_pm, stride_xm,
                     GREEDY: tl.constexpr, LAST: tl.constexpr, SPECIAL: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        """Row b of bGPT's byte step i: the byte (argmax of the logits, or the drawn token), replaced by the forced
        byte while i < n_forced and by SPECIAL once the row has emitted it; stored at patch[b, i]; the next step's
        input byte_wte[byte] + wpe[i + 1] into x[b] (unless LAST). The logits are read from L2 (.cg): other
        programs of the same kernel may have written them."""
        if GREEDY:
            offs_v = tl.arange(0, BLOCK_V)
            logits = tl.load(logits_ptr + b.to(tl.int64) * stride_lm + offs_v, mask=offs_v < V,
                             other=float("-inf"), cache_modifier=".cg")
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

    @triton.jit
    def _select_byte_kernel(logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                            x_ptr, V, C, i, stride_lm, stride_fm, stride_pm, stride_xm,
                            LAST: tl.constexpr, SPECIAL: tl.constexpr,
                            BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        """_select_byte of the drawn tokens for row program_id(0)."""
        let_next_kernel_launch(PDL)
        wait_for_previous_kernel(PDL)
        _select_byte(tl.program_id(0), logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr,
                     wpe_ptr, x_ptr, V, C, i, stride_lm, stride_fm, stride_pm, stride_xm, False, LAST, SPECIAL,
                     BLOCK_V, BLOCK_C)

    @triton.jit
    def _head_select_kernel(h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, logits_ptr, count_ptr, forced_ptr, n_forced_ptr,
                            seen_ptr, patch_ptr, wte_ptr, wpe_ptr, x_ptr, V, C, i, stride_hm, stride_wn, stride_lm,
                            stride_fm, stride_pm, stride_xm, eps,
                            LAST: tl.constexpr, SPECIAL: tl.constexpr, PDL: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Greedy byte step i's end: logits[b, n-block] = LN(h[b]) @ W[n-block].T (ln_linear, no bias); the last
        program of row b to finish (count_ptr[b], zero before and after) then selects its byte (_select_byte)."""
        let_next_kernel_launch(PDL)
        b = tl.program_id(1)
        y, offs_n, n_mask = _ln_gemv(h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, w_ptr, w_ptr, logits_ptr.dtype.element_ty, b,
                                     tl.program_id(0), V, C, stride_hm, stride_wn, 0, eps, True, False, False, 0, PDL,
                                     BLOCK_K, BLOCK_N)
        tl.store(logits_ptr + b.to(tl.int64) * stride_lm + offs_n, y.to(logits_ptr.dtype.element_ty), mask=n_mask)
        tl.debug_barrier()  # every thread's stores are issued before the counter's release
        if tl.atomic_add(count_ptr + b, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            tl.atomic_xchg(count_ptr + b, 0, sem="relaxed")
            _select_byte(b, logits_ptr, logits_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                         x_ptr, V, C, i, stride_lm, stride_fm, stride_pm, stride_xm, True, LAST, SPECIAL, BLOCK_V,
                         BLOCK_C)

    # Few output rows per program for the narrow layers (N = C: 768 outputs / 16 = 48 programs cannot keep an
    # H100's 132 SMs reading), more for the wide ones; the autotuner picks per shape among those whose weight tile
    # (BLOCK_N x BLOCK_K) stays within ~64 registers per thread.
    _LN_LINEAR_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (1, 2, 4, 8, 16) for w in (4, 8)]

    def _prune_ln_linear_configs(configs, named_args, **kwargs):
        block_k = kwargs["BLOCK_K"]
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_k <= 64 * 32 * c.num_warps]
        return kept or configs[:1]

    _ln_linear_tuned = triton.autotune(_LN_LINEAR_CONFIGS, key=["N", "K", "HAS_LN", "HAS_RES", "ACT"],
                                       prune_configs_by={"early_config_prune": _prune_ln_linear_configs})(
        _ln_linear_kernel)

    def _prune_qkv_attention_configs(configs, named_args, **kwargs):
        """As ln_linear's, and BLOCK_N must divide the head size."""
        return [c for c in _prune_ln_linear_configs(configs, named_args, **kwargs)
                if kwargs["D"] % c.kwargs["BLOCK_N"] == 0] or [triton.Config({"BLOCK_N": 1}, num_warps=4)]

    _head_select_tuned = triton.autotune(_LN_LINEAR_CONFIGS, key=["V", "C", "LAST"],
                                         prune_configs_by={"early_config_prune": _prune_ln_linear_configs})(
        _head_select_kernel)

    _qkv_attention_tuned = triton.autotune(_LN_LINEAR_CONFIGS, key=["C", "K", "D", "BLOCK_L"],
                                           prune_configs_by={"early_config_prune": _prune_qkv_attention_configs})(
        _qkv_attention_kernel)

# Small blocks for the CPU interpreter: several blocks and partial tiles even at test sizes.
_INTERPRET_LN_LINEAR = {"BLOCK_N": 8}
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
                 ACT=_activation(act), BLOCK_K=triton.next_power_of_2(K), **launch_options(x.device))
    if interpreting():
        meta = _INTERPRET_LN_LINEAR
        _ln_linear_kernel[(triton.cdiv(N, meta["BLOCK_N"]), M)](*args, **flags, **meta)
    else:
        _ln_linear_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), M)](*args, **flags)
    return y


_attention_counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> int32 (B', H) zeros


def qkv_attention(x: torch.Tensor, ln, c_attn, cache, slot: torch.Tensor, key_mask: torch.Tensor,
                  n_head: int) -> torch.Tensor:
    """x (B, C) -> the attention output (B, C) of one new token per row at cache slot (1,) (a device tensor), in one
    kernel: qkv = c_attn(ln(x)), k and v stored in cache (a KVCache of (B', H, L, D), B' >= B) at the slot,
    attention over the keys up to the slot that key_mask ((1, L) or (L,) bool) allows."""
    B, C = x.shape
    D = C // n_head
    k_cache, v_cache = cache.k, cache.v
    counts = _attention_counters.get(cache)
    if counts is None or counts.device != x.device or counts.shape != k_cache.shape[:2]:
        counts = _attention_counters[cache] = torch.zeros(k_cache.shape[:2], dtype=torch.int32, device=x.device)
    qkv = torch.empty(B, 3 * C, dtype=x.dtype, device=x.device)
    y = torch.empty(B, C, dtype=x.dtype, device=x.device)
    weight, bias = c_attn.weight, c_attn.bias
    args = (x, ln.weight, ln.bias, weight, bias if bias is not None else weight, qkv, k_cache, v_cache, slot,
            key_mask.reshape(-1), y, counts, C, C, x.stride(0), weight.stride(0), qkv.stride(0), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), y.stride(0), ln.eps, 1.0 / math.sqrt(D))
    block_l = _INTERPRET_BLOCK_L if interpreting() else min(triton.next_power_of_2(k_cache.size(2)), 128)
    flags = dict(HAS_BIAS=bias is not None, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_L=block_l,
                 BLOCK_K=triton.next_power_of_2(C), **launch_options(x.device))
    if interpreting():
        block_n = min(_INTERPRET_LN_LINEAR["BLOCK_N"], D & -D)  # the largest power of two dividing D, at most 8
        _qkv_attention_kernel[(3 * C // block_n, B)](*args, **flags, BLOCK_N=block_n)
    else:
        _qkv_attention_tuned[lambda cfg: (3 * C // cfg["BLOCK_N"], B)](*args, **flags)
    return y


def block_step(block, x: torch.Tensor, cache, slot: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """layers.Block for one new token per row: x (B, C) at cache slot (1,) -> x (B, C); four kernels."""
    y = qkv_attention(x, block.ln_1, block.attn.c_attn, cache, slot, key_mask, block.attn.n_head)
    x = ln_linear(y, None, block.attn.c_proj, residual=x)
    h = ln_linear(x, block.ln_2, block.mlp.c_fc, act=block.mlp.gelu)
    return ln_linear(h, None, block.mlp.c_proj, residual=x)


def blocks_step(stack, x: torch.Tensor, caches, slot: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Every block of a layers.GPT2Stack for one new token per row: x (B, C) (positions added) -> x (B, C), before
    the final LayerNorm."""
    for block, cache in zip(stack.h, caches):
        x = block_step(block, x, cache, slot, key_mask)
    return x


def select_byte(logits: torch.Tensor, token: torch.Tensor, forced: torch.Tensor, n_forced: torch.Tensor,
                seen: torch.Tensor, patch: torch.Tensor, i: int, byte_wte: torch.Tensor, wpe: torch.Tensor,
                special: int, x_next: torch.Tensor | None) -> None:
    """bGPT's byte step i after the logits (B, V) and the drawn token (B,), in one kernel: the byte, forced while
    i < n_forced (a () device tensor), SPECIAL once seen (B,) says the row emitted it (updated); written to
    patch[:, i]; x_next (B, C) <- byte_wte[byte] + wpe[i + 1] unless x_next is None. (Greedy: head_select_byte.)"""
    B, V = logits.shape
    C = byte_wte.size(1)
    last = x_next is None
    _select_byte_kernel[(B,)](logits, token, forced, n_forced, seen, patch, byte_wte,
                              wpe, x_next if not last else logits, V, C, i, logits.stride(0), forced.stride(0),
                              patch.stride(0), x_next.stride(0) if not last else 0, LAST=last,
                              SPECIAL=special, BLOCK_V=triton.next_power_of_2(V), BLOCK_C=triton.next_power_of_2(C),
                              num_warps=1 if interpreting() else 4, **launch_options(logits.device))


def head_select_byte(h: torch.Tensor, ln, lm_head, counts: torch.Tensor, forced: torch.Tensor, n_forced: torch.Tensor,
                     seen: torch.Tensor, patch: torch.Tensor, i: int, byte_wte: torch.Tensor, wpe: torch.Tensor,
                     special: int, x_next: torch.Tensor | None) -> None:
    """Greedy: logits = lm_head(ln(h)) (h (B, C)) and select_byte on them, in one kernel; counts: int32 (B,) zeros
    (left at zero)."""
    B, C = h.shape
    weight = lm_head.weight
    V = weight.size(0)
    logits = torch.empty(B, V, dtype=h.dtype, device=h.device)
    last = x_next is None
    args = (h, ln.weight, ln.bias, weight, logits, counts, forced, n_forced, seen, patch, byte_wte, wpe,
            x_next if not last else logits, V, C, i, h.stride(0), weight.stride(0), logits.stride(0), forced.stride(0),
            patch.stride(0), x_next.stride(0) if not last else 0, ln.eps)
    flags = dict(LAST=last, SPECIAL=special, BLOCK_V=triton.next_power_of_2(V), BLOCK_C=triton.next_power_of_2(C),
                 BLOCK_K=triton.next_power_of_2(C), **launch_options(h.device))
    if interpreting():
        meta = _INTERPRET_LN_LINEAR
        _head_select_kernel[(triton.cdiv(V, meta["BLOCK_N"]), B)](*args, **flags, **meta)
    else:
        _head_select_tuned[lambda cfg: (triton.cdiv(V, cfg["BLOCK_N"]), B)](*args, **flags)
