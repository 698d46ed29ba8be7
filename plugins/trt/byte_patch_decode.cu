// bytedeploy::BytePatchDecode (version 1): one whole bGPT patch from its feature, the byte-level decoder's patch_size
// greedy steps (plugins/patch_decode.py, bytedeploy/models/bgpt.py generate_patch).
//
// Inputs feature float32/float16 (B, n_embd), forced int32 (B, patch_size) (its first n_forced bytes begin the patch),
// n_forced int32 (1,); output patch int32 (B, patch_size): bytes 0..255, and 256 (end) on every step after a row's
// first 256. Fields (plugins/patch_decode.PLUGIN_FIELDS): patch_size, n_embd, byte_n_layer, byte_n_head, top_k, seed
// (INT32), top_p, temperature (FLOAT32), weights (FLOAT32: the byte decoder's parameters in ByteDecoder.parameters()
// order: byte_wte, wpe, per block ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj (weight, bias each), ln_f; the LM head
// is byte_wte).
//
// Only greedy decoding is implemented (temperature 0 or top_k 1, what the exporter bakes into the node): a node that
// asks for sampling is refused when the plugin is created, with a message saying so. The Python plugin samples.
//
// The weights go to the GPU once per plugin object (onShapeChange, or the first enqueue), in the feature's dtype;
// activations, LayerNorm statistics and sums are float32. A step is the GPT-2 decoder on one new position per row,
// then ln_f + LM head and the selection (argmax, forced bytes, the end mark, the next input byte's embedding). A step
// reads all the weights (84 MB for bGPT base in float32), so two paths:
//
// - Up to kGemvMaxRows rows (the GEMV path), 4 + 4 + 4 + 1 kernels per step for 3 layers, after the design of the
//   fused Triton kernels (plugins/decode_kernels.py): per layer qkvAttentionKernel (LayerNorm + QKV projection; the
//   last block of a head, counted with an atomic counter, attends for that head over the KV cache), gemvKernel for
//   attn c_proj + residual, for LayerNorm + c_fc + GELU, for mlp c_proj + residual; then headSelectKernel (ln_f + LM
//   head; its last block selects every row's byte and writes the next step's input). A step's input after the first
//   is wte[byte] + wpe[step], so the first layer's LayerNorm + QKV is a row of a table computed once with the weights
//   ((P - 1) x 257 x 3 C float32, 35 MB for bGPT base): there tableAttentionKernel, reading no weights, stands in for
//   qkvAttentionKernel. A GEMV block (8 warps, about two per SM) owns a few whole weight rows and copies them into
//   shared memory with cp.async before it waits for the previous kernel (programmatic dependent launch): the weights
//   of the next kernels stream while the current one finishes, and after the wait only the input rows (from L2)
//   remain. All batch rows are computed from that one copy of the weights: a warp takes two weight rows and a slice
//   of K (lanes over float4s), the slices' sums are added up in shared memory in a fixed order.
// - More rows (the GEMM path), 7 kernels per layer + 3: LayerNorm kernels, a register-tiled SGEMM (64 x 16 output
//   tiles, 4 x 2 per thread, shared-memory staging of A and W, float32 FMA, 4 thread groups per block splitting K;
//   each weight read once per step and M tile) with bias / GELU / residual epilogues, the attention and the
//   selection with a warp per (row, head) / row.
//
// The KV cache and activations live in TensorRT's workspace; its last region holds the atomic counters (zeroed by
// the first kernel, reset by the block that finishes each count). A row has ended when its previous byte is 256 (the
// output itself). All kernels go on the given stream, with programmatic dependent launch on sm_90+; nothing
// synchronizes, so the application may capture the stream into a CUDA graph.
#include "common.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace bytedeploy
{
namespace
{

constexpr char kName[] = "BytePatchDecode";
constexpr int kSymbols = 257; // bytes 0..255 and 256
constexpr int kEnd = 256;
constexpr int kGemvMaxRows = 8;  // batch rows of the GEMV path
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvBlocksPerSM = 2; // about: 16 warps per SM stream the weights and share the dot products
constexpr int kRowThreads = 128; // LayerNorm, attention, selection: a warp per row or (row, head)
constexpr int kTileM = 64, kTileN = 16, kTileK = 32, kTileThreads = 128;
constexpr int kSplitK = 4; // a GEMM block's thread groups, each over every kSplitK-th K tile
constexpr int kGemmThreads = kTileThreads * kSplitK;
constexpr int kMaxCounters = 64; // the counters' region holds at least 256 bytes
constexpr int kMaxEmbd = 1024;
constexpr int kReservedSmem = 1024; // of the opt-in shared memory per block: the kernels' static shared memory
constexpr float kLayerNormEps = 1e-5f;

enum Epilogue
{
    kStore,
    kGelu,
    kAddResidual
};

// Offsets of each tensor in the flat weights (ByteDecoder.parameters() order).
struct Layout
{
    int64_t P, C, L;
    int64_t wte() const { return 0; }
    int64_t wpe() const { return kSymbols * C; }
    int64_t block(int64_t l) const { return wpe() + (P + 1) * C + l * perBlock(); }
    int64_t perBlock() const { return 12 * C * C + 13 * C; }
    int64_t ln1W(int64_t l) const { return block(l); }
    int64_t ln1B(int64_t l) const { return block(l) + C; }
    int64_t attnW(int64_t l) const { return block(l) + 2 * C; }
    int64_t attnB(int64_t l) const { return attnW(l) + 3 * C * C; }
    int64_t projW(int64_t l) const { return attnB(l) + 3 * C; }
    int64_t projB(int64_t l) const { return projW(l) + C * C; }
    int64_t ln2W(int64_t l) const { return projB(l) + C; }
    int64_t ln2B(int64_t l) const { return ln2W(l) + C; }
    int64_t fcW(int64_t l) const { return ln2B(l) + C; }
    int64_t fcB(int64_t l) const { return fcW(l) + 4 * C * C; }
    int64_t mlpProjW(int64_t l) const { return fcB(l) + 4 * C; }
    int64_t mlpProjB(int64_t l) const { return mlpProjW(l) + 4 * C * C; }
    int64_t lnFW() const { return block(L); }
    int64_t lnFB() const { return lnFW() + C; }
    int64_t size() const { return lnFB() + C; }
};

// ---- device helpers

__device__ __forceinline__ float4 load4(float const* p)
{
    return *reinterpret_cast<float4 const*>(p);
}

__device__ __forceinline__ float4 load4(__half const* p)
{
    uint2 const v = *reinterpret_cast<uint2 const*>(p);
    float2 const lo = __half22float2(*reinterpret_cast<__half2 const*>(&v.x));
    float2 const hi = __half22float2(*reinterpret_cast<__half2 const*>(&v.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// Activations written by earlier kernels (or by other blocks of this one): read from L2.
__device__ __forceinline__ float4 loadL2(float4 const* p)
{
    return __ldcg(p);
}

__device__ __forceinline__ float loadL2(float const* p)
{
    return __ldcg(p);
}

__device__ __forceinline__ float dot4(float4 a, float4 b)
{
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float warpMax(float v)
{
    for (int o = 16; o > 0; o >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

__device__ __forceinline__ float geluTanh(float v)
{
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

template <int kEpilogue>
__device__ __forceinline__ float applyEpilogue(float v, float residual)
{
    if (kEpilogue == kGelu)
    {
        return geluTanh(v);
    }
    return kEpilogue == kAddResidual ? residual + v : v;
}

// bytes (a multiple of 16) from global to shared memory without registers (cp.async, sm_80+), by the whole block.
__device__ __forceinline__ void copyAsync(void* shared, void const* global, int bytes)
{
    for (int i = threadIdx.x * 16; i < bytes; i += blockDim.x * 16)
    {
        char* to = static_cast<char*>(shared) + i;
        char const* from = static_cast<char const*>(global) + i;
#if __CUDA_ARCH__ >= 800
        unsigned const address = static_cast<unsigned>(__cvta_generic_to_shared(to));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(from) : "memory");
#else
        *reinterpret_cast<uint4*>(to) = *reinterpret_cast<uint4 const*>(from);
#endif
    }
}

__device__ __forceinline__ void copyAsyncCommit()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

__device__ __forceinline__ void copyAsyncWait()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetchL2(void const* p)
{
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// The count-the-blocks pattern of a split reduction: true in the block that is the `total`-th to arrive at counter
// (after this block's stores, which it then sees with everyone else's); that block resets the counter for next time.
__device__ bool lastToArrive(int* counter, int total)
{
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
    {
        last = atomicAdd(counter, 1) == total - 1;
        if (last)
        {
            *counter = 0;
        }
    }
    __syncthreads();
    if (last)
    {
        __threadfence();
    }
    return last;
}

// ---- GEMV path: out (B, N) (=, GELU of, or += ) LayerNorm(in (B, K)) times weight (N, K)^T + bias

template <typename T>
struct Gemv
{
    float const* in;
    float* out;
    T const* weight;
    T const* bias;       // or nullptr
    T const* normWeight; // nullptr: no LayerNorm
    T const* normBias;
    int B, K, N, rows; // rows: weight rows per block
};

// A GEMV block's shared memory, in bytes from its start: its weight rows (T), the LayerNorm's gain and shift (T),
// the input rows (float), the rows' bias and residual (float), the warps' partial sums (float); the total.
struct GemvSmem
{
    int weights, gain, shift, x, bias, residual, partial, total;

    __host__ __device__ GemvSmem(int rows, int K, int B, bool norm, int elem)
    {
        auto align = [](int bytes) { return (bytes + 15) / 16 * 16; };
        weights = 0;
        gain = weights + align(rows * K * elem);
        shift = gain + (norm ? align(K * elem) : 0);
        x = shift + (norm ? align(K * elem) : 0);
        bias = x + align(B * K * 4);
        residual = bias + align(rows * 4);
        partial = residual + align(B * rows * 4);
        int const items = (rows + 1) / 2 > kGemvWarps ? (rows + 1) / 2 : kGemvWarps;
        total = partial + align(items * kGemvMaxRows * 2 * 4);
    }
};

// The input rows into shared memory (all at once: one round trip to L2), and the residual of the block's outputs.
template <int kEpilogue>
__device__ void stageInputs(float* x, float* residual, float const* in, float const* out, int B, int K, int N, int n0,
    int rows)
{
    constexpr int kPerThread = 8;
    int const quads = B * K / 4;
    float4 const* from = reinterpret_cast<float4 const*>(in);
    float4* to = reinterpret_cast<float4*>(x);
    for (int i0 = 0; i0 < quads; i0 += kPerThread * blockDim.x)
    {
        float4 v[kPerThread];
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
        {
            int const i = i0 + j * blockDim.x + threadIdx.x;
            v[j] = i < quads ? loadL2(from + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int j = 0; j < kPerThread; ++j)
        {
            int const i = i0 + j * blockDim.x + threadIdx.x;
            if (i < quads)
            {
                to[i] = v[j];
            }
        }
    }
    if (kEpilogue == kAddResidual)
    {
        for (int i = threadIdx.x; i < B * rows; i += blockDim.x)
        {
            residual[i] = loadL2(out + static_cast<size_t>(i / rows) * N + n0 + i % rows);
        }
    }
}

// LayerNorm of the B rows in x (shared, in place), a warp per row; mean and variance in two passes.
template <typename T>
__device__ void normalizeRows(float* x, T const* gain, T const* shift, int B, int K)
{
    int const lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int b = threadIdx.x >> 5; b < B; b += warps)
    {
        float* row = x + b * K;
        float s = 0.0f;
        for (int k = 4 * lane; k < K; k += 128)
        {
            float4 const v = load4(row + k);
            s += v.x + v.y + v.z + v.w;
        }
        float const mean = warpSum(s) / K;
        float d2 = 0.0f;
        for (int k = 4 * lane; k < K; k += 128)
        {
            float4 const v = load4(row + k);
            d2 += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean) + (v.z - mean) * (v.z - mean)
                + (v.w - mean) * (v.w - mean);
        }
        float const rstd = rsqrtf(warpSum(d2) / K + kLayerNormEps);
        for (int k = 4 * lane; k < K; k += 128)
        {
            float4 v = load4(row + k);
            float4 const g = load4(gain + k), h = load4(shift + k);
            v.x = (v.x - mean) * rstd * g.x + h.x;
            v.y = (v.y - mean) * rstd * g.y + h.y;
            v.z = (v.z - mean) * rstd * g.z + h.z;
            v.w = (v.w - mean) * rstd * g.w + h.w;
            *reinterpret_cast<float4*>(row + k) = v;
        }
    }
}

// The block's outputs from shared memory. A warp's item is two weight rows (a pair) and a slice of K (every
// slices-th float4 of 32 lanes; slices: warps per pair, at least 1), every batch row from the same weight loads; the
// items' sums go through shared memory (partial) and are added up in slice order, then the epilogue.
template <typename T, int kEpilogue>
__device__ void gemvRows(T const* weights, float const* x, float const* bias, float const* residual, float* partial,
    float* out, int B, int K, int N, int n0, int rows)
{
    int const lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    int const pairs = (rows + 1) / 2, slices = max(1, warps / pairs);
    for (int item = threadIdx.x >> 5; item < pairs * slices; item += warps)
    {
        int const r = 2 * (item / slices), slice = item % slices;
        T const* w0 = weights + r * K;
        T const* w1 = r + 1 < rows ? w0 + K : w0;
        float acc0[kGemvMaxRows] = {}, acc1[kGemvMaxRows] = {};
        for (int k = 4 * (lane + 32 * slice); k < K; k += 128 * slices)
        {
            float4 const a = load4(w0 + k), c = load4(w1 + k);
#pragma unroll
            for (int b = 0; b < kGemvMaxRows; ++b)
            {
                if (b < B)
                {
                    float4 const v = load4(x + b * K + k);
                    acc0[b] += dot4(a, v);
                    acc1[b] += dot4(c, v);
                }
            }
        }
#pragma unroll
        for (int b = 0; b < kGemvMaxRows; ++b)
        {
            if (b < B)
            {
                float const s0 = warpSum(acc0[b]), s1 = warpSum(acc1[b]);
                if (lane == 0)
                {
                    partial[(item * kGemvMaxRows + b) * 2] = s0;
                    partial[(item * kGemvMaxRows + b) * 2 + 1] = s1;
                }
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < B * rows; i += blockDim.x)
    {
        int const b = i / rows, r = i % rows, first = r / 2 * slices;
        float v = bias[r];
        for (int slice = 0; slice < slices; ++slice)
        {
            v += partial[((first + slice) * kGemvMaxRows + b) * 2 + (r & 1)];
        }
        out[static_cast<size_t>(b) * N + n0 + r] = applyEpilogue<kEpilogue>(v, residual[i]);
    }
}

// One block of a GEMV: rows p.rows * blockIdx.x ... Requests its weights, then waits for the previous kernel.
template <typename T, int kEpilogue>
__device__ void gemvBlock(Gemv<T> const& p, char* smem)
{
    int const n0 = blockIdx.x * p.rows, rows = min(p.rows, p.N - n0);
    bool const norm = p.normWeight != nullptr;
    GemvSmem const at(p.rows, p.K, p.B, norm, sizeof(T));
    T* weights = reinterpret_cast<T*>(smem + at.weights);
    T* gain = reinterpret_cast<T*>(smem + at.gain);
    T* shift = reinterpret_cast<T*>(smem + at.shift);
    float* x = reinterpret_cast<float*>(smem + at.x);
    float* bias = reinterpret_cast<float*>(smem + at.bias);
    float* residual = reinterpret_cast<float*>(smem + at.residual);
    float* partial = reinterpret_cast<float*>(smem + at.partial);

    copyAsync(weights, p.weight + static_cast<size_t>(n0) * p.K, rows * p.K * static_cast<int>(sizeof(T)));
    if (norm)
    {
        copyAsync(gain, p.normWeight, p.K * static_cast<int>(sizeof(T)));
        copyAsync(shift, p.normBias, p.K * static_cast<int>(sizeof(T)));
    }
    copyAsyncCommit();
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
    {
        bias[r] = p.bias ? toFloat(p.bias[n0 + r]) : 0.0f;
    }
    waitPreviousKernel();

    stageInputs<kEpilogue>(x, residual, p.in, p.out, p.B, p.K, p.N, n0, rows);
    copyAsyncWait();
    __syncthreads();
    if (norm)
    {
        normalizeRows(x, gain, shift, p.B, p.K);
        __syncthreads();
    }
    gemvRows<T, kEpilogue>(weights, x, bias, residual, partial, p.out, p.B, p.K, p.N, n0, rows);
}

template <typename T, int kEpilogue>
__global__ void __launch_bounds__(kGemvThreads) gemvKernel(Gemv<T> p)
{
    extern __shared__ __align__(16) char smem[];
    letNextKernelLaunch();
    gemvBlock<T, kEpilogue>(p, smem);
}

// ---- attention and selection (both paths)

// The step's attention for one (row, head), by a warp: q, k and v (D each) at q, q + C and q + 2 C (written by
// other blocks or the previous kernel); keys and values: the (row, head)'s cache (P, D), slots before `slot` filled.
// out (D) = softmax(q k^T / sqrt(D)) v over slots 0..slot (lane s scores slots s and s + 32), then k and v go to the
// cache at the slot.
__device__ float attentionScore(float const* q, float const* key, int D)
{
    float dot = 0.0f;
    if ((D & 3) == 0)
    {
#pragma unroll 16
        for (int d = 0; d < D; d += 4)
        {
            dot += dot4(loadL2(reinterpret_cast<float4 const*>(q + d)), loadL2(reinterpret_cast<float4 const*>(key + d)));
        }
    }
    else
    {
        for (int d = 0; d < D; ++d)
        {
            dot += loadL2(q + d) * loadL2(key + d);
        }
    }
    return dot;
}

__device__ void attendHead(float const* q, float* keys, float* values, float* out, int C, int D, int slot)
{
    int const lane = threadIdx.x & 31;
    float const scale = rsqrtf(static_cast<float>(D));
    float score[2] = {-INFINITY, -INFINITY};
    for (int i = 0; i < 2; ++i)
    {
        int const s = lane + 32 * i;
        if (s <= slot)
        {
            score[i] = attentionScore(q, s == slot ? q + C : keys + s * D, D) * scale;
        }
    }
    float const top = warpMax(fmaxf(score[0], score[1]));
    float const e0 = lane <= slot ? __expf(score[0] - top) : 0.0f;
    float const e1 = lane + 32 <= slot ? __expf(score[1] - top) : 0.0f;
    float const total = warpSum(e0 + e1);
    for (int d0 = 0; d0 < D; d0 += 32) // warp-uniform: the weights go round by shuffles
    {
        int const d = d0 + lane;
        bool const mine = d < D;
        float const kNew = mine ? loadL2(q + C + d) : 0.0f, vNew = mine ? loadL2(q + 2 * C + d) : 0.0f;
        float o = 0.0f;
#pragma unroll 8
        for (int s = 0; s < slot; ++s)
        {
            float const weight = __shfl_sync(0xffffffffu, s < 32 ? e0 : e1, s & 31);
            o += mine ? weight * loadL2(values + s * D + d) : 0.0f;
        }
        o += __shfl_sync(0xffffffffu, slot < 32 ? e0 : e1, slot & 31) * vNew;
        if (mine)
        {
            out[d] = o / total;
            keys[slot * D + d] = kNew;
            values[slot * D + d] = vNew;
        }
    }
}

// What a step's selection reads and writes.
template <typename T>
struct Select
{
    float const* logits; // (B, 257)
    int const* forced;   // (B, P)
    int const* nForced;  // (1,)
    int* patch;          // (B, P)
    float* x;            // (B, C): the next step's input
    T const* wte;
    T const* wpe;
    int B, C, P, step;
};

// Row b's byte at the step, by a warp: the argmax of its logits (the first of equal maxima, as torch.argmax), or the
// forced byte while step < n_forced; 256 once the row's previous byte was 256. Then the next step's input,
// wte[byte] + wpe[step + 1].
template <typename T>
__device__ void selectRow(Select<T> const& s, int b)
{
    int const lane = threadIdx.x & 31;
    float const* row = s.logits + static_cast<size_t>(b) * kSymbols;
    float value = -INFINITY;
    int index = lane;
    for (int i = lane; i < kSymbols; i += 32)
    {
        float const v = loadL2(row + i);
        if (v > value)
        {
            value = v, index = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1)
    {
        float const v = __shfl_xor_sync(0xffffffffu, value, o);
        int const i = __shfl_xor_sync(0xffffffffu, index, o);
        if (v > value || (v == value && i < index))
        {
            value = v, index = i;
        }
    }
    int* patch = s.patch + static_cast<size_t>(b) * s.P;
    int byte = s.step < *s.nForced ? s.forced[static_cast<size_t>(b) * s.P + s.step] : index;
    if (s.step > 0 && __ldcg(patch + s.step - 1) == kEnd)
    {
        byte = kEnd;
    }
    if (lane == 0)
    {
        patch[s.step] = byte;
    }
    if (s.step + 1 < s.P)
    {
        int const token = min(max(byte, 0), kEnd);
        T const* embedding = s.wte + static_cast<size_t>(token) * s.C;
        T const* position = s.wpe + static_cast<size_t>(s.step + 1) * s.C;
        for (int c = lane; c < s.C; c += 32)
        {
            s.x[static_cast<size_t>(b) * s.C + c] = toFloat(embedding[c]) + toFloat(position[c]);
        }
    }
}

// Where a layer's attention reads and writes: qkv (B, 3 C), the layer's caches (B, H, P, D), out (B, C).
struct Attention
{
    float const* qkv;
    float* cacheK;
    float* cacheV;
    float* out;
    int B, H, D, P, slot;

    __device__ void attend(int b, int h) const
    {
        int const C = H * D;
        size_t const cache = (static_cast<size_t>(b) * H + h) * P * D;
        attendHead(qkv + static_cast<size_t>(b) * 3 * C + h * D, cacheK + cache, cacheV + cache,
            out + static_cast<size_t>(b) * C + h * D, C, D, slot);
    }
};

// ---- GEMV path: the fused kernels

// LayerNorm + QKV projection (p: N = 3 C, p.rows dividing D, so a block's rows lie in one head's q, k or v); the
// last of a head's 3 D / p.rows blocks attends for that head, every row. Before the wait, each block asks L2 for its
// share of the head's cached keys and values (written a step ago, since evicted by the weights).
template <typename T>
__global__ void __launch_bounds__(kGemvThreads) qkvAttentionKernel(Gemv<T> p, Attention a, int* counters)
{
    extern __shared__ __align__(16) char smem[];
    letNextKernelLaunch();
    int const C = a.H * a.D, n0 = blockIdx.x * p.rows, head = n0 % C / a.D;
    int const perHead = 3 * a.D / p.rows, share = (n0 / C * a.D + n0 % a.D) / p.rows;
    int const lines = (a.slot * a.D + 31) / 32; // 128-byte lines of the filled slots
    for (int i = share + perHead * threadIdx.x; i < 2 * a.B * lines; i += perHead * blockDim.x)
    {
        int const b = i / (2 * lines), j = i % (2 * lines);
        float const* cache = (j < lines ? a.cacheK : a.cacheV) + (static_cast<size_t>(b) * a.H + head) * a.P * a.D;
        prefetchL2(cache + (j % lines) * 32);
    }
    gemvBlock<T, kStore>(p, smem);
    if (lastToArrive(counters + head, perHead))
    {
        for (int b = threadIdx.x >> 5; b < a.B; b += blockDim.x >> 5)
        {
            a.attend(b, head);
        }
    }
}

// ln_f + the LM head into logits (p), then the last block selects every row's byte (s).
template <typename T>
__global__ void __launch_bounds__(kGemvThreads) headSelectKernel(Gemv<T> p, Select<T> s, int* counter)
{
    extern __shared__ __align__(16) char smem[];
    letNextKernelLaunch();
    gemvBlock<T, kStore>(p, smem);
    if (lastToArrive(counter, gridDim.x))
    {
        for (int b = threadIdx.x >> 5; b < s.B; b += blockDim.x >> 5)
        {
            selectRow(s, b);
        }
    }
}

// Layer 0's attention at steps after the first (GEMV path), a warp per (row, head): a step's input is wte[byte] +
// wpe[step] with the byte before it, so its first block's q, k and v are a row of the table computed with the
// weights (first-layer QKV of every (position, byte): (P - 1, 257, 3 C)); this kernel stands in for that layer's
// qkvAttentionKernel and reads no weights. Before the wait, the warps of row 0 ask L2 for their head's slice of the
// step's table rows and every warp for its cached keys and values.
__global__ void __launch_bounds__(kRowThreads) tableAttentionKernel(Attention a, float const* table, int const* patch)
{
    letNextKernelLaunch();
    int const pair = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    int const b = pair / a.H, h = pair % a.H, C = a.H * a.D;
    float const* rows = table + static_cast<size_t>(a.slot - 1) * kSymbols * 3 * C;
    size_t const cache = (static_cast<size_t>(b) * a.H + h) * a.P * a.D;
    int const lines = (a.D + 31) / 32, cached = (a.slot * a.D + 31) / 32;
    if (pair < a.B * a.H)
    {
        for (int i = lane; b == 0 && i < kSymbols * 3 * lines; i += 32)
        {
            prefetchL2(rows + static_cast<size_t>(i / lines) * C + h * a.D + (i % lines) * 32);
        }
        for (int i = lane; i < cached; i += 32)
        {
            prefetchL2(a.cacheK + cache + i * 32);
            prefetchL2(a.cacheV + cache + i * 32);
        }
    }
    waitPreviousKernel();
    if (pair < a.B * a.H)
    {
        int const token = min(max(__ldcg(patch + static_cast<size_t>(b) * a.P + a.slot - 1), 0), kEnd);
        attendHead(rows + static_cast<size_t>(token) * 3 * C + h * a.D, a.cacheK + cache, a.cacheV + cache,
            a.out + static_cast<size_t>(b) * C + h * a.D, C, a.D, a.slot);
    }
}

// The table's LayerNorm'd inputs, a warp per row r = (position - 1) * 257 + byte: LayerNorm(wte[byte] +
// wpe[position]) with the first block's ln_1, into out (rows, C).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) tableInputKernel(T const* __restrict__ wte, T const* __restrict__ wpe,
    T const* __restrict__ gain, T const* __restrict__ shift, float* __restrict__ out, int rows, int C)
{
    int const r = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows)
    {
        return;
    }
    T const* embedding = wte + static_cast<size_t>(r % kSymbols) * C;
    T const* position = wpe + static_cast<size_t>(r / kSymbols + 1) * C;
    auto input = [&](int c) { return toFloat(embedding[c]) + toFloat(position[c]); };
    float s = 0.0f;
    for (int c = lane; c < C; c += 32)
    {
        s += input(c);
    }
    float const mean = warpSum(s) / C;
    float d2 = 0.0f;
    for (int c = lane; c < C; c += 32)
    {
        d2 += (input(c) - mean) * (input(c) - mean);
    }
    float const rstd = rsqrtf(warpSum(d2) / C + kLayerNormEps);
    for (int c = lane; c < C; c += 32)
    {
        out[static_cast<size_t>(r) * C + c] = (input(c) - mean) * rstd * toFloat(gain[c]) + toFloat(shift[c]);
    }
}

// ---- GEMM path

// out (M, N) (=, GELU of, or +=) in (M, K) times weight (N, K)^T + bias. 64 x 16 output tiles, a thread 4 rows x 2
// columns; kSplitK groups of threads per block, group g over the K tiles g, g + kSplitK, ... (32 deep), whose sums
// are added up in group order at the end. A group stages its A and W tiles in shared memory, transposed, and issues
// the next tile's loads before the current tile's FMAs.
template <typename T, int kEpilogue>
__global__ void __launch_bounds__(kGemmThreads) gemmKernel(
    float const* __restrict__ in, float* out, int M, int K, int N, T const* __restrict__ weight, T const* bias)
{
    constexpr int kQuads = kTileK / 4, kLoadsA = kTileM * kQuads / kTileThreads;
    static_assert(kTileN * kQuads == kTileThreads, "one W quad per thread");
    static_assert(kTileThreads * 8 <= kTileK * (kTileM + 4), "a group's sums fit its A tile");
    __shared__ __align__(16) float as[kSplitK][kTileK][kTileM + 4];
    __shared__ __align__(16) float ws[kSplitK][kTileK][kTileN + 4];
    letNextKernelLaunch();
    waitPreviousKernel();
    int const m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
    int const g = threadIdx.x / kTileThreads, t = threadIdx.x % kTileThreads;
    int const tx = t % (kTileN / 2), ty = t / (kTileN / 2); // columns 2 tx, 2 tx + 1; rows 4 ty .. 4 ty + 3
    float4 a[kLoadsA], w;
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < kLoadsA; ++i)
        {
            int const q = i * kTileThreads + t, m = m0 + q / kQuads, k = k0 + 4 * (q % kQuads);
            a[i] = m < M && k < K ? loadL2(reinterpret_cast<float4 const*>(in + static_cast<size_t>(m) * K + k))
                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        int const n = n0 + t / kQuads, k = k0 + 4 * (t % kQuads);
        w = n < N && k < K ? load4(weight + static_cast<size_t>(n) * K + k) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    };
    float acc[4][2] = {};
    int const tiles = (K + kTileK * kSplitK - 1) / (kTileK * kSplitK); // per group; past K, zeros
    load(g * kTileK);
    for (int tile = 0; tile < tiles; ++tile)
    {
#pragma unroll
        for (int i = 0; i < kLoadsA; ++i)
        {
            int const q = i * kTileThreads + t, m = q / kQuads, k = 4 * (q % kQuads);
            as[g][k][m] = a[i].x, as[g][k + 1][m] = a[i].y, as[g][k + 2][m] = a[i].z, as[g][k + 3][m] = a[i].w;
        }
        int const n = t / kQuads, k = 4 * (t % kQuads);
        ws[g][k][n] = w.x, ws[g][k + 1][n] = w.y, ws[g][k + 2][n] = w.z, ws[g][k + 3][n] = w.w;
        __syncthreads();
        if (tile + 1 < tiles)
        {
            load(((tile + 1) * kSplitK + g) * kTileK);
        }
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk)
        {
            float4 const x = *reinterpret_cast<float4 const*>(&as[g][kk][4 * ty]);
            float2 const y = *reinterpret_cast<float2 const*>(&ws[g][kk][2 * tx]);
            acc[0][0] += x.x * y.x, acc[0][1] += x.x * y.y;
            acc[1][0] += x.y * y.x, acc[1][1] += x.y * y.y;
            acc[2][0] += x.z * y.x, acc[2][1] += x.z * y.y;
            acc[3][0] += x.w * y.x, acc[3][1] += x.w * y.y;
        }
        __syncthreads();
    }
    float* sums = &as[g][0][0]; // the group's 8 sums per thread, after the last tile's reads
    for (int i = 0; i < 8; ++i)
    {
        sums[i * kTileThreads + t] = acc[i / 2][i % 2];
    }
    __syncthreads();
    if (g != 0)
    {
        return;
    }
    for (int i = 0; i < 4; ++i)
    {
        int const m = m0 + 4 * ty + i;
        for (int j = 0; j < 2; ++j)
        {
            int const n = n0 + 2 * tx + j;
            float v = 0.0f;
            for (int group = 0; group < kSplitK; ++group)
            {
                v += (&as[group][0][0])[(2 * i + j) * kTileThreads + t];
            }
            if (m < M && n < N)
            {
                float& o = out[static_cast<size_t>(m) * N + n];
                float const residual = kEpilogue == kAddResidual ? loadL2(&o) : 0.0f;
                o = applyEpilogue<kEpilogue>(v + (bias ? toFloat(bias[n]) : 0.0f), residual);
            }
        }
    }
}

// out (B, C) = LayerNorm(in (B, C)), a warp per row (three passes over the row, from L2).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) layerNormKernel(
    float const* in, float* __restrict__ out, T const* __restrict__ gain, T const* __restrict__ shift, int B, int C)
{
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= B)
    {
        return;
    }
    float const* row = in + static_cast<size_t>(b) * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32)
    {
        s += loadL2(row + c);
    }
    float const mean = warpSum(s) / C;
    float d2 = 0.0f;
    for (int c = lane; c < C; c += 32)
    {
        float const d = loadL2(row + c) - mean;
        d2 += d * d;
    }
    float const rstd = rsqrtf(warpSum(d2) / C + kLayerNormEps);
    for (int c = lane; c < C; c += 32)
    {
        out[static_cast<size_t>(b) * C + c] = (loadL2(row + c) - mean) * rstd * toFloat(gain[c]) + toFloat(shift[c]);
    }
}

// A warp per (row, head).
__global__ void __launch_bounds__(kRowThreads) attentionKernel(Attention a)
{
    letNextKernelLaunch();
    waitPreviousKernel();
    int const pair = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5);
    if (pair < a.B * a.H)
    {
        a.attend(pair / a.H, pair % a.H);
    }
}

// A warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) selectKernel(Select<T> s)
{
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x * (kRowThreads / 32) + (threadIdx.x >> 5);
    if (b < s.B)
    {
        selectRow(s, b);
    }
}

// ---- both paths

// The first input of every row, feature + wpe[0]; the counters to zero.
template <typename T>
__global__ void startKernel(
    T const* __restrict__ feature, T const* __restrict__ wpe, float* __restrict__ x, int* counters, int C)
{
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
    {
        x[static_cast<size_t>(b) * C + c] = toFloat(feature[static_cast<size_t>(b) * C + c]) + toFloat(wpe[c]);
    }
    if (b == 0 && threadIdx.x < kMaxCounters)
    {
        counters[threadIdx.x] = 0;
    }
}

// The step buffers, carved from TensorRT's workspace for B rows: x, qkv, attention output (and the GEMM path's
// normalized rows), MLP hidden, logits, K and V caches (L, B, H, P, D), and the atomic counters (B ints' room, at
// least kMaxCounters: heads, then the head kernel's).
struct Buffers
{
    float *x, *qkv, *att, *hidden, *logits, *cacheK, *cacheV;
    int* counters;

    static void sizes(int64_t B, Layout const& l, size_t (&bytes)[8])
    {
        int64_t const C = l.C, cache = l.L * B * l.P * C;
        int64_t const counts[8] = {B * C, B * 3 * C, B * C, B * 4 * C, B * kSymbols, cache, cache, B};
        for (int i = 0; i < 8; ++i)
        {
            bytes[i] = alignUp(static_cast<size_t>(counts[i]) * 4); // float32 or int32
        }
    }

    Buffers(void* workspace, int64_t B, Layout const& l)
    {
        size_t bytes[8];
        sizes(B, l, bytes);
        char* p = static_cast<char*>(workspace);
        float** floats[7] = {&x, &qkv, &att, &hidden, &logits, &cacheK, &cacheV};
        for (int i = 0; i < 7; ++i)
        {
            *floats[i] = reinterpret_cast<float*>(p);
            p += bytes[i];
        }
        counters = reinterpret_cast<int*>(p);
    }
};

size_t workspaceBytes(int64_t B, Layout const& l)
{
    size_t bytes[8];
    Buffers::sizes(B, l, bytes);
    size_t total = 0;
    for (size_t b : bytes)
    {
        total += b;
    }
    return total;
}

// Every kernel of a dtype may take the whole shared memory (the GEMV path's weight rows), and all prefer shared
// memory to L1, so that a kernel's blocks and the next one's (programmatic dependent launch) share an SM.
template <typename T>
cudaError_t configureKernels(int maxSmem)
{
    void const* big[] = {reinterpret_cast<void const*>(qkvAttentionKernel<T>),
        reinterpret_cast<void const*>(gemvKernel<T, kAddResidual>), reinterpret_cast<void const*>(gemvKernel<T, kGelu>),
        reinterpret_cast<void const*>(headSelectKernel<T>)};
    void const* small[] = {reinterpret_cast<void const*>(gemmKernel<T, kStore>),
        reinterpret_cast<void const*>(gemmKernel<T, kGelu>), reinterpret_cast<void const*>(gemmKernel<T, kAddResidual>),
        reinterpret_cast<void const*>(layerNormKernel<T>), reinterpret_cast<void const*>(attentionKernel),
        reinterpret_cast<void const*>(selectKernel<T>), reinterpret_cast<void const*>(startKernel<T>),
        reinterpret_cast<void const*>(tableAttentionKernel)};
    cudaError_t s = cudaSuccess;
    for (void const* k : big)
    {
        if (s == cudaSuccess)
        {
            s = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, maxSmem);
        }
        if (s == cudaSuccess)
        {
            s = cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        }
    }
    for (void const* k : small)
    {
        if (s == cudaSuccess)
        {
            s = cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
        }
    }
    return s;
}

class BytePatchDecodePlugin : public PluginBase
{
public:
    BytePatchDecodePlugin(int32_t patchSize, int32_t nEmbd, int32_t nLayer, int32_t nHead, int32_t topK, float topP,
        float temperature, int32_t seed, std::vector<float> weights)
        : PluginBase(kName)
        , mPatchSize(patchSize)
        , mEmbd(nEmbd)
        , mLayers(nLayer)
        , mHeads(nHead)
        , mTopK(topK)
        , mSeed(seed)
        , mTopP(topP)
        , mTemperature(temperature)
        , mWeights(std::move(weights))
    {
        if (std::min({mPatchSize, mEmbd, mLayers, mHeads}) < 1 || mEmbd % mHeads != 0)
        {
            throw std::invalid_argument("bad byte decoder config patch_size " + std::to_string(mPatchSize)
                + ", n_embd " + std::to_string(mEmbd) + ", byte_n_layer " + std::to_string(mLayers)
                + ", byte_n_head " + std::to_string(mHeads));
        }
        if (mEmbd % 8 != 0 || mEmbd > kMaxEmbd || mPatchSize > 64 || mHeads >= kMaxCounters)
        {
            throw std::invalid_argument("n_embd " + std::to_string(mEmbd) + ", patch_size " + std::to_string(mPatchSize)
                + ", byte_n_head " + std::to_string(mHeads) + ": the C++ kernels take n_embd a multiple of 8 up to "
                + std::to_string(kMaxEmbd) + ", patch_size up to 64 and byte_n_head up to "
                + std::to_string(kMaxCounters - 1) + "; use the Python plugins");
        }
        int64_t const expected = layout().size();
        if (static_cast<int64_t>(mWeights.size()) != expected)
        {
            throw std::invalid_argument("weights has " + std::to_string(mWeights.size())
                + " values, the byte decoder of this config has " + std::to_string(expected));
        }
        if (!(mTemperature == 0.0f || mTopK == 1))
        {
            throw std::invalid_argument("the C++ library decodes greedily only (temperature 0 or top_k 1); this node "
                                        "asks for top_k "
                + std::to_string(mTopK) + ", top_p " + std::to_string(mTopP) + ", temperature "
                + std::to_string(mTemperature) + ": export with greedy sampling, or use the Python plugins");
        }
    }

    ~BytePatchDecodePlugin() override
    {
        cudaFree(mDeviceWeights);
        cudaFree(mTable);
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new BytePatchDecodePlugin(
                mPatchSize, mEmbd, mLayers, mHeads, mTopK, mTopP, mTemperature, mSeed, mWeights);
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

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const*,
        int32_t nbInputs) const noexcept override
    {
        if (nbOutputs != 1 || nbInputs != 3)
        {
            return -1;
        }
        outputTypes[0] = nvinfer1::DataType::kINT32;
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*, int32_t,
        nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 2)
        {
            return -1;
        }
        outputs[0].nbDims = 2;
        outputs[0].d[0] = inputs[0].d[0]; // the (symbolic) batch
        outputs[0].d[1] = exprBuilder.constant(mPatchSize);
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
        if (pos == 0)
        {
            return desc.type == nvinfer1::DataType::kFLOAT || desc.type == nvinfer1::DataType::kHALF;
        }
        return desc.type == nvinfer1::DataType::kINT32; // forced, n_forced, patch
    }

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t,
        nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept override
    {
        return workspaceBytes(inputs[0].max.d[0], layout());
    }

    // ---- runtime

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const*,
        int32_t) noexcept override
    {
        if (nbInputs != 3 || !checkDims(in[0].dims, in[1].dims, in[2].dims))
        {
            return -1;
        }
        return upload(in[0].type) ? 0 : -1;
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        int64_t const B = inputDesc[0].dims.d[0];
        if (B == 0)
        {
            return 0;
        }
        if (!upload(inputDesc[0].type))
        {
            return -1;
        }
        auto const* forced = static_cast<int const*>(inputs[1]);
        auto const* nForced = static_cast<int const*>(inputs[2]);
        auto* patch = static_cast<int*>(outputs[0]);
        cudaError_t const status = inputDesc[0].type == nvinfer1::DataType::kHALF
            ? decode<__half>(static_cast<__half const*>(inputs[0]), forced, nForced, patch, workspace, B, stream)
            : decode<float>(static_cast<float const*>(inputs[0]), forced, nForced, patch, workspace, B, stream);
        if (status != cudaSuccess)
        {
            logError(std::string("BytePatchDecode enqueue: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }

protected:
    std::vector<nvinfer1::PluginField> fields() override
    {
        return {intField("patch_size", &mPatchSize), intField("n_embd", &mEmbd), intField("byte_n_layer", &mLayers),
            intField("byte_n_head", &mHeads), intField("top_k", &mTopK), floatField("top_p", &mTopP),
            floatField("temperature", &mTemperature), intField("seed", &mSeed),
            floatField("weights", mWeights.data(), static_cast<int32_t>(mWeights.size()))};
    }

private:
    Layout layout() const { return Layout{mPatchSize, mEmbd, mLayers}; }

    bool checkDims(nvinfer1::Dims const& feature, nvinfer1::Dims const& forced, nvinfer1::Dims const& nForced) const
    {
        auto fits = [](int64_t got, int64_t expected) { return got == expected || got == -1; };
        bool const ok = feature.nbDims == 2 && fits(feature.d[1], mEmbd) && forced.nbDims == 2
            && fits(forced.d[1], mPatchSize) && nForced.nbDims == 1 && fits(nForced.d[0], 1)
            && (feature.d[0] == -1 || forced.d[0] == -1 || feature.d[0] == forced.d[0]);
        if (!ok)
        {
            logError("BytePatchDecode (patch_size " + std::to_string(mPatchSize) + ", n_embd " + std::to_string(mEmbd)
                + "): inputs must be feature (B, n_embd), forced (B, patch_size) and n_forced (1,)");
        }
        return ok;
    }

    // The weights on the current GPU in the feature's dtype, once.
    bool upload(nvinfer1::DataType type)
    {
        if (mDeviceWeights && mDeviceType == type)
        {
            return true;
        }
        cudaFree(mDeviceWeights);
        cudaFree(mTable);
        mDeviceWeights = nullptr;
        mTable = nullptr;
        size_t const n = mWeights.size();
        std::vector<__half> halves;
        void const* host = mWeights.data();
        size_t bytes = n * sizeof(float);
        if (type == nvinfer1::DataType::kHALF)
        {
            halves.resize(n);
            for (size_t i = 0; i < n; ++i)
            {
                halves[i] = __float2half_rn(mWeights[i]);
            }
            host = halves.data();
            bytes = n * sizeof(__half);
        }
        int device = 0;
        cudaError_t status = cudaGetDevice(&device);
        if (status == cudaSuccess)
        {
            status = cudaDeviceGetAttribute(&mSMs, cudaDevAttrMultiProcessorCount, device);
        }
        if (status == cudaSuccess)
        {
            status = cudaDeviceGetAttribute(&mMaxSmem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        }
        if (status == cudaSuccess)
        {
            mMaxSmem -= kReservedSmem;
            status = type == nvinfer1::DataType::kHALF ? configureKernels<__half>(mMaxSmem)
                                                       : configureKernels<float>(mMaxSmem);
        }
        if (status == cudaSuccess)
        {
            status = cudaMalloc(&mDeviceWeights, bytes);
        }
        if (status == cudaSuccess)
        {
            status = cudaMemcpy(mDeviceWeights, host, bytes, cudaMemcpyHostToDevice);
        }
        if (status == cudaSuccess)
        {
            status = type == nvinfer1::DataType::kHALF ? computeTable<__half>() : computeTable<float>();
        }
        if (status != cudaSuccess)
        {
            logError(std::string("BytePatchDecode: cannot put the weights on the GPU: ") + cudaGetErrorString(status));
            cudaFree(mDeviceWeights);
            cudaFree(mTable);
            mDeviceWeights = nullptr;
            mTable = nullptr;
            return false;
        }
        mDeviceType = type;
        return true;
    }

    // The first block's QKV projection of every later step's possible input (tableAttentionKernel), once, on the
    // legacy default stream (as the weights' copy): (P - 1, 257, 3 C) float32.
    template <typename T>
    cudaError_t computeTable()
    {
        Layout const l = layout();
        auto const* w = static_cast<T const*>(mDeviceWeights);
        int const rows = (mPatchSize - 1) * kSymbols, C = mEmbd;
        if (rows == 0)
        {
            return cudaSuccess;
        }
        float* inputs = nullptr;
        cudaError_t s = cudaMalloc(&inputs, static_cast<size_t>(rows) * C * sizeof(float));
        if (s == cudaSuccess)
        {
            s = cudaMalloc(&mTable, static_cast<size_t>(rows) * 3 * C * sizeof(float));
        }
        if (s == cudaSuccess)
        {
            dim3 const grid((rows + kRowThreads / 32 - 1) / (kRowThreads / 32));
            tableInputKernel<T><<<grid, kRowThreads>>>(
                w + l.wte(), w + l.wpe(), w + l.ln1W(0), w + l.ln1B(0), inputs, rows, C);
            s = cudaGetLastError();
        }
        if (s == cudaSuccess)
        {
            dim3 const grid((3 * C + kTileN - 1) / kTileN, (rows + kTileM - 1) / kTileM);
            gemmKernel<T, kStore><<<grid, kGemmThreads>>>(
                inputs, static_cast<float*>(mTable), rows, C, 3 * C, w + l.attnW(0), w + l.attnB(0));
            s = cudaGetLastError();
        }
        if (s == cudaSuccess)
        {
            s = cudaStreamSynchronize(nullptr);
        }
        cudaFree(inputs);
        return s;
    }

    // Weight rows per GEMV block: about N / (kGemvBlocksPerSM SMs), so that a kernel's blocks are one wave.
    int gemvRowsPerBlock(int N) const
    {
        int const blocks = kGemvBlocksPerSM * mSMs;
        return std::max(1, (N + blocks - 1) / blocks);
    }

    // The QKV projection's rows per block: the largest divisor of the head size not above gemvRowsPerBlock, so that
    // a block's rows lie in one head (qkvAttentionKernel).
    int qkvRowsPerBlock() const
    {
        int const D = mEmbd / mHeads, target = gemvRowsPerBlock(3 * mEmbd);
        int rows = 1;
        for (int r = 1; r <= std::min(D, target); ++r)
        {
            rows = D % r == 0 ? r : rows;
        }
        return rows;
    }

    template <typename T>
    Gemv<T> gemv(float const* in, float* out, int B, int K, int N, int rows, T const* weight, T const* bias,
        T const* normWeight = nullptr, T const* normBias = nullptr) const
    {
        return Gemv<T>{in, out, weight, bias, normWeight, normBias, B, K, N, rows};
    }

    template <typename T>
    static dim3 gemvGrid(Gemv<T> const& p)
    {
        return dim3((p.N + p.rows - 1) / p.rows);
    }

    template <typename T>
    static size_t gemvSmem(Gemv<T> const& p)
    {
        return GemvSmem(p.rows, p.K, p.B, p.normWeight != nullptr, sizeof(T)).total;
    }

    // Does every GEMV of B rows fit its shared memory?
    bool gemvFits(int B, int elem) const
    {
        int const C = mEmbd;
        int const largest = std::max({GemvSmem(qkvRowsPerBlock(), C, B, true, elem).total,
            GemvSmem(gemvRowsPerBlock(C), C, B, false, elem).total,
            GemvSmem(gemvRowsPerBlock(4 * C), C, B, true, elem).total,
            GemvSmem(gemvRowsPerBlock(C), 4 * C, B, false, elem).total,
            GemvSmem(gemvRowsPerBlock(kSymbols), C, B, true, elem).total});
        return B <= kGemvMaxRows && largest <= mMaxSmem;
    }

    template <typename T>
    cudaError_t decode(T const* feature, int const* forced, int const* nForced, int* patch, void* workspace,
        int64_t B, cudaStream_t stream) const
    {
        Layout const l = layout();
        auto const* w = static_cast<T const*>(mDeviceWeights);
        Buffers const buf(workspace, B, l);
        int const rows = static_cast<int>(B);
        cudaError_t s
            = launch(startKernel<T>, dim3(rows), 128, 0, stream, feature, w + l.wpe(), buf.x, buf.counters, mEmbd);
        bool const small = gemvFits(rows, sizeof(T));
        for (int step = 0; step < mPatchSize && s == cudaSuccess; ++step)
        {
            Select<T> const select{
                buf.logits, forced, nForced, patch, buf.x, w + l.wte(), w + l.wpe(), rows, mEmbd, mPatchSize, step};
            s = small ? gemvStep(w, buf, select, stream) : gemmStep(w, buf, select, stream);
        }
        return s;
    }

    // The layer's attention at this step: its caches, slot `step`.
    Attention attention(Buffers const& buf, int layer, int B, int step) const
    {
        size_t const cacheLayer = static_cast<size_t>(B) * mPatchSize * mEmbd;
        return Attention{buf.qkv, buf.cacheK + layer * cacheLayer, buf.cacheV + layer * cacheLayer, buf.att, B, mHeads,
            mEmbd / mHeads, mPatchSize, step};
    }

    // One step of the GEMV path: 4 kernels per layer, then the head and selection.
    template <typename T>
    cudaError_t gemvStep(T const* w, Buffers const& buf, Select<T> const& select, cudaStream_t stream) const
    {
        Layout const l = layout();
        int const B = select.B, C = mEmbd;
        dim3 const block(kGemvThreads);
        cudaError_t s = cudaSuccess;
        for (int layer = 0; layer < mLayers && s == cudaSuccess; ++layer)
        {
            Gemv<T> const qkv = gemv(buf.x, buf.qkv, B, C, 3 * C, qkvRowsPerBlock(), w + l.attnW(layer),
                w + l.attnB(layer), w + l.ln1W(layer), w + l.ln1B(layer));
            Gemv<T> const proj
                = gemv(buf.att, buf.x, B, C, C, gemvRowsPerBlock(C), w + l.projW(layer), w + l.projB(layer));
            Gemv<T> const fc = gemv(buf.x, buf.hidden, B, C, 4 * C, gemvRowsPerBlock(4 * C), w + l.fcW(layer),
                w + l.fcB(layer), w + l.ln2W(layer), w + l.ln2B(layer));
            Gemv<T> const mlp = gemv(buf.hidden, buf.x, B, 4 * C, C, gemvRowsPerBlock(C), w + l.mlpProjW(layer),
                w + l.mlpProjB(layer));
            if (layer == 0 && select.step > 0)
            {
                dim3 const grid((B * mHeads + kRowThreads / 32 - 1) / (kRowThreads / 32));
                s = launch(tableAttentionKernel, grid, kRowThreads, 0, stream, attention(buf, layer, B, select.step),
                    static_cast<float const*>(mTable), static_cast<int const*>(select.patch));
            }
            else
            {
                s = launch(qkvAttentionKernel<T>, gemvGrid(qkv), block, gemvSmem(qkv), stream, qkv,
                    attention(buf, layer, B, select.step), buf.counters);
            }
            if (s == cudaSuccess)
            {
                s = launch(gemvKernel<T, kAddResidual>, gemvGrid(proj), block, gemvSmem(proj), stream, proj);
            }
            if (s == cudaSuccess)
            {
                s = launch(gemvKernel<T, kGelu>, gemvGrid(fc), block, gemvSmem(fc), stream, fc);
            }
            if (s == cudaSuccess)
            {
                s = launch(gemvKernel<T, kAddResidual>, gemvGrid(mlp), block, gemvSmem(mlp), stream, mlp);
            }
        }
        if (s == cudaSuccess) // ln_f and the LM head (byte_wte, no bias), then the selection
        {
            Gemv<T> const head = gemv(buf.x, buf.logits, B, C, kSymbols, gemvRowsPerBlock(kSymbols), w + l.wte(),
                static_cast<T const*>(nullptr), w + l.lnFW(), w + l.lnFB());
            s = launch(headSelectKernel<T>, gemvGrid(head), block, gemvSmem(head), stream, head, select,
                buf.counters + mHeads);
        }
        return s;
    }

    template <typename T, int kEpilogue>
    static cudaError_t gemm(float const* in, float* out, int M, int K, int N, T const* weight, T const* bias,
        cudaStream_t stream)
    {
        dim3 const grid((N + kTileN - 1) / kTileN, (M + kTileM - 1) / kTileM);
        return launch(gemmKernel<T, kEpilogue>, grid, kGemmThreads, 0, stream, in, out, M, K, N, weight, bias);
    }

    template <typename T>
    static cudaError_t layerNorm(
        float const* in, float* out, T const* gain, T const* shift, int B, int C, cudaStream_t stream)
    {
        dim3 const grid((B + kRowThreads / 32 - 1) / (kRowThreads / 32));
        return launch(layerNormKernel<T>, grid, kRowThreads, 0, stream, in, out, gain, shift, B, C);
    }

    // One step of the GEMM path: per layer LayerNorm (into att), QKV, attention, c_proj + residual, LayerNorm, c_fc +
    // GELU, mlp c_proj + residual; then ln_f, the LM head and the selection.
    template <typename T>
    cudaError_t gemmStep(T const* w, Buffers const& buf, Select<T> const& select, cudaStream_t stream) const
    {
        Layout const l = layout();
        int const B = select.B, C = mEmbd, warpsPerBlock = kRowThreads / 32;
        cudaError_t s = cudaSuccess;
        for (int layer = 0; layer < mLayers && s == cudaSuccess; ++layer)
        {
            s = layerNorm(buf.x, buf.att, w + l.ln1W(layer), w + l.ln1B(layer), B, C, stream);
            if (s == cudaSuccess)
            {
                s = gemm<T, kStore>(buf.att, buf.qkv, B, C, 3 * C, w + l.attnW(layer), w + l.attnB(layer), stream);
            }
            if (s == cudaSuccess)
            {
                dim3 const grid((B * mHeads + warpsPerBlock - 1) / warpsPerBlock);
                s = launch(
                    attentionKernel, grid, kRowThreads, 0, stream, attention(buf, layer, B, select.step));
            }
            if (s == cudaSuccess)
            {
                s = gemm<T, kAddResidual>(buf.att, buf.x, B, C, C, w + l.projW(layer), w + l.projB(layer), stream);
            }
            if (s == cudaSuccess)
            {
                s = layerNorm(buf.x, buf.att, w + l.ln2W(layer), w + l.ln2B(layer), B, C, stream);
            }
            if (s == cudaSuccess)
            {
                s = gemm<T, kGelu>(buf.att, buf.hidden, B, C, 4 * C, w + l.fcW(layer), w + l.fcB(layer), stream);
            }
            if (s == cudaSuccess)
            {
                s = gemm<T, kAddResidual>(
                    buf.hidden, buf.x, B, 4 * C, C, w + l.mlpProjW(layer), w + l.mlpProjB(layer), stream);
            }
        }
        if (s == cudaSuccess)
        {
            s = layerNorm(buf.x, buf.att, w + l.lnFW(), w + l.lnFB(), B, C, stream);
        }
        if (s == cudaSuccess)
        {
            s = gemm<T, kStore>(buf.att, buf.logits, B, C, kSymbols, w + l.wte(), static_cast<T const*>(nullptr), stream);
        }
        if (s == cudaSuccess)
        {
            dim3 const grid((B + warpsPerBlock - 1) / warpsPerBlock);
            s = launch(selectKernel<T>, grid, kRowThreads, 0, stream, select);
        }
        return s;
    }

    int32_t mPatchSize, mEmbd, mLayers, mHeads, mTopK, mSeed;
    float mTopP, mTemperature;
    std::vector<float> mWeights;
    void* mDeviceWeights = nullptr;
    void* mTable = nullptr; // tableAttentionKernel's
    nvinfer1::DataType mDeviceType = nvinfer1::DataType::kFLOAT;
    int mSMs = 1, mMaxSmem = 0; // of the GPU the weights are on: SMs, dynamic shared memory a GEMV block may take
};

class BytePatchDecodeCreator : public CreatorBase
{
public:
    BytePatchDecodeCreator()
        : CreatorBase(kName,
            {nvinfer1::PluginField("patch_size", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("n_embd", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("byte_n_layer", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("byte_n_head", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("top_k", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("top_p", nullptr, nvinfer1::PluginFieldType::kFLOAT32, 1),
                nvinfer1::PluginField("temperature", nullptr, nvinfer1::PluginFieldType::kFLOAT32, 1),
                nvinfer1::PluginField("seed", nullptr, nvinfer1::PluginFieldType::kINT32, 1),
                nvinfer1::PluginField("weights", nullptr, nvinfer1::PluginFieldType::kFLOAT32, 0)})
    {
    }

protected:
    nvinfer1::IPluginV3* create(FieldReader const& f) override
    {
        auto integer = [&](char const* name) { return static_cast<int32_t>(f.integer(name)); };
        return new BytePatchDecodePlugin(integer("patch_size"), integer("n_embd"), integer("byte_n_layer"),
            integer("byte_n_head"), integer("top_k"), f.real("top_p"), f.real("temperature"), integer("seed"),
            f.floats("weights"));
    }
};

} // namespace

nvinfer1::IPluginCreatorV3One* bytePatchDecodeCreator()
{
    static BytePatchDecodeCreator creator;
    return &creator;
}

} // namespace bytedeploy
