"""The BitLinear TensorRT plugin object, called directly (TensorRT cannot run engines here).

With TensorRT's Python module (tensorrt or tensorrt_rtx): the creator, its fields, registration, and every method
with TensorRT's own descriptor objects. Without it (the GPU machine): the same methods with stand-in descriptors
(objects with dims, type.name, format.name). On a GPU: enqueue on real device pointers and a side stream, bitwise
against bitlinear_int. get_output_shapes always gets stand-in dimension expressions: a real IExprBuilder exists only
inside a TensorRT builder."""


import pytest
import torch
from gpu_marks import gpu_test
from plugin_descs import Expr, ExprBuilder, dynamic_desc, tensor_desc

from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS
from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary
from bytedeploy.plugins import bitlinear_kernels, trt_plugins
from bytedeploy.plugins.trt_plugins import BitLinearPlugin, BitLinearPluginCreator, int_fields, plugin_fields

trt = trt_plugins.trt
needs_trt = pytest.mark.skipif(trt is None, reason="TensorRT's Python module (tensorrt / tensorrt_rtx) is missing")
gpu = gpu_test(bitlinear_kernels.triton is None, "needs a CUDA GPU and Triton")


def make_plugin(K: int, N: int) -> BitLinearPlugin:
    arrays = int_fields(in_features=K, out_features=N)
    return BitLinearPluginCreator().create_plugin("layer0", plugin_fields(arrays),
                                                  None if trt is None else trt.TensorRTPhase.BUILD)


def test_names_match_the_exporters_custom_op():
    creator = BitLinearPluginCreator()
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == ("BitLinear", "1", "bytedeploy")
    assert creator.name in CUSTOM_OPS and creator.plugin_namespace == CUSTOM_DOMAIN
    assert creator.plugin_version == str(CUSTOM_OPS["BitLinear"])
    plugin = make_plugin(100, 37)
    assert (plugin.plugin_name, plugin.plugin_version, plugin.plugin_namespace) == ("BitLinear", "1", "bytedeploy")
    assert plugin.num_outputs == 1 and (plugin.in_features, plugin.out_features) == (100, 37)


def test_creator_rejects_missing_fields():
    with pytest.raises(ValueError, match="out_features"):
        BitLinearPluginCreator().create_plugin("l", plugin_fields(int_fields(in_features=8)), None)


@needs_trt
def test_fields_serialize_and_recreate_with_int64_fields_too():
    import numpy as np

    plugin = make_plugin(100, 37)
    fields = plugin.get_fields_to_serialize()
    assert {f.name: int(f.data[0]) for f in fields} == {"in_features": 100, "out_features": 37}
    assert all(f.type == trt.PluginFieldType.INT32 for f in fields)
    again = BitLinearPluginCreator().create_plugin("l", fields, trt.TensorRTPhase.RUNTIME)
    assert (again.in_features, again.out_features) == (100, 37)
    arrays = {"in_features": np.array([8], np.int64), "out_features": np.array([3], np.int64)}
    int64 = trt.PluginFieldCollection([trt.PluginField(k, a, trt.PluginFieldType.INT64) for k, a in arrays.items()])
    plugin = BitLinearPluginCreator().create_plugin("l", int64, trt.TensorRTPhase.BUILD)
    assert (plugin.in_features, plugin.out_features) == (8, 3)


@needs_trt
def test_register_plugins_once_under_the_bytedeploy_namespace():
    names = ["bytedeploy::BitLinear", "bytedeploy::BytePatchDecode"]
    assert trt_plugins.register_plugins() == names
    assert trt_plugins.register_plugins() == names
    creator = trt.get_plugin_registry().get_creator("BitLinear", "1", "bytedeploy")
    assert creator is not None and creator.name == "BitLinear"
    arrays = int_fields(in_features=16, out_features=4)
    plugin = creator.create_plugin("l", plugin_fields(arrays), trt.TensorRTPhase.BUILD)
    assert plugin.out_features == 4


