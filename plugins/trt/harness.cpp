// A harness for libbytedeploy_trt_plugins.so without TensorRT's libraries (plugins/trt_harness.py builds and drives
// it; the tests and benchmarks/trt_plugins.py use it): it loads the library with dlopen, takes the creators from
// getCreators, creates a plugin from fields in files, and calls the plugin the way TensorRT does. The only TensorRT
// objects it needs are IExprBuilder / IDimensionExpr for getOutputShapes, faked here through their implementation
// interfaces (apiv::VExprBuilder, apiv::VDimensionExpr).
//
//   harness LIB check NAME FIELDS OUT TYPES DIMS   creators, build and runtime methods; the report is JSON on stdout,
//                                                 the serialized fields go to OUT
//   harness LIB run NAME FIELDS CASE               (GPU) enqueue twice on device buffers: CASE/inputs.txt and
//                                                 CASE/outputs.txt list "TYPE FILE dim..."; outputs written to FILE
//   harness LIB time NAME FIELDS CASE COPIES REPLAYS   (GPU) a CUDA graph of COPIES enqueues, each on its own copy
//                                                 of input 1 (BitLinear's weights: every call reads them from DRAM);
//                                                 prints the median microseconds per enqueue
//   harness LIB register                          loads the library with BYTEDEPLOY_TRT_PLUGINS_REGISTER=1 (as for
//                                                 Triton); prints what it registered with this harness's stand-in
//                                                 for TensorRT's getPluginRegistry (exported: link with
//                                                 --export-dynamic)
//
// FIELDS/fields.txt lists "NAME TYPE FILE" (TYPE INT32, INT64 or FLOAT32; FILE raw little-endian values). TYPES is the
// inputs' and outputs' data types ("HALF,UINT8,FLOAT,HALF"); DIMS the inputs' dims ("batch,seq,100;37,25;1"), where
// a name is a symbolic dimension (max 64 for the workspace size).
#include <NvInferImpl.h>
#include <NvInferRuntime.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

[[noreturn]] void fail(std::string const& message)
{
    std::fprintf(stderr, "harness: %s\n", message.c_str());
    std::exit(1);
}

void check(cudaError_t status, char const* what)
{
    if (status != cudaSuccess)
    {
        fail(std::string(what) + ": " + cudaGetErrorString(status));
    }
}

std::vector<std::string> split(std::string const& s, char sep)
{
    std::vector<std::string> parts;
    std::stringstream in(s);
    for (std::string part; std::getline(in, part, sep);)
    {
        parts.push_back(part);
    }
    return parts;
}

std::string readFile(std::string const& path)
{
    std::ifstream in(path, std::ios::binary);
    if (!in)
    {
        fail("cannot read " + path);
    }
    return std::string(std::istreambuf_iterator<char>(in), {});
}

void writeFile(std::string const& path, void const* data, size_t bytes)
{
    std::ofstream out(path, std::ios::binary);
    out.write(static_cast<char const*>(data), static_cast<std::streamsize>(bytes));
    if (!out)
    {
        fail("cannot write " + path);
    }
}

std::map<std::string, DataType> const kTypes = {{"FLOAT", DataType::kFLOAT}, {"HALF", DataType::kHALF},
    {"INT8", DataType::kINT8}, {"INT32", DataType::kINT32}, {"BOOL", DataType::kBOOL}, {"UINT8", DataType::kUINT8},
    {"BF16", DataType::kBF16}, {"INT64", DataType::kINT64}};

DataType typeOf(std::string const& name)
{
    auto it = kTypes.find(name);
    if (it == kTypes.end())
    {
        fail("unknown data type " + name);
    }
    return it->second;
}

std::string nameOf(DataType type)
{
    for (auto const& [name, t] : kTypes)
    {
        if (t == type)
        {
            return name;
        }
    }
    return "?";
}

size_t sizeOf(DataType type)
{
    switch (type)
    {
    case DataType::kFLOAT:
    case DataType::kINT32: return 4;
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
    }
}

