// bytedeploy::BitLinear (version 1): y = bitlinear_int(x, packed_weight, weight_scale, in_features) in x's dtype,
// bitwise (bytedeploy/models/bitlinear.py). W2A8: ternary weights packed 4 per byte, int8 per-token activations,
// int32 sums.
//
// Inputs x float32/float16 (..., K), packed_weight uint8 (N, ceil(K/4)), weight_scale float32 (1,); fields
// in_features K, out_features N (INT32; INT64 accepted); output y (..., N). M = the product of x's leading dims.
//
// Packing: weight 4j + i of a row in bits 2i..2i+1 of byte j, codes 00 -> 0, 01 -> +1, 10 -> -1 (11 -> 0). So a 32-bit
// word of a row holds its 16 weights of one group of 16 inputs, weight t in bits 2t..2t+1. The kernels never unpack to
// that order: (word & 0x33333333) puts the codes of the even weights t = 2e, e = 0..7, in nibbles, ((word >> 2) &
// 0x33333333) those of the odd ones, and one byte permute (prmt) of the table {0, +1, -1, 0} by 4 nibbles makes an
// int8x4 of weights. Word q = s + 2h (s, h in {0, 1}) of a group then holds weights t = 8h + 2e + s, e = 0..3, and the
// activations are quantized straight into that order (int8 x_int of input 16g + 8h + 2e + s at byte 16g + 4q + e), so
// that one dp4a or int8 MMA multiplies matching pairs.
//
// Paths, by M. Both read the weights as 16-byte chunks (64 inputs of a row) and issue the first ones before waiting
// for the previous kernel (programmatic dependent launch, sm_90+), so that their DRAM latency overlaps the previous
// kernel's tail and the activation quantization.
// GEMV (M <= 4): one kernel, the token count a template parameter; a block of 8 warps owns 32 weight rows, a warp 4,
// and each lane holds 2 chunks of each of its rows in registers (the whole row when K <= 4096: all of a block's
// weights are requested before the wait), refilled as they are used for longer rows. After the wait the block
// quantizes the tokens into shared memory (chunk-interleaved, so that lanes reading consecutive chunks hit distinct
// banks; one read of x, kept in registers), then 16 weights per dp4a.
// Batch (M > 4): a quantization kernel writes x_int (permuted, padded to whole chunks) and the per-token scales to
// the workspace; then an int8 tensor-core kernel (mma.sync m16n8k32, int32 accumulators): a block of 8 warps owns 32
// or 64 output columns and 16 or 32 tokens; its warps split K by superchunks of 256 inputs (4 chunks, one per lane
// of a quad), each holding two superchunks of weights in registers (loaded before the wait), and the block adds the
// warps' int32 tiles in shared memory. Lane (g, t) reads chunk t of a superchunk of column g of each 8-column tile,
// and the int8 activations of the same 4 groups of its rows g and g + 8, fed to the MMA in the permuted order (the K
// order inside an MMA is free, as long as A and B agree).
//
// Exactness: the integer parts are exact; the float parts repeat bitlinear_int's IEEE float32 operations:
//   s = (1 / max(max|x|, 1e-5)) * 127  (torch computes 127 / t as t.reciprocal() * 127), x_int = rint(x s) clipped to
//   [-128, 127], y = float(acc) * (beta / s), then rounded to x's dtype.
#include "common.h"

#include <cuda_fp16.h>

