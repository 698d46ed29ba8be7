"""ONNX Runtime graph runner: one InferenceSession per bundle graph, run through IOBinding.

Values a graph returns stay ORT values on the session's device and go back in as inputs of the next call without a
copy; ``to_numpy`` copies what a loop reads on the host. Family loops (runtimes/<family>.py) only see the runner
interface, which the TensorRT runner implements too:

    runner = OrtRunner(bundle, device="cpu")             # or "cuda" with onnxruntime-gpu
    out = runner.run("prefill", {"tokens": ids, ...})   # one call: numpy or runner values in, runner values out
    cache = runner.zeros(shape, np.float32)              # a buffer on the device, allocated once by the loop
    step = runner.bind("decode", feeds, outputs, capture=True)   # inputs and outputs bound once
    step()                                               # one call of the bound graph; outputs written in place
    runner.write(u, draws)                               # new contents for a bound input (a host-to-device copy)

``bind`` keeps its IOBinding, so a step costs no binding work; an output bound to the same value as an input (a KV
cache: present_k.0 onto past_k.0) is written in place. With capture=True on the CUDA provider the graph's session
is made with ``enable_cuda_graph`` and each bound call gets a CUDA graph of its own (``gpu_graph_id``): its first
call captures it, later calls replay it. ONNX Runtime may run a graph once more while it captures it, so a bound
step must be idempotent: it may write in place what it reads only where writing it twice gives the same result (a
cache slot, a token at a position), never a counter (the loops alternate two buffers for positions). Where the
CUDA provider cannot capture a graph (a node it would run on the CPU, say), the graph runs without CUDA graphs and
``cuda_graph_errors`` says why.

A graph with an ONNX Runtime variant (GraphSpec.ort_file: SkipLayerNormalization and MultiHeadAttention contrib
ops, exporters/ort_fusions.py) runs that variant; BYTEDEPLOY_ORT_FUSIONS=0 runs the standard graphs instead.
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
CUDA_DID_NOT_START = ("ONNX Runtime's CUDA execution provider did not start (it fell back to the CPU), usually a CUDA "
                      "or cuDNN library it needs is missing; BYTEDEPLOY_ORT_LOG=2 shows onnxruntime's reason")


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA / cuDNN libraries of the nvidia-* pip packages (onnxruntime-gpu[cuda,cudnn]'s, or PyTorch's) into
    the process before the CUDA execution provider looks for them; without this it may fail to start and ORT quietly
    runs on the CPU."""
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
        ort.preload_dlls()
        _preloaded = True


def session_options(custom_ops: bool, profile: str | None = None):
    """profile: a file prefix for ONNX Runtime's profiler (benchmarks/gpu_bench.py's step profile)."""
    ort = import_ort()
    so = ort.SessionOptions()
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
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
        # The Python ops run on the calling thread; pool threads spinning meanwhile take its cores (2.6x slower on 2).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def cuda_providers(cuda_graph: bool) -> list:
    options = {"enable_cuda_graph": "1"} if cuda_graph else {}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def make_session(model_path: str | Path, device: str = "cpu", custom_ops: bool = False, cuda_graph: bool = False,
                 profile: str | None = None):
    """An InferenceSession for one graph file; custom_ops registers bytedeploy's ONNX Runtime custom ops; cuda_graph
    enables CUDA graph capture (device "cuda"); profile turns ONNX Runtime's profiler on (a file prefix)."""
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
        providers = providers_for(device)
        if device == "cuda":
            providers = cuda_providers(cuda_graph)
        session = ort.InferenceSession(model, sess_options=session_options(custom_ops, profile), providers=providers)
    except UserError:
        raise
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented, ...)
        raise UserError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0]}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise UserError(CUDA_DID_NOT_START)
    return session