// ---- fields

struct Fields
{
    std::vector<std::string> names;
    std::vector<std::string> data;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    void add(std::string const& name, PluginFieldType type, std::string bytes, size_t itemSize)
    {
        names.push_back(name);
        data.push_back(std::move(bytes));
        fields.emplace_back(nullptr, nullptr, type, static_cast<int32_t>(data.back().size() / itemSize));
    }

    PluginFieldCollection const* get()
    {
        for (size_t i = 0; i < fields.size(); ++i)
        {
            fields[i].name = names[i].c_str();
            fields[i].data = data[i].data();
        }
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
        return &collection;
    }
};

size_t fieldItemSize(PluginFieldType type)
{
    switch (type)
    {
    case PluginFieldType::kINT32:
    case PluginFieldType::kFLOAT32: return 4;
    case PluginFieldType::kINT64:
    case PluginFieldType::kFLOAT64: return 8;
    default: fail("unexpected plugin field type " + std::to_string(static_cast<int>(type)));
    }
}

Fields readFields(std::string const& dir)
{
    std::map<std::string, PluginFieldType> const types
        = {{"INT32", PluginFieldType::kINT32}, {"INT64", PluginFieldType::kINT64}, {"FLOAT32", PluginFieldType::kFLOAT32}};
    Fields f;
    std::istringstream lines(readFile(dir + "/fields.txt"));
    for (std::string name, type, file; lines >> name >> type >> file;)
    {
        auto it = types.find(type);
        if (it == types.end())
        {
            fail("field type " + type);
        }
        f.add(name, it->second, readFile(dir + "/" + file), fieldItemSize(it->second));
    }
    return f;
}

Fields copyFields(PluginFieldCollection const* fc)
{
    Fields f;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& p = fc->fields[i];
        size_t const bytes = static_cast<size_t>(p.length) * fieldItemSize(p.type);
        f.add(p.name, p.type, std::string(static_cast<char const*>(p.data), bytes), fieldItemSize(p.type));
    }
    return f;
}

bool sameFields(Fields const& a, Fields const& b)
{
    if (a.names != b.names || a.data != b.data || a.fields.size() != b.fields.size())
    {
        return false;
    }
    for (size_t i = 0; i < a.fields.size(); ++i)
    {
        if (a.fields[i].type != b.fields[i].type || a.fields[i].length != b.fields[i].length)
        {
            return false;
        }
    }
    return true;
}

void writeFields(Fields const& f, std::string const& dir)
{
    std::ostringstream list;
    for (size_t i = 0; i < f.names.size(); ++i)
    {
        std::string const type = f.fields[i].type == PluginFieldType::kINT32 ? "INT32"
            : f.fields[i].type == PluginFieldType::kINT64                    ? "INT64"
                                                                             : "FLOAT32";
        list << f.names[i] << " " << type << " " << f.names[i] << ".bin\n";
        writeFile(dir + "/" + f.names[i] + ".bin", f.data[i].data(), f.data[i].size());
    }
    std::string const text = list.str();
    writeFile(dir + "/fields.txt", text.data(), text.size());
}

// ---- a stand-in for TensorRT's dimension expressions

struct ExprImpl : apiv::VDimensionExpr
{
    bool constant = false;
    int64_t value = 0;
    std::string symbol;

    bool isConstant() const override { return constant; }
    int64_t getConstantValue() const override { return constant ? value : std::numeric_limits<int64_t>::min(); }
    bool isSizeTensor() const override { return false; }
};

struct Expr : IDimensionExpr
{
    ExprImpl impl;
    Expr() { mImpl = &impl; }
};

struct ExprPool
{
    std::vector<std::unique_ptr<Expr>> exprs;

    Expr const* make(bool constant, int64_t value, std::string symbol)
    {
        exprs.push_back(std::make_unique<Expr>());
        exprs.back()->impl.constant = constant;
        exprs.back()->impl.value = value;
        exprs.back()->impl.symbol = std::move(symbol);
        return exprs.back().get();
    }
};

