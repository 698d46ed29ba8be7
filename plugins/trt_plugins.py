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

``BytePatchDecode`` (namespace "bytedeploy", version "1"): one whole bGPT patch from its feature, the byte-level
decoder's patch_size steps with on-device sampling (plugins/patch_decode.PatchDecoder). Inputs feature float32 /
float16 (B, n_embd), forced int32 (B, patch_size) (the first n_forced bytes of the patch, the rest ignored),
n_forced int32 (1,); output patch int32 (B, patch_size), bytes 0..255 and 256 = end (a row keeps 256 after its
first). Fields (plugins/patch_decode.PLUGIN_FIELDS): patch_size, n_embd, byte_n_layer, byte_n_head, top_k, seed
(INT32), top_p, temperature (FLOAT32), weights (FLOAT32, the byte decoder's parameters flattened in ByteDecoder's
parameters() order). The first enqueue rebuilds the byte decoder on the GPU in the feature's dtype (cached on the
plugin, as is one PatchDecoder per batch size) and runs the patch's steps as plain kernels on TensorRT's stream:
no CUDA graph capture inside enqueue, which would synchronize the device, and fail when the application itself
captures TensorRT's stream into a graph (then these kernels simply become part of that graph). Sampling draws from
one CUDA generator per plugin, seeded with the seed field when the plugin is created (attach_to_context gives each
execution context a fresh one): a fresh plugin repeats its draws, later calls continue the stream.

Not verified here (TensorRT cannot run engines on these machines): that a TensorRT builder accepts the plugin
inside a real network and that an engine calls it. What the tests check is every method, called directly.

The same two plugins, with the same names, versions, namespace and fields, exist as a C++ library for TensorRT
outside Python (plugins/trt/, libbytedeploy_trt_plugins.so; its BytePatchDecode decodes greedily only). `bytedeploy
build` and the TensorRT runner load that library where it exists and register these Python classes only without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS
from bytedeploy.models.sampling import make_generator
from bytedeploy.plugins.patch_decode import PLUGIN_FIELDS, PatchDecoder, byte_decoder_from_weights, byte_decoder_size
from bytedeploy.sampling import SamplingConfig

try:
    import tensorrt as trt
except ImportError:
    try:
        import tensorrt_rtx as trt
    except ImportError:
        trt = None

BITLINEAR = "BitLinear"
BITLINEAR_VERSION = str(CUSTOM_OPS[BITLINEAR])
PATCH_DECODE = "BytePatchDecode"
PATCH_DECODE_VERSION = str(CUSTOM_OPS[PATCH_DECODE])

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "UINT8": torch.uint8, "INT32": torch.int32}
ARRAY_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.uint8: "|u1", torch.int32: "<i4"}
FIELD_TYPES = {"int32": "INT32", "float32": "FLOAT32"}  # numpy dtype -> PluginFieldType

if trt is not None:
    PLUGIN_BASES = (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime)
    CREATOR_BASES = (trt.IPluginCreatorV3One,)
else:
    PLUGIN_BASES = CREATOR_BASES = (object,)


def int_fields(**ints: int) -> dict[str, np.ndarray]:
    return {name: np.array([value], dtype=np.int32) for name, value in ints.items()}


def plugin_fields(arrays: dict[str, np.ndarray]):
    """INT32 / FLOAT32 plugin fields over int32 / float32 `arrays` (see int_fields): a trt.PluginFieldCollection, or
    without TensorRT records with the same name/data. A PluginField keeps only a pointer to its array: keep `arrays`
    alive with it."""
    if trt is None:
        return [SimpleNamespace(name=name, data=data) for name, data in arrays.items()]
    return trt.PluginFieldCollection([
        trt.PluginField(name, data, getattr(trt.PluginFieldType, FIELD_TYPES[data.dtype.name]))
        for name, data in arrays.items()])


def read_fields(fields) -> dict[str, np.ndarray]:
    """{name: a 1-D copy of its data} of a field collection (TensorRT owns the data only during create_plugin)."""
    return {f.name: np.array(f.data, copy=True).reshape(-1) for f in fields}


def data_type(name: str):
    """TensorRT's DataType of that name, or a stand-in with the name without TensorRT."""
    return SimpleNamespace(name=name) if trt is None else getattr(trt.DataType, name)


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


