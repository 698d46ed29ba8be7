"""TensorRT graph runner (TensorRT 10 API), without torch: one deserialized engine and execution context per graph.

    runner = TrtRunner(bundle)                      # engines from `bytedeploy build BUNDLE` in BUNDLE/engines
    out = runner.run("prefill", {"tokens": ids, "rows": rows, ...}, outputs)   # DeviceArray values
    logits = runner.to_numpy(out["logits"])

The runner interface of runtimes/ort.py (value, zeros, write, run, bind, workspace, to_numpy). Inputs are numpy
arrays (copied to the GPU) or this runner's DeviceArrays (a previous call's outputs, fed back without a copy);
outputs are DeviceArrays allocated once the input shapes are set (``get_tensor_shape``), or the ones the caller
gives; one that is also an input gets the result copied over it after the engine ran. Device
memory, copies and ``execute_async_v3`` all go on the runner's own CUDA stream, through the CUDA runtime's C API
(polygraphy's ctypes wrapper of libcudart). Memory is allocated and freed stream-ordered (cudaMallocAsync /
cudaFreeAsync; the device's default pool keeps freed memory for the next call): a DeviceArray's memory goes back to
the pool, after the work queued before, when the last reference to it or to one of its views (``reshape``, basic
indexing with a contiguous result such as ``feature[:, 0]``) goes. ``to_numpy`` copies to the host and waits.

Plugins (engines of graphs with bytedeploy custom ops): the C++ library libbytedeploy_trt_plugins.so, loaded into
TensorRT's plugin registry: the one named (``plugins``), else the one the engine's metadata records if it is still
there, else the one built beside the package; without any, the Python plugins (plugins/trt_plugins.py), which import
torch, and only then.

Before anything runs, each engine's metadata (exporters/trt_build.py writes it beside the engine) is checked
against this machine: the TensorRT module and version that built it, the GPU compute capability, the graph it was
built from (sha256), the plugins it needs; and each call's input shapes against the engine's optimization profile.
Each mismatch is a one-line UserError. The checks run on any machine; executing needs a GPU TensorRT runs on
(full TensorRT 10 on H100/H200; TensorRT-RTX on RTX GPUs only).
"""

from __future__ import annotations

import ctypes
import math
import operator
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import Bundle
from bytedeploy.exporters.trt_build import (
    RTX_COMPUTE_CAPABILITY,
    cuda_compute_capability,
    cudart,
    engine_paths,
    import_tensorrt,
    make_logger,
    plugin_library,
    read_engine_meta,
    register_plugins,
)

# TensorRT-RTX does not run on Hopper data-center GPUs (H100/H200).
RTX_UNSUPPORTED_COMPUTE_CAPABILITIES = ("9.0",)
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
                "UINT8": np.uint8, "BOOL": np.bool_}
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3  # cudaMemcpyKind
MEMPOOL_RELEASE_THRESHOLD = 4  # cudaMemPoolAttrReleaseThreshold
DEVICE_ATTRIBUTE_MEMORY_POOLS = 115  # cudaDevAttrMemoryPoolsSupported


def check_engine_meta(meta: dict | None, graph: str, bundle: Bundle, engines: Path, module: str, version: str,
                      compute_capability: str) -> dict:
    """Refuse an engine this machine must not run; returns meta. Pure: no TensorRT, no GPU needed."""
    if meta is None:
        raise UserError(f"no TensorRT engine for graph {graph!r} in {engines}: run `bytedeploy build {bundle.path}`")
    spec = bundle.graph(graph)
    if meta.get("graph_sha256") != bundle.files.get(spec.file):
        raise UserError(f"engine {graph!r} in {engines} was built from another export of {spec.file} (sha256 "
                        f"differs): run `bytedeploy build {bundle.path} --force`")
    if (meta.get("module"), meta.get("tensorrt_version")) != (module, version):
        raise UserError(f"engine {graph!r} was built with {meta.get('module')} {meta.get('tensorrt_version')}; this is "
                        f"{module} {version}: rebuild it here with `bytedeploy build --force`")
    built_for = meta.get("compute_capability")
    if built_for == RTX_COMPUTE_CAPABILITY:
        if compute_capability in RTX_UNSUPPORTED_COMPUTE_CAPABILITIES:
            raise UserError(f"engine {graph!r} is a TensorRT-RTX engine, and TensorRT-RTX does not run on this GPU "
                            f"(compute capability {compute_capability}); build with full TensorRT "
                            '(pip install "bytedeploy[trt]")')
    elif built_for != compute_capability:
        raise UserError(f"engine {graph!r} was built for GPU compute capability {built_for}; this GPU is "
                        f"{compute_capability}: rebuild it here with `bytedeploy build --force`")
    if meta.get("plugins") and module == "tensorrt_rtx":
        raise UserError(f"engine {graph!r} needs plugins and TensorRT-RTX has no plugin layers")
    return meta