struct BuilderImpl : apiv::VExprBuilder
{
    ExprPool* pool = nullptr;

    IDimensionExpr const* constant(int64_t value) override { return pool->make(true, value, ""); }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
};

struct Builder : IExprBuilder
{
    BuilderImpl impl;
    explicit Builder(ExprPool* pool)
    {
        impl.pool = pool;
        mImpl = &impl;
    }
};

std::string exprJson(IDimensionExpr const* e)
{
    auto const* ours = dynamic_cast<Expr const*>(e);
    if (!ours)
    {
        return "null";
    }
    return ours->impl.constant ? std::to_string(ours->impl.value) : "\"" + ours->impl.symbol + "\"";
}

// ---- a stand-in for TensorRT's plugin registry, for the library's registration on load

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations" // IPluginRegistry's IPluginCreator (V2) overloads
struct FakeRegistry : IPluginRegistry
{
    std::vector<std::pair<std::string, std::string>> registered; // (creator name, namespace)

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        registered.emplace_back(static_cast<IPluginCreatorV3One&>(creator).getPluginName(), ns);
        return true;
    }
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
    IPluginCreator* const* getPluginCreatorList(int32_t* const) const noexcept override { return nullptr; }
    IPluginCreator* getPluginCreator(AsciiChar const*, AsciiChar const*, AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
    bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
    bool isParentSearchEnabled() const override { return false; }
    void setParentSearchEnabled(bool const) override {}
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    IPluginCreatorInterface* const* getAllCreators(int32_t* const) const noexcept override { return nullptr; }
    IPluginCreatorInterface* getCreator(AsciiChar const*, AsciiChar const*, AsciiChar const*) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
    int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const) noexcept override { return nullptr; }
};
#pragma GCC diagnostic pop

FakeRegistry gRegistry;

// ---- the library and a plugin

struct Plugin
{
    IPluginV3* plugin = nullptr;
    IPluginV3OneCore* core = nullptr;
    IPluginV3OneBuild* build = nullptr;
    IPluginV3OneRuntime* runtime = nullptr;

    explicit Plugin(IPluginV3* p)
        : plugin(p)
    {
        if (!p)
        {
            fail("no plugin");
        }
        core = static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
        build = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
        runtime = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    }
};

using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);

std::vector<IPluginCreatorV3One*> loadCreators(std::string const& library)
{
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
    {
        fail(std::string("dlopen: ") + dlerror());
    }
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    if (!getCreators)
    {
        fail("the library exports no getCreators");
    }
    int32_t n = 0;
    IPluginCreatorInterface* const* list = getCreators(n);
    std::vector<IPluginCreatorV3One*> creators;
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo const info = list[i]->getInterfaceInfo();
        if (std::string(info.kind) != "PLUGIN CREATOR_V3ONE")
        {
            fail(std::string("creator of kind ") + info.kind);
        }
        creators.push_back(static_cast<IPluginCreatorV3One*>(list[i]));
    }
    return creators;
}

IPluginCreatorV3One* findCreator(std::vector<IPluginCreatorV3One*> const& creators, std::string const& name)
{
    for (IPluginCreatorV3One* c : creators)
    {
        if (name == c->getPluginName() && std::string(c->getPluginVersion()) == "1"
            && std::string(c->getPluginNamespace()) == "bytedeploy")
        {
            return c;
        }
    }
    fail("no creator bytedeploy::" + name + " version 1");
}

std::string quoted(std::string const& s)
{
    return "\"" + s + "\"";
}

std::string boolJson(bool b)
{
    return b ? "true" : "false";
}

template <typename T, typename F>
std::string jsonList(std::vector<T> const& items, F&& item)
{
    std::string out = "[";
    for (size_t i = 0; i < items.size(); ++i)
    {
        out += (i ? ", " : "") + item(items[i]);
    }
    return out + "]";
}