namespace bytedeploy
{
namespace
{

constexpr char kName[] = "BitLinear";
constexpr int kGemvMaxTokens = 4;
constexpr int kThreads = 256; // every kernel's blocks
constexpr int kWarps = kThreads / 32;
constexpr int kGemvRowsPerWarp = 4;
constexpr int kGemvRowsPerBlock = kWarps * kGemvRowsPerWarp;
constexpr int kGemvSlots = 2;           // chunks of each row a GEMV lane holds in registers
constexpr int kGemvMaxSmem = 46 * 1024; // dynamic shared memory, under the 48 KB that needs no opt-in
constexpr int kUnitBatch = 4;           // units of 8 inputs each thread loads at once
constexpr int kMmaColumnTiles = 4;      // 8-column MMA tiles per warp
constexpr int kMmaWarpColumns = 8 * kMmaColumnTiles;
constexpr int kMmaDepth = 2; // superchunks of weights each MMA warp holds in registers

__device__ __forceinline__ uint32_t ternaryInt8x4(uint32_t nibbles)
{
    return __byte_perm(0x00FF0100u, 0u, nibbles); // byte e = table[nibble e], table = {0, +1, -1, 0}
}

// The 16 weights of a packed word as 4 int8x4 words, word q = s + 2h holding weights 8h + 2e + s.
__device__ __forceinline__ void decodeWord(uint32_t word, uint32_t (&out)[4])
{
    uint32_t const even = word & 0x33333333u, odd = (word >> 2) & 0x33333333u;
    out[0] = ternaryInt8x4(even);
    out[1] = ternaryInt8x4(odd);
    out[2] = ternaryInt8x4(even >> 16);
    out[3] = ternaryInt8x4(odd >> 16);
}

__device__ __forceinline__ uint32_t wordOf(uint4 const& v, int q)
{
    return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

__device__ __forceinline__ void loadVector(float const* p, float (&v)[8])
{
    float4 const a = *reinterpret_cast<float4 const*>(p), b = *reinterpret_cast<float4 const*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void loadVector(__half const* p, float (&v)[8])
{
    uint4 const u = *reinterpret_cast<uint4 const*>(p);
    __half2 const* h = reinterpret_cast<__half2 const*>(&u);
    for (int i = 0; i < 4; ++i)
    {
        float2 const f = __half22float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}

// Unit u of the `total` units of 8 inputs of a block of token rows (units per row): its inputs as floats, 0 past K
// and past the last row. Rows of a multiple of 16 inputs are read as 16-byte vectors.
template <typename T>
__device__ __forceinline__ void loadUnit(T const* x, int u, int units, int total, int K, float (&v)[8])
{
    T const* row = x + static_cast<size_t>(u / units) * K;
    int const k0 = 8 * (u % units);
    if (u < total && K % 16 == 0 && k0 < K)
    {
        loadVector(row + k0, v);
        return;
    }
    for (int i = 0; i < 8; ++i)
    {
        v[i] = u < total && k0 + i < K ? toFloat(row[k0 + i]) : 0.0f;
    }
}

__device__ __forceinline__ float actScale(float amax)
{
    return __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.0f);
}

__device__ __forceinline__ uint32_t quantize(float v, float scale)
{
    return static_cast<uint8_t>(max(-128, min(127, __float2int_rn(__fmul_rn(v, scale)))));
}

// A unit's x_int as the permuted words (s = 0, h) and (s = 1, h) of its group: its even and its odd inputs. Unit u
// = 2g + h thus fills words 2u and 2u + 1 of the permuted rows: one uint2 per unit.
__device__ __forceinline__ uint2 quantizeUnit(float const (&v)[8], float scale)
{
    uint2 words = make_uint2(0, 0);
    for (int e = 0; e < 4; ++e)
    {
        words.x |= quantize(v[2 * e], scale) << (8 * e);
        words.y |= quantize(v[2 * e + 1], scale) << (8 * e);
    }
    return words;
}

// Word j (bytes 4j..4j+3) of a packed row of rowBytes bytes, byte by byte; bytes past the row read as code 00.
__device__ __forceinline__ uint32_t loadWordBytes(uint8_t const* row, int j, int rowBytes)
{
    uint32_t word = 0;
    for (int b = 0; b < 4; ++b)
    {
        int const i = 4 * j + b;
        word |= i < rowBytes ? static_cast<uint32_t>(__ldg(row + i)) << (8 * b) : 0u;
    }
    return word;
}

// Chunk c (bytes 16c..16c+15: groups 4c..4c+3, one word each) of a packed row; zeros past the row. kAligned: rows of
// whole 16-byte chunks, read as one 16-byte load.
template <bool kAligned>
__device__ __forceinline__ uint4 loadChunk(uint8_t const* row, int c, int rowBytes)
{
    if (kAligned)
    {
        return 16 * c < rowBytes ? __ldg(reinterpret_cast<uint4 const*>(row) + c) : make_uint4(0, 0, 0, 0);
    }
    return make_uint4(loadWordBytes(row, 4 * c, rowBytes), loadWordBytes(row, 4 * c + 1, rowBytes),
        loadWordBytes(row, 4 * c + 2, rowBytes), loadWordBytes(row, 4 * c + 3, rowBytes));
}

// The absmax of each of kRows token rows over the block: every thread ends with all of them.
template <int kRows>
__device__ __forceinline__ void blockAbsmax(float (&amax)[kRows], float* partial /* [warps][kRows] */)
{
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int m = 0; m < kRows; ++m)
    {
        for (int o = 16; o > 0; o >>= 1)
        {
            amax[m] = fmaxf(amax[m], __shfl_xor_sync(0xffffffffu, amax[m], o));
        }
        if (lane == 0)
        {
            partial[warp * kRows + m] = amax[m];
        }
    }
    __syncthreads();
    for (int m = 0; m < kRows; ++m)
    {
        amax[m] = 0.0f;
        for (int w = 0; w < kWarps; ++w)
        {
            amax[m] = fmaxf(amax[m], partial[w * kRows + m]);
        }
    }
}

// Where unit u of the permuted x_int goes (a uint2 index; units per token row, 8 per chunk of 64 inputs). In order:
// token m's group g at uint4 m * groups + g. Interleaved (the GEMV's shared memory): group 4c + q at uint4
// m * groups + q * chunks + c, so that lanes reading consecutive chunks read consecutive 16-byte words.
template <bool kInterleaved>
__device__ __forceinline__ int unitSlot(int u, int units)
{
    if (!kInterleaved)
    {
        return u;
    }
    int const m = u / units, g = (u % units) / 2, h = u % 2, chunks = units / 8;
    return m * units + 2 * ((g % 4) * chunks + g / 4) + h;
}

// x_int of kRows consecutive tokens of x, `units` units of 8 inputs per token (those past K are zeros), into out
// (unitSlot's layout), and each token's scale into scale (every thread gets them): the whole block takes part, each
// thread loading kUnitBatch units at once. When the rows fit one batch per thread, x is read once and quantized from
// registers; otherwise a second pass reads it again, mostly from L1.
template <typename T, int kRows, bool kInterleaved>
__device__ void quantizeTokens(T const* x, int units, int K, float* partial, uint2* out, float (&scale)[kRows])
{
    int const total = kRows * units;
    bool const onePass = total <= kUnitBatch * kThreads;
    float v[kUnitBatch][8];
    float amax[kRows];
    for (int m = 0; m < kRows; ++m)
    {
        amax[m] = 0.0f;
    }
    for (int u0 = threadIdx.x; u0 < total; u0 += kUnitBatch * kThreads)
    {
        for (int b = 0; b < kUnitBatch; ++b)
        {
            loadUnit(x, u0 + b * kThreads, units, total, K, v[b]);
        }
        for (int b = 0; b < kUnitBatch; ++b)
        {
            float local = 0.0f;
            for (int i = 0; i < 8; ++i)
            {
                local = fmaxf(local, fabsf(v[b][i]));
            }
            int const m = (u0 + b * kThreads) / units;
            for (int r = 0; r < kRows; ++r)
            {
                amax[r] = r == m ? fmaxf(amax[r], local) : amax[r];
            }
        }
    }
    blockAbsmax(amax, partial);
    for (int m = 0; m < kRows; ++m)
    {
        scale[m] = actScale(amax[m]);
    }
    for (int u0 = threadIdx.x; u0 < total; u0 += kUnitBatch * kThreads)
    {
        if (!onePass)
        {
#pragma unroll
            for (int b = 0; b < kUnitBatch; ++b)
            {
                loadUnit(x, u0 + b * kThreads, units, total, K, v[b]);
            }
        }
        for (int b = 0; b < kUnitBatch; ++b)
        {
            int const u = u0 + b * kThreads, m = u / units;
            float s = scale[0];
            for (int r = 1; r < kRows; ++r)
            {
                s = r == m ? scale[r] : s;
            }
            if (u < total)
            {
                out[unitSlot<kInterleaved>(u, units)] = quantizeUnit(v[b], s);
            }
        }
    }
}

// ---- GEMV: kTokens <= 4 tokens, one kernel.
// Grid: ceil(N / 32) blocks of 256 threads; warp w of block b owns rows 32b + 4w .. + 3. Lane l holds chunks l and
// l + 32 of each of its rows (slots 0, 1), then l + 64, l + 96, ..., each slot refilled once it is used.
template <typename T, int kTokens, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2) gemvKernel(T const* __restrict__ x, uint8_t const* __restrict__ packed,
    float const* __restrict__ weightScale, T* __restrict__ y, int K, int N)
{
    extern __shared__ uint4 xs[]; // [kTokens][4 chunks] interleaved permuted groups (unitSlot)
    __shared__ float partial[kWarps * kTokens];
    letNextKernelLaunch();
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int const rowBytes = (K + 3) / 4, chunks = (rowBytes + 15) / 16;
    int const row0 = blockIdx.x * kGemvRowsPerBlock + warp * kGemvRowsPerWarp;
    constexpr int kStride = 32 * kGemvSlots; // chunks per pass over the slots

    auto load = [&](int r, int c) {
        int const n = row0 + r;
        return n < N ? loadChunk<kAligned>(packed + static_cast<size_t>(n) * rowBytes, c, rowBytes)
                     : make_uint4(0, 0, 0, 0);
    };
    uint4 w[kGemvRowsPerWarp][kGemvSlots];
    for (int r = 0; r < kGemvRowsPerWarp; ++r)
    {
        for (int s = 0; s < kGemvSlots; ++s)
        {
            w[r][s] = load(r, lane + 32 * s); // weights first: they do not depend on the previous kernel
        }
    }
    // Always taken. Behind a branch the wait stays below the loads above; as a plain statement ptxas (CUDA 13.0)
    // scheduled it above every one of them, so no weight was requested before the previous kernel ended.
    if (blockIdx.x < gridDim.x)
    {
        waitPreviousKernel();
    }

    float scale[kTokens];
    quantizeTokens<T, kTokens, true>(x, 8 * chunks, K, partial, reinterpret_cast<uint2*>(xs), scale);
    __syncthreads();

    int acc[kGemvRowsPerWarp][kTokens] = {};
    for (int base = 0; base < chunks; base += kStride)
    {
#pragma unroll
        for (int s = 0; s < kGemvSlots; ++s)
        {
            int const c = base + lane + 32 * s;
            if (c < chunks)
            {
                for (int q = 0; q < 4; ++q)
                {
                    uint4 xw[kTokens];
                    for (int m = 0; m < kTokens; ++m)
                    {
                        xw[m] = xs[(4 * m + q) * chunks + c];
                    }
                    for (int r = 0; r < kGemvRowsPerWarp; ++r)
                    {
                        uint32_t b[4];
                        decodeWord(wordOf(w[r][s], q), b);
                        for (int m = 0; m < kTokens; ++m)
                        {
                            int a = acc[r][m];
                            a = __dp4a(static_cast<int>(b[0]), static_cast<int>(xw[m].x), a);
                            a = __dp4a(static_cast<int>(b[1]), static_cast<int>(xw[m].y), a);
                            a = __dp4a(static_cast<int>(b[2]), static_cast<int>(xw[m].z), a);
                            acc[r][m] = __dp4a(static_cast<int>(b[3]), static_cast<int>(xw[m].w), a);
                        }
                    }
                }
            }
            if (base + kStride < chunks)
            {
                for (int r = 0; r < kGemvRowsPerWarp; ++r)
                {
                    w[r][s] = load(r, c + kStride);
                }
            }
        }
    }

    float const beta = *weightScale;
    for (int r = 0; r < kGemvRowsPerWarp; ++r)
    {
        for (int m = 0; m < kTokens; ++m)
        {
            int a = acc[r][m];
            for (int o = 16; o > 0; o >>= 1)
            {
                a += __shfl_xor_sync(0xffffffffu, a, o);
            }
            int const n = row0 + r;
            if (lane == 0 && n < N)
            {
                y[static_cast<size_t>(m) * N + n] = fromFloat<T>(__fmul_rn(static_cast<float>(a), __fdiv_rn(beta, scale[m])));
            }
        }
    }
}

// ---- batch path, 1: one block per token: its scale, and x_int in the permuted order, padded with zeros to
// paddedGroups groups of 16.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantizeKernel(
    T const* __restrict__ x, uint2* __restrict__ xq, float* __restrict__ scales, int K, int paddedGroups)
{
    __shared__ float partial[kWarps];
    letNextKernelLaunch();
    waitPreviousKernel(); // reads x; also, the previous call's MMA kernel may still read xq
    size_t const token = blockIdx.x;
    float scale[1];
    quantizeTokens<T, 1, false>(x + token * K, 2 * paddedGroups, K, partial, xq + token * 2 * paddedGroups, scale);
    if (threadIdx.x == 0)
    {
        scales[token] = scale[0];
    }
}

__device__ __forceinline__ void mmaInt8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
    uint32_t b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ---- batch path, 2: grid (ceil(N / (32 kWarpsN)), ceil(M / (16 kTiles))) blocks of 8 warps. Warp (wn, wk) =
// (warp % kWarpsN, warp / kWarpsN) owns 32 output columns (4 MMA tiles of 8) and the block's 16 kTiles tokens, over
// the superchunks wk, wk + kWarpsK, ... (256 inputs each). Lane (g, t) = (lane / 4, lane % 4): per superchunk sc it
// reads chunk 4 sc + t (groups G = 16 sc + 4t + i, i = 0..3) of column g of each tile, and the x_int of the same
// groups of rows g and g + 8 of each token tile; per group, the MMA fragments (A rows g, g + 8, K = 4t..4t+3 and
// 16+4t..; B column g, the same K) take permuted words q = 0, 1 and then q = 2, 3 of group G. The warps' int32 tiles
// are added in shared memory.
template <typename T, int kTiles, int kWarpsN, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2) mmaKernel(uint4 const* __restrict__ xq,
    float const* __restrict__ scales, uint8_t const* __restrict__ packed, float const* __restrict__ weightScale,
    T* __restrict__ y, int M, int K, int N, int paddedGroups)
{
    constexpr int kWarpsK = kWarps / kWarpsN;
    constexpr int kAcc = kTiles * kMmaColumnTiles * 4; // accumulators per lane
    __shared__ int partials[kWarps][kAcc][32];
    letNextKernelLaunch();
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    int const wn = warp % kWarpsN, wk = warp / kWarpsN;
    int const n0 = (blockIdx.x * kWarpsN + wn) * kMmaWarpColumns;
    int const m0 = blockIdx.y * 16 * kTiles;
    int const rowBytes = (K + 3) / 4, chunks = paddedGroups / 4, superchunks = (chunks + 3) / 4;

    auto loadWeights = [&](int sc, uint4(&w)[kMmaColumnTiles]) {
        for (int j = 0; j < kMmaColumnTiles; ++j)
        {
            int const n = n0 + 8 * j + g;
            w[j] = n < N ? loadChunk<kAligned>(packed + static_cast<size_t>(n) * rowBytes, 4 * sc + t, rowBytes)
                         : make_uint4(0, 0, 0, 0);
        }
    };
    uint4 w[kMmaDepth][kMmaColumnTiles];
    for (int d = 0; d < kMmaDepth; ++d)
    {
        loadWeights(wk + kWarpsK * d, w[d]); // weights first: they do not depend on the previous kernel
    }
    waitPreviousKernel();

    // group i of superchunk sc of rows g, g + 8 of each token tile; zeros past M and past the padded row
    auto loadActivations = [&](int sc, int i, uint4(&a)[kTiles][2]) {
        int const c = 4 * sc + t;
        for (int tile = 0; tile < kTiles; ++tile)
        {
            for (int half = 0; half < 2; ++half)
            {
                int const r = m0 + 16 * tile + g + 8 * half;
                a[tile][half] = c < chunks && r < M ? __ldg(xq + static_cast<size_t>(r) * paddedGroups + 4 * c + i)
                                                    : make_uint4(0, 0, 0, 0);
            }
        }
    };
    int acc[kTiles][kMmaColumnTiles][4] = {};
    auto multiply = [&](int sc, uint4 const(&w)[kMmaColumnTiles]) {
        uint4 a[4][kTiles][2];
        for (int i = 0; i < 4; ++i)
        {
            loadActivations(sc, i, a[i]);
        }
        for (int i = 0; i < 4; ++i)
        {
            for (int j = 0; j < kMmaColumnTiles; ++j)
            {
                uint32_t b[4];
                decodeWord(wordOf(w[j], i), b);
                for (int tile = 0; tile < kTiles; ++tile)
                {
                    uint4 const& lo = a[i][tile][0];
                    uint4 const& hi = a[i][tile][1];
                    mmaInt8(acc[tile][j], lo.x, hi.x, lo.y, hi.y, b[0], b[1]);
                    mmaInt8(acc[tile][j], lo.z, hi.z, lo.w, hi.w, b[2], b[3]);
                }
            }
        }
    };
    for (int s0 = 0; wk + kWarpsK * s0 < superchunks; s0 += kMmaDepth)
    {
#pragma unroll
        for (int d = 0; d < kMmaDepth; ++d)
        {
            int const sc = wk + kWarpsK * (s0 + d);
            if (sc < superchunks) // the whole warp
            {
                multiply(sc, w[d]);
                loadWeights(sc + kWarpsK * kMmaDepth, w[d]); // zeros past the row
            }
        }
    }

    for (int tile = 0; tile < kTiles; ++tile)
    {
        for (int j = 0; j < kMmaColumnTiles; ++j)
        {
            for (int e = 0; e < 4; ++e)
            {
                partials[warp][(tile * kMmaColumnTiles + j) * 4 + e][lane] = acc[tile][j][e];
            }
        }
    }
    __syncthreads();
    // warp (wn, wk) adds up and stores accumulators wk, wk + kWarpsK, ... of the columns of warps (wn, *)
    float const beta = *weightScale;
    for (int i = wk; i < kAcc; i += kWarpsK)
    {
        int sum = 0;
        for (int k = 0; k < kWarpsK; ++k)
        {
            sum += partials[k * kWarpsN + wn][i][lane];
        }
        int const tile = i / (4 * kMmaColumnTiles), j = i / 4 % kMmaColumnTiles, e = i % 4;
        int const r = m0 + 16 * tile + g + 8 * (e >> 1), col = n0 + 8 * j + 2 * t + (e & 1);
        if (r < M && col < N)
        {
            y[static_cast<size_t>(r) * N + col] = fromFloat<T>(__fmul_rn(static_cast<float>(sum), __fdiv_rn(beta, scales[r])));
        }
    }
}

