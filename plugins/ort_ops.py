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
                  ``bitlinear_int`` below computes it in numpy, bit for bit.

How ORT runs it: onnxruntime-extensions runs Python ops, but only in its own domain "ai.onnx.contrib".
``model_for_ort`` therefore returns the graph with every bytedeploy::BitLinear node (and the opset import) moved to
that domain, and registers ``bitlinear_op`` below under the op type "BitLinear"; ``register_custom_ops`` loads the
extensions library into the session options. The op takes float32 x: where x is float16 the node is wrapped in
Casts (bitlinear_int quantizes in float32 anyway, so the result is the same). Each call crosses into Python and
copies its output through a list; the op itself is vectorized numpy: the packed weight unpacked through a 256-entry
table (once per weight: cached by its content) and float32 matrix products, exact because every sum of int8 x
ternary products stays an integer below 2^24 (float32 represents those exactly, whatever the summation order). Its
sessions keep ORT's idle threads from spinning while the op runs on the calling thread (runtimes/ort.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN
from bytedeploy.families.bitnet import ACT_QMAX, EPS, PACK_SHIFTS

ORT_PY_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops live in
ORT_OPS = ("BitLinear",)  # of bytedeploy.exporters.bundle.CUSTOM_OPS, those implemented here


@onnx_op(op_type="BitLinear",
         inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float],
         outputs=[PyCustomOpDef.dt_float],
         attrs={"in_features": PyCustomOpDef.dt_int64, "out_features": PyCustomOpDef.dt_int64})
def bitlinear_op(x, packed_weight, weight_scale, in_features, out_features):
    if packed_weight.shape != (out_features, -(-in_features // 4)) or x.shape[-1] != in_features:
        raise ValueError(f"BitLinear: x {x.shape}, packed_weight {packed_weight.shape} do not fit in_features "
                         f"{in_features}, out_features {out_features}")
    return bitlinear_int(x, packed_weight, weight_scale, in_features)


def ternary_table() -> np.ndarray:
    """(256, 4) float32: the four weights packed in each byte value (w = (c & 1) - (c >> 1) per 2-bit code c)."""
    codes = (np.arange(256, dtype=np.uint8)[:, None] >> np.array(PACK_SHIFTS, dtype=np.uint8)) & 3
    return (codes & 1).astype(np.float32) - (codes >> 1).astype(np.float32)


TERNARY = ternary_table()
MAX_EXACT_FLOAT32_K = 2**24 // 128  # |x_int . W_int| <= 128 K must stay below 2^24 for float32 sums to be exact
# Rows per matrix product. numpy's OpenBLAS threads a product past ~0.5M multiply-adds, and its threads, woken inside
# ORT's call, stalled for 15-30 ms on a loaded 2-core host (80 x 128 x 352: 0.04 ms when they do not); blocks of 8
# rows keep a tiny model's products on the calling thread.
ROW_BLOCK = 8
UNPACKED: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # key -> (packed weight, unpacked_weight's result)
MAX_UNPACKED = 1024  # weights kept; past that the cache starts over


def unpacked_weight(packed_weight: np.ndarray, in_features: int) -> np.ndarray:
    """uint8 (N, ceil(K / 4)) -> float32 (K, N) in {-1, 0, 1}, W_int transposed; unpacked once per weight. ORT hands
    the op a new copy of the initializer on every call, so the cache goes by content: looked up by the shape and the
    first bytes, then compared whole (a memcmp, far cheaper than hashing it)."""
    packed_weight = np.ascontiguousarray(packed_weight, dtype=np.uint8)
    key = (packed_weight.shape, in_features, packed_weight.reshape(-1)[:64].tobytes())
    hit = UNPACKED.get(key)
    if hit is None or not np.array_equal(hit[0], packed_weight):
        if len(UNPACKED) >= MAX_UNPACKED:
            UNPACKED.clear()
        w_int = TERNARY[packed_weight].reshape(len(packed_weight), -1)[:, :in_features]
        hit = UNPACKED[key] = (packed_weight.copy(), np.ascontiguousarray(w_int.T))
    return hit[1]


def bitlinear_int(x: np.ndarray, packed_weight: np.ndarray, weight_scale, in_features: int) -> np.ndarray:
    """bytedeploy.models.bitlinear.bitlinear_int in numpy, bit for bit: x (..., K) -> float32 (..., N)."""
    shape = np.shape(x)
    x = np.asarray(x, dtype=np.float32).reshape(-1, in_features)
    absmax = np.abs(x).max(1, keepdims=True)
    np.maximum(absmax, np.float32(EPS), out=absmax)
    act_scale = np.float32(ACT_QMAX) * np.reciprocal(absmax)  # torch's 127 / t is t.reciprocal() * 127
    x_int = np.rint(x * act_scale)  # in [-127, 127] already (|x| <= absmax): the reference's clip changes nothing
    w_int_t = unpacked_weight(packed_weight, in_features)
    if in_features > MAX_EXACT_FLOAT32_K:
        x_int, w_int_t = x_int.astype(np.float64), w_int_t.astype(np.float64)
    acc = np.concatenate([rows @ w_int_t for rows in np.split(x_int, range(ROW_BLOCK, len(x_int), ROW_BLOCK))])
    y = acc.astype(np.float32) * (np.float32(np.asarray(weight_scale).reshape(())) / act_scale)
    return y.reshape(*shape[:-1], len(packed_weight))


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