Dims dimsOf(std::vector<int64_t> const& values)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    std::copy(values.begin(), values.end(), d.d);
    return d;
}

// ---- check: everything but enqueue

int checkMode(std::vector<IPluginCreatorV3One*> const& creators, std::string const& name, std::string const& fieldsDir,
    std::string const& outDir, std::string const& typesArg, std::string const& dimsArg)
{
    std::string report = "{\"creators\": " + jsonList(creators, [](IPluginCreatorV3One* c) {
        std::vector<std::string> fieldNames;
        PluginFieldCollection const* fc = c->getFieldNames();
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            fieldNames.push_back(fc->fields[i].name);
        }
        return "{\"name\": " + quoted(c->getPluginName()) + ", \"version\": " + quoted(c->getPluginVersion())
            + ", \"namespace\": " + quoted(c->getPluginNamespace())
            + ", \"fields\": " + jsonList(fieldNames, quoted) + "}";
    });
    report += ", \"registered_on_load\": " + std::to_string(gRegistry.registered.size()); // none without the flag
    IPluginCreatorV3One* creator = findCreator(creators, name);
    Fields given = readFields(fieldsDir);
    Plugin p(creator->createPlugin("harness", given.get(), TensorRTPhase::kBUILD));
    report += ", \"plugin\": {\"name\": " + quoted(p.core->getPluginName()) + ", \"version\": "
        + quoted(p.core->getPluginVersion()) + ", \"namespace\": " + quoted(p.core->getPluginNamespace())
        + ", \"capabilities\": [" + boolJson(p.core) + ", " + boolJson(p.build) + ", " + boolJson(p.runtime)
        + "], \"outputs\": " + std::to_string(p.build->getNbOutputs());

    // types, formats
    std::vector<std::string> typeNames = split(typesArg, ',');
    int32_t const nbOutputs = p.build->getNbOutputs();
    int32_t const nbInputs = static_cast<int32_t>(typeNames.size()) - nbOutputs;
    std::vector<DataType> ioTypes;
    for (auto const& t : typeNames)
    {
        ioTypes.push_back(typeOf(t));
    }
    std::vector<std::string> outputTypes;
    for (DataType x : {DataType::kFLOAT, DataType::kHALF})
    {
        std::vector<DataType> in(ioTypes.begin(), ioTypes.begin() + nbInputs);
        in[0] = x;
        std::vector<DataType> out(nbOutputs);
        int32_t const status = p.build->getOutputDataTypes(out.data(), nbOutputs, in.data(), nbInputs);
        outputTypes.push_back(quoted(nameOf(x)) + ": " + (status == 0 ? quoted(nameOf(out[0])) : "null"));
    }
    report += ", \"output_types\": {" + outputTypes[0] + ", " + outputTypes[1] + "}";

    std::vector<std::vector<std::string>> dimsText;
    for (auto const& d : split(dimsArg, ';'))
    {
        dimsText.push_back(split(d, ','));
    }
    ExprPool pool;
    std::vector<DynamicPluginTensorDesc> io(nbInputs + nbOutputs);
    std::vector<DimsExprs> inputExprs(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        std::vector<int64_t> dims, maxDims;
        inputExprs[i].nbDims = static_cast<int32_t>(dimsText[i].size());
        for (size_t j = 0; j < dimsText[i].size(); ++j)
        {
            std::string const& d = dimsText[i][j];
            bool const symbolic = !std::isdigit(static_cast<unsigned char>(d[0]));
            dims.push_back(symbolic ? -1 : std::stoll(d));
            maxDims.push_back(symbolic ? 64 : std::stoll(d));
            inputExprs[i].d[j] = pool.make(!symbolic, symbolic ? 0 : std::stoll(d), symbolic ? d : "");
        }
        io[i].desc.dims = dimsOf(dims);
        io[i].min = dimsOf(dims);
        io[i].opt = dimsOf(maxDims);
        io[i].max = dimsOf(maxDims);
    }
    std::vector<DimsExprs> outputExprs(nbOutputs);
    Builder builder(&pool);
    int32_t const shapeStatus = p.build->getOutputShapes(
        inputExprs.data(), nbInputs, nullptr, 0, outputExprs.data(), nbOutputs, builder);
    std::vector<IDimensionExpr const*> outDims(outputExprs[0].d, outputExprs[0].d + outputExprs[0].nbDims);
    report += ", \"output_shape\": " + (shapeStatus == 0 ? jsonList(outDims, exprJson) : std::string("null"));
    for (int32_t i = 0; i < nbInputs + nbOutputs; ++i)
    {
        io[i].desc.type = ioTypes[i];
        io[i].desc.format = TensorFormat::kLINEAR;
    }
    std::vector<std::string> formats, nonLinear;
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        std::vector<std::string> accepted;
        for (auto const& [typeName, type] : kTypes)
        {
            std::vector<DynamicPluginTensorDesc> trial = io;
            trial[pos].desc.type = type;
            if (p.build->supportsFormatCombination(pos, trial.data(), nbInputs, nbOutputs))
            {
                accepted.push_back(quoted(typeName));
            }
        }
        std::sort(accepted.begin(), accepted.end());
        formats.push_back(jsonList(accepted, [](std::string const& s) { return s; }));
        std::vector<DynamicPluginTensorDesc> trial = io;
        trial[pos].desc.format = TensorFormat::kCHW4;
        nonLinear.push_back(boolJson(p.build->supportsFormatCombination(pos, trial.data(), nbInputs, nbOutputs)));
    }
    report += ", \"formats\": " + jsonList(formats, [](std::string const& s) { return s; })
        + ", \"non_linear_accepted\": " + jsonList(nonLinear, [](std::string const& s) { return s; });

    // configure (as given, and with x's last dim off by one), workspace at the max dims
    int32_t const good = p.build->configurePlugin(io.data(), nbInputs, io.data() + nbInputs, nbOutputs);
    std::vector<DynamicPluginTensorDesc> bad = io;
    bad[0].desc.dims.d[bad[0].desc.dims.nbDims - 1] += 1;
    int32_t const wrong = p.build->configurePlugin(bad.data(), nbInputs, bad.data() + nbInputs, nbOutputs);
    size_t const workspace = p.build->getWorkspaceSize(io.data(), nbInputs, io.data() + nbInputs, nbOutputs);
    report += ", \"configure\": " + std::to_string(good) + ", \"configure_wrong_dims\": " + std::to_string(wrong)
        + ", \"workspace_at_max\": " + std::to_string(workspace);

    // fields: serialized, recreated at runtime, cloned, attached
    Fields serialized = copyFields(p.runtime->getFieldsToSerialize());
    writeFields(serialized, outDir);
    Plugin again(creator->createPlugin("harness", serialized.get(), TensorRTPhase::kRUNTIME));
    Plugin clone(p.plugin->clone());
    Plugin attached(p.runtime->attachToContext(nullptr));
    auto same = [&](Plugin& other) {
        return other.plugin != p.plugin && sameFields(copyFields(other.runtime->getFieldsToSerialize()), serialized);
    };
    report += ", \"recreated_fields_equal\": " + boolJson(same(again)) + ", \"clone_fields_equal\": "
        + boolJson(same(clone)) + ", \"attached_fields_equal\": " + boolJson(same(attached)) + "}}";
    for (Plugin* q : {&p, &again, &clone, &attached})
    {
        delete q->plugin;
    }
    std::printf("%s\n", report.c_str());
    return 0;
}