int64_t paddedGroupsOf(int64_t K)
{
    return ((K + 15) / 16 + 3) / 4 * 4; // whole chunks of 64 inputs
}

size_t batchWorkspace(int64_t M, int64_t K)
{
    return alignUp(static_cast<size_t>(M) * paddedGroupsOf(K) * 16) + alignUp(static_cast<size_t>(M) * sizeof(float));
}

bool gemvFits(int64_t M, int64_t K)
{
    return M <= kGemvMaxTokens && M * paddedGroupsOf(K) * 16 <= kGemvMaxSmem;
}

bool wholeChunkRows(int K)
{
    return ((K + 3) / 4) % 16 == 0; // rows of whole 16-byte chunks
}

template <typename T, int kTokens>
cudaError_t launchGemv(T const* x, uint8_t const* packed, float const* scale, T* y, int K, int N, cudaStream_t stream)
{
    dim3 const grid((N + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock);
    size_t const smem = kTokens * paddedGroupsOf(K) * sizeof(uint4);
    return wholeChunkRows(K) ? launch(gemvKernel<T, kTokens, true>, grid, kThreads, smem, stream, x, packed, scale, y, K, N)
                             : launch(gemvKernel<T, kTokens, false>, grid, kThreads, smem, stream, x, packed, scale, y, K, N);
}

template <typename T, int kTiles, int kWarpsN>
cudaError_t launchMma(uint4 const* xq, float const* scales, uint8_t const* packed, float const* scale, T* y, int M,
    int K, int N, int paddedGroups, cudaStream_t stream)
{
    dim3 const grid((N + kWarpsN * kMmaWarpColumns - 1) / (kWarpsN * kMmaWarpColumns), (M + 16 * kTiles - 1) / (16 * kTiles));
    return wholeChunkRows(K) ? launch(mmaKernel<T, kTiles, kWarpsN, true>, grid, kThreads, 0, stream, xq, scales, packed,
                                   scale, y, M, K, N, paddedGroups)
                             : launch(mmaKernel<T, kTiles, kWarpsN, false>, grid, kThreads, 0, stream, xq, scales,
                                   packed, scale, y, M, K, N, paddedGroups);
}

template <typename T>
cudaError_t run(void const* x, uint8_t const* packed, float const* scale, void* y, void* workspace, int M, int K,
    int N, cudaStream_t stream)
{
    auto const* xt = static_cast<T const*>(x);
    auto* yt = static_cast<T*>(y);
    if (gemvFits(M, K))
    {
        switch (M)
        {
        case 1: return launchGemv<T, 1>(xt, packed, scale, yt, K, N, stream);
        case 2: return launchGemv<T, 2>(xt, packed, scale, yt, K, N, stream);
        case 3: return launchGemv<T, 3>(xt, packed, scale, yt, K, N, stream);
        default: return launchGemv<T, 4>(xt, packed, scale, yt, K, N, stream);
        }
    }
    int const paddedGroups = static_cast<int>(paddedGroupsOf(K));
    auto* xq = static_cast<uint4*>(workspace); // M rows of paddedGroups permuted groups of 16
    auto* scales = reinterpret_cast<float*>(
        static_cast<char*>(workspace) + alignUp(static_cast<size_t>(M) * paddedGroups * sizeof(uint4)));
    cudaError_t status = launch(quantizeKernel<T>, dim3(M), kThreads, 0, stream, xt, reinterpret_cast<uint2*>(xq),
        scales, K, paddedGroups);
    if (status != cudaSuccess)
    {
        return status;
    }
    if (M <= 16)
    {
        return launchMma<T, 1, 1>(xq, scales, packed, scale, yt, M, K, N, paddedGroups, stream);
    }
    if (M <= 32)
    {
        return launchMma<T, 2, 1>(xq, scales, packed, scale, yt, M, K, N, paddedGroups, stream);
    }
    return launchMma<T, 2, 2>(xq, scales, packed, scale, yt, M, K, N, paddedGroups, stream);
}

class BitLinearPlugin : public PluginBase
{
public:
    BitLinearPlugin(int32_t inFeatures, int32_t outFeatures)
        : PluginBase(kName)
        , mIn(inFeatures)
        , mOut(outFeatures)
    {
        if (inFeatures < 1 || outFeatures < 1)
        {
            throw std::invalid_argument("BitLinear needs positive in/out features, got " + std::to_string(inFeatures)
                + ", " + std::to_string(outFeatures));
        }
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new BitLinearPlugin(mIn, mOut);
        }
        catch (std::exception const& e)
        {
            logError(e.what());
            return nullptr;
        }
    }

    // ---- build

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const*, int32_t) noexcept override
    {
        return nbInputs == 3 && checkDims(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims) ? 0 : -1;
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 3)
        {
            return -1;
        }
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
        nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims < 1)
        {
            return -1;
        }
        outputs[0] = inputs[0]; // the leading (batch, sequence) dims as they are, symbolic or not
        outputs[0].d[inputs[0].nbDims - 1] = exprBuilder.constant(mOut);
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || pos < 0 || pos > 3)
        {
            return false;
        }
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case 0: return desc.type == nvinfer1::DataType::kFLOAT || desc.type == nvinfer1::DataType::kHALF;
        case 1: return desc.type == nvinfer1::DataType::kUINT8;
        case 2: return desc.type == nvinfer1::DataType::kFLOAT;
        default: return desc.type == inOut[0].desc.type; // y in x's dtype
        }
    }

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t, nvinfer1::DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        int64_t const maxTokens = volume(inputs[0].max, 0, inputs[0].max.nbDims - 1);
        return gemvFits(maxTokens, mIn) ? 0 : batchWorkspace(maxTokens, mIn);
    }

    // ---- runtime

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const*,
        int32_t) noexcept override
    {
        return nbInputs == 3 && checkDims(in[0].dims, in[1].dims, in[2].dims) ? 0 : -1;
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        int64_t const M = volume(inputDesc[0].dims, 0, inputDesc[0].dims.nbDims - 1);
        if (M == 0)
        {
            return 0;
        }
        auto const* packed = static_cast<uint8_t const*>(inputs[1]);
        auto const* scale = static_cast<float const*>(inputs[2]);
        cudaError_t const status = inputDesc[0].type == nvinfer1::DataType::kHALF
            ? run<__half>(inputs[0], packed, scale, outputs[0], workspace, static_cast<int>(M), mIn, mOut, stream)
            : run<float>(inputs[0], packed, scale, outputs[0], workspace, static_cast<int>(M), mIn, mOut, stream);
        if (status != cudaSuccess)
        {
            logError(std::string("BitLinear enqueue: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

protected:
    std::vector<nvinfer1::PluginField> fields() override
    {
        return {intField("in_features", &mIn), intField("out_features", &mOut)};
    }

private:
    // Input dims against the fields; -1 (unknown at build time) passes.
    bool checkDims(nvinfer1::Dims const& x, nvinfer1::Dims const& w, nvinfer1::Dims const& s) const
    {
        auto fits = [](int64_t got, int64_t expected) { return got == expected || got == -1; };
        bool const ok = x.nbDims >= 1 && fits(x.d[x.nbDims - 1], mIn) && w.nbDims == 2 && fits(w.d[0], mOut)
            && fits(w.d[1], (mIn + 3) / 4) && (volume(s) == 1 || volume(s) == -1 || (s.nbDims == 1 && s.d[0] == -1));
        if (!ok)
        {
            logError("BitLinear (" + std::to_string(mIn) + " -> " + std::to_string(mOut)
                + "): inputs must be x (..., in_features), packed_weight (out_features, ceil(in_features / 4)) and "
                  "weight_scale (1,)");
        }
        return ok;
    }

    int32_t mIn;
    int32_t mOut;
};

class BitLinearCreator : public CreatorBase
{
public:
    BitLinearCreator()
        : CreatorBase(kName,
            {nvinfer1::PluginField("in_features", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("out_features", nullptr, nvinfer1::PluginFieldType::kINT32, 1)})
    {
    }

protected:
    nvinfer1::IPluginV3* create(FieldReader const& fields) override
    {
        return new BitLinearPlugin(
            static_cast<int32_t>(fields.integer("in_features")), static_cast<int32_t>(fields.integer("out_features")));
    }
};

} // namespace

nvinfer1::IPluginCreatorV3One* bitLinearCreator()
{
    static BitLinearCreator creator;
    return &creator;
}

} // namespace bytedeploy
