"""bGPT's sampling loop over a bundle's graphs (patch_prefill, patch_decode, byte_step; see exporters/bgpt.py).

The same loop as bytedeploy.models.bgpt.generate_cached, step for step: the prompt's whole patches go through
patch_prefill, each new patch is sampled byte by byte with byte_step (its first call reads the patch feature and
the prompt's forced tail bytes), and the finished patch goes through patch_decode. Caches and features stay runner
values; only the logits come to the host, where the shared sampler draws with the same seeded CPU generator.

On the trt backend, a bundle exported with --patch-decode plugin has the patch_decode_fused graph (the
BytePatchDecode TensorRT plugin): each patch is then one call of it instead of patch_size byte_step calls, when the
request's sampling is the one baked into the graph (greedy; the plugin draws with its own generator). ONNX Runtime
has no implementation of that op, so the ort backends never open the graph (their sessions are made per graph on
first use) and keep the byte_step loop.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.exporters.bgpt import FUSED
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models.bgpt import SPECIAL, UNIT, patches_to_bytes, plan_generation
from bytedeploy.sampling import SamplingConfig, make_generator, sample


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    if cfg.task != "generate":
        raise UserError("this bundle holds a bGPT classifier; it cannot generate")
    patches, tail, max_patches = plan_generation(cfg, request)
    float_type = bundle.input_dtype("byte_step", "feature")
    fused = use_fused(bundle, runner, request.sampling)
    t0 = time.perf_counter()
    outs = generate_loop(cfg, runner, float_type, patches, tail, max_patches, request.sampling, request.batch_size,
                         fused)
    seconds = time.perf_counter() - t0
    if request.max_new:
        outs = [o[:request.max_new] for o in outs]
    return GenerateResult(outs, sum(len(o) for o in outs), seconds, UNIT)


def use_fused(bundle, runner, sampling: SamplingConfig) -> bool:
    """Decode patches with patch_decode_fused: on TensorRT, with the graph, for the sampling baked into it."""
    baked = bundle.extra.get("patch_decode_sampling")
    if runner.name != "trt" or FUSED not in bundle.graphs or baked is None:
        return False
    baked = SamplingConfig(**baked)
    return (baked.greedy and sampling.greedy) or baked == sampling


def generate_loop(cfg, runner, float_type: np.dtype, prompt: np.ndarray, tail: np.ndarray, max_patches: int,
                  sampling: SamplingConfig, batch_size: int, fused: bool = False) -> list[bytes]:
    """generate_cached's loop; float_type is the graphs' (float32 or float16), for the empty inputs; fused: each
    patch from one patch_decode_fused call."""
    gen = make_generator(sampling.seed, "cpu")
    B, n0 = batch_size, len(prompt)
    x = np.ascontiguousarray(np.broadcast_to(prompt[None], (B, n0, cfg.patch_size)))
    out = runner.run("patch_prefill", {"patches": x, "positions": np.arange(n0, dtype=np.int64)})
    feature, past = out["feature"], (out["present_k"], out["present_v"])
    forced = np.ascontiguousarray(np.broadcast_to(tail[None], (B, len(tail))))
    done = np.zeros(B, dtype=bool)
    pos, rows = n0, []
    for _ in range(max_patches):
        if fused:
            patch = fused_patch(cfg, runner, feature, forced)
        else:
            patch = generate_patch(cfg, runner, float_type, feature, forced, sampling, gen)
        patch[done] = SPECIAL
        rows.append(patch[:, forced.shape[1]:])
        done |= (patch == SPECIAL).any(-1)
        if done.all() or pos + 1 >= cfg.n_patches:
            break
        out = runner.run("patch_decode", {"patch": patch[:, None], "positions": np.array([pos], dtype=np.int64),
                                          "past_k": past[0], "past_v": past[1]})
        feature, past = out["feature"], (out["present_k"], out["present_v"])
        pos += 1
        forced = forced[:, :0]
    return [patches_to_bytes(r) for r in np.concatenate(rows, 1)]


def fused_patch(cfg, runner, feature, forced: np.ndarray) -> np.ndarray:
    """One patch for every row from one patch_decode_fused call: feature (B, 1, C) as patch_prefill / patch_decode
    return it, forced (B, k) -> (B, P) int64 with the forced bytes in front."""
    B, k = forced.shape
    padded = np.zeros((B, cfg.patch_size), dtype=np.int32)
    padded[:, :k] = forced
    out = runner.run(FUSED, {"feature": feature[:, 0], "forced": padded, "n_forced": np.array([k], dtype=np.int32)})
    return runner.to_numpy(out["patch"]).astype(np.int64)


def generate_patch(cfg, runner, float_type: np.dtype, feature, forced: np.ndarray, sampling: SamplingConfig,
                   gen: torch.Generator) -> np.ndarray:
    """One patch for every row (generate_patch of the eager loop): byte_step over [feature, forced bytes] with an
    empty past, then one sampled byte per call. Rows that emitted 256 keep emitting 256."""
    P, (B, k) = cfg.patch_size, forced.shape
    head_dim = cfg.n_embd // cfg.byte_n_head
    empty = np.zeros((cfg.byte_n_layer, B, cfg.byte_n_head, 0, head_dim), dtype=float_type)
    no_feature = np.zeros((B, 0, cfg.n_embd), dtype=float_type)
    out = runner.run("byte_step", {"feature": feature, "bytes": forced, "positions": np.arange(1 + k, dtype=np.int64),
                                   "past_k": empty, "past_v": empty})
    seen = (forced == SPECIAL).any(-1)
    tokens = [forced]
    for i in range(k, P):
        logits = torch.from_numpy(runner.to_numpy(out["logits"]))
        token = sample(logits, sampling, gen).numpy().astype(np.int64)
        token = np.where(seen, SPECIAL, token)
        seen = seen | (token == SPECIAL)
        tokens.append(token[:, None])
        if i + 1 < P:
            out = runner.run("byte_step", {"feature": no_feature, "bytes": token[:, None],
                                           "positions": np.array([i + 1], dtype=np.int64),
                                           "past_k": out["present_k"], "past_v": out["present_v"]})
    return np.concatenate(tokens, 1)
