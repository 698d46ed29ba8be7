"""bGPT -> ONNX graphs: the pieces of bytedeploy.models.bgpt.generate_cached, over a static patch-level KV cache.

    patch_prefill       patches (b, N, P) int64 (N prompt patches from position 0), rows (b,), feature (B, C),
                        past_k.i / past_v.i (B, H, T, D) of the patch decoder
                        -> feature_out: feature with row rows[i] set to the last patch's feature of prompt i;
                           present caches (the rows' slots 0..N-1 written)
    patch_decode        patch (B, P) int64, pos (B,) each row's patch position, past caches
                        -> feature (B, C) of the patch at its position, pos_out = pos + 1, present caches (the
                           patch's keys and values at slot pos)
    byte_patch_greedy   feature (B, C), forced (B, P) int64, n_forced (B,) int64
                        -> patch (B, P) int64, logits (B, P, 257): the byte decoder's 16 steps unrolled in one graph,
                           each byte the argmax, or forced[b, i] for i < n_forced[b] (a prompt's partial last patch);
                           after a 256 every byte is 256
    byte_patch          the same with sampling: + u (B, P) uniforms, temperature, top_k, top_p (B,) per row
                        (onnx_graphs.sample_tokens at every byte)

A patch is two calls, byte_patch(_greedy) then patch_decode; their values stay on the device and the loop reads the
patch once (runtimes/bgpt.py). The byte decoder restarts at every patch, so its keys and values live inside the
byte_patch graphs. patch_decode's outputs may overwrite its inputs in place (present caches onto past ones,
feature_out onto the feature) except pos_out. Positions are inputs (learned position embeddings through
GPT2Stack's pos_emb) and the masks are built from tensors (onnx_graphs.slot_mask, attention_mask), so nothing in
the graphs depends on a Python int taken from a traced shape.

With --patch-decode plugin, one more graph:

    patch_decode_fused  feature (B, C), forced (B, P) int32 (the first n_forced bytes of the patch), n_forced (1,)
                        int32 -> patch (B, P) int32: one bytedeploy::BytePatchDecode node (the TensorRT plugin of
                        plugins/trt_plugins.py) that decodes the whole patch, its byte decoder weights and sampling
                        settings (FUSED_SAMPLING: greedy) in the node's attributes. Runtimes other than TensorRT
                        keep using byte_patch (ONNX Runtime has no implementation of the op).
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
    SAMPLING_INPUTS,
    attention_mask,
    cache_axes,
    cache_names,
    check_exported,
    count_up,
    empty_caches,
    export_graph,
    export_opset,
    prefill_caches,
    row_caches,
    sample_tokens,
    sampling_example,
    slot_caches,
    slot_mask,
    written,
)
from bytedeploy.families.bgpt import FUSED, SPECIAL
from bytedeploy.models.bgpt import N_SYMBOLS, Model
from bytedeploy.plugins.patch_decode import plugin_fields_of
from bytedeploy.sampling import SamplingConfig
from bytedeploy.verify import VerifyCase

PATCH_DECODE_MODES = ("plugin",)
FUSED_OP = "BytePatchDecode"
FUSED_SAMPLING = SamplingConfig(temperature=0.0)  # baked into the node; runtimes use it for matching requests only


class PatchPrefill(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, patches, rows, feature, *caches):
        stack = self.model.patch_decoder
        step_caches = row_caches(list(caches), rows)
        x = self.model.embed_patches(patches)
        positions = count_up(patches[0, :, 0])
        h = stack(x, step_caches, attn_mask=attention_mask(None, positions, x.dtype), pos_emb=stack.wpe(positions))
        return (feature.index_put((rows,), h[:, -1].to(feature.dtype)), *written(step_caches))


class PatchDecode(nn.Module):
    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, patch, pos, *caches):
        stack = self.model.patch_decoder
        at = torch.minimum(pos, count_up(caches[0][0, 0, :, 0])[-1])[:, None]
        step_caches = slot_caches(list(caches), at)
        x = self.model.embed_patches(patch[:, None])
        h = stack(x, step_caches, attn_mask=slot_mask(caches[0], at, x.dtype), pos_emb=stack.wpe(at))
        return (h[:, -1], pos + 1, *written(step_caches))


class BytePatch(nn.Module):
    """The byte decoder's patch_size steps, unrolled: each reads the byte before (the feature first), chooses the next
    byte and feeds it on; forced bytes replace the chosen ones, and after a 256 every byte is 256 (generate_patch)."""

    def __init__(self, model: Model, sampled: bool):
        super().__init__()
        self.model, self.sampled = model, sampled

    def forward(self, feature, forced, n_forced, *sampling):
        m, P = self.model, self.model.cfg.patch_size
        stack = m.byte_decoder
        caches = prefill_caches(len(stack.h))
        x = feature[:, None].to(m.byte_wte.weight.dtype)
        seen = torch.zeros_like(n_forced, dtype=torch.bool)
        patch, logits = [], []
        for i in range(P):
            h = stack(x, caches, pos_emb=stack.wpe.weight[i:i + 1])
            step_logits = m.lm_head(h[:, -1])
            if self.sampled:
                u, temperature, top_k, top_p = sampling
                byte = sample_tokens(step_logits, u[:, i], temperature, top_k, top_p, N_SYMBOLS)
            else:
                byte = step_logits.argmax(-1)
            byte = torch.where(n_forced > i, forced[:, i], byte)
            byte = torch.where(seen, torch.full_like(byte, SPECIAL), byte)
            seen = seen | (byte == SPECIAL)
            patch.append(byte)
            logits.append(step_logits)
            if i + 1 < P:
                x = m.byte_wte(byte)[:, None]
        return torch.stack(patch, 1), torch.stack(logits, 1)


def check_generative(cfg) -> None:
    if cfg.task != "generate":
        raise UserError("exporting a bGPT classifier is not supported; export a generative (task=generate) bGPT")


def export_graphs(model: Model, cfg, folder: Path, precision: str, bitlinear, opset: int,
                  patch_decode: str | None = None):
    check_generative(cfg)
    if patch_decode is not None and patch_decode not in PATCH_DECODE_MODES:
        raise UserError(f"unknown --patch-decode {patch_decode!r}; choose {', '.join(PATCH_DECODE_MODES)}")
    opset = export_opset(opset)
    B, N, P, T, C = 2, 3, cfg.patch_size, 5, cfg.n_embd
    L, H = cfg.n_layer, cfg.n_head
    dtype = model.byte_wte.weight.dtype
    g = torch.Generator().manual_seed(0)
    patches = torch.randint(0, N_SYMBOLS, (B, N, P), generator=g)
    caches = empty_caches(L, B, H, T, C // H, dtype)
    past, present = cache_names(L), cache_names(L, "present")
    axes = cache_axes(L)
    batch = {0: "batch"}
    graphs = [export_graph(
        PatchPrefill(model), "patch_prefill", (patches, torch.tensor([1, 0]), torch.zeros(B, C, dtype=dtype),
                                               *caches), folder, ["patches", "rows", "feature", *past],
        ["feature_out", *present],
        {"patches": {0: "batch", 1: "patches"}, "rows": batch, "feature": batch, "feature_out": batch, **axes}, opset)]
    graphs.append(export_graph(
        PatchDecode(model), "patch_decode", (patches[:, 0], torch.tensor([2, 4]), *caches), folder,
        ["patch", "pos", *past], ["feature", "pos_out", *present],
        {"patch": batch, "pos": batch, "feature": batch, "pos_out": batch, **axes}, opset))
    byte_args = (torch.zeros(B, C, dtype=dtype), patches[:, 1], torch.tensor([0, 3]))
    byte_names = ["feature", "forced", "n_forced"]
    byte_axes = {name: batch for name in [*byte_names, *SAMPLING_INPUTS, "patch", "logits"]}
    graphs.append(export_graph(BytePatch(model, sampled=False), "byte_patch_greedy", byte_args, folder, byte_names,
                               ["patch", "logits"], byte_axes, opset))
    u = torch.full((B, P), 0.5)
    graphs.append(export_graph(BytePatch(model, sampled=True), "byte_patch",
                               (*byte_args, u, *sampling_example(B)[1:]), folder, [*byte_names, *SAMPLING_INPUTS],
                               ["patch", "logits"], byte_axes, opset))
    if patch_decode is None:
        return graphs, {"opset": opset}
    graphs.append(export_fused_patch_decode(model, folder, opset))
    return graphs, {"patch_decode": patch_decode, "patch_decode_sampling": asdict(FUSED_SAMPLING), "opset": opset}


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
    """patch_prefill over 4 random patches into static caches of n_patches slots, then decode_steps patch_decode
    steps (as many as the context allows), each fed the eager caches of the call before; then byte_patch_greedy on
    the prefill's and the last decode's features with every byte forced (teacher forcing: random bytes), whose
    logits are the byte decoder's over [feature, bytes]."""
    check_generative(cfg)
    B, P = batch_size, cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    n_prompt = min(4, cfg.n_patches - 1)
    patches = torch.randint(0, N_SYMBOLS, (B, n_prompt, P), generator=g)
    caches = model.patch_decoder.make_caches(B, cfg.n_patches)
    past, present = cache_names(cfg.n_layer), cache_names(cfg.n_layer, "present")
    state = lambda names: dict(zip(names, [t.numpy().copy() for t in [c.k for c in caches] + [c.v for c in caches]]))
    dtype = model.byte_wte.weight.dtype
    before = state(past)
    feature = model.encode_patches(patches, caches, 0)[:, -1]
    cases = [VerifyCase("patch_prefill", "patch_prefill",
                        {"patches": patches.numpy(), "rows": np.arange(B),
                         "feature": np.zeros((B, cfg.n_embd), dtype=feature.numpy().dtype), **before},
                        {"feature_out": feature.numpy(), **state(present)})]
    features = [feature]
    for step in range(min(decode_steps, cfg.n_patches - n_prompt)):
        pos = n_prompt + step
        patch = torch.randint(0, N_SYMBOLS, (B, P), generator=g)
        before = state(past)
        feature = model.encode_patches(patch[:, None], caches, pos)[:, -1]
        cases.append(VerifyCase("patch_decode", f"patch_decode {step + 1}",
                                {"patch": patch.numpy(), "pos": np.full(B, pos, dtype=np.int64), **before},
                                {"feature": feature.numpy(), **state(present)}))
        features.append(feature)
    for i, feature in enumerate([features[0], features[-1]]):
        forced = torch.randint(0, SPECIAL, (B, P), generator=g)  # real bytes: no 256 to end the patch
        logits = model.byte_logits(feature.to(dtype), forced[:, :-1])
        cases.append(VerifyCase("byte_patch_greedy", f"byte_patch p{i}",
                                {"feature": feature.numpy(), "forced": forced.numpy(),
                                 "n_forced": np.full(B, P, dtype=np.int64)}, {"logits": logits.numpy()}))
    return cases