class Plugin(*PLUGIN_BASES):
    """What both plugins share: the IPluginV3 bases' set-up, identity, and the capability methods whose behaviour is
    the same (shape checks through the subclass's check_dims, no workspace, no tactics, fields serialized as
    given). Subclasses set self.fields and implement clone, the output types/shapes, formats, check_dims and
    enqueue."""

    def __init__(self, name: str, version: str):
        for base in PLUGIN_BASES:
            if base is not object:
                base.__init__(self)
        self.plugin_name, self.plugin_namespace, self.plugin_version = name, CUSTOM_DOMAIN, version
        self.num_outputs = 1
        self.timing_cache_id = ""  # one implementation: nothing to time per instance

    def get_capability_interface(self, capability_type):
        return self

    def configure_plugin(self, inp, out) -> None:
        self.check_dims([d.desc.dims for d in inp])

    def get_workspace_size(self, inp, out) -> int:
        return 0  # temporaries come from torch's allocator, on TensorRT's stream

    def get_valid_tactics(self):
        return []

    def on_shape_change(self, inp, out) -> None:
        self.check_dims([d.dims for d in inp])

    def set_tactic(self, tactic) -> None:
        pass

    def attach_to_context(self, resource_context):
        return self.clone()

    def get_fields_to_serialize(self):
        return plugin_fields(self.fields)


class PluginCreator(*CREATOR_BASES):
    """A creator's set-up: identity and the fields it declares (field_arrays keeps their arrays alive)."""

    def __init__(self, name: str, version: str, field_arrays: dict[str, np.ndarray]):
        for base in CREATOR_BASES:
            if base is not object:
                base.__init__(self)
        self.name, self.plugin_namespace, self.plugin_version = name, CUSTOM_DOMAIN, version
        self.field_arrays = field_arrays
        self.field_names = plugin_fields(self.field_arrays)


