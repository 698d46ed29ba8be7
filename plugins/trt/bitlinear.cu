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
// Paths, by M: GEMV (M <= 4): one kernel; every block takes the tokens' absmax, quantizes them into shared memory
// and gives each warp 4 weight rows, 16 weights per dp4a. Batch (M > 4): a quantization kernel writes x_int (permuted,
// padded to whole groups of 64 inputs) and the per-token scales to the workspace; then each warp computes 8 outputs
// for 16 or 32 tokens with int8 tensor-core MMAs (mma.sync m16n8k32, int32 accumulators): per 64 inputs, each thread
// reads one weight word of its output column and the int8 activations of its two rows, fed to the MMA in the permuted
// order (the K order inside an MMA is free, as long as A and B agree).
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
constexpr int kThreads = 256; // the GEMV's and the quantization kernel's blocks
constexpr int kGemvRowsPerWarp = 4;
constexpr int kGemvRowsPerBlock = kThreads / 32 * kGemvRowsPerWarp;
constexpr int kGemvMaxSmem = 46 * 1024; // dynamic shared memory, under the 48 KB that needs no opt-in
constexpr int kUnitBatch = 4;           // units of 8 inputs each thread loads at once
constexpr int kMmaWarps = 4;
constexpr int kMmaColumns = 8; // outputs per warp: one MMA's N

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

// Word j (bytes 4j..4j+3) of a packed row of rowBytes bytes; bytes past the row read as code 00 (weight 0).
template <bool kAlignedRows>
__device__ __forceinline__ uint32_t loadWord(uint8_t const* row, int j, int rowBytes)
{
    if (kAlignedRows) // rowBytes % 4 == 0: a word is all in or all out
    {
        return 4 * j < rowBytes ? __ldg(reinterpret_cast<uint32_t const*>(row) + j) : 0u;
    }
    uint32_t word = 0;
    for (int b = 0; b < 4; ++b)
    {
        int const i = 4 * j + b;
        word |= i < rowBytes ? static_cast<uint32_t>(__ldg(row + i)) << (8 * b) : 0u;
    }
    return word;
}

// The absmax of each of up to 4 token rows over the block: every thread ends with all of them.
__device__ __forceinline__ void blockAbsmax(float (&amax)[kGemvMaxTokens], float* shared /* [warps][4] */)
{
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int m = 0; m < kGemvMaxTokens; ++m)
    {
        for (int o = 16; o > 0; o >>= 1)
        {
            amax[m] = fmaxf(amax[m], __shfl_xor_sync(0xffffffffu, amax[m], o));
        }
        if (lane == 0)
        {
            shared[warp * kGemvMaxTokens + m] = amax[m];
        }
    }
    __syncthreads();
    for (int m = 0; m < kGemvMaxTokens; ++m)
    {
        amax[m] = 0.0f;
        for (int w = 0; w < kThreads / 32; ++w)
        {
            amax[m] = fmaxf(amax[m], shared[w * kGemvMaxTokens + m]);
        }
    }
}

// x_int of rows (<= 4) consecutive tokens of x, `units` units of 8 inputs per token (those past K are zeros), into
// out in the permuted order, and each token's scale into scales (shared memory): the whole block takes part, each
// thread loading kUnitBatch units at once (one pass for the absmax, another, mostly from L1, to quantize).
template <typename T>
__device__ void quantizeTokens(T const* x, int rows, int units, int K, float* scales, float* partial, uint2* out)
{
    int const total = rows * units;
    float amax[kGemvMaxTokens] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int u0 = threadIdx.x; u0 < total; u0 += kUnitBatch * kThreads)
    {
        float v[kUnitBatch][8];
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
            for (int t = 0; t < kGemvMaxTokens; ++t)
            {
                amax[t] = t == m ? fmaxf(amax[t], local) : amax[t];
            }
        }
    }
    blockAbsmax(amax, partial);
    for (int t = 0; t < kGemvMaxTokens; ++t)
    {
        if (threadIdx.x == t)
        {
            scales[t] = actScale(amax[t]);
        }
    }
    __syncthreads();
    for (int u0 = threadIdx.x; u0 < total; u0 += kUnitBatch * kThreads)
    {
        float v[kUnitBatch][8];
        for (int b = 0; b < kUnitBatch; ++b)
        {
            loadUnit(x, u0 + b * kThreads, units, total, K, v[b]);
        }
        for (int b = 0; b < kUnitBatch; ++b)
        {
            int const u = u0 + b * kThreads;
            if (u < total)
            {
                out[u] = quantizeUnit(v[b], scales[u / units]);
            }
        }
    }
}

