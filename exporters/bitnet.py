"""BitNet -> ONNX: the token step graphs of onnx_graphs (prefill, decode, sample), BitLinear in one of two modes.

    prefill  tokens (b, S) i64 at positions 0..S-1, rows (b,), past_k.i / past_v.i (B, H, T, D)
             -> logits (b, 256) of the last position, present_k.i / present_v.i (the rows' slots 0..S-1 written)
    decode   seq (B, N), pos (B,) i64, past caches -> logits (B, 256) of seq[b, pos[b]] at position pos[b], seq_out
             (the argmax at pos + 1), pos_out, present caches
    sample   logits, u, temperature, top_k, top_p, seq, pos -> seq_out

The runtime loop, like the eager one, re-prefills a sliding window from position 0 once the context is full. The
rotary tables are initializers gathered at the positions (a tensor), each row at its own, so no position is a
constant of the trace. Caches are float32 in fp32 bundles and float16 in fp16 ones.

Every BitLinear is traced as one node: its RMSNorm in standard ops, then ``bytedeploy::BitLinear`` (the custom op
whose contract is at the top of plugins/ort_ops.py) on the norm's float32 output, with the 2-bit packed weights
(bitlinear.pack_ternary) and beta as initializers; the result is cast to the model's dtype. An fp16 bundle quantizes
the fp16-rounded weights (as the eager model does after .half()).

  --bitlinear plugin  the graph keeps those nodes (custom_ops ["bytedeploy::BitLinear"]): TensorRT's plugin and
                      the ONNX Runtime custom op run them.
  --bitlinear qdq     (the default) each node is then rewritten into standard ONNX ops, so any runtime loads it:
                          s   = Reciprocal(Max(ReduceMax(Abs(x), -1), 1e-5)) * 127   per-token scale
                          x_q = Clip(Round(x * s), -128, 127)                        integer-valued float32
                          W   = DequantizeLinear(W_int (K, N) INT4, 1.0)             ternary values as float32
                          y   = MatMul(x_q, W) * (beta / s)
                      The MatMul of integer-valued float32 tensors is exact (every partial sum is an integer below
                      127 K < 2^24 for K < 132,000) and the other ops are torch's in torch's order (127 / t is
                      t.reciprocal() * 127 in torch), so in fp32 the result equals bitlinear.bitlinear_int bit for
                      bit (tests/test_export_bitnet.py). INT4 initializers need DequantizeLinear-21, so qdq graphs
                      are traced at the requested opset, converted to max(opset, 21), and the bundle records that
                      opset. ONNX also has INT2 (DequantizeLinear-25, which ONNX Runtime 1.32 runs); INT4 at opset 21
                      is the older form that more runtimes load, at 4 bits per weight instead of 2.
Rewriting the traced custom node (instead of tracing the standard ops from torch) keeps one trace for both modes
and puts the integer weights in the graph as INT4 initializers, which the torch exporter cannot write.

Comparing with eager (verify): the integer reference is discontinuous. An activation x s within a few float32 ulps
of a rounding boundary rounds one way in torch and the other way in ONNX Runtime, whose RMSNorm sums in another
order; that one activation then moves by one step (absmax / 127) and the token's later outputs by ~1e-3 of their
scale. Eager disagrees with itself the same way. Measured on the tiny test model (batch 3, 16-byte prefill + 8 decode
steps, 40 seeds): ORT vs eager beyond 1e-5 in 4 of 40 prefills and 4 of 320 decode steps, logits up to 1.7e-2 apart
(|logits| ~ 10) and caches up to 2.9e-3; eager with its norm in float64 vs eager: 3 of 40 and 25 of 320, up to
2.1e-2. Hence VERIFY_TOLERANCES: fp32 is exact per BitLinear and within 1e-5 end to end except for such flips
(tests/test_export_bitnet.py checks both).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS
from bytedeploy.exporters.onnx_graphs import cache_names, check_exported, export_token_graphs
from bytedeploy.families.bitnet import FP_MODE
from bytedeploy.models import bitnet
from bytedeploy.models.bitlinear import ACT_QMAX, EPS, BitLinear, bitlinear_int, unpack_ternary
from bytedeploy.verify import VerifyCase

BITLINEAR_MODES = ("qdq", "plugin")
OP_TYPE = "BitLinear"
OP = f"{CUSTOM_DOMAIN}::{OP_TYPE}"
QDQ_OPSET = 21  # DequantizeLinear with INT4 inputs
TRACE_MAX_OPSET = 20  # the TorchScript exporter's newest opset
# `bytedeploy verify` defaults (atol, rtol), see the module docstring. fp32: rounding flips moved logits by up to
# 1.7e-2 and caches by 2.9e-3 (tiny model, 40 seeds). fp16 (fp16 weights, caches and attention; ORT's fp16 kernels
# round differently from torch's): up to 4.3e-2 on logits of ~10 and 5e-3 on caches.
VERIFY_TOLERANCES = {"fp32": (5e-2, 1e-4), "fp16": (1e-1, 2e-2)}



# ----------------------------------------------------------------------------------------------- BitLinear node


class BitLinearFunction(torch.autograd.Function):
    """bitlinear_int in eager; the bytedeploy::BitLinear node in a trace."""

    @staticmethod
    def forward(ctx, x, packed_weight, weight_scale, in_features: int, out_features: int):
        return bitlinear_int(x, packed_weight, weight_scale, in_features).to(x.dtype)

    @staticmethod
    def symbolic(g, x, packed_weight, weight_scale, in_features: int, out_features: int):
        # plugin_namespace / plugin_version: how TensorRT's ONNX parser finds the plugin (its default namespace is "")
        y = g.op(OP, x, packed_weight, weight_scale, in_features_i=in_features, out_features_i=out_features,
                 plugin_namespace_s=CUSTOM_DOMAIN, plugin_version_s=str(CUSTOM_OPS[OP_TYPE]))
        sizes = x.type().varyingSizes()  # None for the dynamic axes
        return y.setType(x.type().with_sizes([*sizes[:-1], out_features]))


class ExportBitLinear(nn.Module):
    """A BitLinear's deployment form: its RMSNorm, then BitLinearFunction on the packed weights, then the bias."""

    def __init__(self, layer: BitLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.norm = layer.norm
        packed, scale, _ = layer.export_int()
        self.register_buffer("packed_weight", packed)
        self.register_buffer("weight_scale", scale.float().reshape(1))
        self.bias = layer.bias

    def forward(self, x):
        y = BitLinearFunction.apply(self.norm(x), self.packed_weight, self.weight_scale, self.in_features,
                                    self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def deployment_copy(model: bitnet.Model) -> bitnet.Model:
    """A copy of the model with every BitLinear swapped for its ExportBitLinear."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                setattr(module, name, ExportBitLinear(child))
    return model


# ----------------------------------------------------------------------------------------------- graphs


def run_layers(model: bitnet.Model, ids, positions, caches, start=0, attn_mask=None):
    """bitnet.Model.logits at the given positions (B or 1, T) (a tensor, traced), the final norm's float32 output
    cast to the LM head's dtype (fp16 bundles) -> logits (B, T, 256). start is for KVCache.update (verify_cases' eager
    run); the graphs' caches ignore it."""
    cos, sin = model.rope_cos[positions][:, None], model.rope_sin[positions][:, None]
    x = model.tok_emb(ids)
    for layer, cache in zip(model.layers, caches):
        x = layer(x, cos, sin, cache, start, attn_mask)
    return model.lm_head(model.norm(x).to(model.lm_head.weight.dtype))


def resolve_mode(bitlinear: str | None) -> str:
    mode = bitlinear or "qdq"
    if mode not in BITLINEAR_MODES:
        raise UserError(f"unknown --bitlinear {bitlinear!r}; choose {', '.join(BITLINEAR_MODES)}")
    return mode


def export_graphs(model: bitnet.Model, cfg: bitnet.Config, folder: Path, precision: str, bitlinear: str | None,
                  opset: int):
    if cfg.mode == FP_MODE:
        raise UserError("this BitNet is the full-precision twin (mode=fp), a training baseline: it has no BitLinear "
                        "weights to export")
    mode = resolve_mode(bitlinear)
    deploy = deployment_copy(model)
    dtype = deploy.tok_emb.weight.dtype
    trace_opset = min(opset, TRACE_MAX_OPSET)
    final_opset = max(opset, QDQ_OPSET) if mode == "qdq" else opset
    step = lambda model, tokens, positions, caches, mask: run_layers(model, tokens, positions, caches, 0, mask)
    graphs = export_token_graphs(deploy, step, folder, cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, dtype,
                                 trace_opset, custom_ops=True)
    if mode == "plugin" and final_opset == trace_opset:
        return graphs, {"bitlinear": mode, "opset": final_opset}  # as traced and checked by export_graph
    for spec in graphs:
        path = folder / spec.file
        model_proto = onnx.load(str(path))
        if final_opset != trace_opset:
            model_proto = convert_opset(model_proto, final_opset)
        if mode == "qdq":
            expand_bitlinear_nodes(model_proto)
        onnx.save_model(model_proto, str(path))
        spec.custom_ops = check_exported(path, spec.name, model_proto)
    return graphs, {"bitlinear": mode, "opset": final_opset}


def convert_opset(model_proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the default-domain opset (every op the trace uses keeps its meaning from 18 to 21+)."""
    converted = onnx.version_converter.convert_version(model_proto, opset)
    converted.ir_version = max(model_proto.ir_version, onnx.helper.find_min_ir_version_for(
        [helper.make_opsetid("", opset)]))
    return converted


# ----------------------------------------------------------------------------------------------- qdq rewrite


def int4_initializer(name: str, values: np.ndarray) -> TensorProto:
    """int8 values in [-8, 7] -> an INT4 initializer (two's complement nibbles, the first element in the low one)."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = (flat.view(np.uint8) & 0x0F).reshape(-1, 2)
    raw = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, TensorProto.INT4, values.shape, raw, raw=True)


def elem_types(model_proto: onnx.ModelProto) -> dict[str, int]:
    """Value name -> ONNX element type, where shape inference knows it."""
    inferred = onnx.shape_inference.infer_shapes(model_proto)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def expand_bitlinear_nodes(model_proto: onnx.ModelProto) -> None:
    """Replace every bytedeploy::BitLinear node by the standard-op computation in the module docstring, in place."""
    g = model_proto.graph
    inits = {t.name: t for t in g.initializer}
    types = elem_types(model_proto)
    shared = [numpy_helper.from_array(np.array(v, dtype=np.float32), name) for name, v in
              [("bitlinear_eps", EPS), ("bitlinear_qmax", ACT_QMAX), ("bitlinear_qmin_clip", -128.0),
               ("bitlinear_qmax_clip", 127.0), ("bitlinear_one", 1.0)]]
    shared.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "bitlinear_last_axis"))
    new_nodes, new_inits, packed_names = [], [], set()
    for node in g.node:
        if node.domain != CUSTOM_DOMAIN or node.op_type != OP_TYPE:
            new_nodes.append(node)
            continue
        x, packed_name, scale = node.input
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        K = attrs["in_features"]
        packed = torch.from_numpy(numpy_helper.to_array(inits[packed_name]).copy())
        w_int = unpack_ternary(packed, K).t().contiguous().numpy()  # (K, N): MatMul's layout
        w_name = f"{packed_name}.int4"
        new_inits.append(int4_initializer(w_name, w_int))
        packed_names.add(packed_name)
        p = node.output[0] + "/"  # unique prefix for this node's intermediates
        x_dtype = types.get(x, TensorProto.FLOAT) or TensorProto.FLOAT
        nodes = [
            helper.make_node("Cast", [x], [p + "x"], to=TensorProto.FLOAT),
            helper.make_node("Abs", [p + "x"], [p + "abs"]),
            helper.make_node("ReduceMax", [p + "abs", "bitlinear_last_axis"], [p + "amax"], keepdims=1),
            helper.make_node("Max", [p + "amax", "bitlinear_eps"], [p + "amax_clamped"]),
            helper.make_node("Reciprocal", [p + "amax_clamped"], [p + "amax_inv"]),  # torch's 127 / t is
            helper.make_node("Mul", [p + "amax_inv", "bitlinear_qmax"], [p + "act_scale"]),  # t.reciprocal() * 127
            helper.make_node("Mul", [p + "x", p + "act_scale"], [p + "scaled"]),
            helper.make_node("Round", [p + "scaled"], [p + "rounded"]),
            helper.make_node("Clip", [p + "rounded", "bitlinear_qmin_clip", "bitlinear_qmax_clip"], [p + "x_q"]),
            helper.make_node("DequantizeLinear", [w_name, "bitlinear_one"], [p + "w"]),
            helper.make_node("MatMul", [p + "x_q", p + "w"], [p + "acc"]),
            helper.make_node("Div", [scale, p + "act_scale"], [p + "rescale"]),
            helper.make_node("Mul", [p + "acc", p + "rescale"],
                             [node.output[0] if x_dtype == TensorProto.FLOAT else p + "y"]),
        ]
        if x_dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [p + "y"], [node.output[0]], to=x_dtype))
        new_nodes.extend(nodes)
    del g.node[:]
    g.node.extend(new_nodes)
    kept = [t for t in g.initializer if t.name not in packed_names]
    del g.initializer[:]
    g.initializer.extend(kept + shared + new_inits)
    opsets = [o for o in model_proto.opset_import if o.domain != CUSTOM_DOMAIN]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(opsets)