// ---- run / time: enqueue on device buffers

struct Tensor
{
    PluginTensorDesc desc{};
    std::string file;
    std::string host;
    void* device = nullptr;

    size_t bytes() const
    {
        int64_t n = 1;
        for (int32_t i = 0; i < desc.dims.nbDims; ++i)
        {
            n *= desc.dims.d[i];
        }
        return static_cast<size_t>(n) * sizeOf(desc.type);
    }
};

std::vector<Tensor> readTensors(std::string const& dir, std::string const& list, bool load)
{
    std::vector<Tensor> tensors;
    std::istringstream lines(readFile(dir + "/" + list));
    for (std::string line; std::getline(lines, line);)
    {
        std::istringstream words(line);
        Tensor t;
        std::string type;
        if (!(words >> type >> t.file))
        {
            continue;
        }
        std::vector<int64_t> dims;
        for (int64_t d; words >> d;)
        {
            dims.push_back(d);
        }
        t.desc.type = typeOf(type);
        t.desc.format = TensorFormat::kLINEAR;
        t.desc.dims = dimsOf(dims);
        check(cudaMalloc(&t.device, std::max<size_t>(t.bytes(), 256)), "cudaMalloc");
        if (load)
        {
            t.host = readFile(dir + "/" + t.file);
            if (t.host.size() != t.bytes())
            {
                fail(t.file + " holds " + std::to_string(t.host.size()) + " bytes, not " + std::to_string(t.bytes()));
            }
            check(cudaMemcpy(t.device, t.host.data(), t.bytes(), cudaMemcpyHostToDevice), "cudaMemcpy");
        }
        else
        {
            check(cudaMemset(t.device, 0xFF, t.bytes()), "cudaMemset"); // NaN / -1: unwritten outputs show
        }
        tensors.push_back(std::move(t));
    }
    return tensors;
}