def test_clone_attach_and_capabilities():
    plugin = make_plugin(64, 32)
    for copy in (plugin.clone(), plugin.attach_to_context(None)):
        assert copy is not plugin and (copy.in_features, copy.out_features) == (64, 32)
    assert plugin.get_capability_interface(None) is plugin
    assert plugin.get_workspace_size([], []) == 0


def test_output_type_follows_x():
    plugin = make_plugin(64, 32)
    types = ["HALF", "UINT8", "FLOAT"]
    if trt is not None:
        types = [getattr(trt.DataType, t) for t in types]
    assert plugin.get_output_data_types(types) == [types[0]]


def test_output_shapes_keep_symbolic_leading_dims():
    plugin = make_plugin(64, 32)
    batch, seq = Expr(symbol="batch"), Expr(symbol="seq")
    inputs = [[batch, seq, Expr(constant=64)], [Expr(constant=32), Expr(constant=16)], [Expr(constant=1)]]
    (out,) = plugin.get_output_shapes(inputs, [], ExprBuilder())
    assert out[0] is batch and out[1] is seq and out[2].constant == 32


def test_supported_formats():
    plugin = make_plugin(100, 37)

    def io(x="HALF", w="UINT8", s="FLOAT", y="HALF", fmt="LINEAR"):
        return [dynamic_desc(x, [-1, 100], fmt), dynamic_desc(w, [37, 25]), dynamic_desc(s, [1]),
                dynamic_desc(y, [-1, 37])]

    for dtype in ("HALF", "FLOAT"):
        assert all(plugin.supports_format_combination(pos, io(dtype, y=dtype), 3) for pos in range(4))
    assert not plugin.supports_format_combination(3, io("HALF", y="FLOAT"), 3)
    assert not plugin.supports_format_combination(0, io("INT8"), 3)
    assert not plugin.supports_format_combination(1, io(w="INT8"), 3)
    assert not plugin.supports_format_combination(2, io(s="HALF"), 3)
    assert not plugin.supports_format_combination(0, io(fmt="CHW4"), 3)


def test_configure_and_shape_change_check_dims():
    plugin = make_plugin(100, 37)
    good = [dynamic_desc("HALF", [-1, 100]), dynamic_desc("UINT8", [37, 25]), dynamic_desc("FLOAT", [1])]
    out = [dynamic_desc("HALF", [-1, 37])]
    plugin.configure_plugin(good, out)
    plugin.on_shape_change([d.desc for d in good], [d.desc for d in out])
    for bad in ([dynamic_desc("HALF", [2, 99])] + good[1:], [good[0], dynamic_desc("UINT8", [37, 26]), good[2]],
                good[:2] + [dynamic_desc("FLOAT", [2])]):
        with pytest.raises(ValueError, match="BitLinear plugin"):
            plugin.configure_plugin(bad, out)


@gpu
@pytest.mark.parametrize("lead,K,N,dtype", [((1,), 4096, 4096, torch.float16), ((2, 10), 100, 37, torch.float32),
                                            ((3,), 256, 130, torch.float16)])
def test_enqueue_on_device_pointers_matches_reference(lead, K, N, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*lead, K, generator=g) * 3).to(dtype).cuda()
    packed = pack_ternary(torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)).cuda()
    scale = torch.tensor([0.031], device="cuda")
    y = torch.full((*lead, N), float("nan"), dtype=dtype, device="cuda")
    x_type = "HALF" if dtype == torch.float16 else "FLOAT"
    plugin = make_plugin(K, N).attach_to_context(None)
    input_desc = [tensor_desc(x_type, x.shape), tensor_desc("UINT8", packed.shape), tensor_desc("FLOAT", [1])]
    output_desc = [tensor_desc(x_type, y.shape)]
    plugin.on_shape_change(input_desc, output_desc)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    plugin.enqueue(input_desc, output_desc, [x.data_ptr(), packed.data_ptr(), scale.data_ptr()], [y.data_ptr()],
                   0, stream.cuda_stream)
    stream.synchronize()
    assert torch.equal(y, bitlinear_int(x, packed, scale, K).to(dtype))