class OrtRunner:
    """The runner interface over ONNX Runtime sessions, created lazily per graph."""

    name = "ort"

    def __init__(self, bundle: Bundle, device: str = "cpu", cuda_graphs: bool | None = None,
                 profile: str | None = None):
        """cuda_graphs: capture the bound steps on the CUDA provider [default: yes, unless BYTEDEPLOY_ORT_CUDA_GRAPHS
        is 0]; profile: a folder for ONNX Runtime's profiles (one file per graph's session)."""
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("BYTEDEPLOY_ORT_CUDA_GRAPHS", "1") != "0"
        self.bundle = bundle
        self.device = device
        self.profile = profile
        self.fusions = os.environ.get("BYTEDEPLOY_ORT_FUSIONS", "1") != "0"
        providers_for(device)  # fail early, with the message, when the provider is missing
        self.sessions = {}
        self.capturing = set()  # graphs whose session captures CUDA graphs
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.cuda_graph_errors: dict[str, str] = {}  # graph -> why it runs without CUDA graphs
        self.graph_ids: dict[str, int] = {}  # graph -> CUDA graphs captured (gpu_graph_id) so far
        self.workspaces = {}  # loops' buffers and bound calls, kept across generate calls (see workspace())

    def session(self, graph: str, capture: bool = False):
        capture = capture and self.cuda_graphs and graph not in self.cuda_graph_errors
        if graph not in self.sessions:
            spec = self.bundle.graph(graph)
            try:
                self.sessions[graph] = make_session(
                    self.graph_file(graph), self.device, custom_ops=bool(spec.custom_ops), cuda_graph=capture,
                    profile=str(Path(self.profile) / graph) if self.profile else None)
            except UserError as e:
                if not capture:
                    raise
                self.cuda_graph_errors[graph] = str(e)
                return self.session(graph)
            if capture:
                self.capturing.add(graph)
        return self.sessions[graph]

    def graph_file(self, graph: str) -> Path:
        """The file this runner runs for a graph: its ONNX Runtime variant, where the bundle has one."""
        spec = self.bundle.graph(graph)
        if spec.ort_file and self.fusions:
            return self.bundle.path / spec.ort_file
        return self.bundle.graph_path(graph)

    def value(self, host: np.ndarray):
        """A copy of a host array on the runner's device."""
        # a copy even on the CPU, where an OrtValue would otherwise share the array's memory
        try:
            return import_ort().OrtValue.ortvalue_from_numpy(np.array(host, order="C"), self.device, 0)
        except Exception:  # ORT's own exception types: no memory of that device here
            if self.device == "cuda":
                raise UserError(CUDA_DID_NOT_START) from None
            raise

    def zeros(self, shape, dtype):
        return self.value(np.zeros(shape, dtype=dtype))

    def write(self, value, host: np.ndarray) -> None:
        """New contents for a value (same shape and dtype), in place: a bound input keeps its address."""
        host = np.ascontiguousarray(host)
        if host.nbytes != value.tensor_size_in_bytes() or list(host.shape) != value.shape():
            raise ValueError(f"cannot write a {host.dtype} {host.shape} array into a {value.data_type()} "
                             f"{value.shape()} value")
        value.update_inplace(host)

    def workspace(self, key, make):
        """The loop's buffers and bound calls for key (a graph, a batch size, ...): make() on first use, then the same
        ones, so that CUDA graphs are captured once per key across generate calls."""
        if key not in self.workspaces:
            self.workspaces[key] = make()
        return self.workspaces[key]

    def run(self, graph: str, feeds: dict, outputs: dict | None = None) -> dict:
        """One call. feeds: name -> numpy array or runner value; outputs: name -> a runner value to write into (an
        input's value: in place); the other outputs are new runner values. Returns name -> value."""
        return OrtCall(self, graph, feeds, outputs or {}, capture=False)()

    def bind(self, graph: str, feeds: dict, outputs: dict, capture: bool = False) -> OrtCall:
        """The graph call with its inputs and outputs bound once (see the module docstring)."""
        return OrtCall(self, graph, feeds, outputs, capture)

    def to_numpy(self, value) -> np.ndarray:
        """A host copy (on the CPU provider OrtValue.numpy() shares the value's memory, which later calls write)."""
        return np.array(value.numpy()) if not isinstance(value, np.ndarray) else value


class OrtCall:
    """One graph's IOBinding, kept: calling it runs the graph on the bound values (in a CUDA graph of its own when
    captured)."""

    def __init__(self, runner: OrtRunner, graph: str, feeds: dict, outputs: dict, capture: bool):
        self.runner, self.graph, self.outputs = runner, graph, dict(outputs)
        self.feeds = {name: v if isinstance(v, import_ort().OrtValue) else np.ascontiguousarray(v)
                      for name, v in feeds.items()}
        self.capture = capture
        self.make_binding()

    def make_binding(self) -> None:
        ort = import_ort()
        runner = self.runner
        self.session = runner.session(self.graph, self.capture)
        self.captured = self.capture and self.graph in runner.capturing
        binding = self.session.io_binding()
        for name, value in self.feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        self.names = [o.name for o in self.session.get_outputs()]
        for name in self.names:
            if name in self.outputs:
                binding.bind_ortvalue_output(name, self.outputs[name])
            else:
                binding.bind_output(name, runner.device)
        self.binding = binding
        self.options = ort.RunOptions()
        if self.graph in runner.capturing:
            graph_id = -1  # a session that captures: runs of calls that do not are not captured
            if self.captured:
                graph_id = runner.graph_ids.get(self.graph, 0)
                runner.graph_ids[self.graph] = graph_id + 1
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def __call__(self) -> dict:
        try:
            self.session.run_with_iobinding(self.binding, self.options)
        except Exception as e:  # ORT's own exception types
            if not self.captured:
                raise UserError(f"ONNX Runtime failed to run graph {self.graph}: {str(e).splitlines()[0]}") from None
            self.fall_back(e)
            self.session.run_with_iobinding(self.binding, self.options)
        if len(self.outputs) == len(self.names):
            return self.outputs
        return dict(zip(self.names, self.binding.get_outputs()))

    def fall_back(self, error: Exception) -> None:
        """The CUDA provider could not capture this graph: run it, from now on, in a session without CUDA graphs."""
        runner = self.runner
        runner.cuda_graph_errors[self.graph] = str(error).splitlines()[0]
        runner.capturing.discard(self.graph)
        runner.sessions.pop(self.graph, None)
        self.capture = False
        self.make_binding()