struct Enqueue
{
    Plugin plugin;
    std::vector<Tensor> inputs, outputs;
    std::vector<PluginTensorDesc> inDesc, outDesc;
    std::vector<void const*> inPtr;
    std::vector<void*> outPtr;
    void* workspace = nullptr;
    cudaStream_t stream = nullptr;

    Enqueue(IPluginCreatorV3One* creator, Fields& fields, std::string const& dir)
        : plugin(creator->createPlugin("harness", fields.get(), TensorRTPhase::kRUNTIME))
    {
        IPluginV3* created = plugin.plugin;
        plugin = Plugin(plugin.runtime->attachToContext(nullptr)); // as TensorRT does for each execution context
        delete created;
        inputs = readTensors(dir, "inputs.txt", true);
        outputs = readTensors(dir, "outputs.txt", false);
        std::vector<DynamicPluginTensorDesc> dyn(inputs.size() + outputs.size());
        for (auto const& t : inputs)
        {
            inDesc.push_back(t.desc);
            inPtr.push_back(t.device);
        }
        for (auto const& t : outputs)
        {
            outDesc.push_back(t.desc);
            outPtr.push_back(t.device);
        }
        for (size_t i = 0; i < dyn.size(); ++i)
        {
            PluginTensorDesc const& d = i < inputs.size() ? inDesc[i] : outDesc[i - inputs.size()];
            dyn[i].desc = d;
            dyn[i].min = dyn[i].opt = dyn[i].max = d.dims;
        }
        int32_t const nIn = static_cast<int32_t>(inputs.size()), nOut = static_cast<int32_t>(outputs.size());
        size_t const bytes = plugin.build->getWorkspaceSize(dyn.data(), nIn, dyn.data() + nIn, nOut);
        if (bytes)
        {
            check(cudaMalloc(&workspace, bytes), "cudaMalloc workspace");
        }
        if (plugin.runtime->onShapeChange(inDesc.data(), nIn, outDesc.data(), nOut) != 0)
        {
            fail("onShapeChange failed");
        }
        check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    }

    void operator()()
    {
        if (plugin.runtime->enqueue(inDesc.data(), outDesc.data(), inPtr.data(), outPtr.data(), workspace, stream) != 0)
        {
            fail("enqueue failed");
        }
    }