def check_shapes(graph: str, meta: dict, shapes: dict[str, tuple]) -> None:
    """Every input present, and each shape inside the engine's optimization profile."""
    profile = meta["profile"]
    missing = [n for n in profile if n not in shapes]
    unknown = [n for n in shapes if n not in profile]
    if missing or unknown:
        raise UserError(f"graph {graph!r}: inputs {sorted(shapes)} do not match the engine's {sorted(profile)}")
    axes = {t["name"]: t["shape"] for t in meta.get("inputs", [])}
    for name, shape in shapes.items():
        lo, hi = profile[name]["min"], profile[name]["max"]
        shape = tuple(int(d) for d in shape)
        bad = len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi))
        if bad:
            names = axes.get(name, [None] * len(lo))
            where = ", ".join(f"{n if isinstance(n, str) else i} in {a}..{b}"
                              for i, (n, a, b) in enumerate(zip(names, lo, hi)) if a != b)
            raise UserError(f"graph {graph!r} input {name!r} has shape {shape}, outside the engine's profile "
                            f"{tuple(lo)}..{tuple(hi)} ({where or 'fixed shape'}); rebuild with a larger "
                            "--max-batch / --max-len")


def load_engine_metas(bundle: Bundle, engines: Path, module: str, version: str, compute_capability: str) -> dict:
    return {g: check_engine_meta(read_engine_meta(engines, g), g, bundle, engines, module, version,
                                 compute_capability) for g in bundle.graphs}


