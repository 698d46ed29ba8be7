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
// activations, LayerNorm statistics and sums are float32. A step is the GPT-2 decoder on one new position per row:
// per layer LayerNorm + QKV, attention over the KV cache slots so far, projection + residual, LayerNorm + MLP up with
// GELU (tanh), MLP down + residual; then ln_f + LM head, and the selection (argmax, forced bytes, the end mark, the
// next input byte's embedding). The KV cache and activations live in TensorRT's workspace. All kernels go on the
// given stream, with programmatic dependent launch on sm_90+ so that each kernel's weight loads overlap the previous
// kernel's tail; nothing synchronizes, so the application may capture the stream into a CUDA graph.
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
constexpr int kLinearWarps = 8;
constexpr int kRowsPerPass = 8; // batch rows staged in shared memory at a time
constexpr int kChunk = 1024;    // inputs staged at a time
constexpr int kSelectThreads = 256;
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

template <typename T>
struct Vec; // one 16-byte weight load
template <>
struct Vec<float>
{
    static constexpr int kCount = 4;
};
template <>
struct Vec<__half>
{
    static constexpr int kCount = 8;
};

__device__ __forceinline__ void unpack(uint4 v, float (&out)[4])
{
    out[0] = __uint_as_float(v.x), out[1] = __uint_as_float(v.y), out[2] = __uint_as_float(v.z),
    out[3] = __uint_as_float(v.w);
}