    std::vector<std::string> read()
    {
        check(cudaStreamSynchronize(stream), "enqueue's kernels");
        std::vector<std::string> host;
        for (auto const& t : outputs)
        {
            host.emplace_back(t.bytes(), '\0');
            check(cudaMemcpy(host.back().data(), t.device, t.bytes(), cudaMemcpyDeviceToHost), "cudaMemcpy");
        }
        return host;
    }
};

int runMode(IPluginCreatorV3One* creator, Fields& fields, std::string const& dir)
{
    Enqueue e(creator, fields, dir);
    e();
    std::vector<std::string> first = e.read();
    e();
    std::vector<std::string> second = e.read();
    for (size_t i = 0; i < e.outputs.size(); ++i)
    {
        writeFile(dir + "/" + e.outputs[i].file, second[i].data(), second[i].size());
    }
    std::printf("{\"repeat_equal\": %s}\n", boolJson(first == second).c_str());
    return 0;
}

int timeMode(IPluginCreatorV3One* creator, Fields& fields, std::string const& dir, int copies, int replays)
{
    Enqueue e(creator, fields, dir);
    e(); // first call outside the graph
    e.read();
    std::vector<void*> weightCopies(copies);
    size_t const weightBytes = e.inputs[1].bytes();
    for (auto& w : weightCopies)
    {
        check(cudaMalloc(&w, weightBytes), "cudaMalloc copy");
        check(cudaMemcpy(w, e.inputs[1].device, weightBytes, cudaMemcpyDeviceToDevice), "cudaMemcpy copy");
    }
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    check(cudaStreamBeginCapture(e.stream, cudaStreamCaptureModeGlobal), "begin capture");
    for (void* w : weightCopies)
    {
        e.inPtr[1] = w;
        e();
    }
    check(cudaStreamEndCapture(e.stream, &graph), "end capture");
    check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    cudaEvent_t start, end;
    check(cudaEventCreate(&start), "event");
    check(cudaEventCreate(&end), "event");
    std::vector<float> times;
    for (int i = 0; i < 3 + replays; ++i)
    {
        check(cudaEventRecord(start, e.stream), "record");
        check(cudaGraphLaunch(exec, e.stream), "graph launch");
        check(cudaEventRecord(end, e.stream), "record");
        check(cudaEventSynchronize(end), "synchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, end), "elapsed");
        if (i >= 3)
        {
            times.push_back(ms * 1000.0f / copies);
        }
    }
    std::sort(times.begin(), times.end());
    std::printf("{\"us_per_call\": %.3f, \"copies\": %d, \"replays\": %d}\n", times[times.size() / 2], copies, replays);
    return 0;
}

} // namespace

extern "C" IPluginRegistry* getPluginRegistry() noexcept
{
    return &gRegistry;
}

int main(int argc, char** argv)
{
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() == 2 && args[1] == "register")
    {
        setenv("BYTEDEPLOY_TRT_PLUGINS_REGISTER", "1", 1);
        loadCreators(args[0]);
        std::printf("{\"registered\": %s}\n", jsonList(gRegistry.registered, [](auto const& r) {
            return "[" + quoted(r.first) + ", " + quoted(r.second) + "]";
        }).c_str());
        return 0;
    }
    if (args.size() < 4)
    {
        fail("usage: harness LIB check|run|time NAME FIELDS ... or harness LIB register");
    }
    std::vector<IPluginCreatorV3One*> creators = loadCreators(args[0]);
    std::string const& mode = args[1];
    if (mode == "check" && args.size() == 7)
    {
        return checkMode(creators, args[2], args[3], args[4], args[5], args[6]);
    }
    Fields fields = readFields(args[3]);
    IPluginCreatorV3One* creator = findCreator(creators, args[2]);
    if (mode == "run" && args.size() == 5)
    {
        return runMode(creator, fields, args[4]);
    }
    if (mode == "time" && args.size() == 7)
    {
        return timeMode(creator, fields, args[4], std::stoi(args[5]), std::stoi(args[6]));
    }
    fail("bad arguments for mode " + mode);
}
