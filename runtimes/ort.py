"""ONNX Runtime graph runner: one InferenceSession per bundle graph, run through IOBinding.

Values a graph returns stay ORT values on the session's device (KV caches on the GPU with the CUDA execution
provider) and go back in as inputs of the next call without a copy; ``to_numpy`` copies the few a loop needs on the
host (logits). Family loops (runtimes/<family>.py) only see the GraphRunner interface, which the TensorRT runner
implements too.

    runner = OrtRunner(bundle, device="cpu")        # or "cuda" with onnxruntime-gpu
    out = runner.run("decode", {"ids": ids, "past_k": out_prev["present_k"], ...})
    logits = runner.to_numpy(out["logits"])
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import Bundle


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return ort


def providers_for(device: str) -> list[str]:
    ort = import_ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("the ort-cuda backend needs onnxruntime-gpu with a working CUDA execution provider; "
                            f"this onnxruntime has {', '.join(ort.get_available_providers())}")
        preload_cuda_libraries(ort)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UserError(f"unknown ONNX Runtime device {device!r}: cpu or cuda")


_preloaded = False


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA / cuDNN libraries of the nvidia-* pip packages (PyTorch's) into the process before the CUDA
    execution provider looks for them; without this it may fail to start and ORT quietly runs on the CPU."""
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
        ort.preload_dlls()
        _preloaded = True


def session_options(custom_ops: bool):
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = int(os.environ.get("BYTEDEPLOY_ORT_LOG", "3"))  # 3: errors only; 0: verbose
    threads = os.environ.get("BYTEDEPLOY_ORT_THREADS")  # tiny models run faster on 1 thread than on many
    if threads:
        if not threads.isdigit():
            raise UserError(f"BYTEDEPLOY_ORT_THREADS must be a whole number of threads, not {threads!r}")
        so.intra_op_num_threads = int(threads)
    if custom_ops:
        from bytedeploy.plugins.ort_ops import register_custom_ops

        register_custom_ops(so)
    return so


def make_session(model_path: str | Path, device: str = "cpu", custom_ops: bool = False):
    """An InferenceSession for one graph file; custom_ops registers bytedeploy's ONNX Runtime custom ops."""
    ort = import_ort()
    model = str(model_path)
    if custom_ops:
        try:
            from bytedeploy.plugins.ort_ops import model_for_ort
        except ImportError as e:  # onnxruntime-extensions carries the Python custom ops
            raise UserError(f"bytedeploy's ONNX Runtime custom ops need onnxruntime-extensions, which is not "
                            f"importable ({e}); pip install onnxruntime-extensions") from None

        model = model_for_ort(model_path)  # bytes of the graph with the custom ops ORT-resolvable
    try:
        session = ort.InferenceSession(model, sess_options=session_options(custom_ops),
                                       providers=providers_for(device))
    except UserError:
        raise
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented, ...)
        raise UserError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError("ONNX Runtime's CUDA execution provider did not start (it fell back to the CPU), usually a "
                        "CUDA or cuDNN library it needs is missing; BYTEDEPLOY_ORT_LOG=2 shows onnxruntime's reason")
    return session


class OrtRunner:
    """GraphRunner over ONNX Runtime sessions, created lazily per graph."""

    name = "ort"

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        self.bundle = bundle
        self.device = device
        providers_for(device)  # fail early, with the message, when the provider is missing
        self.sessions = {}

    def session(self, graph: str):
        if graph not in self.sessions:
            spec = self.bundle.graph(graph)
            self.sessions[graph] = make_session(self.bundle.graph_path(graph), self.device,
                                                custom_ops=bool(spec.custom_ops))
        return self.sessions[graph]

    def run(self, graph: str, feeds: dict) -> dict:
        """feeds: name -> numpy array or ORT value (a previous output). Returns name -> ORT value on the device."""
        ort = import_ort()
        sess = self.session(graph)
        binding = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            binding.bind_output(name, self.device)
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs()))

    def to_numpy(self, value) -> np.ndarray:
        return value.numpy() if not isinstance(value, np.ndarray) else value