class Cuda:
    """The CUDA runtime calls the runner makes, all on its own stream (ctypes, through polygraphy's libcudart)."""

    def __init__(self):
        from polygraphy import cuda

        self.lib = cudart()
        if self.lib is None:
            raise UserError("the trt backend needs the CUDA runtime library (libcudart), which does not load here")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.stream = cuda.Stream()
        device, supported = ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.cudaGetDevice(ctypes.byref(device)), "cudaGetDevice")
        self.lib.cudaDeviceGetAttribute(ctypes.byref(supported), DEVICE_ATTRIBUTE_MEMORY_POOLS, device)
        self.pools = bool(supported.value)
        if self.pools:  # keep freed memory in the pool (by default it goes back to the OS at every synchronization)
            pool, keep = ctypes.c_void_p(), ctypes.c_uint64(2**64 - 1)
            self.check(self.lib.cudaDeviceGetDefaultMemPool(ctypes.byref(pool), device), "cudaDeviceGetDefaultMemPool")
            self.check(self.lib.cudaMemPoolSetAttribute(pool, MEMPOOL_RELEASE_THRESHOLD, ctypes.byref(keep)),
                       "cudaMemPoolSetAttribute")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise UserError(f"CUDA error in {what}: {self.lib.cudaGetErrorString(status).decode()} ({status})")

    @property
    def handle(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(self.stream.ptr)

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        if self.pools:
            self.check(self.lib.cudaMallocAsync(ctypes.byref(ptr), ctypes.c_size_t(nbytes), self.handle),
                       "cudaMallocAsync")
        else:
            self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        if self.pools:
            self.lib.cudaFreeAsync(ctypes.c_void_p(ptr), self.handle)
        else:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
                                            self.handle), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self.check(self.lib.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def empty(self, shape, dtype) -> DeviceArray:
        dtype = np.dtype(dtype)
        return DeviceArray(Allocation(self, math.prod(shape) * dtype.itemsize), shape, dtype)

    def upload(self, host: np.ndarray) -> DeviceArray:
        """A device copy of a host array (pageable: host is read before this returns)."""
        host = np.ascontiguousarray(host)
        array = self.empty(host.shape, host.dtype)
        if host.nbytes:
            self.copy(array.ptr, host.ctypes.data, host.nbytes, HOST_TO_DEVICE)
        return array

    def download(self, array: DeviceArray) -> np.ndarray:
        """A host copy of a device array, once the work queued before on the stream is done."""
        host = np.empty(array.shape, array.dtype)
        if host.nbytes:
            self.copy(host.ctypes.data, array.ptr, host.nbytes, DEVICE_TO_HOST)
        self.synchronize()
        return host


class Allocation:
    """Device memory from the runner's stream, freed on that stream when the last array using it goes."""

    def __init__(self, cuda: Cuda, nbytes: int):
        self.cuda, self.ptr = cuda, cuda.malloc(nbytes) if nbytes else 0

    def __del__(self):
        if self.ptr:
            self.cuda.free(self.ptr)


class DeviceArray:
    """A C-contiguous array in GPU memory: shape, numpy dtype and the address of its first element. ``reshape`` and
    basic indexing whose result is contiguous return views of the same memory."""

    def __init__(self, memory: Allocation, shape, dtype, offset: int = 0):
        self.memory, self.shape, self.dtype, self.offset = memory, tuple(int(d) for d in shape), np.dtype(dtype), offset

    @property
    def ptr(self) -> int:
        return self.memory.ptr + self.offset

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    def reshape(self, *shape) -> DeviceArray:
        shape = list(shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
        if shape.count(-1) == 1:
            known = math.prod(d for d in shape if d != -1)
            shape[shape.index(-1)] = self.size // known if known else 0
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape a DeviceArray of shape {self.shape} into {tuple(shape)}")
        return DeviceArray(self.memory, shape, self.dtype, self.offset)

    def __getitem__(self, key) -> DeviceArray:
        """Integers and step-1 slices, as numpy indexes; the selection must be contiguous (no copies on the GPU)."""
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or any(k is None or k is Ellipsis for k in key):
            raise IndexError(f"DeviceArray {self.shape} takes at most {self.ndim} integers or slices, got {key}")
        key += (slice(None),) * (self.ndim - len(key))
        strides = [math.prod(self.shape[d + 1:]) for d in range(self.ndim)]
        offset, shape, extents = 0, [], []
        for k, n, stride in zip(key, self.shape, strides):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("DeviceArray slices take no step")
                extent = max(0, stop - start)
                shape.append(extent)
            else:
                start, extent = operator.index(k), 1
                start += n if start < 0 else 0
                if not 0 <= start < n:
                    raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            offset += start * stride
            extents.append(extent)
        partial = [d for d, (e, n) in enumerate(zip(extents, self.shape)) if e < n]
        if partial and math.prod(extents) and any(e != 1 for e in extents[:partial[-1]]):
            raise IndexError(f"{key} selects a non-contiguous part of a DeviceArray {self.shape}; copy it to the host "
                             "with to_numpy first")
        return DeviceArray(self.memory, shape, self.dtype, self.offset + offset * self.dtype.itemsize)


def numpy_dtype(trt_dtype) -> np.dtype:
    if trt_dtype.name not in NUMPY_DTYPES:
        raise UserError(f"TensorRT tensor type {trt_dtype.name} has no numpy equivalent here")
    return np.dtype(NUMPY_DTYPES[trt_dtype.name])


def runner_plugin_library(explicit, meta: dict) -> Path | None:
    """The C++ plugin library to load: the one named, else the one the engine was built with if it is still there,
    else the one beside the package, else None (the Python plugins)."""
    if explicit is not None:
        return plugin_library(explicit)
    recorded = meta.get("plugin_library")
    if isinstance(recorded, dict) and Path(recorded["path"]).is_file():
        return Path(recorded["path"])
    return plugin_library(None)


class TrtRunner:
    """GraphRunner over TensorRT engines; every engine is checked at construction, deserialized on first use."""

    name = "trt"

    def __init__(self, bundle: Bundle, engines: str | Path | None = None, plugins: str | Path | None = None):
        self.trt, self.module = import_tensorrt()
        self.compute_capability = cuda_compute_capability()
        if self.compute_capability is None:
            raise UserError(f"the trt backend runs TensorRT engines on a CUDA GPU and the CUDA runtime sees none "
                            f"({self.module} {self.trt.__version__} is installed)")
        self.bundle = bundle
        self.engines = Path(engines) if engines is not None else bundle.path / "engines"
        self.meta = load_engine_metas(bundle, self.engines, self.module, self.trt.__version__,
                                      self.compute_capability)
        self.plugin_library = None  # the C++ library loaded, if any
        for graph, meta in self.meta.items():
            if meta.get("plugins"):
                self.plugin_library = runner_plugin_library(plugins, meta)
                register_plugins(self.trt, bundle.graph(graph), self.plugin_library)
        self.cuda = Cuda()
        self.scratch = self.cuda.empty((256,), np.uint8)  # the address of empty tensors
        self.logger = make_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.loaded = {}  # graph -> (engine, context, input names, output names)
        self.workspaces = {}  # loops' buffers and bound calls (see workspace())

    def load(self, graph: str):
        if graph not in self.loaded:
            path = engine_paths(self.engines, graph)[0]
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise UserError(f"{self.module} cannot load engine {path}: {self.logger.last_error()}")
            context = engine.create_execution_context()
            if context is None:
                raise UserError(f"{self.module} cannot create an execution context for {path}: "
                                f"{self.logger.last_error()}")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = {n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT}
            outputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
            self.loaded[graph] = (engine, context, inputs, outputs)
        return self.loaded[graph]

    def to_device(self, value, dtype: np.dtype, graph: str, name: str) -> DeviceArray:
        """A feed on the GPU in the engine's dtype: this runner's DeviceArray as it is, a host array copied."""
        if isinstance(value, DeviceArray):
            if value.memory.cuda is not self.cuda:
                raise UserError(f"graph {graph!r} input {name!r} is another runner's DeviceArray")
            if value.dtype != dtype:
                raise UserError(f"graph {graph!r} input {name!r} is a {value.dtype} DeviceArray; the engine takes "
                                f"{dtype}")
            return value
        return self.cuda.upload(np.asarray(value, dtype=dtype))

    def address(self, array: DeviceArray) -> int:
        return array.ptr if array.nbytes else self.scratch.ptr

    def value(self, host: np.ndarray) -> DeviceArray:
        return self.cuda.upload(host)

    def zeros(self, shape, dtype) -> DeviceArray:
        return self.cuda.upload(np.zeros(shape, dtype=dtype))

    def write(self, value: DeviceArray, host: np.ndarray) -> None:
        """New contents for a DeviceArray (same shape and dtype), in place, in stream order."""
        host = np.ascontiguousarray(host)
        if host.shape != value.shape or host.dtype != value.dtype:
            raise ValueError(f"cannot write a {host.dtype} {host.shape} array into a {value.dtype} {value.shape} one")
        if host.nbytes:
            self.cuda.copy(value.ptr, host.ctypes.data, host.nbytes, HOST_TO_DEVICE)
            self.cuda.synchronize()  # the pageable host array may go once this returns

    def workspace(self, key, make):
        """The loop's buffers and bound calls for key, made once (as OrtRunner.workspace)."""
        if key not in self.workspaces:
            self.workspaces[key] = make()
        return self.workspaces[key]

    def bind(self, graph: str, feeds: dict, outputs: dict, capture: bool = False):
        """The call run(graph, feeds, outputs) as a function (TensorRT sets its addresses per call)."""
        return lambda: self.run(graph, feeds, outputs)

    def run(self, graph: str, feeds: dict, outputs: dict | None = None) -> dict:
        """feeds: name -> numpy array or DeviceArray; outputs: name -> a DeviceArray to write into (an input's: the
        result is copied over it after the engine ran, TensorRT not promising in-place writes). Returns name ->
        DeviceArray."""
        if graph not in self.meta:
            raise UserError(f"bundle {self.bundle.path} has no graph {graph!r}")
        check_shapes(graph, self.meta[graph], {n: tuple(v.shape) for n, v in feeds.items()})
        engine, context, input_names, output_names = self.load(graph)
        inputs = {}  # alive until enqueued; their memory is freed on the same stream, after the engine's work
        for name, value in feeds.items():
            if name not in input_names:  # a graph input the ONNX parser found unused
                continue
            array = self.to_device(value, numpy_dtype(engine.get_tensor_dtype(name)), graph, name)
            context.set_input_shape(name, array.shape)
            context.set_tensor_address(name, self.address(array))
            inputs[name] = array
        given, results = outputs or {}, {}
        fed = {array.ptr for array in inputs.values() if array.nbytes}
        for name in output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"graph {graph!r} output {name!r} has a data-dependent shape {shape}")
            target = given.get(name)
            if target is not None and target.ptr not in fed:
                results[name] = target
            else:
                results[name] = self.cuda.empty(shape, numpy_dtype(engine.get_tensor_dtype(name)))
            context.set_tensor_address(name, self.address(results[name]))
        if not context.execute_async_v3(self.cuda.stream.ptr):
            raise UserError(f"TensorRT failed to run graph {graph!r}: {self.logger.last_error()}")
        for name, target in given.items():
            if results[name] is not target:  # an input's buffer: the new contents go over it
                self.cuda.copy(target.ptr, results[name].ptr, target.nbytes, DEVICE_TO_DEVICE)
                results[name] = target
        return results

    def to_numpy(self, value) -> np.ndarray:
        """A host copy of a DeviceArray (waits for the runner's stream); numpy arrays as they are."""
        return value if isinstance(value, np.ndarray) else self.cuda.download(value)
