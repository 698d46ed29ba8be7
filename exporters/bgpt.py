"""bGPT -> three ONNX graphs, the pieces of bytedeploy.models.bgpt.generate_cached:

    patch_prefill  patches (B, N, P) int64, positions (N,)
                   -> feature (B, 1, C) of the last patch, present_k / present_v (L, B, H, N, D)
    patch_decode   patch (B, 1, P) int64, positions (1,), past_k / past_v (L, B, H, T, D)
                   -> feature (B, 1, C), present_k / present_v (L, B, H, T+1, D)
    byte_step      feature (B, F, C) with F = 1 (the first call of a patch: [feature, forced bytes]) or F = 0 (one
                   more byte), bytes (B, K) int64, positions (F+K,), past_k / past_v of the byte decoder
                   -> logits (B, 257) of the last position, present_k / present_v

With --patch-decode plugin, a fourth graph:

    patch_decode_fused  feature (B, C), forced (B, P) int32 (the first n_forced bytes of the patch), n_forced (1,)
                        int32 -> patch (B, P) int32: one bytedeploy::BytePatchDecode node (the TensorRT plugin of
                        plugins/trt_plugins.py) that decodes the whole patch, its byte decoder weights and sampling
                        settings (FUSED_SAMPLING: greedy) in the node's attributes. Runtimes other than TensorRT
                        keep using byte_step (ONNX Runtime has no implementation of the op).

Positions are inputs (learned position embeddings through GPT2Stack's pos_emb) and the causal mask is built from
tensors (onnx_graphs.attention_mask), so nothing in the graphs depends on a Python int taken from a traced shape.
The feature output has the shape the byte_step input wants, so a runtime passes it on as a device value.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS, GraphSpec, TensorSpec
from bytedeploy.exporters.onnx_graphs import (
    CACHE_AXES,
    PRESENT_AXES,
    attention_mask,
    cache_arrays,
    check_exported,
    export_graph,
    layer_caches,
    prefill_caches,
    stacked,
)
from bytedeploy.models.bgpt import N_SYMBOLS, Model
from bytedeploy.plugins.patch_decode import plugin_fields_of
from bytedeploy.sampling import SamplingConfig
from bytedeploy.verify import VerifyCase

N_FORCED = 3  # forced bytes in the verify cases' first byte_step call (a prompt's partial last patch)
PATCH_DECODE_MODES = ("plugin",)
FUSED = "patch_decode_fused"
FUSED_OP = "BytePatchDecode"
FUSED_SAMPLING = SamplingConfig(temperature=0.0)  # baked into the node; runtimes use it for matching requests only


class PatchPrefill(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, patches, positions):
        stack = self.model.patch_decoder
        caches = prefill_caches(len(stack.h))
        x = self.model.embed_patches(patches)
        h = stack(x, caches, attn_mask=attention_mask(None, positions, x.dtype), pos_emb=stack.wpe(positions))
        return (h[:, -1:], *stacked(caches))


class PatchDecode(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, patch, positions, past_k, past_v):
        stack = self.model.patch_decoder
        caches = layer_caches(past_k, past_v)
        x = self.model.embed_patches(patch)
        mask = attention_mask(past_k[0, 0, 0, :, 0], positions, x.dtype)
        h = stack(x, caches, attn_mask=mask, pos_emb=stack.wpe(positions))
        return (h[:, -1:], *stacked(caches))


class ByteStep(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, feature, bytes_in, positions, past_k, past_v):
        m = self.model
        caches = layer_caches(past_k, past_v)
        x = torch.cat([feature.to(m.byte_wte.weight.dtype), m.byte_wte(bytes_in)], 1)
        mask = attention_mask(past_k[0, 0, 0, :, 0], positions, x.dtype)
        h = m.byte_decoder(x, caches, attn_mask=mask, pos_emb=m.byte_decoder.wpe(positions))
        return (m.lm_head(h[:, -1]), *stacked(caches))


def empty_cache(stack, batch_size: int, dtype) -> np.ndarray:
    """(L, B, H, 0, D): the past of a decoder's first call."""
    c = stack.cfg
    return np.zeros((c.n_layer, batch_size, c.n_head, 0, c.n_embd // c.n_head), dtype=dtype)


def check_generative(cfg) -> None:
    if cfg.task != "generate":
        raise UserError("exporting a bGPT classifier is not supported; export a generative (task=generate) bGPT")


def export_graphs(model: Model, cfg, folder: Path, precision: str, bitlinear, opset: int,
                  patch_decode: str | None = None):
    check_generative(cfg)
    if patch_decode is not None and patch_decode not in PATCH_DECODE_MODES:
        raise UserError(f"unknown --patch-decode {patch_decode!r}; choose {', '.join(PATCH_DECODE_MODES)}")
    B, N, P = 2, 3, cfg.patch_size
    g = torch.Generator().manual_seed(0)
    patches = torch.randint(0, N_SYMBOLS, (B, N, P), generator=g)
    prefill = PatchPrefill(model)
    feature, pk, pv = prefill(patches, torch.arange(N))
    graphs = [export_graph(
        prefill, "patch_prefill", (patches, torch.arange(N)), folder, ["patches", "positions"],
        ["feature", "present_k", "present_v"],
        {"patches": {0: "batch", 1: "patches"}, "positions": {0: "patches"}, "feature": {0: "batch"},
         "present_k": {1: "batch", 3: "patches"}, "present_v": {1: "batch", 3: "patches"}}, opset)]
    graphs.append(export_graph(
        PatchDecode(model), "patch_decode", (patches[:, :1], torch.tensor([N]), pk, pv), folder,
        ["patch", "positions", "past_k", "past_v"], ["feature", "present_k", "present_v"],
        {"patch": {0: "batch"}, "feature": {0: "batch"}, "past_k": CACHE_AXES, "past_v": CACHE_AXES,
         "present_k": PRESENT_AXES, "present_v": PRESENT_AXES}, opset))
    # Traced with a feature, two bytes and a non-empty past so that no axis is specialised to 0 or 1.
    byte_caches = model.byte_decoder.make_caches(B, P + 1)
    model.byte_logits(feature[:, 0], patches[:, 0, :2], byte_caches, 0)
    past_k = torch.stack([c.k[:, :, :3] for c in byte_caches])
    past_v = torch.stack([c.v[:, :, :3] for c in byte_caches])
    graphs.append(export_graph(
        ByteStep(model), "byte_step", (feature, patches[:, 0, 3:5], torch.tensor([3, 4, 5]), past_k, past_v),
        folder, ["feature", "bytes", "positions", "past_k", "past_v"], ["logits", "present_k", "present_v"],
        {"feature": {0: "batch", 1: "n_feature"}, "bytes": {0: "batch", 1: "n_bytes"}, "positions": {0: "new"},
         "past_k": CACHE_AXES, "past_v": CACHE_AXES, "logits": {0: "batch"},
         "present_k": PRESENT_AXES, "present_v": PRESENT_AXES}, opset))
    if patch_decode is None:
        return graphs, {}
    graphs.append(export_fused_patch_decode(model, folder, opset))
    return graphs, {"patch_decode": patch_decode, "patch_decode_sampling": asdict(FUSED_SAMPLING)}


def export_fused_patch_decode(model: Model, folder: Path, opset: int) -> GraphSpec:
    """The patch_decode_fused graph, written with onnx.helper: one node, nothing to trace."""
    cfg = model.cfg
    P, C = cfg.patch_size, cfg.n_embd
    float_type = TensorProto.FLOAT16 if model.byte_wte.weight.dtype == torch.float16 else TensorProto.FLOAT
    attrs = {name: numpy_helper.from_array(a, name) if name == "weights" else a[0].item()
             for name, a in plugin_fields_of(model, FUSED_SAMPLING).items()}
    # plugin_namespace / plugin_version: how TensorRT's ONNX parser finds the plugin (its default namespace is "")
    node = helper.make_node(FUSED_OP, ["feature", "forced", "n_forced"], ["patch"], name="byte_patch_decode",
                            domain=CUSTOM_DOMAIN, plugin_namespace=CUSTOM_DOMAIN,
                            plugin_version=str(CUSTOM_OPS[FUSED_OP]), **attrs)
    inputs = [helper.make_tensor_value_info("feature", float_type, ["batch", C]),
              helper.make_tensor_value_info("forced", TensorProto.INT32, ["batch", P]),
              helper.make_tensor_value_info("n_forced", TensorProto.INT32, [1])]
    outputs = [helper.make_tensor_value_info("patch", TensorProto.INT32, ["batch", P])]
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPS[FUSED_OP])]
    model_proto = helper.make_model(helper.make_graph([node], FUSED, inputs, outputs), opset_imports=opsets,
                                    ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    rel = f"onnx/{FUSED}.onnx"
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model_proto, str(folder / rel))
    custom = check_exported(folder / rel, FUSED, model_proto)
    float_name = "float16" if float_type == TensorProto.FLOAT16 else "float32"
    return GraphSpec(FUSED, rel, [TensorSpec("feature", ["batch", C], float_name),
                                  TensorSpec("forced", ["batch", P], "int32"), TensorSpec("n_forced", [1], "int32")],
                     [TensorSpec("patch", ["batch", P], "int32")], custom)


