"""TensorRT engines from a bundle's ONNX graphs: ``bytedeploy build BUNDLE``.

    ENGINES/NAME.engine   serialized engine, one per bundle graph, one optimization profile each
    ENGINES/NAME.json     what the loader (runtimes/trt.py) checks before running it: TensorRT module and version,
                          GPU compute capability, plugins and the plugin library, profile ranges, sha256 of the graph
                          it came from
    ENGINES/timing.cache  TensorRT timing cache, read and updated (full TensorRT only)

Plugins (graphs exported with --bitlinear plugin or --patch-decode plugin): the C++ library
libbytedeploy_trt_plugins.so (plugins/trt/, built by `python -m bytedeploy.plugins.build_trt`) when it exists:
--plugins PATH, else the one built beside the package (plugins/trt/build/). TensorRT loads it with
IPluginRegistry.load_library, and the engine metadata records its path and sha256 ("plugin_library"). Without it,
the Python plugins of plugins/trt_plugins.py (which need torch) are registered instead, recorded as "python".

The module is ``tensorrt`` (TensorRT 10) when it imports and is not a stub, else ``tensorrt_rtx``. TensorRT-RTX
builds ahead of time without a GPU (the engine is JIT-specialized on the target RTX GPU when loaded) but has no
plugin layers and builds strongly typed networks only: the engine computes in the graph's own types, so its
precision is the bundle's (export with --precision fp16 for an fp16 engine).

Profile ranges come from each input's named dynamic axes and the model config:

    "batch"                          1 .. --max-batch
    "past*", "cache*" (KV caches)    0 .. L - 1
    other length axes                1 .. L     ("seq", "patches", "positions", "new", "bytes", ...)

L is the model's context (block_size, n_patches or seq_len; --max-len lowers it); opt is the middle of each range.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

import bytedeploy
from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS, PRECISIONS, Bundle, GraphSpec, load_bundle
from bytedeploy.plugins.build_trt import default_library

INSTALL_HINT = 'pip install "bytedeploy[trt]" (TensorRT 10, on a GPU machine) or "bytedeploy[trt-rtx]" (TensorRT-RTX)'
RTX_COMPUTE_CAPABILITY = "ahead-of-time, no GPU"
CONTEXT_KEYS = ("block_size", "n_patches", "seq_len")  # the model's context length, by family
LENGTH_AXES = ("seq", "tokens", "patches", "positions", "new", "len", "length", "bytes", "queries")
BYTEDEPLOY_PLUGIN_VERSION = {op: str(v) for op, v in CUSTOM_OPS.items()}
PYTHON_PLUGINS = "python"  # engine metadata "plugin_library" when the Python plugins were registered
CUDA_DEVICE_ATTRIBUTE_CC_MAJOR, CUDA_DEVICE_ATTRIBUTE_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor


# ---- the TensorRT module ----------------------------------------------------------------------------------------

def import_tensorrt():
    """-> (module, name): ``tensorrt`` when it is a real TensorRT, else ``tensorrt_rtx``; UserError when neither."""
    why = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            why.append(f"{name} not installed" if isinstance(e, ModuleNotFoundError) else f"{name}: {e}")
            continue
        except OSError as e:  # a wheel whose shared libraries do not load
            why.append(f"{name}: {e}")
            continue
        if not hasattr(module, "Builder") or not hasattr(module, "OnnxParser"):
            why.append(f"{name} is a stub package")
            continue
        return module, name
    raise UserError(f"no TensorRT found ({'; '.join(why)}): {INSTALL_HINT}")


def make_logger(trt):
    """A TensorRT logger that keeps warnings and errors (for our one-line messages) instead of printing them."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip().splitlines()[-1] if msg.strip() else msg)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no error message from TensorRT"

    return Logger()


def cudart():
    """The CUDA runtime library through polygraphy's ctypes wrapper (no torch), or None where it does not load."""
    from polygraphy import cuda

    try:
        return cuda.wrapper().handle
    except Exception:  # an OSError from ctypes, or polygraphy's own exception when it finds no libcudart
        return None


def cuda_compute_capability() -> str | None:
    """"major.minor" of CUDA device 0, or None without a usable GPU or CUDA runtime."""
    lib = cudart()
    count = ctypes.c_int(0)
    if lib is None or lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_DEVICE_ATTRIBUTE_CC_MAJOR, 0)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_DEVICE_ATTRIBUTE_CC_MINOR, 0)
    return f"{major.value}.{minor.value}"


