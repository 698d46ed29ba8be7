// What bytedeploy's two TensorRT plugins share: identity, logging, plugin fields, the IPluginV3 plumbing and, for
// the .cu files, the device helpers (programmatic dependent launch, float conversions).
//
// Both plugins are IPluginV3 objects with the three capabilities of TensorRT 10 (IPluginV3OneCore, IPluginV3OneBuild,
// IPluginV3OneRuntime) and an IPluginCreatorV3One each, exported through getCreators (plugins.cpp). Names, version,
// namespace and fields are those of the Python plugins (plugins/trt_plugins.py) and of the exporters' ONNX nodes.
#pragma once

#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace bytedeploy
{

constexpr char kNamespace[] = "bytedeploy";
constexpr char kVersion[] = "1";

// The logger finder TensorRT hands the library when it loads it (setLoggerFinder, plugins.cpp).
inline nvinfer1::ILoggerFinder*& loggerFinder()
{
    static nvinfer1::ILoggerFinder* finder = nullptr;
    return finder;
}

// One error line through TensorRT's logger, or stderr when the library was loaded without TensorRT (the test harness).
inline void logError(std::string const& message)
{
    std::string const line = std::string("bytedeploy TensorRT plugins: ") + message;
    nvinfer1::ILogger* logger = loggerFinder() ? loggerFinder()->findLogger() : nullptr;
    if (logger)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, line.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

// The fields TensorRT passes to createPlugin, read by name. The ONNX parser passes integer attributes as INT32 or
// INT64 and float attributes as FLOAT32; a missing field or another type is a std::invalid_argument.
class FieldReader
{
public:
    FieldReader(char const* plugin, nvinfer1::PluginFieldCollection const* fc)
        : mPlugin(plugin)
        , mFields(fc)
    {
    }

    int64_t integer(char const* name) const
    {
        nvinfer1::PluginField const& f = find(name);
        if (f.type == nvinfer1::PluginFieldType::kINT32 && f.length >= 1)
        {
            return static_cast<int32_t const*>(f.data)[0];
        }
        if (f.type == nvinfer1::PluginFieldType::kINT64 && f.length >= 1)
        {
            return static_cast<int64_t const*>(f.data)[0];
        }
        throw std::invalid_argument(mPlugin + ": field " + name + " is not an INT32 or INT64 value");
    }

    float real(char const* name) const
    {
        std::vector<float> values = floats(name);
        if (values.empty())
        {
            throw std::invalid_argument(mPlugin + ": field " + name + " is empty");
        }
        return values[0];
    }

    std::vector<float> floats(char const* name) const
    {
        nvinfer1::PluginField const& f = find(name);
        if (f.type != nvinfer1::PluginFieldType::kFLOAT32)
        {
            throw std::invalid_argument(mPlugin + ": field " + name + " is not FLOAT32");
        }
        auto const* data = static_cast<float const*>(f.data);
        return std::vector<float>(data, data + f.length);
    }

private:
    nvinfer1::PluginField const& find(char const* name) const
    {
        for (int32_t i = 0; mFields && i < mFields->nbFields; ++i)
        {
            if (mFields->fields[i].name && std::string(mFields->fields[i].name) == name)
            {
                return mFields->fields[i];
            }
        }
        throw std::invalid_argument(mPlugin + ": missing field " + name);
    }

    std::string mPlugin;
    nvinfer1::PluginFieldCollection const* mFields;
};

// The IPluginV3 plumbing both plugins share: the capabilities are this object itself, one output, a context gets a
// clone, and the fields to serialize are those the subclass lists (pointing into its own members).
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit PluginBase(char const* name)
        : mName(name)
    {
    }

    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t getNbOutputs() const noexcept override { return 1; }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialized = fields();
        mCollection.nbFields = static_cast<int32_t>(mSerialized.size());
        mCollection.fields = mSerialized.data();
        return &mCollection;
    }

protected:
    virtual std::vector<nvinfer1::PluginField> fields() = 0;

    char const* mName;

private:
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mCollection{};
};

// A creator's identity and declared fields; createPlugin turns the subclass's exceptions into a logged nullptr.
class CreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    CreatorBase(char const* name, std::vector<nvinfer1::PluginField> declared)
        : mName(name)
        , mDeclared(std::move(declared))
    {
        mCollection.nbFields = static_cast<int32_t>(mDeclared.size());
        mCollection.fields = mDeclared.data();
    }

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase) noexcept override
    {
        try
        {
            return create(FieldReader(mName, fc));
        }
        catch (std::exception const& e)
        {
            logError(std::string("cannot create ") + mName + " plugin " + (name ? name : "") + ": " + e.what());
            return nullptr;
        }
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }
    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

protected:
    virtual nvinfer1::IPluginV3* create(FieldReader const& fields) = 0;

private:
    char const* mName;
    std::vector<nvinfer1::PluginField> mDeclared;
    nvinfer1::PluginFieldCollection mCollection{};
};

inline nvinfer1::PluginField intField(char const* name, int32_t const* value)
{
    return nvinfer1::PluginField(name, value, nvinfer1::PluginFieldType::kINT32, 1);
}

inline nvinfer1::PluginField floatField(char const* name, float const* values, int32_t length = 1)
{
    return nvinfer1::PluginField(name, values, nvinfer1::PluginFieldType::kFLOAT32, length);
}

inline int64_t volume(nvinfer1::Dims const& dims, int32_t from = 0, int32_t to = -1)
{
    int64_t v = 1;
    for (int32_t i = from; i < (to < 0 ? dims.nbDims : to); ++i)
    {
        v *= dims.d[i];
    }
    return v;
}

// Launch with programmatic dependent launch where the GPU has it (sm_90+): the kernel may start while the previous
// kernel on the stream finishes, and waits for it in waitPreviousKernel (see the kernels).
bool hasProgrammaticLaunch();

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args)
{
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = hasProgrammaticLaunch() ? 1 : 0;
    cudaError_t status = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
    return status == cudaSuccess ? cudaGetLastError() : status;
}

inline size_t alignUp(size_t bytes, size_t alignment = 256)
{
    return (bytes + alignment - 1) / alignment * alignment;
}

} // namespace bytedeploy

#ifdef __CUDACC__
#include <cuda_fp16.h>

namespace bytedeploy
{

// Programmatic dependent launch (sm_90+; no-ops before): let the next kernel on the stream launch now, and wait until
// the previous kernel has finished and its writes are visible. Kernels read only weights before they wait.
__device__ __forceinline__ void letNextKernelLaunch()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void waitPreviousKernel()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float toFloat(float v) { return v; }
__device__ __forceinline__ float toFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v) { return __float2half_rn(v); }

} // namespace bytedeploy
#endif
