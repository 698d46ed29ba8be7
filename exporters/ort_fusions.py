"""ONNX Runtime-only variants of a bundle's graphs, with ONNX Runtime's transformer fusions (com.microsoft contrib ops).

At session creation ONNX Runtime already fuses, on the CPU and CUDA providers alike, GELU with its bias (BiasGelu,
FastGelu for the tanh form), MatMul with a transpose or scale (FusedMatMul) and RMSNorm (SimplifiedLayerNormalization);
LayerNorm is one LayerNormalization op in the exported graphs. Two fusions it does not make on our graphs:

  SkipLayerNormalization  residual Add + LayerNorm (+ the projection's bias) in one op. ONNX Runtime's own
                          SkipLayerNormFusion only fuses an Add whose sum feeds the LayerNorm alone (post-LN BERT);
                          in our pre-LN blocks the sum also feeds the next residual Add. onnxruntime.transformers'
                          optimizer (model_type gpt2) keeps that sum as the op's 4th output.
  MultiHeadAttention      our attention, softmax(q k^T scale + mask) v over the whole static cache after the step's
                          in-place write (ScatterElements / ScatterND, kept as they are), as one op: query
                          (B, S, C), key and value the (B, H, T, D) caches, attention_bias the step's additive mask
                          (AttentionFusion below). Exact: the same arithmetic, the cache write untouched.

Contrib ops run on ONNX Runtime only (TensorRT cannot parse them), so export writes the fused graph beside the
standard one, onnx/NAME.ort.onnx, and the graph's manifest entry names it (GraphSpec.ort_file): ONNX Runtime runs
it, TensorRT the standard graph. Graphs without a fusion get no variant. Why not GroupQueryAttention or
DecoderMaskedMultiHeadAttention (which would also write the cache): docs/performance.md, "ONNX Runtime fusions".

This module needs onnxruntime.transformers (and its sympy import): it runs at export time, next to torch.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
from pathlib import Path

import onnx
from onnx import helper
from onnxruntime.transformers.fusion_base import Fusion
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from bytedeploy.exporters.bundle import GraphSpec

MS_DOMAIN = "com.microsoft"
ORT_SUFFIX = ".ort.onnx"


def contrib_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """com.microsoft op type -> how many nodes of it the graph has."""
    return dict(collections.Counter(n.op_type for n in model.graph.node if n.domain == MS_DOMAIN))


def add_ort_variants(folder: Path, graphs: list[GraphSpec]) -> None:
    """Write onnx/NAME.ort.onnx for every graph that ONNX Runtime's fusions change, and set its spec.ort_file.
    Graphs with bytedeploy custom ops (BitLinear plugin) and graphs with external weights (past 2 GB) are left as
    they are."""
    for spec in graphs:
        path = folder / spec.file
        model = onnx.load(str(path), load_external_data=False)
        if spec.custom_ops or any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            continue
        fused = fuse(model)
        if contrib_op_counts(fused):
            rel = spec.file.removesuffix(".onnx") + ORT_SUFFIX
            onnx.save_model(fused, str(folder / rel))
            onnx.checker.check_model(str(folder / rel))
            spec.ort_file = rel


def fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime.transformers' gpt2 fusions (SkipLayerNormalization, BiasGelu, ...; its attention fusions target
    concatenated pasts and find nothing here), then AttentionFusion; -> the fused model (a copy)."""
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    for name in ("fusion_base", "onnx_model", "onnx_model_bert", "fusion_skiplayernorm", "onnx_model_gpt2",
                 "fusion_utils", "symbolic_shape_infer"):  # the optimizer's modules log to their own names
        logging.getLogger(name).setLevel(logging.ERROR)
    options = FusionOptions("gpt2")
    options.enable_attention = False
    # GELU is one ONNX op (opset 20) that ONNX Runtime fuses with its bias at session creation (BiasGelu for the erf
    # form, FastGelu for tanh); the optimizer's BiasGelu fusion would turn the tanh form into the erf one, and its
    # QuickGelu fusion fails on BitNet's SiLU.
    options.enable_gelu = options.enable_bias_gelu = False
    options.enable_embed_layer_norm = False  # it would need word and position embeddings of one graph input
    with contextlib.redirect_stdout(io.StringIO()):  # its shape inference prints its failures (BitNet's graphs)
        optimized = optimize_model(onnx.ModelProto.FromString(model.SerializeToString()), model_type="gpt2",
                                   num_heads=0, hidden_size=0, optimization_options=options, opt_level=0)
        AttentionFusion(optimized).apply()
    optimized.prune_graph(allow_remove_graph_inputs=False)
    optimized.topological_sort()
    if not any(o.domain == MS_DOMAIN for o in optimized.model.opset_import):
        optimized.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return optimized.model