def plugin_names(spec: GraphSpec) -> list[dict]:
    """The TensorRT plugins a graph needs: name, version and namespace of each bytedeploy custom op."""
    out = []
    for op in spec.custom_ops:
        op_type = op.partition("::")[2]
        out.append({"name": op_type, "version": BYTEDEPLOY_PLUGIN_VERSION[op_type], "namespace": CUSTOM_DOMAIN})
    return out


def plugin_library(path=None) -> Path | None:
    """The C++ plugin library to use: path when given (it must exist), else the one built beside the package, else
    None (the Python plugins)."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"plugin library {path} does not exist; build it with `python -m "
                            "bytedeploy.plugins.build_trt`")
        return Path(path).resolve()
    built = default_library()
    return built if built.is_file() else None


def library_record(library: Path | None) -> dict | str:
    """What the engine metadata says about the plugins: the library's path and sha256, or "python"."""
    if library is None:
        return PYTHON_PLUGINS
    return {"path": str(library), "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}


_loaded_libraries: dict[str, object] = {}  # path -> TensorRT's handle: a library registers its creators once


def register_plugins(trt, spec: GraphSpec, library: Path | None) -> None:
    """Make the bytedeploy plugins the graph needs known to TensorRT: the C++ library when given, else the Python
    plugins (plugins/trt_plugins.py); then check each one is registered."""
    registry = trt.get_plugin_registry()
    if library is not None:
        if str(library) not in _loaded_libraries:
            handle = registry.load_library(str(library))
            if handle is None:
                raise UserError(f"TensorRT could not load the plugin library {library} (built for another TensorRT "
                                "or GPU, or bytedeploy's Python plugins are already registered in this process)")
            _loaded_libraries[str(library)] = handle
    else:
        from bytedeploy.plugins import trt_plugins

        trt_plugins.register_plugins()
    for p in plugin_names(spec):
        if registry.get_creator(p["name"], p["version"], p["namespace"]) is None:
            raise UserError(f"graph {spec.name!r}: TensorRT plugin {p['namespace']}::{p['name']} version "
                            f"{p['version']} is not registered")


# ---- optimization profiles --------------------------------------------------------------------------------------

@dataclass
class AxisRange:
    min: int
    opt: int
    max: int


def context_length(bundle: Bundle, max_len: int | None) -> int:
    cfg = bundle.model_config
    context = next((int(cfg[k]) for k in CONTEXT_KEYS if k in cfg), None)
    if context is None:
        raise UserError(f"bundle {bundle.path}: the {bundle.family} config has no context length "
                        f"({', '.join(CONTEXT_KEYS)}) to size the TensorRT profiles")
    if max_len is None:
        return context
    if not 1 <= max_len <= context:
        raise UserError(f"--max-len {max_len} is outside 1..{context} (the {bundle.family} model's context)")
    return max_len


def middle(lo: int, hi: int) -> AxisRange:
    return AxisRange(lo, (lo + hi + 1) // 2, hi)


def axis_range(axis: str, graph: str, bundle: Bundle, max_batch: int, length: int) -> AxisRange:
    """Range of one named dynamic axis (see the module docstring)."""
    if axis == "batch":
        return middle(1, max_batch)
    if axis.startswith(("past", "cache")):
        return middle(0, length - 1)
    if axis in LENGTH_AXES:
        return middle(1, length)
    raise UserError(f"graph {graph!r}: no TensorRT profile rule for dynamic axis {axis!r}; name it batch, past*, "
                    f"cache* or {', '.join(LENGTH_AXES)} (or add a rule to bytedeploy.exporters.trt_build)")


def graph_profile(spec: GraphSpec, bundle: Bundle, max_batch: int, length: int) -> dict[str, dict[str, list[int]]]:
    """{input name: {"min": dims, "opt": dims, "max": dims}} for every input of the graph."""
    profile = {}
    for t in spec.inputs:
        ranges = [AxisRange(d, d, d) if isinstance(d, int) else axis_range(d, spec.name, bundle, max_batch, length)
                  for d in t.shape]
        profile[t.name] = {k: [getattr(r, k) for r in ranges] for k in ("min", "opt", "max")}
    return profile


# ---- building ---------------------------------------------------------------------------------------------------

def parse_graph(trt, builder, logger, path: Path, name: str):
    """ONNX file -> INetworkDefinition; UserError naming the graph and the first failing node."""
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        if parser.num_errors == 0:
            raise UserError(f"TensorRT cannot parse graph {name!r} ({path}): {logger.last_error()}")
        e = parser.get_error(0)
        node = f"node {e.node_name() or e.node()} ({e.node_operator()})" if e.node() >= 0 else "the graph"
        raise UserError(f"TensorRT cannot parse graph {name!r}: {node}: {str(e.desc()).splitlines()[0]}")
    return network, parser


def check_network_input(graph: str, tensor, profile: dict) -> None:
    if tensor.name not in profile:
        raise UserError(f"graph {graph!r}: TensorRT input {tensor.name!r} is not in the bundle manifest")
    if tensor.is_shape_tensor:
        raise UserError(f"graph {graph!r}: input {tensor.name!r} is a shape tensor, which bytedeploy cannot profile")
    if len(tensor.shape) != len(profile[tensor.name]["min"]):
        raise UserError(f"graph {graph!r}: input {tensor.name!r} has rank {len(tensor.shape)} in the ONNX graph "
                        f"and {len(profile[tensor.name]['min'])} in the manifest")


def set_precision(trt, config, precision: str) -> None:
    """Full TensorRT: let the builder choose fp16 or bf16 kernels (TF32 is on by default for fp32)."""
    if precision == "fp32":
        return
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if flag is None:
        raise UserError(f"this TensorRT ({trt.__version__}) has no {precision} builder flag")
    config.set_flag(flag)


def load_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        raise UserError(f"timing cache {path} is corrupt or from another TensorRT; delete it and build again")
    return cache


def write_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def engine_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.engine", out / f"{name}.json"


def read_engine_meta(out: Path, name: str) -> dict | None:
    engine, meta = engine_paths(out, name)
    if not (engine.is_file() and meta.is_file()):
        return None
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def is_current(meta: dict | None, wanted: dict) -> bool:
    """An existing engine is kept when it was built from the same graph, module and settings."""
    keys = ("graph_sha256", "module", "tensorrt_version", "requested_precision", "profile", "compute_capability",
            "plugin_library")
    return meta is not None and all(meta.get(k) == wanted[k] for k in keys)


@dataclass
class Builder:
    """One TensorRT module's builder and the settings every graph of a build shares."""
    trt: object
    module: str  # "tensorrt" | "tensorrt_rtx"
    compute_capability: str
    precision: str
    timing_cache: Path | None  # None under TensorRT-RTX, whose timing cache calls are no-ops
    library: Path | None = None  # the C++ plugin library, None: the Python plugins

    def __post_init__(self):
        self.logger = make_logger(self.trt)
        self.builder = self.trt.Builder(self.logger)
        self.cache = None  # the ITimingCache, shared by every graph's config

    @property
    def rtx(self) -> bool:
        return self.module == "tensorrt_rtx"

    def engine_meta(self, bundle: Bundle, spec: GraphSpec, profile: dict) -> dict:
        return {
            "graph": spec.name, "engine": f"{spec.name}.engine", "bytedeploy_version": bytedeploy.__version__,
            "family": bundle.family, "graph_file": spec.file, "graph_sha256": bundle.files.get(spec.file),
            "builder": self.module, "module": self.module, "tensorrt_version": self.trt.__version__,
            "compute_capability": self.compute_capability,
            "requested_precision": self.precision,
            # TensorRT-RTX networks are strongly typed: the engine computes in the graph's types.
            "precision": bundle.precision if self.rtx else self.precision,
            "bundle_precision": bundle.precision,
            "plugins": plugin_names(spec),
            "plugin_library": library_record(self.library) if spec.custom_ops else None,
            "profile": profile,
            "inputs": [asdict(t) for t in spec.inputs], "outputs": [asdict(t) for t in spec.outputs],
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
        }

    def config(self, spec: GraphSpec, network, profile: dict):
        config = self.builder.create_builder_config()
        p = self.builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            check_network_input(spec.name, tensor, profile)
            r = profile[tensor.name]
            p.set_shape(tensor.name, r["min"], r["opt"], r["max"])
        if config.add_optimization_profile(p) < 0:
            raise UserError(f"graph {spec.name!r}: TensorRT rejects the optimization profile: "
                            f"{self.logger.last_error()}")
        if not self.rtx:
            set_precision(self.trt, config, self.precision)
            if self.cache is None:
                self.cache = load_timing_cache(config, self.timing_cache)
            elif not config.set_timing_cache(self.cache, False):
                raise UserError(f"cannot use the timing cache {self.timing_cache} for graph {spec.name!r}")
        return config

    def build(self, bundle: Bundle, spec: GraphSpec, profile: dict):
        """-> the serialized engine (IHostMemory); writes the updated timing cache."""
        if spec.custom_ops:
            register_plugins(self.trt, spec, self.library)
        network, _parser = parse_graph(self.trt, self.builder, self.logger, bundle.graph_path(spec.name), spec.name)
        serialized = self.builder.build_serialized_network(network, self.config(spec, network, profile))
        if serialized is None:
            raise UserError(f"TensorRT could not build graph {spec.name!r}: {self.logger.last_error()}")
        if self.cache is not None:
            write_atomic(self.timing_cache, memoryview(self.cache.serialize()))
        return serialized


def make_builder(bundle: Bundle, out: Path, precision: str, timing_cache, library: Path | None = None) -> Builder:
    """Choose the TensorRT module and check it can build this bundle here."""
    trt, module = import_tensorrt()
    if module == "tensorrt_rtx":
        for spec in bundle.graphs.values():
            if spec.custom_ops:
                hint = "export without --patch-decode" if spec.name == "patch_decode_fused" else \
                    "export with --bitlinear qdq"
                raise UserError(f"graph {spec.name!r} uses {', '.join(spec.custom_ops)}: TensorRT-RTX has no plugin "
                                f"layers; {hint}, or build with full TensorRT on a GPU machine")
        return Builder(trt, module, RTX_COMPUTE_CAPABILITY, precision, None)
    compute_capability = cuda_compute_capability()
    if compute_capability is None:
        raise UserError("full TensorRT builds engines on a CUDA GPU and none is visible; on a CPU-only machine "
                        'uninstall tensorrt and use TensorRT-RTX (pip install "bytedeploy[trt-rtx]")')
    return Builder(trt, module, compute_capability, precision,
                   Path(timing_cache) if timing_cache else out / "timing.cache", library)


def build_engines(bundle, out=None, precision: str | None = None, max_batch: int = 8, max_len: int | None = None,
                  timing_cache=None, force: bool = False, plugins=None) -> dict[str, dict]:
    """Build one engine per bundle graph into out (default BUNDLE/engines); returns {graph: metadata}. precision
    None: the bundle's. plugins: the C++ plugin library (default: the one beside the package, if built)."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    precision = precision or bundle.precision
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, not {max_batch}")
    out = Path(out) if out is not None else bundle.path / "engines"
    length = context_length(bundle, max_len)
    b = make_builder(bundle, out, precision, timing_cache, plugin_library(plugins))
    results = {}
    for i, spec in enumerate(bundle.graphs.values(), 1):
        step = f"[{i}/{len(bundle.graphs)}] {spec.name}:"
        engine_path, meta_path = engine_paths(out, spec.name)
        meta = b.engine_meta(bundle, spec, graph_profile(spec, bundle, max_batch, length))
        built = read_engine_meta(out, spec.name)
        if not force and is_current(built, meta):
            click.echo(f"{step} kept {engine_path} (up to date; --force rebuilds)")
            results[spec.name] = built
            continue
        start = time.perf_counter()
        serialized = b.build(bundle, spec, meta["profile"])
        meta["build_seconds"] = round(time.perf_counter() - start, 3)
        meta["engine_bytes"] = serialized.nbytes
        write_atomic(engine_path, memoryview(serialized))
        write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())  # last: marks the engine complete
        click.echo(f"{step} built {engine_path} with {b.module} {b.trt.__version__} ({meta['precision']}, "
                   f"{serialized.nbytes / 1e6:.1f} MB) in {meta['build_seconds']:.1f} s")
        results[spec.name] = meta
    if b.rtx and precision != bundle.precision:
        hint = f"export with --precision {precision} for {precision} engines" if precision in PRECISIONS else \
            "bundles are fp32 or fp16"
        click.echo(f"note: TensorRT-RTX builds strongly typed networks: these engines compute in the bundle's "
                   f"{bundle.precision}, not --precision {precision} ({hint})")
    return results