// ---- GEMV: M <= 4 tokens, one kernel.
// Grid: ceil(N / 32) blocks of 256 threads; warp w of block b owns rows 32b + 4w .. + 3. Each lane reads kWords
// consecutive words of each of its 4 rows per step (a 16-byte load when rows are 16-byte aligned).
template <typename T, int kWords>
__global__ void __launch_bounds__(kThreads) gemvKernel(T const* __restrict__ x, uint8_t const* __restrict__ packed,
    float const* __restrict__ weightScale, T* __restrict__ y, int M, int K, int N)
{
    extern __shared__ uint4 xq[]; // [M][groups] permuted int8 groups of 16
    __shared__ float partial[kThreads / 32 * kGemvMaxTokens];
    __shared__ float scales[kGemvMaxTokens];
    letNextKernelLaunch();
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int const groups = (K + 15) / 16, rowBytes = (K + 3) / 4;
    int const row0 = blockIdx.x * kGemvRowsPerBlock + warp * kGemvRowsPerWarp;
    constexpr int kStep = 32 * kWords;

    uint32_t cur[kGemvRowsPerWarp][kWords];
    auto load = [&](int base, uint32_t(&w)[kGemvRowsPerWarp][kWords]) {
        for (int r = 0; r < kGemvRowsPerWarp; ++r)
        {
            int const n = row0 + r, j = base + lane * kWords;
            uint8_t const* row = packed + static_cast<size_t>(n) * rowBytes;
            if (kWords == 4)
            {
                uint4 v = n < N && j < groups ? __ldg(reinterpret_cast<uint4 const*>(row) + j / 4) : make_uint4(0, 0, 0, 0);
                w[r][0] = v.x, w[r][1] = v.y, w[r][2] = v.z, w[r][3] = v.w;
            }
            else
            {
                for (int q = 0; q < kWords; ++q)
                {
                    w[r][q] = n < N ? loadWord<false>(row, j + q, rowBytes) : 0u;
                }
            }
        }
    };
    load(0, cur); // weights first: they do not depend on the previous kernel
    waitPreviousKernel();

    quantizeTokens(x, M, 2 * groups, K, scales, partial, reinterpret_cast<uint2*>(xq));
    __syncthreads();

    int acc[kGemvRowsPerWarp][kGemvMaxTokens] = {};
    for (int base = 0; base < groups; base += kStep)
    {
        uint32_t next[kGemvRowsPerWarp][kWords];
        if (base + kStep < groups)
        {
            load(base + kStep, next);
        }
        for (int q = 0; q < kWords; ++q)
        {
            int const j = base + lane * kWords + q;
            if (j >= groups)
            {
                break;
            }
            uint4 xw[kGemvMaxTokens];
            for (int m = 0; m < kGemvMaxTokens; ++m)
            {
                xw[m] = m < M ? xq[m * groups + j] : make_uint4(0, 0, 0, 0);
            }
            for (int r = 0; r < kGemvRowsPerWarp; ++r)
            {
                uint32_t w[4];
                decodeWord(cur[r][q], w);
                for (int m = 0; m < kGemvMaxTokens; ++m)
                {
                    int a = acc[r][m];
                    a = __dp4a(static_cast<int>(w[0]), static_cast<int>(xw[m].x), a);
                    a = __dp4a(static_cast<int>(w[1]), static_cast<int>(xw[m].y), a);
                    a = __dp4a(static_cast<int>(w[2]), static_cast<int>(xw[m].z), a);
                    acc[r][m] = __dp4a(static_cast<int>(w[3]), static_cast<int>(xw[m].w), a);
                }
            }
        }
        if (base + kStep < groups)
        {
            for (int r = 0; r < kGemvRowsPerWarp; ++r)
            {
                for (int q = 0; q < kWords; ++q)
                {
                    cur[r][q] = next[r][q];
                }
            }
        }
    }

    float const beta = *weightScale;
    for (int r = 0; r < kGemvRowsPerWarp; ++r)
    {
        for (int m = 0; m < kGemvMaxTokens; ++m)
        {
            int a = acc[r][m];
            for (int o = 16; o > 0; o >>= 1)
            {
                a += __shfl_xor_sync(0xffffffffu, a, o);
            }
            int const n = row0 + r;
            if (lane == 0 && m < M && n < N)
            {
                y[static_cast<size_t>(m) * N + n] = fromFloat<T>(__fmul_rn(static_cast<float>(a), __fdiv_rn(beta, scales[m])));
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
    __shared__ float partial[kThreads / 32 * kGemvMaxTokens];
    __shared__ float scale[kGemvMaxTokens];
    letNextKernelLaunch();
    waitPreviousKernel(); // reads x; also, the previous call's MMA kernel may still read xq
    size_t const token = blockIdx.x;
    quantizeTokens(x + token * K, 1, 2 * paddedGroups, K, scale, partial, xq + token * 2 * paddedGroups);
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

// ---- batch path, 2: grid (ceil(N / 32), ceil(M / (16 kTiles))) blocks of 4 warps; a warp owns 8 output columns
// and 16 kTiles tokens. Lane (g, t) = (lane / 4, lane % 4): per 64 inputs, group 4c + t of the chunk c, it reads the
// weight word of column g and the x_int groups of rows g and g + 8 of each tile; the MMA fragments (A rows g, g + 8,
// K = 4t..4t+3 and 16+4t..; B column g, the same K) take permuted words q = 0, 1 and then q = 2, 3 of that group.
template <typename T, int kTiles, bool kAlignedRows>
__global__ void __launch_bounds__(kMmaWarps * 32) mmaKernel(uint4 const* __restrict__ xq,
    float const* __restrict__ scales, uint8_t const* __restrict__ packed, float const* __restrict__ weightScale,
    T* __restrict__ y, int M, int K, int N, int paddedGroups)
{
    constexpr int kDepth = 8 / kTiles; // chunks per buffer: two buffers, one loading while the other multiplies
    letNextKernelLaunch();
    int const lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int const n0 = (blockIdx.x * kMmaWarps + (threadIdx.x >> 5)) * kMmaColumns;
    int const m0 = blockIdx.y * 16 * kTiles;
    if (n0 >= N)
    {
        return; // the whole warp
    }
    int const rowBytes = (K + 3) / 4, n = n0 + g, chunks = paddedGroups / 4;
    uint8_t const* row = packed + static_cast<size_t>(n < N ? n : 0) * rowBytes;
    waitPreviousKernel();

    // chunk c: this thread's weight word (group 4c + t of column n) and x_int groups of rows g, g + 8 of each tile
    auto load = [&](int c0, uint32_t(&w)[kDepth], uint4(&a)[kDepth][kTiles][2]) {
        for (int d = 0; d < kDepth; ++d)
        {
            int const c = c0 + d, group = 4 * c + t;
            bool const in = c < chunks;
            w[d] = in && n < N ? loadWord<kAlignedRows>(row, group, rowBytes) : 0u;
            for (int tile = 0; tile < kTiles; ++tile)
            {
                for (int half = 0; half < 2; ++half)
                {
                    int const r = m0 + 16 * tile + g + 8 * half;
                    a[d][tile][half] = in && r < M ? __ldg(xq + static_cast<size_t>(r) * paddedGroups + group)
                                                   : make_uint4(0, 0, 0, 0);
                }
            }
        }
    };
    int acc[kTiles][4] = {};
    auto multiply = [&](uint32_t const(&w)[kDepth], uint4 const(&a)[kDepth][kTiles][2]) {
        for (int d = 0; d < kDepth; ++d)
        {
            uint32_t b[4];
            decodeWord(w[d], b);
            for (int tile = 0; tile < kTiles; ++tile)
            {
                uint4 const& lo = a[d][tile][0];
                uint4 const& hi = a[d][tile][1];
                mmaInt8(acc[tile], lo.x, hi.x, lo.y, hi.y, b[0], b[1]);
                mmaInt8(acc[tile], lo.z, hi.z, lo.w, hi.w, b[2], b[3]);
            }
        }
    };
    uint32_t w0[kDepth], w1[kDepth];
    uint4 a0[kDepth][kTiles][2], a1[kDepth][kTiles][2];
    load(0, w0, a0);
    for (int c0 = 0; c0 < chunks; c0 += 2 * kDepth) // chunks past the end load as zeros, which add nothing
    {
        load(c0 + kDepth, w1, a1);
        multiply(w0, a0);
        load(c0 + 2 * kDepth, w0, a0);
        multiply(w1, a1);
    }

    float const beta = *weightScale;
    for (int tile = 0; tile < kTiles; ++tile)
    {
        for (int i = 0; i < 4; ++i)
        {
            int const r = m0 + 16 * tile + g + 8 * (i >> 1), col = n0 + 2 * t + (i & 1);
            if (r < M && col < N)
            {
                y[static_cast<size_t>(r) * N + col]
                    = fromFloat<T>(__fmul_rn(static_cast<float>(acc[tile][i]), __fdiv_rn(beta, scales[r])));
            }
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
    return M <= kGemvMaxTokens && M * ((K + 15) / 16) * 16 <= kGemvMaxSmem;
}

template <typename T>
cudaError_t run(void const* x, uint8_t const* packed, float const* scale, void* y, void* workspace, int M, int K,
    int N, cudaStream_t stream)
{
    auto const* xt = static_cast<T const*>(x);
    auto* yt = static_cast<T*>(y);
    if (gemvFits(M, K))
    {
        dim3 const grid((N + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock);
        size_t const smem = static_cast<size_t>(M) * ((K + 15) / 16) * 16;
        bool const rows16 = ((K + 3) / 4) % 16 == 0; // 16-byte aligned rows of whole 4-word steps
        return rows16 ? launch(gemvKernel<T, 4>, grid, kThreads, smem, stream, xt, packed, scale, yt, M, K, N)
                      : launch(gemvKernel<T, 1>, grid, kThreads, smem, stream, xt, packed, scale, yt, M, K, N);
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
    int const blocksN = (N + kMmaWarps * kMmaColumns - 1) / (kMmaWarps * kMmaColumns);
    bool const aligned = ((K + 3) / 4) % 4 == 0;
    if (M <= 16)
    {
        dim3 const grid(blocksN, (M + 15) / 16);
        return aligned ? launch(mmaKernel<T, 1, true>, grid, kMmaWarps * 32, 0, stream, xq, scales, packed, scale, yt,
                             M, K, N, paddedGroups)
                       : launch(mmaKernel<T, 1, false>, grid, kMmaWarps * 32, 0, stream, xq, scales, packed, scale,
                             yt, M, K, N, paddedGroups);
    }
    dim3 const grid(blocksN, (M + 31) / 32);
    return aligned ? launch(mmaKernel<T, 2, true>, grid, kMmaWarps * 32, 0, stream, xq, scales, packed, scale, yt, M,
                         K, N, paddedGroups)
                   : launch(mmaKernel<T, 2, false>, grid, kMmaWarps * 32, 0, stream, xq, scales, packed, scale, yt, M,
                         K, N, paddedGroups);
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