class BitLinearPlugin(Plugin):
    """bytedeploy::BitLinear: y = bitlinear_int(x, packed_weight, weight_scale, in_features), same dtype as x."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(BITLINEAR, BITLINEAR_VERSION)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"BitLinear plugin needs positive in/out features, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fields = int_fields(in_features=self.in_features, out_features=self.out_features)

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


class BitLinearPluginCreator(PluginCreator):
    def __init__(self):
        super().__init__(BITLINEAR, BITLINEAR_VERSION, int_fields(in_features=0, out_features=0))

    def create_plugin(self, name, field_collection, phase) -> BitLinearPlugin:
        fields = read_int_fields(field_collection)
        missing = {"in_features", "out_features"} - set(fields)
        if missing:
            raise ValueError(f"BitLinear plugin {name!r}: missing fields {sorted(missing)}")
        return BitLinearPlugin(fields["in_features"], fields["out_features"])


class BytePatchDecodePlugin(Plugin):
    """bytedeploy::BytePatchDecode: patch (B, P) int32 = a bGPT patch decoded from feature (B, C) (module docstring)."""

    def __init__(self, fields: dict[str, np.ndarray]):
        super().__init__(PATCH_DECODE, PATCH_DECODE_VERSION)
        self.fields = {name: np.asarray(fields[name], dtype=dtype).reshape(-1) for name, dtype in PLUGIN_FIELDS.items()}
        ints = {name: int(a[0]) for name, a in self.fields.items() if a.dtype == np.int32}
        self.patch_size, self.n_embd = ints["patch_size"], ints["n_embd"]
        self.n_layer, self.n_head = ints["byte_n_layer"], ints["byte_n_head"]
        if min(self.patch_size, self.n_embd, self.n_layer, self.n_head) < 1 or self.n_embd % self.n_head:
            raise ValueError(f"BytePatchDecode plugin: bad byte decoder config patch_size {self.patch_size}, n_embd "
                             f"{self.n_embd}, byte_n_layer {self.n_layer}, byte_n_head {self.n_head}")
        size = byte_decoder_size(self.patch_size, self.n_embd, self.n_layer, self.n_head)
        if self.fields["weights"].size != size:
            raise ValueError(f"BytePatchDecode plugin: weights has {self.fields['weights'].size} values, the byte "
                             f"decoder of this config has {size}")
        self.sampling = SamplingConfig(ints["top_k"], float(self.fields["top_p"][0]),
                                       float(self.fields["temperature"][0]), ints["seed"])
        self.modules, self.decoders, self.generators = {}, {}, {}  # built on first use, see decoder()

    def clone(self) -> BytePatchDecodePlugin:
        return BytePatchDecodePlugin(self.fields)

    # ---- build

    def get_output_data_types(self, input_types):
        return [data_type("INT32")]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        """patch's dims: feature's (symbolic) batch, then the constant patch_size."""
        feature = inputs[0]
        return [type(feature)([feature[0], expr_builder.constant(self.patch_size)])]

    def supports_format_combination(self, pos: int, in_out, num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format.name != "LINEAR":
            return False
        if pos == 0:
            return desc.type.name in ("FLOAT", "HALF")
        return desc.type.name == "INT32"  # forced, n_forced, patch

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:
        feature, forced, n_forced = (device_tensor(p, d) for p, d in zip(inputs, input_desc))
        patch = device_tensor(outputs[0], output_desc[0])
        with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
            self.decode(feature, forced, n_forced, patch)

    # ---- the computation, on torch tensors

    @torch.no_grad()
    def decode(self, feature, forced, n_forced, patch) -> None:
        """feature (B, C), forced (B, P), n_forced (1,) -> patch (B, P), written in place; tensors of one device
        (enqueue passes TensorRT's buffers; on the CPU this is the reference the tests compare with)."""
        decoder = self.decoder(feature.size(0), feature.device, feature.dtype)
        decoder.feature.copy_(feature)
        decoder.forced.copy_(forced)
        decoder.n_forced.copy_(n_forced.reshape(()))
        decoder.run()
        patch.copy_(decoder.patch)

    def decoder(self, batch_size: int, device, dtype) -> PatchDecoder:
        """The PatchDecoder for this batch size: the byte decoder rebuilt once per device and dtype from the weights
        field, one generator per device (seeded once, shared by every batch size)."""
        key = (device, dtype)
        if key not in self.modules:
            self.modules[key] = byte_decoder_from_weights(self.patch_size, self.n_embd, self.n_layer, self.n_head,
                                                          self.fields["weights"], device, dtype)
        if device not in self.generators:
            self.generators[device] = make_generator(self.sampling.seed, device)
        if (key, batch_size) not in self.decoders:
            self.decoders[key, batch_size] = PatchDecoder(self.modules[key], batch_size, self.sampling,
                                                          self.generators[device], use_graph=False)
        return self.decoders[key, batch_size]

    # ---- helpers

    def check_dims(self, dims) -> None:
        """Raise on input dims that contradict the fields; -1 (not known at build time) passes."""
        feature, forced, n_forced = (tuple(int(v) for v in d) for d in dims)
        checks = (("feature", feature, (-1, self.n_embd)), ("forced", forced, (-1, self.patch_size)),
                  ("n_forced", n_forced, (1,)))
        for name, got, expected in checks:
            if len(got) != len(expected) or any(g not in (e, -1) for g, e in zip(got, expected) if e != -1):
                raise ValueError(f"BytePatchDecode plugin (patch_size {self.patch_size}, n_embd {self.n_embd}): "
                                 f"{name} is {got}, expected {expected} (-1: any batch)")
        if -1 not in (feature[0], forced[0]) and feature[0] != forced[0]:
            raise ValueError(f"BytePatchDecode plugin: feature batch {feature[0]} != forced batch {forced[0]}")


class BytePatchDecodePluginCreator(PluginCreator):
    def __init__(self):
        super().__init__(PATCH_DECODE, PATCH_DECODE_VERSION,
                         {name: np.zeros(1, dtype=dtype) for name, dtype in PLUGIN_FIELDS.items()})

    def create_plugin(self, name, field_collection, phase) -> BytePatchDecodePlugin:
        fields = read_fields(field_collection)
        missing = set(PLUGIN_FIELDS) - set(fields)
        if missing:
            raise ValueError(f"BytePatchDecode plugin {name!r}: missing fields {sorted(missing)}")
        return BytePatchDecodePlugin(fields)


CREATORS = (BitLinearPluginCreator, BytePatchDecodePluginCreator)
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
