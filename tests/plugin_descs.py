"""Plugin tensor descriptors for calling the TensorRT plugins' methods directly in tests: TensorRT's own classes when
tensorrt / tensorrt_rtx is installed, else stand-ins with the same attributes."""

from types import SimpleNamespace

from bytedeploy.plugins.trt_plugins import trt


def tensor_desc(type_name: str, dims, fmt: str = "LINEAR"):
    """A PluginTensorDesc."""
    if trt is None:
        return SimpleNamespace(type=SimpleNamespace(name=type_name), dims=tuple(dims),
                               format=SimpleNamespace(name=fmt))
    desc = trt.PluginTensorDesc()
    desc.type, desc.format, desc.dims = getattr(trt.DataType, type_name), getattr(trt.TensorFormat, fmt), trt.Dims(dims)
    return desc


def dynamic_desc(type_name: str, dims, fmt: str = "LINEAR"):
    """A DynamicPluginTensorDesc around tensor_desc."""
    if trt is None:
        return SimpleNamespace(desc=tensor_desc(type_name, dims, fmt))
    desc = trt.DynamicPluginTensorDesc()
    desc.desc = tensor_desc(type_name, dims, fmt)
    return desc


class Expr(SimpleNamespace):
    """A symbolic dimension (symbol=...) or a constant one (constant=...) for get_output_shapes."""


class ExprBuilder:
    def constant(self, value):
        return Expr(constant=value)