# ----------------------------------------------------------------------------------------------- verify


@torch.no_grad()
def verify_cases(model: Model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]:
    """patch_prefill over 4 random patches, then decode_steps patch_decode steps (as many as the context allows),
    then byte_step over two whole patches: the first from the prefill's feature with N_FORCED forced bytes, the
    second from the last decode feature with none. Each call is fed the eager caches of the call before."""
    check_generative(cfg)
    B, P = batch_size, cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    n_prompt = min(4, cfg.n_patches - 1)
    patches = torch.randint(0, N_SYMBOLS, (B, n_prompt, P), generator=g)
    patch_caches = model.patch_decoder.make_caches(B, cfg.n_patches)
    feature = model.encode_patches(patches, patch_caches, 0)[:, -1:]
    pk, pv = cache_arrays(patch_caches, n_prompt)
    cases = [VerifyCase("patch_prefill", "patch_prefill",
                        {"patches": patches.numpy(), "positions": np.arange(n_prompt, dtype=np.int64)},
                        {"feature": feature.numpy(), "present_k": pk, "present_v": pv})]
    features = [feature]
    for step in range(min(decode_steps, cfg.n_patches - n_prompt)):
        pos = n_prompt + step
        patch = torch.randint(0, N_SYMBOLS, (B, 1, P), generator=g)
        feeds = {"patch": patch.numpy(), "positions": np.array([pos], dtype=np.int64), "past_k": pk, "past_v": pv}
        feature = model.encode_patches(patch, patch_caches, pos)[:, -1:]
        pk, pv = cache_arrays(patch_caches, pos + 1)
        cases.append(VerifyCase("patch_decode", f"patch_decode {step + 1}", feeds,
                                {"feature": feature.numpy(), "present_k": pk, "present_v": pv}))
        features.append(feature)
    for i, (feature, n_forced) in enumerate([(features[0], min(N_FORCED, P - 1)), (features[-1], 0)]):
        cases += byte_patch_cases(model, feature, n_forced, g, f"byte_step p{i} ")
    return cases