# ----------------------------------------------------------------------------------------------- verify


@torch.no_grad()
def verify_cases(model: bitnet.Model, cfg: bitnet.Config, bundle, batch_size: int, decode_steps: int,
                 seed: int) -> list[VerifyCase]:
    """A prefill of random bytes into static caches of the context's length, then decode_steps single-byte steps, each
    fed eager's caches of the step before. Expected: the eager model in the integer reference path
    (set_inference_int), in the model's dtype, with the shared KVCache (whose buffers are the static caches)."""
    prompt_len = max(2, min(16, cfg.block_size - decode_steps))
    if prompt_len + decode_steps > cfg.block_size:
        raise UserError(f"{decode_steps} decode steps after a {prompt_len}-byte prefill exceed the model's "
                        f"context of {cfg.block_size}")
    ref = copy.deepcopy(model).eval().set_inference_int(True)
    total = prompt_len + decode_steps
    ids = torch.randint(0, cfg.vocab_size, (batch_size, total), generator=torch.Generator().manual_seed(seed))
    caches = ref.make_caches(batch_size, cfg.block_size)
    names, present = cache_names(cfg.n_layer), cache_names(cfg.n_layer, "present")
    state = lambda: [t.numpy().copy() for t in [c.k for c in caches] + [c.v for c in caches]]

    before = state()
    logits = run_layers(ref, ids[:, :prompt_len], torch.arange(prompt_len)[None], caches, 0)[:, -1]
    cases = [VerifyCase("prefill", "prefill", {"tokens": ids[:, :prompt_len].numpy(),
                                               "rows": np.arange(batch_size), **dict(zip(names, before))},
                        {"logits": logits.numpy(), **dict(zip(present, state()))})]
    for i in range(decode_steps):
        n = prompt_len + i
        before = state()
        feeds = {"seq": ids.numpy(), "pos": np.full(batch_size, n, dtype=np.int64), **dict(zip(names, before))}
        logits = run_layers(ref, ids[:, n:n + 1], torch.tensor([[n]]), caches, n)[:, -1]
        cases.append(VerifyCase("decode", f"decode {i + 1}", feeds, {"logits": logits.numpy(),
                                                                    **dict(zip(present, state()))}))
    return cases
