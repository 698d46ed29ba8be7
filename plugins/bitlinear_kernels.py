"""BitLinear W2A8 GPU kernels (Triton): per-token int8 activations x packed ternary (2-bit) weights, int32 sums.

    y = bitlinear_w2a8(x, packed_weight, weight_scale, in_features)   # == bitlinear_int(...).to(x.dtype), bitwise

Two paths, picked by the number of tokens M (all leading dims of x flattened); their variants and block sizes are
autotune configs (_GEMV_CONFIGS, _GEMM_CONFIGS), so a GPU picks its fastest at the first (warm-up) call, each
candidate timed in a CUDA graph of back-to-back calls (plugins/tuning.py):

  decode GEMV (M <= GEMV_MAX_TOKENS)  grid (N / BLOCK_N, M); weight rows read as int32 words (16 ternary values).
        Per word, two masks (w >> 2 s) & 0x33333333 put 8 codes in nibbles, and one byte permute (prmt) per half
        word turns 4 codes into an int8x4 of {-1, 0, 1} that one dp4a multiplies with 4 int8 activations: about
        13 integer instructions per 16 weights. One launch: each program computes its token's absmax over the
        whole row and quantizes x into the int8x4 words itself. (A variant that quantized x once per token in a
        separate kernel measured 4x slower on an H200 and was removed.) The X_TILE configs, for rows of one chunk
        (KW <= BLOCK_W; the autotuner prunes them otherwise), read x once after the wait, as a contiguous (BLOCK_W,
        16) tile, and take the absmax, quantize and build the int8x4 words in registers; the others read x once
        for the absmax and then gather it again, 16 strided loads per chunk.
  batch GEMM (M > GEMV_MAX_TOKENS)    a row-quantization kernel writes x_int as int8 in a plane-major layout (M, 4,
        ceil(K/4)) — x_q[m, i, j] = x_int[m, 4j + i], the order in which the packed bytes hold the weights — reading a
        row once (up to 8192 values) as a contiguous (KB, 4) tile, and zeroes the split-K tile counters; then a tiled
        kernel decodes each (BLOCK_B, BLOCK_N) byte tile into four int8 planes (4 bytes per 32-bit register op on the
        GPU) and multiplies them on the tensor cores (tl.dot int8 x int8 -> int32). Split-K (autotune meta SPLIT_K, grid
        axis 2) gives N / BLOCK_N * SPLIT_K programs instead of too few long ones, and lets wide N tiles (fewer programs
        reading all of x_q from L2) still fill the GPU. The reduction is deterministic and uses plain stores: each split
        stores its int32 tile into its own slice of the scratch (parts (MAX_SPLIT_K, M, N)) and bumps the tile's counter
        (acq_rel); the split that arrives last adds the SPLIT_K tiles in a fixed order, rescales, stores y and resets
        the counter to 0. The partial sums need no zeroing, only the counters, ceil(M/16) * ceil(N/16) of them. (An
        earlier version added every split's tile into one (M, N) sum with int32 atomics: one atomic per output element
        per split, after zeroing the whole sum in the quantization kernel, and its split-K configs lost to SPLIT_K 1 at
        64 tokens on an H200; those atomics and that zeroing were the cost this scheme removes.)

PDL (plugins/pdl.py): the GEMV issues its first weight loads and then waits for the previous kernel
(wait_for_previous_kernel); its reads of x and its stores come after the wait, so the weight loads overlap the
previous kernel's tail. When the call itself copies the weights (padding to whole words), an earlier kernel did
write them: that launch goes without PDL. The batch path's two kernels are PDL launches too: the quantization kernel
waits first thing (it reads x and zeroes the counters that the previous GEMM may still use), the GEMM issues its
first weight tile's loads before its wait (without PDL when the call copied the weights). Only the pair helps (H200,
4096 x 4096, CUDA graph of chained calls: 64 tokens 12.5 us without PDL, 12.7 and 12.5 us with it on one kernel
only, 10.5 us with both; 16 tokens 9.7 and 8.8 us).

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
numpy; there the PTX-only steps (libdevice rint, dp4a, prmt, the packed plane decode) take portable Triton forms
with the same results, and _INTERPRET_* small blocks replace autotuning. FORCED_CONFIG pins one config (tests run
every candidate; the benchmark's --all-configs times each). (The interpreter converts float32 -> bfloat16 by
truncation, not round-to-nearest as the GPU and torch do, so bfloat16 is checked bitwise only on the GPU.)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bytedeploy.errors import UserError
from bytedeploy.plugins.pdl import launch_options
from bytedeploy.plugins.tuning import autotune

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from bytedeploy.plugins.pdl import let_next_kernel_launch, wait_for_previous_kernel
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
    def _ternary_int8x4(nibbles, PTX: tl.constexpr):
        """int8x4 word of ternary values from the 4 low nibbles of `nibbles` (int32), each holding a 2-bit code
        (00 -> 0, 01 -> +1, 10 -> -1) in its low 2 bits: byte e = the value of nibble e. On the GPU that is one
        byte permute (prmt) whose source bytes are the table {0, 1, -1, 0}: byte e of the result = source byte
        number (nibble e)."""
        if PTX:
            return tl.inline_asm_elementwise("prmt.b32 $0, 0x00FF0100, 0, $1;", "=r,r", [nibbles],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = nibbles & 0
            for e in tl.static_range(4):
                code = (nibbles >> (4 * e)) & 3
                out |= (((code & 1) - (code >> 1)) & 255) << (8 * e)
            return out

    @triton.jit
    def _bytes_asm(wb, asm: tl.constexpr):
        """int8 result of `asm` applied to uint8 wb four bytes at a time (one 32-bit register each)."""
        return tl.inline_asm_elementwise(asm, "=r,r", [wb], dtype=tl.int8, is_pure=True, pack=4)

    @triton.jit
    def _ternary_plane(wb, i: tl.constexpr, PTX: tl.constexpr):
        """int8 {-1, 0, 1} values of bit pair i of the packed weight bytes wb (uint8). On the GPU four bytes at a
        time in 32-bit registers (inline asm, pack=4): plus = code bit 0, minus = code bit 1 of each byte, and
        plus + minus * 255 puts 1 or 0xFF (-1) in each byte without carries: 5 instructions per 4 weights."""
        if PTX:
            if i == 0:
                return _bytes_asm(wb, "{.reg .b32 p, q; and.b32 p, $1, 0x01010101; shr.b32 q, $1, 1; "
                                      "and.b32 q, q, 0x01010101; mad.lo.u32 $0, q, 255, p;}")
            elif i == 1:
                return _bytes_asm(wb, "{.reg .b32 p, q; shr.b32 p, $1, 2; and.b32 p, p, 0x01010101; "
                                      "shr.b32 q, $1, 3; and.b32 q, q, 0x01010101; mad.lo.u32 $0, q, 255, p;}")
            elif i == 2:
                return _bytes_asm(wb, "{.reg .b32 p, q; shr.b32 p, $1, 4; and.b32 p, p, 0x01010101; "
                                      "shr.b32 q, $1, 5; and.b32 q, q, 0x01010101; mad.lo.u32 $0, q, 255, p;}")
            else:
                return _bytes_asm(wb, "{.reg .b32 p, q; shr.b32 p, $1, 6; and.b32 p, p, 0x01010101; "
                                      "shr.b32 q, $1, 7; and.b32 q, q, 0x01010101; mad.lo.u32 $0, q, 255, p;}")
        else:
            code = ((wb >> (2 * i)) & 3).to(tl.int8)
            return (code & 1) - (code >> 1)

    @triton.jit
    def _row_absmax(x_row, K, BLOCK_AMAX: tl.constexpr):
        amax = tl.zeros([BLOCK_AMAX], tl.float32)
        for k0 in range(0, K, BLOCK_AMAX):
            offs = k0 + tl.arange(0, BLOCK_AMAX)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        return tl.max(amax, axis=0)

    @triton.jit
    def _x_words(x_row, words, K, scale, s: tl.constexpr, h: tl.constexpr, PTX: tl.constexpr):
        """int8x4 words of x_int that meet _ternary_int8x4(((w >> 2 s) & 0x33333333) >> 16 h) for weight word w:
        byte e of word j holds x_int[16 j + 8 h + 2 e + s] (nibble 4 h + e of that mask holds the code in bits
        16 h + 4 e + 2 s of the word, i.e. weight 8 h + 2 e + s of its 16)."""
        packed = tl.zeros(words.shape, tl.int32)
        for e in tl.static_range(4):
            k = 16 * words + 8 * h + 2 * e + s
            q = _quantize(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), scale, PTX)
            packed |= (q & 255) << (8 * e)
        return packed

    @triton.jit
    def _x_tile(x_row, words, K):
        """x of the words as a float32 tile (len(words), 16): element (j, t) = x[16 j + t], 0 past K. Each row
        of the tile is 16 contiguous values, so the load vectorises."""
        k = 16 * words[:, None] + tl.arange(0, 16)[None, :]
        return tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)

    @triton.jit
    def _x_tile_words(q):
        """The four int8x4 word vectors of _x_words (index 2 s + h) from the int32 tile q = x_int (words, 16) in
        registers: byte e of word j = q[j, 8 h + 2 e + s]."""
        q = tl.reshape(q, [q.shape[0], 2, 4, 2])  # (word, h, e, s)
        e = tl.arange(0, 4)[None, None, :, None]
        packed = tl.sum((q & 255) << (8 * e), axis=2)  # (word, h, s); the bytes are disjoint, so sum == or
        s0, s1 = tl.split(packed)  # split takes the last axis: s, then h
        x00, x01 = tl.split(s0)
        x10, x11 = tl.split(s1)
        return x00, x01, x10, x11

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, beta_ptr, y_ptr, N, K, KW, stride_xm, stride_wn, stride_ym,
                     BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_AMAX: tl.constexpr, PTX: tl.constexpr,
                     PDL: tl.constexpr, X_TILE: tl.constexpr):
        """y[m, n-block] for one token m; w_ptr: the packed weights as int32 words (N, KW). The program quantizes
        its token's x itself. X_TILE (only when KW <= BLOCK_W, the row in one chunk): x is read once, as a
        (BLOCK_W, 16) tile, and quantized and packed in registers."""
        let_next_kernel_launch(PDL)
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        n_mask = offs_n[:, None] < N
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn

        # the first weight chunk's loads go out before the wait (no earlier kernel writes the weights) and
        # overlap the previous kernel's tail and then the absmax pass; x is read only after the wait
        w_next = tl.load(w_rows + offs_w[None, :], mask=n_mask & (offs_w[None, :] < KW), other=0)
        wait_for_previous_kernel(PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
        if X_TILE:  # the row is one chunk (KW <= BLOCK_W): w_next holds all of it
            x_tile = _x_tile(x_row, offs_w, K)
            scale = _act_scale(tl.max(tl.max(tl.abs(x_tile), axis=1), axis=0))
            x_words = _x_tile_words(_quantize(x_tile, scale, PTX))
            for s in tl.static_range(2):
                codes = (w_next >> (2 * s)) & 0x33333333
                for h in tl.static_range(2):
                    acc = _dp4a(_ternary_int8x4(codes >> (16 * h), PTX), x_words[2 * s + h][None, :], acc, PTX)
        else:
            scale = _act_scale(_row_absmax(x_row, K, BLOCK_AMAX))
            for w0 in range(0, KW, BLOCK_W):
                w = w_next
                words = w0 + offs_w
                nxt = words + BLOCK_W
                w_next = tl.load(w_rows + nxt[None, :], mask=n_mask & (nxt[None, :] < KW), other=0)
                for s in tl.static_range(2):
                    codes = (w >> (2 * s)) & 0x33333333  # the 8 codes 2 n + s of the word, one per nibble n
                    for h in tl.static_range(2):
                        x_words = _x_words(x_row, words, K, scale, s, h, PTX)
                        acc = _dp4a(_ternary_int8x4(codes >> (16 * h), PTX), x_words[None, :], acc, PTX)

        beta = tl.load(beta_ptr)
        y = tl.sum(acc, axis=1).to(tl.float32) * tl.math.div_rn(beta, scale)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, xq_ptr, scale_ptr, counters_ptr, NUM_COUNTERS, K, KB, stride_xm,
                              BLOCK_B: tl.constexpr, BLOCK_AMAX: tl.constexpr, BLOCK_Z: tl.constexpr,
                              PTX: tl.constexpr, PDL: tl.constexpr):
        """x (M, K) -> x_q int8 (M, 4, KB) with x_q[m, i, j] = x_int[m, 4 j + i], and the scales s (M,). Also
        zeroes the GEMM's split-K tile counters (NUM_COUNTERS int32), a share per program, so that no separate
        memset is needed. A row of at most BLOCK_B bytes (4 BLOCK_B values) is read once, as a contiguous
        (BLOCK_B, 4) tile, and quantized in registers; longer rows are read twice (absmax, then each plane)."""
        let_next_kernel_launch(PDL)
        m = tl.program_id(0)
        wait_for_previous_kernel(PDL)  # the previous GEMM may still read the counters; x is written before
        chunk = tl.cdiv(NUM_COUNTERS, tl.num_programs(0))
        z_hi = tl.minimum(m * chunk + chunk, NUM_COUNTERS)
        for z0 in range(m * chunk, z_hi, BLOCK_Z):
            z = z0 + tl.arange(0, BLOCK_Z)
            tl.store(counters_ptr + z, tl.zeros([BLOCK_Z], tl.int32), mask=z < z_hi)
        x_row = x_ptr + m.to(tl.int64) * stride_xm
        xq_row = xq_ptr + m.to(tl.int64) * 4 * KB
        if KB <= BLOCK_B:
            j = tl.arange(0, BLOCK_B)[:, None]
            i = tl.arange(0, 4)[None, :]
            x_tile = tl.load(x_row + 4 * j + i, mask=4 * j + i < K, other=0.0).to(tl.float32)
            scale = _act_scale(tl.max(tl.max(tl.abs(x_tile), axis=1), axis=0))
            tl.store(scale_ptr + m, scale)
            q = _quantize(x_tile, scale, PTX)
            tl.store(xq_row + i * KB + j, q.to(tl.int8), mask=(j < KB) & (i < 4))
        else:
            scale = _act_scale(_row_absmax(x_row, K, BLOCK_AMAX))
            tl.store(scale_ptr + m, scale)
            for j0 in range(0, KB, BLOCK_B):
                j = j0 + tl.arange(0, BLOCK_B)
                for i in tl.static_range(4):
                    k = 4 * j + i
                    q = _quantize(tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32), scale, PTX)
                    tl.store(xq_row + i * KB + j, q.to(tl.int8), mask=j < KB)

    @triton.jit
    def _sum_split_tiles(parts_ptr, tile_offs, split_stride, own_tile, pid_k, mask, SPLIT_K: tl.constexpr):
        """The sum of the SPLIT_K int32 tiles in a fixed order: the other splits' tiles, read from their slices of
        parts in split order (.cg: from L2, never a stale L1 line), then split pid_k's own tile from registers.
        Adding own_tile last, not in its place, converts it from the MMA layout to the loads' layout once instead
        of converting every loaded tile (through shared memory) to the MMA layout."""
        others = tl.zeros(own_tile.shape, tl.int32)
        for k in tl.static_range(SPLIT_K):
            # where(), not mask & (k != pid_k): the interpreter types that int1 tensor & int1 scalar as int32
            other_mask = tl.where(k != pid_k, mask, False)
            others += tl.load(parts_ptr + k * split_stride + tile_offs, mask=other_mask, other=0,
                              cache_modifier=".cg")
        return others + own_tile

    @triton.jit
    def _gemm_kernel(xq_ptr, scale_ptr, w_ptr, beta_ptr, y_ptr, parts_ptr, counters_ptr, M, N, KB, stride_wn,
                     stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                     SPLIT_K: tl.constexpr, MAY_SPLIT: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr):
        """y (M, N) from x_q (M, 4, KB) and the packed weight bytes (N, KB): four int8 MMAs per byte tile.

        Split-K (grid axis 2): split k sums the bytes [k * per, (k + 1) * per) of each row into an int32 tile and
        stores it, plainly, into its own slice parts[k] (parts: (>= SPLIT_K, M, N) int32, never zeroed: the last
        split reads only elements that the other splits stored in this launch). Then it bumps the tile's counter
        (counters[tile]) with an acq_rel atomic: a release of its stores. The split that sees SPLIT_K - 1 is last:
        the others' tiles are complete (its acquire pairs with their releases); it adds all SPLIT_K tiles in a fixed
        order (_sum_split_tiles; integer addition: exact in any order), rescales, stores y and resets the counter to 0,
        so the next launch (the autotuner's repeats, a graph replay) finds the counters zero again. One atomic per
        tile, where atomically adding the tiles into one sum cost one per output element per split."""
        tl.static_assert(MAY_SPLIT or SPLIT_K == 1)  # MAY_SPLIT: M <= SPLIT_K_MAX_TOKENS (scratch; autotune key)
        let_next_kernel_launch(PDL)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        per = tl.cdiv(tl.cdiv(KB, SPLIT_K), BLOCK_B) * BLOCK_B  # whole tiles per split
        j_lo = pid_k * per
        j_hi = tl.minimum(j_lo + per, KB)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        xq_rows = xq_ptr + offs_m[:, None].to(tl.int64) * 4 * KB
        w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
        m_mask = offs_m[:, None] < M
        n_mask = offs_n[None, :] < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        first = j_lo + offs_b
        wb_next = tl.load(w_cols + first[:, None], mask=(first[:, None] < j_hi) & n_mask, other=0)
        wait_for_previous_kernel(PDL)  # x_q, the scales and the counters come from the quantization kernel
        for j0 in range(j_lo, j_hi, BLOCK_B):
            j = j0 + offs_b
            wb = wb_next  # the next tile's loads go out before this tile's decode and MMAs
            nxt = j + BLOCK_B
            wb_next = tl.load(w_cols + nxt[:, None], mask=(nxt[:, None] < j_hi) & n_mask, other=0)
            for i in tl.static_range(4):
                w_plane = _ternary_plane(wb, i, PTX)  # (BLOCK_B, BLOCK_N) int8 in {-1, 0, 1}
                x_plane = tl.load(xq_rows + i * KB + j[None, :], mask=m_mask & (j[None, :] < j_hi), other=0)
                acc = tl.dot(x_plane, w_plane, acc, out_dtype=tl.int32)

        mn_mask = m_mask & n_mask
        beta = tl.load(beta_ptr)
        scale = tl.load(scale_ptr + offs_m, mask=offs_m < M, other=1.0)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        if SPLIT_K == 1:
            y = acc.to(tl.float32) * tl.math.div_rn(beta, scale)[:, None]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mn_mask)
        else:
            tile_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            split_stride = M.to(tl.int64) * N
            tl.store(parts_ptr + pid_k * split_stride + tile_offs, acc, mask=mn_mask)
            tl.debug_barrier()  # every thread's stores are issued before the counter bump (release)
            counter = counters_ptr + pid_m * tl.num_programs(1) + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:  # the last split of this tile
                total = _sum_split_tiles(parts_ptr, tile_offs, split_stride, acc, pid_k, mn_mask, SPLIT_K)
                tl.atomic_xchg(counter, 0, sem="relaxed")
                y = total.to(tl.float32) * tl.math.div_rn(beta, scale)[:, None]
                tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mn_mask)

    def _gemv_config(block_n, block_w, num_warps, x_tile=False):
        return triton.Config({"BLOCK_N": block_n, "BLOCK_W": block_w, "X_TILE": x_tile}, num_warps=num_warps,
                             num_stages=1)

    # BLOCK_W 256 words = a whole 4096-wide row in one chunk: all its loads in flight at once. Each program
    # quantizes x itself, so it wants many rows per program; the X_TILE configs apply where the row is one chunk.
    # The candidates are those that are fast where the kernel runs, in a CUDA graph with PDL (H200, 4096 x 4096, one
    # token, benchmarks/bitlinear_kernels.py --all-configs): there X_TILE with 16 or 32 rows and 8 warps took 3.1 us
    # and BLOCK_N 8 with 4 warps 3.9 us, while Triton's default timing (one launch, L2 flushed, no PDL) ranked the
    # 4-warp configs first, within 5% of the others (hence the graph timing of plugins/tuning.py).
    _GEMV_CONFIGS = [
        _gemv_config(16, 256, 8),
        _gemv_config(32, 256, 8),
        _gemv_config(16, 256, 8, x_tile=True),
        _gemv_config(32, 256, 8, x_tile=True),
        _gemv_config(8, 256, 8, x_tile=True),
    ]

    def _gemm_config(block_n, block_b, split_k, num_warps, num_stages):
        return triton.Config({"BLOCK_N": block_n, "BLOCK_B": block_b, "SPLIT_K": split_k}, num_warps=num_warps,
                             num_stages=num_stages)

    _GEMM_CONFIGS = [  # N / BLOCK_N * SPLIT_K programs: 4096 / 32 * 4 = 512 fill the 132 SMs of an H100/H200
        _gemm_config(32, 64, 1, 4, 3),
        _gemm_config(64, 128, 1, 8, 2),
        _gemm_config(16, 128, 1, 4, 2),
        _gemm_config(32, 128, 2, 4, 2),
        _gemm_config(64, 128, 2, 4, 2),
        _gemm_config(32, 128, 4, 4, 2),
        _gemm_config(64, 128, 4, 4, 2),
        _gemm_config(64, 64, 4, 4, 2),
        _gemm_config(128, 128, 4, 8, 2),
        _gemm_config(32, 64, 8, 4, 2),
        _gemm_config(32, 128, 8, 4, 2),
        _gemm_config(64, 64, 8, 4, 2),
        _gemm_config(64, 128, 8, 8, 2),
        _gemm_config(16, 128, 8, 4, 2),
        _gemm_config(32, 256, 4, 4, 2),
        # For M = 64 (BLOCK_M 64) every program reads its K range of all 64 rows of x_q from L2: with small
        # BLOCK_N that is N / BLOCK_N times the whole x_q. Wide tiles cut it; split-K keeps >= 128 programs.
        _gemm_config(64, 128, 2, 4, 4),
        _gemm_config(64, 256, 2, 8, 2),
        _gemm_config(64, 128, 4, 8, 3),
        _gemm_config(64, 256, 4, 8, 2),
        _gemm_config(64, 128, 8, 4, 2),
        _gemm_config(128, 128, 4, 8, 3),
        _gemm_config(128, 128, 8, 8, 2),
        # BLOCK_N 128 with 4 warps spills registers in the main loop (sm_90, BLOCK_M 64): 8 warps, BLOCK_B 64
        _gemm_config(128, 64, 4, 8, 2),
        _gemm_config(128, 64, 8, 8, 2),
    ]
    # the split-K scratch holds MAX_SPLIT_K (M, N) int32 slices of partial sums: enough for every config
    MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _GEMM_CONFIGS)

    def _prune_gemv_configs(configs, named_args, **kwargs):
        """Drop the X_TILE configs whose BLOCK_W is shorter than the row (the X_TILE=False ones fit every K)."""
        return [c for c in configs if _gemv_config_fits(c.kwargs, named_args["KW"])]

    def _prune_gemm_configs(configs, named_args, **kwargs):
        """Drop splits shorter than one BLOCK_B tile (they would only add partial tiles to store and add up), and
        every split where M is too large for the scratch (MAY_SPLIT off)."""
        kb = named_args["KB"]
        unsplit = [c for c in configs if c.kwargs["SPLIT_K"] == 1]
        if not kwargs["MAY_SPLIT"]:
            return unsplit
        return [c for c in configs if c.kwargs["SPLIT_K"] == 1 or kb // c.kwargs["SPLIT_K"] >= c.kwargs["BLOCK_B"]]

    _gemv_tuned = autotune(_GEMV_CONFIGS, ["N", "K"], _prune_gemv_configs)(_gemv_kernel)
    _gemm_tuned = autotune(_GEMM_CONFIGS, ["N", "KB", "BLOCK_M", "MAY_SPLIT"], _prune_gemm_configs)(_gemm_kernel)

# Small blocks for the CPU interpreter: several chunks, partial tiles and splits even at test sizes.
_INTERPRET_GEMV = {"BLOCK_N": 8, "BLOCK_W": 4, "X_TILE": False}
_INTERPRET_GEMM = {"BLOCK_N": 16, "BLOCK_B": 32, "SPLIT_K": 1}

# Tests (and benchmarks/bitlinear_kernels.py --all-configs) force one config instead of the autotuned one:
# {"gemv" | "gemm": a triton.Config or a dict of meta-parameters}. Empty: autotune (GPU) / _INTERPRET_* (CPU).
FORCED_CONFIG: dict = {}


def _amax_block(K: int) -> int:
    """The whole row in one load when it fits: the absmax pass then costs one round trip to L2, not K / block."""
    return min(triton.next_power_of_2(K), 16384)


SPLIT_K_MAX_TOKENS = 256  # above: no split-K (a prefill's M x N tiles fill the GPU anyway; no scratch)


def _split_k_scratch(M: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM's split-K scratch, uninitialised: partial sums (MAX_SPLIT_K, M, N) int32 (they need no zeroing;
    8 MB at 64 x 4096, from the caching allocator; none above SPLIT_K_MAX_TOKENS) and one int32 counter per
    output tile (tiles are at least 16 x 16), which _quantize_rows_kernel zeroes before the GEMM."""
    num_parts = MAX_SPLIT_K * M * N if M <= SPLIT_K_MAX_TOKENS else 0
    ws = torch.empty(num_parts + triton.cdiv(M, 16) * triton.cdiv(N, 16), dtype=torch.int32, device=device)
    return ws[:num_parts].view(-1, M, N), ws[num_parts:]


def _gemv_config_fits(config_meta: dict, KW: int) -> bool:
    """X_TILE reads the whole row as one (BLOCK_W, 16) tile: only for rows of at most BLOCK_W words."""
    return not config_meta.get("X_TILE") or KW <= config_meta["BLOCK_W"]


def _launch(kind: str, tuned, kernel, grid, args: tuple, meta: dict) -> None:
    """kernel[grid](*args, **meta) with the forced config, the interpreter's, or (on the GPU) the autotuned one.
    meta carries the launch flags too (PDL, launch_pdl): every path launches with the same ones."""
    config = FORCED_CONFIG.get(kind) or ((_INTERPRET_GEMV if kind == "gemv" else _INTERPRET_GEMM)
                                         if interpreting() else None)
    if config is None:
        tuned[grid](*args, **meta)
        return
    if isinstance(config, dict):
        config_meta = dict(config)
    else:
        config_meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    if kind == "gemv":
        KW = dict(zip(kernel.arg_names, args))["KW"]
        if not _gemv_config_fits(config_meta, KW):
            raise UserError(f"the forced GEMV config {config_meta} has X_TILE, which needs rows of at most BLOCK_W "
                            f"words; these have {KW}")
    if kind == "gemm":
        splits = MAX_SPLIT_K if meta["MAY_SPLIT"] else 1
        if config_meta["SPLIT_K"] > splits:
            raise UserError(f"the forced GEMM config {config_meta} has more splits than the split-K scratch holds "
                            f"here ({splits}: MAX_SPLIT_K up to {SPLIT_K_MAX_TOKENS} tokens, then 1)")
    kernel[grid](*args, **meta, **config_meta)


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
        KW = words.size(1)
        copied = words.data_ptr() != packed_weight.data_ptr()  # the kernel just before wrote the weights
        grid = lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), M)
        _launch("gemv", _gemv_tuned, _gemv_kernel, grid,
                (x2, words, beta, y2, N, K, KW, x2.stride(0), words.stride(0), y2.stride(0)),
                {"BLOCK_AMAX": _amax_block(K), "PTX": ptx, **({"PDL": False} if copied else launch_options(x.device))})
        return out
    KB = packed_weight.size(1)
    x_q = torch.empty(M, 4, KB, dtype=torch.int8, device=x.device)
    scales = torch.empty(M, dtype=torch.float32, device=x.device)
    parts, counters = _split_k_scratch(M, N, x.device)
    _quantize_rows_kernel[(M,)](x2, x_q, scales, counters, counters.numel(), K, KB, x2.stride(0),
                                BLOCK_B=min(triton.next_power_of_2(KB), 2048), BLOCK_AMAX=_amax_block(K),
                                BLOCK_Z=1024, PTX=ptx, num_warps=8,
                                **launch_options(x.device))
    w = packed_weight if packed_weight.stride(1) == 1 else packed_weight.contiguous()
    copied = w.data_ptr() != packed_weight.data_ptr()  # written by the kernel just before: no loads before a wait
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    grid = lambda cfg: (triton.cdiv(M, block_m), triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _launch("gemm", _gemm_tuned, _gemm_kernel, grid,
            (x_q, scales, w, beta, y2, parts, counters, M, N, KB, w.stride(0), y2.stride(0)),
            {"BLOCK_M": block_m, "MAY_SPLIT": M <= SPLIT_K_MAX_TOKENS, "PTX": ptx,
             **({"PDL": False} if copied else launch_options(x.device))})
    return out
