"""ONNX Runtime implementations of bytedeploy's custom ops, so plugin-mode bundles also run in ORT (on the CPU).

The op contract (shared with the TensorRT plugin of the same name, version and namespace; exporters/bitnet.py emits
it):

    bytedeploy::BitLinear, version 1   (ONNX domain "bytedeploy", opset_import version 1)
      inputs   0  x              float32 or float16 (..., K): the output of the BitLinear's RMSNorm (the norm
                                 itself is standard ONNX ops before the node)
               1  packed_weight  uint8 (N, ceil(K / 4)): bitlinear.pack_ternary layout (2 bits per value,
                                 0b00 -> 0, 0b01 -> +1, 0b10 -> -1, input 4j + i in bits 2i..2i+1 of byte j)
               2  weight_scale   float32 (1,): beta, the per-tensor weight scale
      attrs    in_features  (int) = K,  out_features (int) = N
      output   y  (..., N), the dtype of x:
                  bitlinear.bitlinear_int(x, packed_weight, weight_scale, K): per-token absmax int8 activations
                  (s = 127 / max(max|x|, 1e-5), x_int = clip(round(x s), -128, 127)), int32 accumulation of
                  x_int . W_int, then y = acc * (beta / s). A bias, if any, is a standard Add after the node.

How ORT runs it: onnxruntime-extensions runs Python ops, but only in its own domain "ai.onnx.contrib".
``model_for_ort`` therefore returns the graph with every bytedeploy::BitLinear node (and the opset import) moved to
that domain, and registers ``bitlinear_op`` below under the op type "BitLinear"; ``register_custom_ops`` loads the
extensions library into the session options. The op takes float32 x: where x is float16 the node is wrapped in
Casts (bitlinear_int quantizes in float32 anyway, so the result is the same). Each call crosses into Python and
copies its output through a list, so plugin mode on ORT is a correctness path, not a fast one: the qdq bundle is
the fast ORT form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN
from bytedeploy.models.bitlinear import bitlinear_int

ORT_PY_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops live in
ORT_OPS = ("BitLinear",)  # of bytedeploy.exporters.bundle.CUSTOM_OPS, those implemented here


@onnx_op(op_type="BitLinear",
         inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float],
         outputs=[PyCustomOpDef.dt_float],
         attrs={"in_features": PyCustomOpDef.dt_int64, "out_features": PyCustomOpDef.dt_int64})
def bitlinear_op(x, packed_weight, weight_scale, in_features, out_features):
    packed = torch.from_numpy(np.ascontiguousarray(packed_weight, dtype=np.uint8))
    if packed.shape != (out_features, -(-in_features // 4)) or x.shape[-1] != in_features:
        raise ValueError(f"BitLinear: x {x.shape}, packed_weight {tuple(packed.shape)} do not fit in_features "
                         f"{in_features}, out_features {out_features}")
    y = bitlinear_int(torch.from_numpy(np.ascontiguousarray(x)), packed, torch.from_numpy(weight_scale).reshape(()),
                      in_features)
    return y.numpy()


def register_custom_ops(session_options) -> None:
    """Load the library that runs the Python ops above into an onnxruntime.SessionOptions."""
    session_options.register_custom_ops_library(get_library_path())


TENSORRT_ONLY_ATTRIBUTES = ("plugin_namespace", "plugin_version")  # read by TensorRT's ONNX parser


def model_for_ort(path: str | Path) -> bytes | str:
    """The graph at path, with bytedeploy custom ops moved to the domain ORT resolves them in (serialized bytes);
    path itself when the graph has none."""
    model = onnx.load(str(path))
    if not any(n.domain == CUSTOM_DOMAIN for n in model.graph.node):
        return str(path)
    x_types = input_types(model)
    nodes = []
    for node in model.graph.node:
        if node.domain != CUSTOM_DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in ORT_OPS:
            raise UserError(f"{path}: bytedeploy has no ONNX Runtime implementation of {CUSTOM_DOMAIN}::"
                            f"{node.op_type} (it has {', '.join(ORT_OPS)}); run this bundle with --backend trt")
        node.domain = ORT_PY_DOMAIN
        kept = [a for a in node.attribute if a.name not in TENSORRT_ONLY_ATTRIBUTES]
        del node.attribute[:]
        node.attribute.extend(kept)
        x_type = x_types.get(node.input[0], TensorProto.FLOAT)
        if x_type in (TensorProto.FLOAT, 0):
            nodes.append(node)
        else:  # float16 x: run the float32 op between Casts
            x, y = node.input[0], node.output[0]
            node.input[0], node.output[0] = x + "/as_float", y + "/as_float"
            nodes += [helper.make_node("Cast", [x], [node.input[0]], to=TensorProto.FLOAT), node,
                      helper.make_node("Cast", [node.output[0]], [y], to=x_type)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for imp in model.opset_import:
        if imp.domain == CUSTOM_DOMAIN:
            imp.domain = ORT_PY_DOMAIN
    return model.SerializeToString()


def input_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each BitLinear node's x input, where shape inference knows it (0 = unknown)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    return {n.input[0]: types.get(n.input[0], 0) for n in model.graph.node if n.domain == CUSTOM_DOMAIN}
