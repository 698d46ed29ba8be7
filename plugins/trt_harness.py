"""Drive plugins/trt/harness.cpp: the C++ plugin library's plugins called as TensorRT calls them, without TensorRT.

    harness = Harness.build(folder, library)      # nvcc, against the same TensorRT headers as the library
    report = harness.check("BitLinear", fields, ["HALF", "UINT8", "FLOAT", "HALF"], ["batch,seq,100", "37,25", "1"],
                           folder)                # creators, build and runtime methods: a dict; the serialized
                                                  # fields in folder/serialized (read_fields)
    outputs, report = harness.run("BitLinear", fields, inputs, outputs, folder)        # GPU: enqueue twice
    harness.register()                            # what the library registers on load for Triton
    us = harness.time("BitLinear", fields, inputs, outputs, folder, copies, replays)   # GPU: CUDA graph timing

Fields are {name: 1-D numpy array} of int32, int64 or float32 (node_fields: an exported node's attributes as
TensorRT's ONNX parser passes them). Inputs are numpy arrays, outputs (dtype, shape) pairs; TensorRT's type of each
follows its numpy dtype. Used by tests/test_trt_library.py and benchmarks/trt_plugins.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from bytedeploy.plugins.build_trt import find_nvcc, find_tensorrt_include, source_dir

TRT_TYPES = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64", "int8": "INT8",
             "uint8": "UINT8"}
FIELD_TYPES = {"int32": "INT32", "int64": "INT64", "float32": "FLOAT32"}
PARSER_ONLY_ATTRIBUTES = ("plugin_namespace", "plugin_version")


class HarnessError(RuntimeError):
    """The harness exited with an error (its stderr is the message)."""


def node_fields(node) -> dict[str, np.ndarray]:
    """A custom-op node's attributes as TensorRT's ONNX parser hands them to the creator: INT -> INT32, FLOAT ->
    FLOAT32, a TENSOR -> its values; the parser's own plugin_namespace / plugin_version left out."""
    from onnx import AttributeProto, helper, numpy_helper

    fields = {}
    for a in node.attribute:
        if a.name in PARSER_ONLY_ATTRIBUTES:
            continue
        value = helper.get_attribute_value(a)
        if a.type == AttributeProto.TENSOR:
            fields[a.name] = numpy_helper.to_array(value).reshape(-1)
        else:
            fields[a.name] = np.array([value], dtype=np.int32 if a.type == AttributeProto.INT else np.float32)
    return fields


def write_fields(folder: Path, fields: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, values in fields.items():
        values = np.asarray(values)
        values.tofile(folder / f"{name}.bin")
        lines.append(f"{name} {FIELD_TYPES[values.dtype.name]} {name}.bin")
    (folder / "fields.txt").write_text("\n".join(lines) + "\n")
    return folder


def read_fields(folder: Path) -> dict[str, np.ndarray]:
    dtypes = {v: k for k, v in FIELD_TYPES.items()}
    fields = {}
    for line in (folder / "fields.txt").read_text().splitlines():
        name, kind, file = line.split()
        fields[name] = np.fromfile(folder / file, dtype=dtypes[kind])
    return fields


def write_case(folder: Path, inputs: list[np.ndarray], outputs: list[tuple]) -> Path:
    """folder/inputs.txt and outputs.txt ("TYPE FILE dim..."), the inputs' data beside them."""
    folder.mkdir(parents=True, exist_ok=True)

    def line(name, dtype, shape):
        return " ".join([TRT_TYPES[np.dtype(dtype).name], name, *(str(int(d)) for d in shape)])

    for i, x in enumerate(inputs):
        np.ascontiguousarray(x).tofile(folder / f"input{i}.bin")
    (folder / "inputs.txt").write_text("".join(line(f"input{i}.bin", x.dtype, x.shape) + "\n"
                                               for i, x in enumerate(inputs)))
    (folder / "outputs.txt").write_text("".join(line(f"output{i}.bin", dtype, shape) + "\n"
                                                for i, (dtype, shape) in enumerate(outputs)))
    return folder


class Harness:
    def __init__(self, executable: Path, library: Path):
        self.executable, self.library = Path(executable), Path(library)

    @classmethod
    def build(cls, folder: Path, library: Path, tensorrt_include: str | None = None, nvcc: str | None = None):
        """Compile plugins/trt/harness.cpp into folder (host code, linked with the CUDA runtime and libdl)."""
        folder.mkdir(parents=True, exist_ok=True)
        executable = folder / "trt_plugin_harness"
        include = find_tensorrt_include(tensorrt_include)
        # --export-dynamic: the library finds the harness's getPluginRegistry as it would TensorRT's
        subprocess.run([find_nvcc(nvcc), "-std=c++17", "-O2", "-isystem", str(include),
                        str(source_dir() / "harness.cpp"), "-o", str(executable), "-ldl", "-Xlinker",
                        "--export-dynamic"], check=True, capture_output=True)
        return cls(executable, library)

    def call(self, *args) -> dict:
        result = subprocess.run([str(self.executable), str(self.library), *map(str, args)], capture_output=True,
                                text=True)
        if result.returncode:
            raise HarnessError(result.stderr.strip())
        return json.loads(result.stdout)

    def register(self) -> dict:
        """Load the library as for Triton (BYTEDEPLOY_TRT_PLUGINS_REGISTER=1): what it registered on load."""
        return self.call("register")

    def check(self, plugin: str, fields: dict, types: list[str], dims: list[str], folder: Path) -> dict:
        serialized = folder / "serialized"
        serialized.mkdir(parents=True, exist_ok=True)
        return self.call("check", plugin, write_fields(folder / "fields", fields), serialized, ",".join(types),
                         ";".join(dims))

    def run(self, plugin: str, fields: dict, inputs: list, outputs: list[tuple], folder: Path):
        """-> (the outputs of the second of two enqueues, the report: whether both enqueues gave the same)."""
        case = write_case(folder / "case", inputs, outputs)
        report = self.call("run", plugin, write_fields(folder / "fields", fields), case)
        return [np.fromfile(case / f"output{i}.bin", dtype=dtype).reshape(shape)
                for i, (dtype, shape) in enumerate(outputs)], report

    def time(self, plugin: str, fields: dict, inputs: list, outputs: list[tuple], folder: Path, copies: int,
             replays: int) -> dict:
        case = write_case(folder / "case", inputs, outputs)
        return self.call("time", plugin, write_fields(folder / "fields", fields), case, copies, replays)
