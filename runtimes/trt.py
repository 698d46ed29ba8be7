"""TensorRT graph runner (TensorRT 10 API): one deserialized engine and execution context per bundle graph.

    runner = TrtRunner(bundle)                      # engines from `bytedeploy build BUNDLE` in BUNDLE/engines
    out = runner.run("decode", {"ids": ids, "past_k": out_prev["present_k"], ...})   # torch CUDA tensors
    logits = runner.to_numpy(out["logits"])

Inputs are numpy arrays or torch tensors (a previous call's outputs, fed back without a copy); outputs are torch
CUDA tensors allocated after the input shapes are set (``get_tensor_shape``), and the engine runs with
``execute_async_v3`` on the current torch CUDA stream, so torch code before and after is ordered with it.

Before anything runs, each engine's metadata (exporters/trt_build.py writes it beside the engine) is checked
against this machine: the TensorRT module and version that built it, the GPU compute capability, the graph it was
built from (sha256), the plugins it needs; and each call's input shapes against the engine's optimization profile.
Each mismatch is a one-line UserError. The checks run on any machine; executing needs a GPU TensorRT runs on
(full TensorRT 10 on H100/H200; TensorRT-RTX on RTX GPUs only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import Bundle
from bytedeploy.exporters.trt_build import (
    RTX_COMPUTE_CAPABILITY,
    cuda_compute_capability,
    engine_paths,
    import_tensorrt,
    make_logger,
    read_engine_meta,
    register_plugins,
)

# TensorRT-RTX does not run on Hopper data-center GPUs (H100/H200).
RTX_UNSUPPORTED_COMPUTE_CAPABILITIES = ("9.0",)
TORCH_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                     "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


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


class TrtRunner:
    """GraphRunner over TensorRT engines; every engine is checked at construction, deserialized on first use."""

    name = "trt"

    def __init__(self, bundle: Bundle, engines: str | Path | None = None):
        self.trt, self.module = import_tensorrt()
        self.compute_capability = cuda_compute_capability()
        if self.compute_capability is None:
            raise UserError(f"the trt backend runs TensorRT engines on a CUDA GPU and torch sees none "
                            f"({self.module} {self.trt.__version__} is installed)")
        self.bundle = bundle
        self.engines = Path(engines) if engines is not None else bundle.path / "engines"
        self.meta = load_engine_metas(bundle, self.engines, self.module, self.trt.__version__,
                                      self.compute_capability)
        for graph, meta in self.meta.items():
            if meta.get("plugins"):
                register_plugins(self.trt, bundle.graph(graph))
        self.logger = make_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.loaded = {}  # graph -> (engine, context, input names, output names)
        self.scratch = None  # a valid address for zero-size tensors (an empty KV cache)

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

    def torch_dtype(self, trt_dtype):
        import torch

        name = TORCH_DTYPE_NAMES.get(trt_dtype.name)
        if name is None:
            raise UserError(f"TensorRT tensor type {trt_dtype.name} has no torch equivalent here")
        return getattr(torch, name)

    def address(self, t) -> int:
        import torch

        if t.numel():
            return t.data_ptr()
        if self.scratch is None:
            self.scratch = torch.empty(256, dtype=torch.uint8, device="cuda")
        return self.scratch.data_ptr()

    def run(self, graph: str, feeds: dict) -> dict:
        """feeds: name -> numpy array or torch tensor. Returns name -> torch CUDA tensor."""
        import torch

        if graph not in self.meta:
            raise UserError(f"bundle {self.bundle.path} has no graph {graph!r}")
        check_shapes(graph, self.meta[graph], {n: tuple(v.shape) for n, v in feeds.items()})
        engine, context, input_names, output_names = self.load(graph)
        inputs = {}
        for name, value in feeds.items():
            if name not in input_names:  # a graph input the ONNX parser found unused
                continue
            dtype = self.torch_dtype(engine.get_tensor_dtype(name))
            t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            t = t.to(device="cuda", dtype=dtype).contiguous()
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, self.address(t))
            inputs[name] = t  # alive until enqueued; later frees are ordered on the same stream
        outputs = {}
        for name in output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"graph {graph!r} output {name!r} has a data-dependent shape {shape}")
            out = torch.empty(shape, dtype=self.torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
            context.set_tensor_address(name, self.address(out))
            outputs[name] = out
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise UserError(f"TensorRT failed to run graph {graph!r}: {self.logger.last_error()}")
        return outputs

    def to_numpy(self, value) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return value.detach().cpu().numpy()
