// The library's entry points, as IPluginRegistry::loadLibrary and `trtexec --dynamicPlugins` look them up:
// getCreators (the IPluginV3 creators) and setLoggerFinder (TensorRT's logger for the plugins' error messages).
//
// Hosts that only dlopen a plugin library, such as Triton's TensorRT backend (--backend-config=tensorrt,plugins=LIB),
// expect it to register its creators itself, while loadLibrary registers them from getCreators and refuses creators
// registered already. So the library registers itself when it is loaded only with BYTEDEPLOY_TRT_PLUGINS_REGISTER=1
// in the environment, through the getPluginRegistry of the TensorRT already loaded in the process (looked up, not
// linked: the library needs no TensorRT library to load).
#include "common.h"

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>

namespace bytedeploy
{

nvinfer1::IPluginCreatorV3One* bitLinearCreator();
nvinfer1::IPluginCreatorV3One* bytePatchDecodeCreator();

bool hasProgrammaticLaunch()
{
    constexpr int kDevices = 64;
    static std::atomic<int> known[kDevices]; // 0: not asked yet, 1: no, 2: yes
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices)
    {
        return false;
    }
    int state = known[device].load(std::memory_order_relaxed);
    if (state == 0)
    {
        int major = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        state = major >= 9 ? 2 : 1;
        known[device].store(state, std::memory_order_relaxed);
    }
    return state == 2;
}

} // namespace bytedeploy

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[]
        = {bytedeploy::bitLinearCreator(), bytedeploy::bytePatchDecodeCreator()};
    nbCreators = 2;
    return creators;
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    bytedeploy::loggerFinder() = finder;
}

namespace
{

struct RegisterOnLoad
{
    RegisterOnLoad()
    {
        char const* flag = std::getenv("BYTEDEPLOY_TRT_PLUGINS_REGISTER");
        if (!flag || std::string(flag) != "1")
        {
            return;
        }
        using GetRegistry = nvinfer1::IPluginRegistry* (*) ();
        auto getRegistry = reinterpret_cast<GetRegistry>(dlsym(RTLD_DEFAULT, "getPluginRegistry"));
        if (!getRegistry || !getRegistry())
        {
            bytedeploy::logError("BYTEDEPLOY_TRT_PLUGINS_REGISTER=1, but no TensorRT is loaded in this process");
            return;
        }
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = getCreators(n);
        for (int32_t i = 0; i < n; ++i)
        {
            if (!getRegistry()->registerCreator(*creators[i], bytedeploy::kNamespace))
            {
                bytedeploy::logError("TensorRT refused to register a creator (registered already?)");
            }
        }
    }
} const registerOnLoad;

} // namespace
