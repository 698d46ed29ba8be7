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
(key_mask = positions <= slot); key_mask, when given, is still applied within that range. One kernel fewer per
block than a separate attention kernel, whose launch cost more than the attention itself. Before their wait the
programs ask L2 for the head's cached keys and values (PREFETCH_KV): written a step or a patch ago, they have
likely been evicted by the weights streamed since, and the attending program, the last one, would wait for them.

Each kernel's tile (BLOCK_N rows per program, warps) is autotuned per shape, except where PINNED_CONFIGS has an
entry for the shape, dtype and GPU kind: the autotuner's picks differ from process to process.

bGPT's glue between its two decoders is two more kernels (embed_patch, patch_feature) instead of about twenty torch
kernels that would break the chain of PDL launches.

In bGPT's byte decoder a step's input is byte_wte[byte] + wpe[position]: it depends only on the byte before it and
the position, so the first block's LayerNorm + QKV projection of every step after the first is a lookup in a table
computed once (first_block_qkv: 15 x 257 x 2304 values for bGPT base). The kernel that selects a byte copies the
next step's row of it (NextStep), and that step's first block starts with attention(), a kernel of one program
per head and row that reads no weights, instead of qkv_attention, which streams the projection's weights and
hands each head to its last program.

Numerics: float32 accumulation in every dtype; LayerNorm's mean and variance in float32 (two passes, as exact as
torch's); results equal the torch path to float32 rounding (tested against it). With TRITON_INTERPRET=1 (set
before triton is imported) the kernels run on CPU tensors: how CI checks them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

import torch

from bytedeploy.plugins.pdl import launch_options
from bytedeploy.plugins.tuning import autotune

try:
    import triton
    import triton.language as tl

    from bytedeploy.plugins.pdl import let_next_kernel_launch, wait_for_previous_kernel
except ImportError:  # the CPU-only install: the torch path runs instead
    triton = None