def scalar_constant(onnx_model, name: str) -> float | None:
    """The value of a one-element constant (initializer or Constant node output), else None."""
    value = onnx_model.get_constant_value(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


class AttentionFusion(Fusion):
    """torch's export of scaled_dot_product_attention with a constant scale and an additive mask,

        q4 = Transpose(Reshape(q (B, S, C)), 0213)                  (B, H, S, D)
        p  = Softmax(MatMul(Mul(q4, a), Mul(Transpose(k, 0132), b)) [+ mask])
        y  = Reshape(Transpose(MatMul(p, v), 0213))                 (B, S, C)

    -> y = MultiHeadAttention(q, k, v, attention_bias=mask) with num_heads H and scale a * b; k and v (B, H, T, D)
    as they are (the static caches after the step's write, or the new keys and values). The mask becomes 4-D,
    (B or 1, 1, S, T)."""

    def __init__(self, model):
        super().__init__(model, "MultiHeadAttention", "Softmax")
        self.shapes = model.infer_runtime_shape({}, update=True)
        self.masks_4d: dict[str, str] = {}  # a mask -> its 4-D form, made once for all layers

    def fuse(self, softmax, input_name_to_nodes, output_name_to_node):
        m = self.model
        parent = m.get_parent(softmax, 0, output_name_to_node)
        mask = None
        if parent is not None and parent.op_type == "Add":
            scores = m.get_parent(parent, 0, output_name_to_node)
            mask = parent.input[1]
        else:
            scores, parent = parent, None
        if scores is None or scores.op_type != "MatMul" or len(input_name_to_nodes[softmax.output[0]]) != 1:
            return
        q_path = m.match_parent_path(scores, ["Mul", "Transpose", "Reshape"], [0, 0, 0], output_name_to_node)
        k_path = m.match_parent_path(scores, ["Mul", "Transpose"], [1, 0], output_name_to_node)
        out_path = m.match_child_path(softmax, ["MatMul", "Transpose", "Reshape"], edges=[(0, 0), (0, 0), (0, 0)],
                                      input_name_to_nodes=input_name_to_nodes)
        if q_path is None or k_path is None or out_path is None or self.shapes is None:
            return
        (q_mul, q_transpose, q_reshape), (k_mul, k_transpose) = q_path, k_path
        pv, out_transpose, out_reshape = out_path
        perms = [helper.get_attribute_value(n.attribute[0]) for n in (q_transpose, k_transpose, out_transpose)]
        if perms != [[0, 2, 1, 3], [0, 1, 3, 2], [0, 2, 1, 3]] or pv.input[0] != softmax.output[0]:
            return
        scales = [scalar_constant(m, n.input[1]) for n in (q_mul, k_mul)]
        query, key, value = q_reshape.input[0], k_transpose.input[0], pv.input[1]
        shapes = [self.shapes.get_edge_shape(name) for name in (query, key, value, mask or key)]
        if None in scales or None in shapes or len(shapes[0]) != 3 or len(shapes[1]) != 4 or len(shapes[2]) != 4:
            return
        num_heads = shapes[1][1]
        if not isinstance(num_heads, int) or shapes[2][1] != num_heads:
            return
        inputs = [query, key, value, "", "", ""]
        if mask is not None:
            inputs[5] = self.mask_4d(mask, len(shapes[3]))
            if inputs[5] is None:
                return
        name = m.create_node_name("MultiHeadAttention")
        node = helper.make_node("MultiHeadAttention", inputs, [out_reshape.output[0]], name=name, domain=MS_DOMAIN,
                                num_heads=num_heads, scale=scales[0] * scales[1])
        self.nodes_to_add.append(node)
        self.node_name_to_graph_name[name] = self.this_graph_name
        self.nodes_to_remove.extend([n for n in (softmax, parent, scores, q_mul, k_mul, k_transpose, pv,
                                                 out_transpose, out_reshape) if n is not None])
        self.prune_graph = True

    def mask_4d(self, mask: str, rank: int) -> str | None:
        """The mask as (B or 1, 1, S, T): a (S, T) mask gets two leading axes; a 4-D one is used as it is."""
        if rank == 4:
            return mask
        if rank != 2:
            return None
        if mask not in self.masks_4d:
            axes, name = mask + "/mha_axes", mask + "/mha_unsqueeze"
            self.model.add_initializer(helper.make_tensor(axes, onnx.TensorProto.INT64, [2], [0, 1]),
                                       self.this_graph_name)
            self.masks_4d[mask] = mask + "/mha_4d"
            self.nodes_to_add.append(helper.make_node("Unsqueeze", [mask, axes], [self.masks_4d[mask]], name=name))
            self.node_name_to_graph_name[name] = self.this_graph_name
        return self.masks_4d[mask]