__device__ __forceinline__ void unpack(uint4 v, float (&out)[8])
{
    __half2 const* h = reinterpret_cast<__half2 const*>(&v);
    for (int i = 0; i < 4; ++i)
    {
        float2 const f = __half22float2(h[i]);
        out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ float warpSum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float geluTanh(float v)
{
    return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// out (B, N) (=, GELU of, or += ) in (B, K) (after a LayerNorm when kNorm; then K <= kChunk) times weight (N, K)^T
// + bias. Grid ceil(N / 8) blocks of 8 warps, one output column per warp; rows go through shared memory 8 at a time, in
// chunks of 1024 inputs, each thread loading its part of a chunk at once. The warp's first weight chunk and the
// LayerNorm's gain and shift are loaded before waiting for the previous kernel.
template <typename T, bool kNorm, int kEpilogue>
__global__ void __launch_bounds__(kLinearWarps * 32) linearKernel(float const* __restrict__ in, float* out, int B,
    int K, int N, T const* __restrict__ weight, T const* __restrict__ bias, T const* __restrict__ normWeight,
    T const* __restrict__ normBias)
{
    constexpr int kThreads = kLinearWarps * 32, kPer = Vec<T>::kCount, kVecs = kChunk / (32 * kPer);
    constexpr int kStage = kRowsPerPass * kChunk / 4 / kThreads; // float4 of a chunk per thread
    __shared__ __align__(16) float xs[kRowsPerPass][kChunk];
    __shared__ float gain[kNorm ? kChunk : 1], shift[kNorm ? kChunk : 1];
    __shared__ float mean[kRowsPerPass], rstd[kRowsPerPass];
    letNextKernelLaunch();
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int const n = blockIdx.x * kLinearWarps + warp;
    T const* row = weight + static_cast<size_t>(n < N ? n : 0) * K;
    uint4 w[kVecs];
    auto loadChunk = [&](int k0) {
        for (int v = 0; v < kVecs; ++v)
        {
            int const k = k0 + (v * 32 + lane) * kPer;
            w[v] = n < N && k < K ? __ldg(reinterpret_cast<uint4 const*>(row + k)) : make_uint4(0, 0, 0, 0);
        }
    };
    loadChunk(0);
    int loaded = 0;
    if (kNorm)
    {
        for (int k = threadIdx.x; k < K; k += kThreads)
        {
            gain[k] = toFloat(normWeight[k]);
            shift[k] = toFloat(normBias[k]);
        }
    }
    waitPreviousKernel();

    for (int b0 = 0; b0 < B; b0 += kRowsPerPass)
    {
        int const rows = min(kRowsPerPass, B - b0);
        float acc[kRowsPerPass] = {};
        for (int k0 = 0; k0 < K; k0 += kChunk)
        {
            if (k0 != loaded)
            {
                loadChunk(k0);
                loaded = k0;
            }
            int const quads = min(kChunk, K - k0) / 4, total = rows * quads; // K is a multiple of 8
            float4 staged[kStage];
            for (int i = 0; i < kStage; ++i)
            {
                int const v = i * kThreads + threadIdx.x;
                staged[i] = v < total ? *reinterpret_cast<float4 const*>(
                                in + static_cast<size_t>(b0 + v / quads) * K + k0 + 4 * (v % quads))
                                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
            for (int i = 0; i < kStage; ++i)
            {
                int const v = i * kThreads + threadIdx.x;
                if (v < total)
                {
                    *reinterpret_cast<float4*>(&xs[v / quads][4 * (v % quads)]) = staged[i];
                }
            }
            __syncthreads();
            if (kNorm) // the whole row is in xs: its mean and variance (two passes), then normalized in place
            {
                if (warp < rows)
                {
                    float s = 0.0f;
                    for (int k = lane; k < K; k += 32)
                    {
                        s += xs[warp][k];
                    }
                    float const mu = warpSum(s) / K;
                    float d2 = 0.0f;
                    for (int k = lane; k < K; k += 32)
                    {
                        d2 += (xs[warp][k] - mu) * (xs[warp][k] - mu);
                    }
                    float const var = warpSum(d2) / K;
                    if (lane == 0)
                    {
                        mean[warp] = mu;
                        rstd[warp] = rsqrtf(var + kLayerNormEps);
                    }
                }
                __syncthreads();
                for (int i = threadIdx.x; i < rows * K; i += kThreads)
                {
                    int const r = i / K, k = i % K;
                    xs[r][k] = (xs[r][k] - mean[r]) * rstd[r] * gain[k] + shift[k];
                }
                __syncthreads();
            }
            for (int v = 0; v < kVecs; ++v)
            {
                int const k = (v * 32 + lane) * kPer;
                if (k >= 4 * quads)
                {
                    break;
                }
                float wf[kPer];
                unpack(w[v], wf);
                for (int r = 0; r < kRowsPerPass; ++r)
                {
                    if (r < rows)
                    {
                        for (int e = 0; e < kPer; e += 4)
                        {
                            float4 const x4 = *reinterpret_cast<float4 const*>(&xs[r][k + e]);
                            acc[r] += wf[e] * x4.x + wf[e + 1] * x4.y + wf[e + 2] * x4.z + wf[e + 3] * x4.w;
                        }
                    }
                }
            }
            __syncthreads();
        }
        for (int r = 0; r < kRowsPerPass; ++r)
        {
            if (r >= rows)
            {
                break;
            }
            float const s = warpSum(acc[r]);
            if (lane == 0 && n < N)
            {
                float v = s + (bias ? toFloat(bias[n]) : 0.0f);
                float& o = out[static_cast<size_t>(b0 + r) * N + n];
                if (kEpilogue == kGelu)
                {
                    o = geluTanh(v);
                }
                else if (kEpilogue == kAddResidual)
                {
                    o += v;
                }
                else
                {
                    o = v;
                }
            }
        }
    }
}

// One warp per (row, head): writes the step's k, v into cache slot `slot`, then softmax(q K^T / sqrt(D)) V over
// slots 0..slot, lane s scoring slot s. qkv (B, 3C); cacheK, cacheV (B, H, P, D) of this layer; out (B, C).
__global__ void __launch_bounds__(32) attentionKernel(
    float const* __restrict__ qkv, float* cacheK, float* cacheV, float* __restrict__ out, int H, int D, int P, int slot)
{
    extern __shared__ float shared[]; // q (D), then the slots' weights (slot + 1)
    float* qs = shared;
    float* weights = shared + D;
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x / H, h = blockIdx.x % H, lane = threadIdx.x, C = H * D;
    float const* q = qkv + static_cast<size_t>(b) * 3 * C + h * D;
    float* keys = cacheK + (static_cast<size_t>(b) * H + h) * P * D;
    float* values = cacheV + (static_cast<size_t>(b) * H + h) * P * D;
    for (int d = lane; d < D; d += 32)
    {
        qs[d] = q[d];
        keys[slot * D + d] = q[C + d];
        values[slot * D + d] = q[2 * C + d];
    }
    __syncwarp();
    float const scale = rsqrtf(static_cast<float>(D));
    float score[2] = {-INFINITY, -INFINITY}; // slots lane and lane + 32 (patch_size <= 64)
    for (int i = 0; i < 2; ++i)
    {
        int const s = lane + 32 * i;
        if (s <= slot)
        {
            float dot = 0.0f;
#pragma unroll 16
            for (int d = 0; d < D; ++d)
            {
                dot += qs[d] * keys[s * D + d];
            }
            score[i] = dot * scale;
        }
    }
    float top = fmaxf(score[0], score[1]);
    for (int o = 16; o > 0; o >>= 1)
    {
        top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
    }
    float const e0 = lane <= slot ? __expf(score[0] - top) : 0.0f;
    float const e1 = lane + 32 <= slot ? __expf(score[1] - top) : 0.0f;
    float const total = warpSum(e0 + e1);
    if (lane <= slot)
    {
        weights[lane] = e0 / total;
    }
    if (lane + 32 <= slot)
    {
        weights[lane + 32] = e1 / total;
    }
    __syncwarp();
    for (int d = lane; d < D; d += 32)
    {
        float o = 0.0f;
#pragma unroll 16
        for (int s = 0; s <= slot; ++s)
        {
            o += weights[s] * values[s * D + d];
        }
        out[static_cast<size_t>(b) * C + h * D + d] = o;
    }
}

// The first input of every row: feature + wpe[0]; no row has ended yet.
template <typename T>
__global__ void startKernel(T const* __restrict__ feature, T const* __restrict__ wpe, float* __restrict__ x,
    int* __restrict__ seen, int C)
{
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
    {
        x[static_cast<size_t>(b) * C + c] = toFloat(feature[static_cast<size_t>(b) * C + c]) + toFloat(wpe[c]);
    }
    if (threadIdx.x == 0)
    {
        seen[b] = 0;
    }
}

// One block per row: byte `step` = argmax of the logits (the first of equal maxima, as torch.argmax), or the forced
// byte while step < n_forced; 256 after the row's first 256; then the next input, wte[byte] + wpe[step + 1].
template <typename T>
__global__ void __launch_bounds__(kSelectThreads) selectKernel(float const* __restrict__ logits,
    int const* __restrict__ forced, int const* __restrict__ nForced, int* seen, int* __restrict__ patch,
    float* __restrict__ x, T const* __restrict__ wte, T const* __restrict__ wpe, int C, int P, int step)
{
    __shared__ float bestValue[kSelectThreads / 32];
    __shared__ int bestIndex[kSelectThreads / 32];
    __shared__ int token;
    letNextKernelLaunch();
    waitPreviousKernel();
    int const b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float const* row = logits + static_cast<size_t>(b) * kSymbols;
    float value = threadIdx.x < kSymbols ? row[threadIdx.x] : -INFINITY;
    int index = threadIdx.x;
    for (int i = threadIdx.x + kSelectThreads; i < kSymbols; i += kSelectThreads)
    {
        if (row[i] > value)
        {
            value = row[i], index = i;
        }
    }
    auto better = [](float v, int i, float than, int thanIndex) { return v > than || (v == than && i < thanIndex); };
    for (int o = 16; o > 0; o >>= 1)
    {
        float const v = __shfl_xor_sync(0xffffffffu, value, o);
        int const i = __shfl_xor_sync(0xffffffffu, index, o);
        if (better(v, i, value, index))
        {
            value = v, index = i;
        }
    }
    if (lane == 0)
    {
        bestValue[warp] = value, bestIndex[warp] = index;
    }
    __syncthreads();
    if (threadIdx.x == 0)
    {
        for (int w = 1; w < kSelectThreads / 32; ++w)
        {
            if (better(bestValue[w], bestIndex[w], value, index))
            {
                value = bestValue[w], index = bestIndex[w];
            }
        }
        int byte = step < *nForced ? forced[static_cast<size_t>(b) * P + step] : index;
        if (seen[b])
        {
            byte = kEnd;
        }
        seen[b] |= byte == kEnd;
        patch[static_cast<size_t>(b) * P + step] = byte;
        token = min(max(byte, 0), kEnd);
    }
    __syncthreads();
    if (step + 1 < P)
    {
        for (int c = threadIdx.x; c < C; c += kSelectThreads)
        {
            x[static_cast<size_t>(b) * C + c]
                = toFloat(wte[static_cast<size_t>(token) * C + c]) + toFloat(wpe[static_cast<size_t>(step + 1) * C + c]);
        }
    }
}

// The step buffers, carved from TensorRT's workspace for B rows: x, qkv, attention output, MLP hidden, logits,
// K and V caches (L, B, H, P, D), and the rows' "ended" flags.
struct Buffers
{
    float *x, *qkv, *att, *hidden, *logits, *cacheK, *cacheV;
    int* seen;

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
        seen = reinterpret_cast<int*>(p);
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
        if (mEmbd % 8 != 0 || mEmbd > kChunk || mPatchSize > 64)
        {
            throw std::invalid_argument("n_embd " + std::to_string(mEmbd) + ", patch_size " + std::to_string(mPatchSize)
                + ": the C++ kernels take n_embd a multiple of 8 up to " + std::to_string(kChunk)
                + " and patch_size up to 64; use the Python plugins");
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
        if (mDeviceWeights)
        {
            cudaFree(mDeviceWeights);
        }
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
        if (mDeviceWeights)
        {
            cudaFree(mDeviceWeights);
            mDeviceWeights = nullptr;
        }
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
        cudaError_t status = cudaMalloc(&mDeviceWeights, bytes);
        if (status == cudaSuccess)
        {
            status = cudaMemcpy(mDeviceWeights, host, bytes, cudaMemcpyHostToDevice);
        }
        if (status != cudaSuccess)
        {
            logError(std::string("BytePatchDecode: cannot put the weights on the GPU: ") + cudaGetErrorString(status));
            cudaFree(mDeviceWeights);
            mDeviceWeights = nullptr;
            return false;
        }
        mDeviceType = type;
        return true;
    }

    template <typename T>
    cudaError_t decode(T const* feature, int const* forced, int const* nForced, int* patch, void* workspace,
        int64_t B, cudaStream_t stream) const
    {
        Layout const l = layout();
        int const C = mEmbd, H = mHeads, D = mEmbd / mHeads, P = mPatchSize, rows = static_cast<int>(B);
        auto const* w = static_cast<T const*>(mDeviceWeights);
        Buffers const buf(workspace, B, l);
        size_t const cacheLayer = static_cast<size_t>(B) * P * C;
        dim3 const linearBlock(kLinearWarps * 32);
        auto blocks = [](int n) { return dim3((n + kLinearWarps - 1) / kLinearWarps); };

        cudaError_t s = launch(startKernel<T>, dim3(rows), 128, 0, stream, feature, w + l.wpe(), buf.x, buf.seen, C);
        for (int step = 0; step < P && s == cudaSuccess; ++step)
        {
            for (int layer = 0; layer < mLayers && s == cudaSuccess; ++layer)
            {
                s = launch(linearKernel<T, true, kStore>, blocks(3 * C), linearBlock, 0, stream, buf.x, buf.qkv, rows,
                    C, 3 * C, w + l.attnW(layer), w + l.attnB(layer), w + l.ln1W(layer), w + l.ln1B(layer));
                if (s == cudaSuccess)
                {
                    s = launch(attentionKernel, dim3(rows * H), 32, (D + step + 1) * sizeof(float), stream, buf.qkv,
                        buf.cacheK + layer * cacheLayer, buf.cacheV + layer * cacheLayer, buf.att, H, D, P, step);
                }
                if (s == cudaSuccess)
                {
                    s = launch(linearKernel<T, false, kAddResidual>, blocks(C), linearBlock, 0, stream, buf.att, buf.x,
                        rows, C, C, w + l.projW(layer), w + l.projB(layer), static_cast<T const*>(nullptr),
                        static_cast<T const*>(nullptr));
                }
                if (s == cudaSuccess)
                {
                    s = launch(linearKernel<T, true, kGelu>, blocks(4 * C), linearBlock, 0, stream, buf.x, buf.hidden,
                        rows, C, 4 * C, w + l.fcW(layer), w + l.fcB(layer), w + l.ln2W(layer), w + l.ln2B(layer));
                }
                if (s == cudaSuccess)
                {
                    s = launch(linearKernel<T, false, kAddResidual>, blocks(C), linearBlock, 0, stream, buf.hidden,
                        buf.x, rows, 4 * C, C, w + l.mlpProjW(layer), w + l.mlpProjB(layer),
                        static_cast<T const*>(nullptr), static_cast<T const*>(nullptr));
                }
            }
            if (s == cudaSuccess) // ln_f and the LM head (byte_wte, no bias)
            {
                s = launch(linearKernel<T, true, kStore>, blocks(kSymbols), linearBlock, 0, stream, buf.x, buf.logits,
                    rows, C, kSymbols, w + l.wte(), static_cast<T const*>(nullptr), w + l.lnFW(), w + l.lnFB());
            }
            if (s == cudaSuccess)
            {
                s = launch(selectKernel<T>, dim3(rows), kSelectThreads, 0, stream, buf.logits, forced, nForced,
                    buf.seen, patch, buf.x, w + l.wte(), w + l.wpe(), C, P, step);
            }
        }
        return s;
    }

    int32_t mPatchSize, mEmbd, mLayers, mHeads, mTopK, mSeed;
    float mTopP, mTemperature;
    std::vector<float> mWeights;
    void* mDeviceWeights = nullptr;
    nvinfer1::DataType mDeviceType = nvinfer1::DataType::kFLOAT;
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
