"""bGPT's sampling loop over a bundle's graphs (patch_prefill, byte_patch(_greedy), patch_decode; see
exporters/bgpt.py).

The same loop as bytedeploy.models.bgpt.generate_cached, patch for patch: the prompt's whole patches go through
patch_prefill into the patch decoder's static caches, each new patch is one byte_patch call (its 16 byte steps, the
prompt's forced tail bytes in front of the first patch, the sampling inside the graph), and the patch goes through
patch_decode. Caches, feature and patch stay on the runner's device (PatchSteps, bound once per batch size; CUDA
graphs on ort-cuda); the host reads each patch once (its 256 ends the row) and, when sampling, writes the patch's
uniforms, drawn from np.random.default_rng(seed).

On the trt backend, a bundle exported with --patch-decode plugin has the patch_decode_fused graph (the
BytePatchDecode TensorRT plugin): each patch is then one call of it instead of byte_patch's, when the request's
sampling is the one baked into the graph (greedy; the plugin draws with its own generator). ONNX Runtime
has no implementation of that op, so the ort backends never open the graph (their sessions are made per graph on
first use) and keep byte_patch.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.families.bgpt import FUSED, N_SYMBOLS, SPECIAL, UNIT, patches_to_bytes, plan_generation
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.runtimes.windowed import cache_shapes, sampling_arrays, workspace
from bytedeploy.sampling import SamplingConfig


@stepwise
def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    if cfg.task != "generate":
        raise UserError("this bundle holds a bGPT classifier; it cannot generate")
    patches, tail, max_patches = plan_generation(cfg, request)
    fused = use_fused(bundle, runner, request.sampling)
    trim = lambda outs: [o[:request.max_new] for o in outs] if request.max_new else outs
    t0 = time.perf_counter()
    outs = yield from map_steps(generate_loop.steps(bundle, runner, patches, tail, max_patches, request.sampling,
                                                    request.batch_size, fused), trim)
    seconds = time.perf_counter() - t0
    outs = trim(outs)
    return GenerateResult(outs, sum(len(o) for o in outs), seconds, UNIT)


def use_fused(bundle, runner, sampling: SamplingConfig) -> bool:
    """Decode patches with patch_decode_fused: on TensorRT, with the graph, for the sampling baked into it."""
    baked = bundle.extra.get("patch_decode_sampling")
    if runner.name != "trt" or FUSED not in bundle.graphs or baked is None:
        return False
    baked = SamplingConfig(**baked)
    return (baked.greedy and sampling.greedy) or baked == sampling


class PatchSteps:
    """bGPT's state on the device for batch_size rows, and its calls bound to it: byte_patch(_greedy) reads feature,
    forced and n_forced and writes patch; patch_decode[p] reads patch and pos[p] and writes feature and pos[1 - p]."""

    def __init__(self, bundle, runner, batch_size: int):
        cfg = bundle.family_config()
        B, P = batch_size, cfg.patch_size
        self.runner, self.parity = runner, 0
        self.caches = {name: runner.zeros(shape, dtype) for name, shape, dtype in
                       cache_shapes(bundle, "patch_decode", B, cfg.n_patches)}
        self.present = {name.replace("past", "present"): value for name, value in self.caches.items()}
        self.feature = runner.zeros((B, cfg.n_embd), bundle.input_dtype("byte_patch_greedy", "feature"))
        self.patch = runner.zeros((B, P), np.int64)
        self.logits = runner.zeros((B, P, N_SYMBOLS), bundle.input_dtype("byte_patch_greedy", "feature"))
        self.forced, self.n_forced = runner.zeros((B, P), np.int64), runner.zeros((B,), np.int64)
        self.pos = [runner.zeros((B,), np.int64), runner.zeros((B,), np.int64)]
        self.u = runner.zeros((B, P), np.float32)
        self.settings = {name: runner.value(a) for name, a in sampling_arrays([SamplingConfig()] * B).items()}
        self.byte_feeds = {"feature": self.feature, "forced": self.forced, "n_forced": self.n_forced}
        self.byte_out = {"patch": self.patch, "logits": self.logits}
        self.byte_greedy = runner.bind("byte_patch_greedy", self.byte_feeds, self.byte_out, capture=True)
        self.decode = [runner.bind("patch_decode", {"patch": self.patch, "pos": self.pos[p], **self.caches},
                                   {"feature": self.feature, "pos_out": self.pos[1 - p], **self.present},
                                   capture=True) for p in (0, 1)]

    @functools.cached_property
    def byte_sampled(self):
        """byte_patch's bound call, made on the first sampled patch (a greedy loop never loads the graph)."""
        return self.runner.bind("byte_patch", {**self.byte_feeds, "u": self.u, **self.settings}, self.byte_out,
                                capture=True)

    def prefill(self, patches: np.ndarray, rows: np.ndarray) -> None:
        """patch_prefill of prompts (b, N, P) into cache rows `rows`, their features into those rows of feature."""
        self.runner.run("patch_prefill", {"patches": patches, "rows": rows, "feature": self.feature, **self.caches},
                        {"feature_out": self.feature, **self.present})

    def set_sampling(self, samplings: list[SamplingConfig]) -> None:
        for name, a in sampling_arrays(samplings).items():
            self.runner.write(self.settings[name], a)

    def bytes(self, u: np.ndarray | None) -> np.ndarray:
        """One patch for every row (byte_patch_greedy, or byte_patch with the uniforms u (B, P)) -> (B, P) on the
        host."""
        if u is None:
            self.byte_greedy()
        else:
            self.runner.write(self.u, u)
            self.byte_sampled()
        return np.asarray(self.runner.to_numpy(self.patch))

    def decode_patch(self) -> None:
        self.decode[self.parity]()
        self.parity = 1 - self.parity


