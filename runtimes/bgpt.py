"""bGPT's sampling loop over a bundle's graphs (patch_prefill, patch_decode, byte_step; see exporters/bgpt.py).

The same loop as bytedeploy.models.bgpt.generate_cached, step for step: the prompt's whole patches go through
patch_prefill, each new patch is sampled byte by byte with byte_step (its first call reads the patch feature and
the prompt's forced tail bytes), and the finished patch goes through patch_decode. Caches and features stay runner
values; only the logits come to the host, where the shared sampler draws with the same seeded CPU generator.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models.bgpt import SPECIAL, UNIT, make_prompt, patches_to_bytes
from bytedeploy.sampling import SamplingConfig, make_generator, sample


def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    if cfg.task != "generate":
        raise UserError("this bundle holds a bGPT classifier; it cannot generate")
    patches, tail = make_prompt(cfg, request)
    if len(patches) >= cfg.n_patches:
        raise UserError(f"the prompt fills all {cfg.n_patches} patches; nothing is left to generate")
    max_patches = cfg.n_patches - len(patches)
    if request.max_new:
        max_patches = min(max_patches, -(-(request.max_new + len(tail)) // cfg.patch_size))
    float_type = np.dtype(next(t.dtype for t in bundle.graphs["byte_step"].inputs if t.name == "feature"))
    t0 = time.perf_counter()
    outs = generate_loop(cfg, runner, float_type, patches, tail, max_patches, request.sampling, request.batch_size)
    seconds = time.perf_counter() - t0
    if request.max_new:
        outs = [o[:request.max_new] for o in outs]
    return GenerateResult(outs, sum(len(o) for o in outs), seconds, UNIT)


def generate_loop(cfg, runner, float_type: np.dtype, prompt: np.ndarray, tail: np.ndarray, max_patches: int,
                  sampling: SamplingConfig, batch_size: int) -> list[bytes]:
    """generate_cached's loop; float_type is the graphs' (float32 or float16), for the empty inputs."""
    gen = make_generator(sampling.seed, "cpu")
    B, n0 = batch_size, len(prompt)
    x = np.ascontiguousarray(np.broadcast_to(prompt[None], (B, n0, cfg.patch_size)))
    out = runner.run("patch_prefill", {"patches": x, "positions": np.arange(n0, dtype=np.int64)})
    feature, past = out["feature"], (out["present_k"], out["present_v"])
    forced = np.ascontiguousarray(np.broadcast_to(tail[None], (B, len(tail))))
    done = np.zeros(B, dtype=bool)
    pos, rows = n0, []
    for _ in range(max_patches):
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
