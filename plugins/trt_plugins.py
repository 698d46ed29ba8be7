"""TensorRT plugins in Python (IPluginV3) for bytedeploy's custom ONNX ops.

    from bytedeploy.plugins.trt_plugins import register_plugins
    register_plugins()   # before parsing an ONNX graph with bytedeploy::BitLinear nodes

``BitLinear`` (namespace "bytedeploy", version "1", matching exporters/bundle.py's CUSTOM_DOMAIN / CUSTOM_OPS and the
exporter's node): inputs x float32/float16 (..., K), packed_weight uint8 (N, ceil(K/4)), weight_scale float32 (1,);
fields in_features K, out_features N; output y (..., N) in x's dtype = bitlinear_int(x, packed, scale, K), computed
by the W2A8 kernel of plugins/bitlinear_kernels.py on TensorRT's stream, directly into TensorRT's output buffer.

The plugin implements IPluginV3 with its three capabilities (IPluginV3OneCore: name/namespace/version;
IPluginV3OneBuild: output types, symbolic output shapes with any leading (batch, sequence) dims, supported
types/formats, configure_plugin; IPluginV3OneRuntime: on_shape_change, enqueue, serialized fields,
attach_to_context) and IPluginCreatorV3One for its creator. The classes derive from ``tensorrt`` or, failing that,
``tensorrt_rtx`` (whose Python module exposes the same plugin interfaces). Without either module they are plain
Python classes with the same methods: ``enqueue`` then still runs the kernel on device pointers with any descriptor
objects that have ``dims``, ``type.name`` and ``format.name``, which is how GPU machines without TensorRT test it.
Data types and formats are compared by name ("FLOAT", "HALF", "UINT8", "LINEAR") for that reason.

Not verified here (TensorRT cannot run engines on these machines): that a TensorRT builder accepts the plugin
inside a real network and that an engine calls it. What the tests check is every method, called directly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS

try:
    import tensorrt as trt
except ImportError:
    try:
        import tensorrt_rtx as trt
    except ImportError:
        trt = None

BITLINEAR = "BitLinear"
BITLINEAR_VERSION = str(CUSTOM_OPS[BITLINEAR])

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "UINT8": torch.uint8}
ARRAY_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1"}

if trt is not None:
    PLUGIN_BASES = (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime)
    CREATOR_BASES = (trt.IPluginCreatorV3One,)
else:
    PLUGIN_BASES = CREATOR_BASES = (object,)


def int_fields(**ints: int) -> dict[str, np.ndarray]:
    return {name: np.array([value], dtype=np.int32) for name, value in ints.items()}


def plugin_fields(arrays: dict[str, np.ndarray]):
    """INT32 plugin fields over `arrays` (see int_fields): a trt.PluginFieldCollection, or without TensorRT records
    with the same name/data. A PluginField keeps only a pointer to its array: keep `arrays` alive with it."""
    if trt is None:
        return [SimpleNamespace(name=name, data=data) for name, data in arrays.items()]
    return trt.PluginFieldCollection([trt.PluginField(name, data, trt.PluginFieldType.INT32)
                                      for name, data in arrays.items()])


def read_int_fields(fields) -> dict[str, int]:
    """{name: int} of a field collection (the ONNX parser passes integer attributes as INT32 or INT64 arrays)."""
    return {f.name: int(np.asarray(f.data).reshape(-1)[0]) for f in fields
            if np.asarray(f.data).dtype.kind in "iu" and np.asarray(f.data).size}


def device_tensor(pointer: int, desc) -> torch.Tensor:
    """A torch CUDA tensor over memory that TensorRT owns (no copy), shaped and typed by the descriptor."""
    shape = tuple(int(d) for d in desc.dims)
    dtype = TORCH_DTYPES[desc.type.name]
    if 0 in shape:
        return torch.empty(shape, dtype=dtype, device="cuda")
    array = SimpleNamespace(__cuda_array_interface__={
        "data": (int(pointer), False), "shape": shape, "typestr": ARRAY_TYPESTR[dtype], "version": 3,
        "stream": None,  # ordering is ours: the kernel runs on TensorRT's stream below
    })
    return torch.as_tensor(array, device="cuda")


class BitLinearPlugin(*PLUGIN_BASES):
    """bytedeploy::BitLinear: y = bitlinear_int(x, packed_weight, weight_scale, in_features), same dtype as x."""

    def __init__(self, in_features: int, out_features: int):
        for base in PLUGIN_BASES:
            if base is not object:
                base.__init__(self)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"BitLinear plugin needs positive in/out features, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fields = int_fields(in_features=self.in_features, out_features=self.out_features)
        self.plugin_name, self.plugin_namespace, self.plugin_version = BITLINEAR, CUSTOM_DOMAIN, BITLINEAR_VERSION
        self.num_outputs = 1
        self.timing_cache_id = ""  # one implementation: nothing to time per instance

    # ---- IPluginV3 / core

    def get_capability_interface(self, capability_type):
        return self

    def clone(self) -> BitLinearPlugin:
        return BitLinearPlugin(self.in_features, self.out_features)

    # ---- build

    def get_output_data_types(self, input_types):
        return [input_types[0]]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        """y's dims: x's leading dims (symbolic: batch, sequence) followed by the constant out_features."""
        x = inputs[0]
        dims = [x[i] for i in range(len(x) - 1)] + [expr_builder.constant(self.out_features)]
        return [type(x)(dims)]  # the input's container type: trt.DimsExprs under TensorRT

    def supports_format_combination(self, pos: int, in_out, num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format.name != "LINEAR":
            return False
        kind = desc.type.name
        if pos == 0:
            return kind in ("FLOAT", "HALF")
        if pos == 1:
            return kind == "UINT8"
        if pos == 2:
            return kind == "FLOAT"
        return kind == in_out[0].desc.type.name  # the output: x's dtype

    def configure_plugin(self, inp, out) -> None:
        self.check_dims([d.desc.dims for d in inp])

    def get_workspace_size(self, inp, out) -> int:
        return 0  # the batch path's few temporaries come from torch's allocator on the same stream

    def get_valid_tactics(self):
        return []

    # ---- runtime

    def on_shape_change(self, inp, out) -> None:
        self.check_dims([d.dims for d in inp])

    def set_tactic(self, tactic) -> None:
        pass

    def attach_to_context(self, resource_context) -> BitLinearPlugin:
        return self.clone()

    def get_fields_to_serialize(self):
        return plugin_fields(self.fields)

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
        from bytedeploy.plugins.bitlinear_kernels import bitlinear_w2a8

        x, packed, scale = (device_tensor(p, d) for p, d in zip(inputs, input_desc))
        y = device_tensor(outputs[0], output_desc[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
            bitlinear_w2a8(x, packed, scale, self.in_features, out=y)

    # ---- helpers

    def check_dims(self, dims) -> None:
        """Raise on input dims that contradict the fields; -1 (not known at build time) passes."""
        x, w, s = (tuple(int(v) for v in d) for d in dims)
        checks = (("x's last dim", x[-1:], (self.in_features,)),
                  ("packed_weight", w, (self.out_features, -(-self.in_features // 4))),
                  ("weight_scale", tuple(v for v in s if v not in (1, -1)), ()))  # one value
        for name, got, expected in checks:
            if len(got) != len(expected) or any(g not in (e, -1) for g, e in zip(got, expected)):
                raise ValueError(f"BitLinear plugin ({self.in_features} -> {self.out_features}): {name} is {got}, "
                                 f"expected {expected}")


class BitLinearPluginCreator(*CREATOR_BASES):
    def __init__(self):
        for base in CREATOR_BASES:
            if base is not object:
                base.__init__(self)
        self.name, self.plugin_namespace, self.plugin_version = BITLINEAR, CUSTOM_DOMAIN, BITLINEAR_VERSION
        self.field_arrays = int_fields(in_features=0, out_features=0)
        self.field_names = plugin_fields(self.field_arrays)

    def create_plugin(self, name, field_collection, phase) -> BitLinearPlugin:
        fields = read_int_fields(field_collection)
        missing = {"in_features", "out_features"} - set(fields)
        if missing:
            raise ValueError(f"BitLinear plugin {name!r}: missing fields {sorted(missing)}")
        return BitLinearPlugin(fields["in_features"], fields["out_features"])


CREATORS = (BitLinearPluginCreator,)
_registered: list = []  # the registry keeps a pointer to each creator: keep the Python objects alive


def register_plugins() -> list[str]:
    """Register every creator with TensorRT's plugin registry once; returns 'namespace::name' of each."""
    if trt is None:
        raise UserError("TensorRT plugins need TensorRT's Python module (tensorrt or tensorrt_rtx), which is not "
                        "installed")
    registry = trt.get_plugin_registry()
    names = []
    for cls in CREATORS:
        creator = cls()
        if registry.get_creator(creator.name, creator.plugin_version, creator.plugin_namespace) is None:
            registry.register_creator(creator, creator.plugin_namespace)
            _registered.append(creator)
        names.append(f"{creator.plugin_namespace}::{creator.name}")
    return names