def byte_patch_cases(model: Model, feature: torch.Tensor, n_forced: int, g: torch.Generator, label: str):
    """One patch of byte_step calls: [feature, forced bytes], then one random byte at a time up to P."""
    B, P = feature.size(0), model.cfg.patch_size
    caches = model.byte_decoder.make_caches(B, P + 1)
    empty = empty_cache(model.byte_decoder, B, feature.numpy().dtype)
    forced = torch.randint(0, N_SYMBOLS, (B, n_forced), generator=g)
    feeds = {"feature": feature.numpy(), "bytes": forced.numpy(),
             "positions": np.arange(1 + n_forced, dtype=np.int64), "past_k": empty, "past_v": empty}
    logits = model.byte_logits(feature[:, 0], forced, caches, 0)[:, -1]
    k, v = cache_arrays(caches, 1 + n_forced)
    cases = [VerifyCase("byte_step", f"{label}{1 + n_forced}", feeds,
                        {"logits": logits.numpy(), "present_k": k, "present_v": v})]
    no_feature = feature.numpy()[:, :0]
    for pos in range(1 + n_forced, P):
        byte = torch.randint(0, N_SYMBOLS, (B, 1), generator=g)
        feeds = {"feature": no_feature, "bytes": byte.numpy(), "positions": np.array([pos], dtype=np.int64),
                 "past_k": k, "past_v": v}
        logits = model.byte_logits(None, byte, caches, pos)[:, -1]
        k, v = cache_arrays(caches, pos + 1)
        cases.append(VerifyCase("byte_step", f"{label}{pos + 1}", feeds,
                                {"logits": logits.numpy(), "present_k": k, "present_v": v}))
    return cases