MAX_ROWS = 4  # ln_linear's one-program-per-row design pays off for a few rows; above it, cuBLAS
MAX_K = 16384  # ln_linear holds whole input rows in registers: GPT-2 blocks up to n_embd 4096 (MLP 4 x n_embd)
# Cached keys a qkv_attention program holds at once. The tile sets the whole kernel's registers: at 128 (bGPT's patch
# decoder) it took 254 per thread, two programs per SM, and the kernel's 288 programs ran in two waves (11-13 us per
# call on an H200, against 5-6 us for the byte decoder's 16); at 32, 120 registers. Longer caches loop.
MAX_BLOCK_L = 32
PREFETCH_KV = True  # qkv_attention asks L2 for the cached keys and values early (the benchmarks measure both)
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
    def _layer_norm(x, g, beta, k_mask, K, eps):
        """LayerNorm of one row x (float32, zeros where not k_mask) with weight g and bias beta, in float32; mean
        and variance in two passes, as exact as torch's."""
        mean = tl.sum(x, axis=0) / K
        centred = tl.where(k_mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
        return centred * rstd * g + beta

    @triton.jit
    def _gemv_operands(ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, pid_n, N, K, stride_wn, HAS_LN: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """What no earlier kernel writes, requested before the wait: the program's BLOCK_N whole weight rows, the
        LayerNorm's weight and bias, the bias (zeros where absent) -> (w, g, beta, bias)."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.zeros([BLOCK_K], tl.float32)
        beta = tl.zeros([BLOCK_K], tl.float32)
        bias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_LN:
            g = tl.load(ln_w_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        return w, g, beta, bias

    @triton.jit
    def _load_row(x_ptr, m, stride_xm, K, BLOCK_K: tl.constexpr):
        """Row m of x (K values), as float32 (zeros past K)."""
        offs_k = tl.arange(0, BLOCK_K)
        return tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)

    @triton.jit
    def _ln_gemv(x, x_ptr, w, g, beta, bias, res_ptr, y_dtype, m, pid_n, N, K, stride_rm, eps,
                 HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """act(LN(x) @ W[n-block].T + b) (+ res[m, n-block]) in float32 -> (y, offs_n, n_mask), from the
        _gemv_operands and x, row m of x_ptr (_load_row), after the wait. BLOCK_K >= K: whole rows, no loop, so that
        after the wait there is one round trip to memory (x and the residual, in parallel)."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        if HAS_RES:
            res = tl.load(res_ptr + m.to(tl.int64) * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_LN:
            x = _layer_norm(x, g, beta, k_mask, K, eps).to(x_ptr.dtype.element_ty).to(tl.float32)  # model's dtype
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
        w, g, beta, bias = _gemv_operands(ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, tl.program_id(0), N, K, stride_wn, HAS_LN,
                                          HAS_BIAS, BLOCK_K, BLOCK_N)
        wait_for_previous_kernel(PDL)
        x = _load_row(x_ptr, m, stride_xm, K, BLOCK_K)
        y, offs_n, n_mask = _ln_gemv(x, x_ptr, w, g, beta, bias, res_ptr, y_ptr.dtype.element_ty, m, tl.program_id(0),
                                     N, K, stride_rm, eps, HAS_LN, HAS_BIAS, HAS_RES, ACT, BLOCK_K, BLOCK_N)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _prefetch_l2(ptrs, mask, PTX: tl.constexpr):
        """Ask L2 for the lines at ptrs where mask holds (prefetch.global.L2: no registers, nothing waits for it).
        With PTX off (the interpreter, or PREFETCH_KV off): nothing."""
        if PTX:
            address = tl.where(mask, ptrs.to(tl.int64), 0)  # masked lanes: 0, skipped
            tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s64 p, $1, 0; @p prefetch.global.L2 [$1]; "
                                      "mov.u32 $0, 0; }", "=r,l", [address], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _attend(qkv_row, k_ptr, v_ptr, head, slot, mask_ptr, y_row, C, stride_cl, scale,
                HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
        """One head of one row: store the new k, v (from the qkv row, written by other programs of this kernel:
        read from L2, .cg) at the slot; y_row[head] = softmax(q k^T * scale) v over keys 0..slot that key_mask
        allows (all of them without HAS_MASK; online softmax over blocks of BLOCK_L keys). head: the (row, head)
        offset into the caches."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(qkv_row + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg").to(tl.float32) * scale
        k_new = tl.load(qkv_row + C + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg")
        v_new = tl.load(qkv_row + 2 * C + offs_d, mask=d_mask, other=0.0, cache_modifier=".cg")
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = v_new.to(v_ptr.dtype.element_ty)

        m_i = tl.full([1], -1.0e30, tl.float32)  # finite: a fully masked block gives exp(-inf) = 0, never nan
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for l0 in range(0, slot + 1, BLOCK_L):  # one block covers a short cache: every load in flight at once
            offs_l = l0 + tl.arange(0, BLOCK_L)
            cached = (offs_l < slot)[:, None] & d_mask[None, :]
            kv_offs = head + offs_l[:, None] * stride_cl + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=cached, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=cached, other=0.0)
            allowed = offs_l <= slot
            if HAS_MASK:
                allowed &= tl.load(mask_ptr + offs_l, mask=offs_l <= slot, other=0) != 0
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
        # stored last, so that the stores (which need k_new and v_new, and which the loads may not pass) do not hold
        # the cache loads back; q's scaling before the loop still does. Scaling the scores instead made a bGPT patch
        # 2% faster on an H200 (0.870 vs 0.888 ms), but then the kernels with and without key_mask rounded apart
        tl.store(k_ptr + head + slot * stride_cl + offs_d, k_new, mask=d_mask)
        tl.store(v_ptr + head + slot * stride_cl + offs_d, v_new, mask=d_mask)

    @triton.jit
    def _qkv_attention_kernel(x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, qkv_ptr, k_ptr, v_ptr, slot_ptr, mask_ptr,
                              y_ptr, count_ptr, C, K, stride_xm, stride_wn, stride_qm, stride_cb, stride_ch,
                              stride_cl, stride_ym, eps, scale,
                              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, LINE: tl.constexpr, BLOCK_L: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """qkv[m, n-block] = LN(x[m]) @ W[n-block].T + b, as ln_linear (N = 3 C); then the program that finishes
        the last of a head's q, k and v columns of row m attends for that head (_attend). BLOCK_N divides D, so a
        program's columns lie in one head's q, k or v: 3 D / BLOCK_N programs per (row, head), counted in
        count_ptr (zero before; the last program sets it back to zero).

        Before the wait, the head's programs ask L2 for the cached keys and values before the slot (each a share of
        the rows): written steps ago, they are usually back in DRAM, and the attending program would otherwise wait
        for them after everything else. The slot read then may be a step old (a previous kernel may still write
        it), which only makes the hint miss a row; the slot the attention uses is read after the wait. After the
        wait the input row is requested first: a load that depends on the slot would hold it back a round trip."""
        let_next_kernel_launch(PDL)
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        qkv_row = qkv_ptr + m.to(tl.int64) * stride_qm
        h = (pid_n * BLOCK_N) % C // D
        head = m.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
        w, g, beta, bias = _gemv_operands(ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, pid_n, 3 * C, K, stride_wn, True,
                                          HAS_BIAS, BLOCK_K, BLOCK_N)
        if PREFETCH:  # before the wait, on the slot as read now: a hint, which an old slot makes no less correct
            slot_hint = tl.load(slot_ptr)
            share = pid_n * BLOCK_N // C * (D // BLOCK_N) + pid_n * BLOCK_N % D // BLOCK_N  # 0 .. 3 D / BLOCK_N - 1
            rows = share + (3 * D // BLOCK_N) * tl.arange(0, BLOCK_L)
            cols = tl.arange(0, BLOCK_D // LINE) * LINE  # one address per LINE values: 64 bytes in float32
            kv_offs = head + rows[:, None] * stride_cl + cols[None, :]
            cached = (rows[:, None] < slot_hint) & (cols[None, :] < D)
            _prefetch_l2(k_ptr + kv_offs, cached, PREFETCH)
            _prefetch_l2(v_ptr + kv_offs, cached, PREFETCH)
        wait_for_previous_kernel(PDL)
        x = _load_row(x_ptr, m, stride_xm, K, BLOCK_K)
        slot = tl.load(slot_ptr)  # used by the attending program only: nothing before it waits for the load
        y, offs_n, n_mask = _ln_gemv(x, x_ptr, w, g, beta, bias, w_ptr, qkv_ptr.dtype.element_ty, m, pid_n, 3 * C,
                                     K, 0, eps, True, HAS_BIAS, False, 0, BLOCK_K, BLOCK_N)
        tl.store(qkv_row + offs_n, y.to(qkv_ptr.dtype.element_ty), mask=n_mask)
        counter = count_ptr + m * (C // D) + h
        tl.debug_barrier()  # every thread's stores are issued before the counter's release
        if tl.atomic_add(counter, 1, sem="acq_rel") == 3 * (D // BLOCK_N) - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed")
            _attend(qkv_row + h * D, k_ptr, v_ptr, head, slot, mask_ptr,
                    y_ptr + m.to(tl.int64) * stride_ym + h * D, C, stride_cl, scale, HAS_MASK, D, BLOCK_D, BLOCK_L)

    @triton.jit
    def _attention_kernel(qkv_ptr, k_ptr, v_ptr, slot_ptr, y_ptr, C, stride_qm, stride_cb, stride_ch, stride_cl,
                          stride_ym, scale, PREFETCH: tl.constexpr, PDL: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, LINE: tl.constexpr, BLOCK_L: tl.constexpr):
        """The attention alone, grid (heads, rows): _attend for head program_id(0) of row program_id(1), its q, k
        and v read from qkv (written by the previous kernel), causal up to the slot. Before the wait the program
        asks L2 for the head's cached keys and values, as qkv_attention's do."""
        let_next_kernel_launch(PDL)
        h = tl.program_id(0)
        m = tl.program_id(1)
        head = m.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
        if PREFETCH:  # a hint on the slot as read now (see qkv_attention)
            rows = tl.arange(0, BLOCK_L)
            cols = tl.arange(0, BLOCK_D // LINE) * LINE
            cached = (rows[:, None] < tl.load(slot_ptr)) & (cols[None, :] < D)
            kv_offs = head + rows[:, None] * stride_cl + cols[None, :]
            _prefetch_l2(k_ptr + kv_offs, cached, PREFETCH)
            _prefetch_l2(v_ptr + kv_offs, cached, PREFETCH)
        wait_for_previous_kernel(PDL)
        slot = tl.load(slot_ptr)
        _attend(qkv_ptr + m.to(tl.int64) * stride_qm + h * D, k_ptr, v_ptr, head, slot, slot_ptr,
                y_ptr + m.to(tl.int64) * stride_ym + h * D, C, stride_cl, scale, False, D, BLOCK_D, BLOCK_L)

    @triton.jit
    def _select_byte(b, logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                     x_ptr, table_ptr, qkv_ptr, V, C, i, stride_lm, stride_fm, stride_nf, stride_pm, stride_xm,
                     stride_qm, GREEDY: tl.constexpr, LAST: tl.constexpr, SPECIAL: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_3C: tl.constexpr):
        """Row b of bGPT's byte step i: the byte (argmax of the logits, or the drawn token), replaced by the forced
        byte while i < n_forced (row b's count: stride_nf 1; one for all rows: 0) and by SPECIAL once the row has
        emitted it; stored at patch[b, i]; unless LAST, the next step's input byte_wte[byte] + wpe[i + 1] into x[b]
        and its first block's q, k, v, row byte of table_ptr (V, 3 C), into qkv[b] (NextStep). The logits are read
        from L2 (.cg): other programs of the same kernel may have written them."""
        # everything that does not depend on the token is requested first, in one round trip with the logits
        forced = tl.load(forced_ptr + b.to(tl.int64) * stride_fm + i)
        is_forced = tl.load(n_forced_ptr + b * stride_nf) > i
        seen = tl.load(seen_ptr + b) != 0
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        if not LAST:
            pos = tl.load(wpe_ptr + (i + 1) * C + offs_c, mask=c_mask, other=0.0)
        if GREEDY:
            offs_v = tl.arange(0, BLOCK_V)
            logits = tl.load(logits_ptr + b.to(tl.int64) * stride_lm + offs_v, mask=offs_v < V,
                             other=float("-inf"), cache_modifier=".cg")
            token = tl.argmax(logits, axis=0, tie_break_left=True).to(tl.int64)  # torch.argmax: first maximum
        else:
            token = tl.load(token_ptr + b)
        token = tl.where(is_forced, forced, token)
        token = tl.where(seen, SPECIAL, token)
        tl.store(seen_ptr + b, (seen | (token == SPECIAL)).to(seen_ptr.dtype.element_ty))
        tl.store(patch_ptr + b.to(tl.int64) * stride_pm + i, token)
        if not LAST:
            e = tl.load(wte_ptr + token * C + offs_c, mask=c_mask, other=0.0)
            offs_3c = tl.arange(0, BLOCK_3C)
            qkv = tl.load(table_ptr + token * (3 * C) + offs_3c, mask=offs_3c < 3 * C, other=0.0)
            tl.store(x_ptr + b.to(tl.int64) * stride_xm + offs_c, e + pos, mask=c_mask)
            tl.store(qkv_ptr + b.to(tl.int64) * stride_qm + offs_3c, qkv, mask=offs_3c < 3 * C)

    @triton.jit
    def _select_byte_kernel(logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                            x_ptr, table_ptr, qkv_ptr, V, C, i, stride_lm, stride_fm, stride_nf, stride_pm, stride_xm,
                            stride_qm, LAST: tl.constexpr, SPECIAL: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_3C: tl.constexpr, PDL: tl.constexpr):
        """_select_byte of the drawn tokens for row program_id(0)."""
        let_next_kernel_launch(PDL)
        wait_for_previous_kernel(PDL)
        _select_byte(tl.program_id(0), logits_ptr, token_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr,
                     wpe_ptr, x_ptr, table_ptr, qkv_ptr, V, C, i, stride_lm, stride_fm, stride_nf, stride_pm, stride_xm,
                     stride_qm, False, LAST, SPECIAL, BLOCK_V, BLOCK_C, BLOCK_3C)

    @triton.jit
    def _head_select_kernel(h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, logits_ptr, count_ptr, forced_ptr, n_forced_ptr,
                            seen_ptr, patch_ptr, wte_ptr, wpe_ptr, x_ptr, table_ptr, qkv_ptr, V, C, i, stride_hm,
                            stride_wn, stride_lm, stride_fm, stride_nf, stride_pm, stride_xm, stride_qm, eps,
                            LAST: tl.constexpr, SPECIAL: tl.constexpr, PDL: tl.constexpr, BLOCK_V: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_3C: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """Greedy byte step i's end: logits[b, n-block] = LN(h[b]) @ W[n-block].T (ln_linear, no bias); the last
        program of row b to finish (count_ptr[b], zero before and after) then selects its byte (_select_byte)."""
        let_next_kernel_launch(PDL)
        b = tl.program_id(1)
        w, g, beta, bias = _gemv_operands(ln_w_ptr, ln_b_ptr, w_ptr, w_ptr, tl.program_id(0), V, C, stride_wn, True,
                                          False, BLOCK_K, BLOCK_N)
        wait_for_previous_kernel(PDL)
        h = _load_row(h_ptr, b, stride_hm, C, BLOCK_K)
        y, offs_n, n_mask = _ln_gemv(h, h_ptr, w, g, beta, bias, w_ptr, logits_ptr.dtype.element_ty, b,
                                     tl.program_id(0), V, C, 0, eps, True, False, False, 0, BLOCK_K, BLOCK_N)
        tl.store(logits_ptr + b.to(tl.int64) * stride_lm + offs_n, y.to(logits_ptr.dtype.element_ty), mask=n_mask)
        tl.debug_barrier()  # every thread's stores are issued before the counter's release
        if tl.atomic_add(count_ptr + b, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            tl.atomic_xchg(count_ptr + b, 0, sem="relaxed")
            _select_byte(b, logits_ptr, logits_ptr, forced_ptr, n_forced_ptr, seen_ptr, patch_ptr, wte_ptr, wpe_ptr,
                         x_ptr, table_ptr, qkv_ptr, V, C, i, stride_lm, stride_fm, stride_nf, stride_pm, stride_xm,
                         stride_qm, True, LAST, SPECIAL, BLOCK_V, BLOCK_C, BLOCK_3C)

    @triton.jit
    def _patch_embed_kernel(patch_ptr, done_ptr, out_ptr, all_done_ptr, index_ptr, pos_ptr, slot_ptr, w_ptr, b_ptr,
                            wpe_ptr, x_ptr, B, C, N_PATCHES, stride_pm, stride_ob, stride_on, stride_wc, stride_xm,
                            P: tl.constexpr, V: tl.constexpr, SPECIAL: tl.constexpr, PDL: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """bGPT after a patch decode, grid (C / BLOCK_C, B): x[b, c-block] = the patch decoder's input for row b's
        new patch at slot = min(pos, N_PATCHES - 1): sum over p of w[c, p V + patch[b, p]] (embed_patches' one-hot
        Linear, summed in order p = 0, 1, ..), + bias, + wpe[slot], each rounded to the model's dtype as torch does.
        Program (0, 0) also does the bookkeeping of every row: out[r, min(index, N_PATCHES - 1)] = the patch, or
        SPECIAL where the row was done before it; done[r] |= the patch holds SPECIAL; all_done = every row done;
        slot_ptr = slot. (The embedding takes the patch as decoded, also for rows already done: their later
        patches are all SPECIAL in out whatever they are fed.)"""
        let_next_kernel_launch(PDL)
        pid_c = tl.program_id(0)
        b = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        bias = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        wait_for_previous_kernel(PDL)
        slot = tl.minimum(tl.load(pos_ptr), N_PATCHES - 1)
        acc = tl.zeros([BLOCK_C], tl.float32)
        for p in tl.static_range(P):
            byte = tl.load(patch_ptr + b.to(tl.int64) * stride_pm + p)
            column = w_ptr + offs_c.to(tl.int64) * stride_wc + p * V + byte
            acc += tl.load(column, mask=c_mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        e = (acc.to(dtype).to(tl.float32) + bias).to(dtype).to(tl.float32)
        pos_emb = tl.load(wpe_ptr + slot * C + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + b.to(tl.int64) * stride_xm + offs_c, (e + pos_emb).to(dtype), mask=c_mask)
        if (pid_c == 0) & (b == 0):
            tl.store(slot_ptr, slot)
            row = tl.minimum(tl.load(index_ptr), N_PATCHES - 1)
            offs_p = tl.arange(0, BLOCK_P)
            p_mask = offs_p < P
            n_done = 0
            for r in range(0, B):
                was_done = tl.load(done_ptr + r) != 0
                patch = tl.load(patch_ptr + r * stride_pm + offs_p, mask=p_mask, other=0)
                tl.store(out_ptr + r * stride_ob + row * stride_on + offs_p, tl.where(was_done, SPECIAL, patch),
                         mask=p_mask)
                done = was_done | (tl.max((patch == SPECIAL).to(tl.int32), axis=0) > 0)
                tl.store(done_ptr + r, done.to(done_ptr.dtype.element_ty))
                n_done += done.to(tl.int32)
            tl.store(all_done_ptr, (n_done == B).to(all_done_ptr.dtype.element_ty))

    @triton.jit
    def _patch_feature_kernel(h_ptr, ln_w_ptr, ln_b_ptr, feature_ptr, wpe_ptr, x0_ptr, seen_ptr, pos_ptr, index_ptr,
                              C, stride_hm, stride_fm, stride_xm, eps, PDL: tl.constexpr, BLOCK_C: tl.constexpr):
        """bGPT after the patch decoder's step, grid (B,): feature[b] = ln_f(h[b]) (the next patch's feature), the
        byte decoder's first input x0[b] = feature[b] + wpe[0] and seen[b] = False (PatchDecoder.prepare); program
        0 then advances pos and index by one (nothing else in this kernel reads them)."""
        let_next_kernel_launch(PDL)
        b = tl.program_id(0)
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        g = tl.load(ln_w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        pos_emb = tl.load(wpe_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        wait_for_previous_kernel(PDL)
        h = tl.load(h_ptr + b.to(tl.int64) * stride_hm + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        dtype = feature_ptr.dtype.element_ty
        feature = _layer_norm(h, g, beta, c_mask, C, eps).to(dtype)
        tl.store(feature_ptr + b.to(tl.int64) * stride_fm + offs_c, feature, mask=c_mask)
        tl.store(x0_ptr + b.to(tl.int64) * stride_xm + offs_c, (feature.to(tl.float32) + pos_emb).to(dtype),
                 mask=c_mask)
        tl.store(seen_ptr + b, tl.zeros([], seen_ptr.dtype.element_ty))
        if b == 0:
            tl.store(pos_ptr, tl.load(pos_ptr) + 1)
            tl.store(index_ptr, tl.load(index_ptr) + 1)

    # Few output rows per program for the narrow layers (N = C: 768 outputs / 16 = 48 programs cannot keep an
    # H100's 132 SMs reading), more for the wide ones; the autotuner picks per shape among those whose weight tile
    # (BLOCK_N x BLOCK_K) stays within ~64 registers per thread.
    _LN_LINEAR_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (1, 2, 4, 8, 16) for w in (4, 8)]

    def _prune_ln_linear_configs(configs, named_args, **kwargs):
        block_k = kwargs["BLOCK_K"]
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_k <= 64 * 32 * c.num_warps]
        return kept or configs[:1]

    # Triton's default timing (graph=False): graph timing (plugins/tuning.py) made a bGPT-base patch 2-3% faster
    # but sigma-GPT's burst passes 1.5x slower (H200: 12,114 vs 18,189 chars/s at batch 1)
    _ln_linear_tuned = autotune(_LN_LINEAR_CONFIGS, ["N", "K", "HAS_LN", "HAS_RES", "ACT"], _prune_ln_linear_configs,
                                graph=False)(_ln_linear_kernel)

    def _prune_qkv_attention_configs(configs, named_args, **kwargs):
        """As ln_linear's, and BLOCK_N must divide the head size."""
        return [c for c in _prune_ln_linear_configs(configs, named_args, **kwargs)
                if kwargs["D"] % c.kwargs["BLOCK_N"] == 0] or [triton.Config({"BLOCK_N": 1}, num_warps=4)]

    _head_select_tuned = autotune(_LN_LINEAR_CONFIGS, ["V", "C", "LAST"], _prune_ln_linear_configs, graph=False)(
        _head_select_kernel)

    _qkv_attention_tuned = autotune(_LN_LINEAR_CONFIGS, ["C", "K", "D", "BLOCK_L"], _prune_qkv_attention_configs,
                                    graph=False)(_qkv_attention_kernel)

# Configs pinned per (kernel, autotune key, dtype) on GPUs of one kind, (compute capability, SM count) -> (BLOCK_N,
# num_warps); other shapes, dtypes and GPUs autotune. The autotuner's picks differ from process to process and so
# did a bGPT-base patch: 0.90 to 1.06 ms in float32 on an H200. These are bGPT base's (768-wide), float32 and
# bfloat16, from a coordinate descent over each kernel's configs timed as whole-patch graph replays on an H200
# (benchmarks/experiments/bgpt_config_sweep.py; float32 0.872 ms per patch after the autotuner's 0.985 in the same
# process, bfloat16 0.790 after 0.805): a kernel's time there depends on its neighbours, how much of the next kernel
# fits beside it, which Triton's one-kernel-at-a-time timing does not see.
PINNED_CONFIGS = {
    (9, 0, 132): {
        ("ln_linear", (768, 768, False, True, ACT_NONE), torch.float32): (1, 4),  # attention's c_proj
        ("ln_linear", (3072, 768, True, False, ACT_GELU_TANH), torch.float32): (4, 4),  # MLP c_fc
        ("ln_linear", (768, 3072, False, True, ACT_NONE), torch.float32): (4, 8),  # MLP c_proj
        ("qkv_attention", (768, 768, 64, 16), torch.float32): (8, 4),  # byte decoder (16 positions)
        ("qkv_attention", (768, 768, 64, 32), torch.float32): (4, 4),  # patch decoder (BLOCK_L capped at 32)
        ("head_select", (257, 768, False), torch.float32): (2, 8),
        ("head_select", (257, 768, True), torch.float32): (4, 8),
        ("ln_linear", (768, 768, False, True, ACT_NONE), torch.bfloat16): (1, 4),
        ("ln_linear", (3072, 768, True, False, ACT_GELU_TANH), torch.bfloat16): (4, 4),
        ("ln_linear", (768, 3072, False, True, ACT_NONE), torch.bfloat16): (2, 4),
        ("qkv_attention", (768, 768, 64, 16), torch.bfloat16): (8, 4),
        ("qkv_attention", (768, 768, 64, 32), torch.bfloat16): (8, 8),  # the sweep's 16/4 (0.780 ms, noise-close)
        # is a tile the autotuner's prune rejects
        ("head_select", (257, 768, False), torch.bfloat16): (1, 4),
        ("head_select", (257, 768, True), torch.bfloat16): (1, 8),
    },
}


@functools.cache
def _gpu_kind(index: int) -> tuple:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor, props.multi_processor_count)


def pinned_config(kernel: str, key: tuple, dtype: torch.dtype, device: torch.device) -> tuple[int, int] | None:
    """(BLOCK_N, num_warps) pinned for this kernel, autotune key and dtype on this GPU, or None: autotune."""
    if device.type != "cuda" or interpreting():
        return None
    kind = _gpu_kind(device.index if device.index is not None else torch.cuda.current_device())
    return PINNED_CONFIGS.get(kind, {}).get((kernel, key, dtype))


def _launch_tuned(tuned, kernel: str, key: tuple, grid, args: tuple, flags: dict, dtype, device) -> None:
    """tuned (an autotuned kernel) with its pinned config where there is one, else autotuned; grid: BLOCK_N ->
    the launch grid."""
    pinned = pinned_config(kernel, key, dtype, device)
    if pinned is None:
        tuned[lambda cfg: grid(cfg["BLOCK_N"])](*args, **flags)
    else:
        block_n, num_warps = pinned
        tuned.fn[grid(block_n)](*args, **flags, BLOCK_N=block_n, num_warps=num_warps)


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
        key = (N, K, flags["HAS_LN"], flags["HAS_RES"], flags["ACT"])
        _launch_tuned(_ln_linear_tuned, "ln_linear", key, lambda block_n: (triton.cdiv(N, block_n), M), args, flags,
                      x.dtype, x.device)
    return y


_attention_counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KVCache -> int32 (B', H) zeros


def qkv_attention(x: torch.Tensor, ln, c_attn, cache, slot: torch.Tensor, key_mask: torch.Tensor | None,
                  n_head: int) -> torch.Tensor:
    """x (B, C) -> the attention output (B, C) of one new token per row at cache slot (1,) (a device tensor), in one
    kernel: qkv = c_attn(ln(x)), k and v stored in cache (a KVCache of (B', H, L, D), B' >= B) at the slot,
    attention over the keys up to the slot that key_mask ((1, L) or (L,) bool; None: all of them) allows."""
    B, C = x.shape
    D = C // n_head
    k_cache, v_cache = cache.k, cache.v
    counts = _attention_counters.get(cache)
    if counts is None or counts.device != x.device or counts.shape != k_cache.shape[:2]:
        counts = _attention_counters[cache] = torch.zeros(k_cache.shape[:2], dtype=torch.int32, device=x.device)
    qkv = torch.empty(B, 3 * C, dtype=x.dtype, device=x.device)
    y = torch.empty(B, C, dtype=x.dtype, device=x.device)
    weight, bias = c_attn.weight, c_attn.bias
    # without a mask, an unused pointer of a mask's dtype: Triton's autotuner keys on the tensors' dtypes, and the
    # kernels with and without a mask must take the same config to round alike
    mask = key_mask.reshape(-1) if key_mask is not None else slot.view(torch.bool)
    args = (x, ln.weight, ln.bias, weight, bias if bias is not None else weight, qkv, k_cache, v_cache, slot, mask, y,
            counts, C, C, x.stride(0), weight.stride(0), qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), y.stride(0), ln.eps, 1.0 / math.sqrt(D))
    block_l = _INTERPRET_BLOCK_L if interpreting() else min(triton.next_power_of_2(k_cache.size(2)), MAX_BLOCK_L)
    block_d = triton.next_power_of_2(D)
    flags = dict(HAS_BIAS=bias is not None, HAS_MASK=key_mask is not None,
                 PREFETCH=PREFETCH_KV and not interpreting(), D=D, BLOCK_D=block_d, LINE=min(16, block_d),
                 BLOCK_L=block_l, BLOCK_K=triton.next_power_of_2(C), **launch_options(x.device))
    if interpreting():
        block_n = min(_INTERPRET_LN_LINEAR["BLOCK_N"], D & -D)  # the largest power of two dividing D, at most 8
        _qkv_attention_kernel[(3 * C // block_n, B)](*args, **flags, BLOCK_N=block_n)
    else:
        _launch_tuned(_qkv_attention_tuned, "qkv_attention", (C, C, D, block_l), lambda block_n: (3 * C // block_n, B),
                      args, flags, x.dtype, x.device)
    return y


def attention(qkv: torch.Tensor, cache, slot: torch.Tensor, n_head: int) -> torch.Tensor:
    """The attention of one new token per row whose q, k, v (B, 3 C) are already computed, in one kernel (one
    program per head and row): k and v stored in cache (a KVCache of (B', H, L, D)) at slot (1,), causal attention
    over the keys up to it -> (B, C). What qkv_attention's attending programs do."""
    B, C = qkv.size(0), qkv.size(1) // 3
    D = C // n_head
    k_cache, v_cache = cache.k, cache.v
    y = torch.empty(B, C, dtype=qkv.dtype, device=qkv.device)
    block_d = triton.next_power_of_2(D)
    block_l = _INTERPRET_BLOCK_L if interpreting() else min(triton.next_power_of_2(k_cache.size(2)), MAX_BLOCK_L)
    _attention_kernel[(n_head, B)](qkv, k_cache, v_cache, slot, y, C, qkv.stride(0), k_cache.stride(0),
                                   k_cache.stride(1), k_cache.stride(2), y.stride(0), 1.0 / math.sqrt(D),
                                   PREFETCH=PREFETCH_KV and not interpreting(), D=D, BLOCK_D=block_d,
                                   LINE=min(16, block_d), BLOCK_L=block_l, num_warps=1 if interpreting() else 4,
                                   **launch_options(qkv.device))
    return y


def block_step(block, x: torch.Tensor, cache, slot: torch.Tensor, key_mask: torch.Tensor | None,
               qkv: torch.Tensor | None = None) -> torch.Tensor:
    """layers.Block for one new token per row: x (B, C) at cache slot (1,) -> x (B, C); four kernels. key_mask:
    as qkv_attention's. qkv: the attention's q, k, v (B, 3 C) when already computed (NextStep; causal attention,
    the attention kernel alone), or None: qkv_attention."""
    if qkv is None:
        y = qkv_attention(x, block.ln_1, block.attn.c_attn, cache, slot, key_mask, block.attn.n_head)
    else:
        y = attention(qkv, cache, slot, block.attn.n_head)
    x = ln_linear(y, None, block.attn.c_proj, residual=x)
    h = ln_linear(x, block.ln_2, block.mlp.c_fc, act=block.mlp.gelu)
    return ln_linear(h, None, block.mlp.c_proj, residual=x)


def blocks_step(stack, x: torch.Tensor, caches, slot: torch.Tensor, key_mask: torch.Tensor,
                first_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """Every block of a layers.GPT2Stack for one new token per row: x (B, C) (positions added) -> x (B, C), before
    the final LayerNorm. first_qkv: the first block's q, k, v (B, 3 C) when already computed (block_step)."""
    for j, (block, cache) in enumerate(zip(stack.h, caches)):
        x = block_step(block, x, cache, slot, key_mask, first_qkv if j == 0 else None)
    return x


@dataclasses.dataclass
class NextStep:
    """What a bGPT byte step's selection writes for the next step, besides the byte: its input x (B, C) <-
    byte_wte[byte] + wpe[i + 1], and its first block's q, k, v, qkv (B, 3 C) <- table[byte]. table (V, 3 C): that
    block's QKV projection of every byte's input at position i + 1 (first_block_qkv), so that the next step's first
    block starts at its attention (attention(), without the projection's weights)."""
    x: torch.Tensor
    table: torch.Tensor
    qkv: torch.Tensor


def first_block_qkv(stack, byte_wte: torch.Tensor) -> torch.Tensor:
    """The first block's q, k, v (c_attn(ln_1(.))) of every byte's input byte_wte[byte] + wpe[p] at positions
    p = 1 .. n_positions - 1 of stack (the byte decoder, a layers.GPT2Stack): (n_positions - 1, V, 3 C). A byte
    step's input depends only on the byte before it and the position, so its QKV projection is a lookup."""
    block = stack.h[0]
    with torch.no_grad():
        return block.attn.c_attn(block.ln_1(byte_wte[None] + stack.wpe.weight[1:, None])).contiguous()


def _next_step_args(next_step: NextStep | None, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' (x, table, qkv) pointers, the strides of x and qkv, and flags; for a patch's last step (None),
    unused ones."""
    if next_step is None:
        return (dummy, dummy, dummy), (0, 0), dict(LAST=True, BLOCK_3C=1)
    x, table, qkv = next_step.x, next_step.table, next_step.qkv
    assert table.stride(1) == 1 and table.size(1) == qkv.size(1) == 3 * x.size(1) and qkv.stride(1) == 1
    return (x, table, qkv), (x.stride(0), qkv.stride(0)), dict(LAST=False, BLOCK_3C=triton.next_power_of_2(qkv.size(1)))


def row_stride(n_forced: torch.Tensor) -> int:
    """The forced counts' stride over rows: 0 when one count () holds for every row."""
    return n_forced.stride(0) if n_forced.dim() else 0


def select_byte(logits: torch.Tensor, token: torch.Tensor, forced: torch.Tensor, n_forced: torch.Tensor,
                seen: torch.Tensor, patch: torch.Tensor, i: int, byte_wte: torch.Tensor, wpe: torch.Tensor,
                special: int, next_step: NextStep | None) -> None:
    """bGPT's byte step i after the logits (B, V) and the drawn token (B,), in one kernel: the byte, forced while
    i < n_forced (a () device tensor, or (B,): a count per row), SPECIAL once seen (B,) says the row emitted it
    (updated); written to patch[:, i]; then, unless next_step is None (the patch's last step), the next step's
    input and first-block q, k, v (NextStep). (Greedy: head_select_byte.)"""
    B, V = logits.shape
    C = byte_wte.size(1)
    pointers, strides, flags = _next_step_args(next_step, logits)
    _select_byte_kernel[(B,)](logits, token, forced, n_forced, seen, patch, byte_wte, wpe, *pointers, V, C, i,
                              logits.stride(0), forced.stride(0), row_stride(n_forced), patch.stride(0), *strides,
                              SPECIAL=special,
                              BLOCK_V=triton.next_power_of_2(V), BLOCK_C=triton.next_power_of_2(C), **flags,
                              num_warps=1 if interpreting() else 4, **launch_options(logits.device))


def head_select_byte(h: torch.Tensor, ln, lm_head, counts: torch.Tensor, forced: torch.Tensor, n_forced: torch.Tensor,
                     seen: torch.Tensor, patch: torch.Tensor, i: int, byte_wte: torch.Tensor, wpe: torch.Tensor,
                     special: int, next_step: NextStep | None) -> None:
    """Greedy: logits = lm_head(ln(h)) (h (B, C)) and select_byte on them, in one kernel; counts: int32 (B,) zeros
    (left at zero)."""
    B, C = h.shape
    weight = lm_head.weight
    V = weight.size(0)
    logits = torch.empty(B, V, dtype=h.dtype, device=h.device)
    pointers, strides, next_flags = _next_step_args(next_step, logits)
    args = (h, ln.weight, ln.bias, weight, logits, counts, forced, n_forced, seen, patch, byte_wte, wpe, *pointers,
            V, C, i, h.stride(0), weight.stride(0), logits.stride(0), forced.stride(0), row_stride(n_forced),
            patch.stride(0), *strides, ln.eps)
    flags = dict(SPECIAL=special, BLOCK_V=triton.next_power_of_2(V), BLOCK_C=triton.next_power_of_2(C),
                 BLOCK_K=triton.next_power_of_2(C), **next_flags, **launch_options(h.device))
    last = next_step is None
    if interpreting():
        meta = _INTERPRET_LN_LINEAR
        _head_select_kernel[(triton.cdiv(V, meta["BLOCK_N"]), B)](*args, **flags, **meta)
    else:
        _launch_tuned(_head_select_tuned, "head_select", (V, C, last), lambda block_n: (triton.cdiv(V, block_n), B),
                      args, flags, h.dtype, h.device)


def embed_patch(patch: torch.Tensor, done: torch.Tensor, out: torch.Tensor, all_done: torch.Tensor,
                index: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, patch_embedding, wpe: torch.Tensor,
                x: torch.Tensor, special: int) -> None:
    """bGPT's glue between a patch decode and the patch decoder's step, in one kernel (_patch_embed_kernel): x (B, C)
    <- embed_patches(patch (B, P)) + wpe[slot] with slot = min(pos, N - 1) also written to slot (1,); out (B, N, P)
    gets the patch at row min(index, N - 1) (SPECIAL for rows done before it); done (B,) and all_done () updated.
    patch_embedding: the model's nn.Linear (C, P * 257); wpe (N, C): the patch decoder's positions."""
    B, P = patch.shape
    C = x.size(1)
    weight = patch_embedding.weight
    block_c = 64
    _patch_embed_kernel[(triton.cdiv(C, block_c), B)](
        patch, done, out, all_done, index, pos, slot, weight, patch_embedding.bias, wpe, x, B, C, wpe.size(0),
        patch.stride(0), out.stride(0), out.stride(1), weight.stride(0), x.stride(0), P=P, V=weight.size(1) // P,
        SPECIAL=special, BLOCK_C=block_c, BLOCK_P=triton.next_power_of_2(P), num_warps=1 if interpreting() else 2,
        **launch_options(x.device))


def patch_feature(h: torch.Tensor, ln_f, feature: torch.Tensor, wpe: torch.Tensor, x0: torch.Tensor,
                  seen: torch.Tensor, pos: torch.Tensor, index: torch.Tensor) -> None:
    """bGPT's glue after the patch decoder's blocks, in one kernel (_patch_feature_kernel): feature (B, C) <-
    ln_f(h (B, C)), x0 <- feature + wpe[0] (wpe: the byte decoder's positions), seen <- False, pos and index
    (1,) += 1."""
    B, C = h.shape
    _patch_feature_kernel[(B,)](h, ln_f.weight, ln_f.bias, feature, wpe, x0, seen, pos, index, C, h.stride(0),
                                feature.stride(0), x0.stride(0), ln_f.eps, BLOCK_C=triton.next_power_of_2(C),
                                num_warps=1 if interpreting() else 4, **launch_options(h.device))