def patch_steps(bundle, runner, batch_size: int) -> PatchSteps:
    return workspace(runner, ("patches", batch_size), lambda: PatchSteps(bundle, runner, batch_size))


@stepwise
def generate_loop(bundle, runner, prompt: np.ndarray, tail: np.ndarray, max_patches: int, sampling: SamplingConfig,
                  batch_size: int, fused: bool = False) -> list[bytes]:
    """generate_cached's loop; fused: each patch from one patch_decode_fused call. Stepwise: one patch per step."""
    cfg = bundle.family_config()
    rng = np.random.default_rng(sampling.seed)
    B, n0, P = batch_size, len(prompt), cfg.patch_size
    state = patch_steps(bundle, runner, B)
    state.prefill(np.ascontiguousarray(np.broadcast_to(prompt[None], (B, n0, P))), np.arange(B))
    if not sampling.greedy:
        state.set_sampling([sampling] * B)
    k = len(tail)
    forced = np.zeros((B, P), dtype=np.int64)
    forced[:, :k] = tail
    runner.write(state.forced, forced)
    runner.write(state.n_forced, np.full(B, k, dtype=np.int64))
    runner.write(state.pos[state.parity], np.full(B, n0, dtype=np.int64))
    done = np.zeros(B, dtype=bool)
    pos, rows = n0, []
    for _ in range(max_patches):
        if fused:
            patch = fused_patch(runner, state, forced, k)
        else:
            patch = state.bytes(None if sampling.greedy else rng.random((B, P)).astype(np.float32))
        patch[done] = SPECIAL
        rows.append(patch[:, k:])
        done |= (patch == SPECIAL).any(-1)
        if done.all() or pos + 1 >= cfg.n_patches:
            break
        yield lambda: [patches_to_bytes(r) for r in np.concatenate(rows, 1)]
        state.decode_patch()
        pos += 1
        if k:  # only the first patch has forced bytes
            k = 0
            runner.write(state.n_forced, np.zeros(B, dtype=np.int64))
    return [patches_to_bytes(r) for r in np.concatenate(rows, 1)]


def fused_patch(runner, state: PatchSteps, forced: np.ndarray, k: int) -> np.ndarray:
    """One patch for every row from one patch_decode_fused call (its first k bytes forced) -> (B, P) int64, also
    written into state.patch for patch_decode."""
    out = runner.run(FUSED, {"feature": state.feature, "forced": forced.astype(np.int32),
                             "n_forced": np.array([k], dtype=np.int32)})
    patch = runner.to_numpy(out["patch"]).astype(np.int64)
    runner.write(state.patch, patch)
    return patch
