"""The native GPU runtime: static KV caches, decode steps captured as CUDA graphs, sampling on the device.

    generate(model, cfg, family, request) -> GenerateResult

runs a checkpoint's model (on a CUDA device) with one loop per family, each in runtimes/native_<family>.py:

  bgpt        prefill the patch decoder, then one CUDA graph per patch: the fused patch decode
              (bytedeploy.plugins.patch_decode: the patch's 16 byte steps) followed by the patch decoder's step on
              the new patch; one host check per patch (have all rows emitted the end mark?).
  char-gpt2   a captured cached step per token while the context has room, then a captured full-window pass per
  bitnet      token (the families' eager semantics); BitNet's BitLinears run the W2A8 kernel
              (bytedeploy.plugins.bitlinear_kernels) when it is there, else fake quantization with cached weights.
  sigma-gpt   the cached autoregressive loop in the requested order, one captured step per token.
  bfn         one captured denoising step (network, draw, Bayesian update) replayed n_steps times.

Why one graph serves every step: positions and step counters live in device tensors that the graph itself
advances, KV caches are the static bytedeploy.kv_cache buffers written with index_copy_ at the device position,
and attention always spans the whole cache with a mask built from the position (keys not yet written are masked
out). Sampling is bytedeploy.sampling.sample (exponential race: no host sync) with a seeded CUDA generator that
is registered with each graph, so replays advance its Philox offset exactly as eager calls would.

At batch <= 4 the GPT-2-shaped families' decode steps (gpt2_step, and bGPT's byte loop) run the fused Triton
kernels of bytedeploy.plugins.decode_kernels: five kernels per block instead of about twenty; KERNELS = "torch"
(env BYTEDEPLOY_NATIVE_KERNELS=torch) keeps the torch path below.

Greedy outputs equal the family's eager backend: the step functions call the model's own modules in the same
order; the only numerical difference is attention over the masked full cache instead of the cache's written
prefix (float32: differences at rounding level, tokens identical unless two logits tie to ~1e-6).

Captured runners are cached on the model and reused while the model's weights are unchanged, so the
first call pays for the capture (reported as extra["captured"]) and later calls replay.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.kv_cache import KVCache
from bytedeploy.registry import family_module

FAMILIES = {
    "bgpt": "bytedeploy.runtimes.native_bgpt",
    "char-gpt2": "bytedeploy.runtimes.native_char_gpt2",
    "sigma-gpt": "bytedeploy.runtimes.native_sigma_gpt",
    "bitnet": "bytedeploy.runtimes.native_bitnet",
    "bfn": "bytedeploy.runtimes.native_bfn",
}
NO_CUDA = "the native backend needs a CUDA GPU"


def generate(model, cfg, family: str, request: GenerateRequest) -> GenerateResult:
    """Run the family's native loop on a model that sits on a CUDA device."""
    loop = family_module(FAMILIES, family,
                         f"the native backend has no loop for family {family!r}; it runs {', '.join(FAMILIES)}")
    device = require_cuda(model)
    model.eval()
    with torch.no_grad(), torch.cuda.device(device):
        return loop.generate(model, cfg, request)


def require_cuda(model) -> torch.device:
    if not torch.cuda.is_available():
        raise UserError(NO_CUDA)
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise UserError(f"the native backend runs models on a CUDA device; this one is on {device} "
                        f"(use --device cuda)")
    return device


# ----------------------------------------------------------------------------------------------- CUDA graphs


def capture(fn: Callable[[], None], generator: torch.Generator | None = None, pool=None,
            warmup: int = 1) -> torch.cuda.CUDAGraph:
    """Run fn on a side stream (lazy initialisation: cuBLAS handles, kernel selection), then record it as a CUDA
    graph. fn reads and writes only static tensors. Its warm-up run really executes: the caller resets positions,
    flags and the generator's seed afterwards."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        if not hasattr(graph, "register_generator_state"):
            raise UserError(f"torch {torch.__version__} cannot capture a seeded generator in a CUDA graph "
                            f"(CUDAGraph.register_generator_state is missing); the native backend needs torch >= 2.5")
        graph.register_generator_state(generator)
    # A dead runner in a reference cycle freed by the garbage collector in the middle of a capture would reset its
    # CUDA graph while the stream captures, which invalidates this capture (torch.cuda.graph no longer collects first
    # unless torch.compiler.config.force_cudagraph_gc). Seen on an H100: "operation not permitted when stream is
    # capturing (function reset)", then every later kernel failed.
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            fn()
    finally:
        gc.enable()
    return graph


RUNNERS_ATTRIBUTE = "_bytedeploy_native_runners"


class RunnerCache(dict):
    """The model's captured runners: left behind when the model is copied or pickled (CUDA graphs are neither)."""

    def __deepcopy__(self, memo):
        return RunnerCache()

    def __reduce__(self):
        return RunnerCache, ()


def cached_runner(model, key: tuple, build: Callable[[], object]):
    """The runner for (model, key), built once while the model's weights are unchanged: each parameter's version
    (in-place updates, e.g. a training step), storage, dtype and device are part of the key, so .half(), .to() or
    assigning .data makes a new one; so do other KERNELS, ATTENTION, pdl.ENABLED and decode_kernels.PREFETCH_KV
    settings. The runner lives on the model (it refers to the model, so a cache beside it would keep the model
    alive) and goes with it."""
    from bytedeploy.plugins import decode_kernels, pdl

    weights = tuple(weight_states(model, []))
    runners = model.__dict__.setdefault(RUNNERS_ATTRIBUTE, RunnerCache())
    full_key = (key, weights, KERNELS, ATTENTION, pdl.ENABLED, decode_kernels.PREFETCH_KV)
    if full_key not in runners:
        runners.clear()  # one live runner per model: graphs hold their memory pools
        runners[full_key] = build()
        runners[full_key].captured_now = True
    else:
        runners[full_key].captured_now = False
    return runners[full_key]


def weight_states(module: torch.nn.Module, states: list) -> list:
    """(version, data pointer, dtype, device) of every parameter of module and its submodules, appended to states
    (a tied parameter once per module that holds it). What module.parameters() walks, a third of its time: it
    builds every submodule's name, and on a slow host the key of a bGPT base (189 parameters) took 0.7 ms of each
    generate() that way, while the GPU waited."""
    for p in module._parameters.values():
        if p is not None:
            states.append((p._version, p.data_ptr(), p.dtype, p.device))
    for child in module._modules.values():
        if child is not None:
            weight_states(child, states)
    return states


def sampling_key(sampling) -> tuple:
    """What a captured graph bakes in of the sampling settings (the seed is reset per call instead)."""
    return (sampling.top_k, sampling.top_p, sampling.temperature)


def sync() -> None:
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- GPT-2 step


def attention_bias(key_mask: torch.Tensor, dtype) -> torch.Tensor:
    """Boolean mask (T, L), True = may attend -> additive bias (0 or -inf), made once per step for every layer."""
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, float("-inf"))


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q (B, H, T, D) over the whole cache k, v (B, H, L, D) with an additive bias (T, L).

    ATTENTION "manual": matmul, softmax, matmul; "sdpa": F.scaled_dot_product_attention with the float bias;
    "auto" (default): manual in float32 (SDPA's float32 path is the memory-efficient kernel, ~20 us a call for a
    single query on an H100), SDPA in float16 / bfloat16 (flash kernels)."""
    if ATTENTION == "manual" or (ATTENTION == "auto" and q.dtype == torch.float32):
        scores = torch.matmul(q * (1.0 / math.sqrt(q.size(-1))), k.transpose(-2, -1)) + bias
        return torch.matmul(scores.softmax(-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


ATTENTION = "auto"


def attention_step(attn, x: torch.Tensor, cache: KVCache, slots: torch.Tensor, bias: torch.Tensor):
    """layers.CausalSelfAttention with the T new keys written at cache slots (T,) (a device tensor) and the
    queries attending over the whole cache under the additive bias (T, L) (attention_bias)."""
    B, T, C = x.shape
    H = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    cache.k.index_copy_(2, slots, k.to(cache.k.dtype))
    cache.v.index_copy_(2, slots, v.to(cache.v.dtype))
    y = cache_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), bias)
    return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def gpt2_step(stack, embeds: torch.Tensor, caches: list[KVCache], slots: torch.Tensor, key_mask: torch.Tensor,
              pos_emb: torch.Tensor | None = None) -> torch.Tensor:
    """layers.GPT2Stack.forward for T new inputs at cache slots (T,) -> hidden (B, T, C); key_mask (T, L), True =
    may attend. pos_emb defaults to the learned positions of the slots (an input's position is its slot, as in the
    eager loops). One new input per row of at most decode_kernels.MAX_ROWS rows runs the fused Triton blocks
    (fused_blocks); keys after the input's slot are then never attended (every caller decodes causally)."""
    if pos_emb is None:
        pos_emb = stack.wpe(slots)
    x = embeds + pos_emb
    if fused_blocks(x):
        from bytedeploy.plugins.decode_kernels import blocks_step

        B, _, C = x.shape
        return stack.ln_f(blocks_step(stack, x.view(B, C), caches, slots, key_mask).view(B, 1, C))
    bias = attention_bias(key_mask, x.dtype)
    for block, cache in zip(stack.h, caches):
        x = x + attention_step(block.attn, block.ln_1(x), cache, slots, bias)
        x = x + block.mlp(block.ln_2(x))
    return stack.ln_f(x)


KERNELS = os.environ.get("BYTEDEPLOY_NATIVE_KERNELS", "auto")  # "auto": fused Triton blocks where they apply; "torch"


def fused_blocks(x: torch.Tensor) -> bool:
    """Does gpt2_step run x (B, T, C) through the fused decode kernels (plugins/decode_kernels.py)? For T = 1 and
    B <= MAX_ROWS where Triton runs, unless KERNELS is "torch" or torch.compile is tracing (Inductor fuses then)."""
    from bytedeploy.plugins import decode_kernels

    if KERNELS == "torch" or x.size(1) != 1 or x.size(0) > decode_kernels.MAX_ROWS:
        return False
    if 4 * x.size(2) > decode_kernels.MAX_K:  # the MLP's input rows must fit ln_linear's registers
        return False
    if torch.compiler.is_compiling() or not x.is_contiguous():
        return False
    return decode_kernels.available(x.device)


def step_mask(positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """(1, L) mask of the cache slots a query at slot (1,) sees: every slot up to its own."""
    return (positions <= slot)[None]


# ----------------------------------------------------------------------------------------------- windowed LMs


class WindowedLM:
    """The decode loop of char GPT-2 and BitNet: absolute positions in a context of T tokens. While the newest token
    fits (index < T) one cached step per token; after that the window slides and every step re-runs the last T
    tokens from position 0 (the families' eager semantics). Both steps are CUDA graphs over static buffers:

      seq (B, n_total)  prompt window then new tokens      logits (B, V)  for the next draw
      pos (1,)          index of the next token in seq      window (B, T)  the last T tokens (window phase)

    step(tokens (B, 1), slot (1,), key_mask (1, T)) -> logits (B, V) runs one cached step;
    window_pass(window (B, T)) -> logits (B, V) the full pass; prefill(tokens (B, n0)) -> logits (B, V) fills the
    caches; transform(logits) -> logits is applied before each draw (char GPT-2 masks its unknown symbol)."""

    def __init__(self, batch_size: int, n0: int, max_new: int, context: int, vocab: int, device, sampling,
                 step, window_pass, prefill, transform=None, use_graphs: bool = True):
        from bytedeploy.models.sampling import make_generator

        self.B, self.n0, self.max_new, self.T = batch_size, n0, max_new, context
        self.sampling, self.step, self.window_pass, self.prefill = sampling, step, window_pass, prefill
        self.transform = transform or (lambda logits: logits)
        self.generator = make_generator(sampling.seed, device)
        self.seq = torch.zeros(batch_size, n0 + max_new, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch_size, vocab, dtype=torch.float32, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.window = torch.zeros(batch_size, context, dtype=torch.long, device=device)
        self.positions = torch.arange(context, device=device)
        self.graphs = {}
        if use_graphs:
            pool = torch.cuda.graph_pool_handle()
            if n0 < context:
                self.graphs["cached"] = capture(self.cached_step, self.generator, pool)
            if n0 + max_new > context:
                self.graphs["window"] = capture(self.window_step, self.generator, pool)

    def draw(self) -> torch.Tensor:
        from bytedeploy.models.sampling import sample

        token = sample(self.transform(self.logits), self.sampling, self.generator)
        self.seq.index_copy_(1, self.pos, token[:, None])
        return token

    def cached_step(self) -> None:
        token = self.draw()
        slot = self.pos.clamp(max=self.T - 1)  # only the warm-up can ask past the context: keep it in bounds
        self.logits.copy_(self.step(token[:, None], slot, step_mask(self.positions, slot)))
        self.pos.add_(1)

    def window_step(self) -> None:
        token = self.draw()
        self.window.copy_(torch.cat([self.window[:, 1:], token[:, None]], 1))
        self.logits.copy_(self.window_pass(self.window))
        self.pos.add_(1)

    def run(self, window_ids: list[int], seed: int) -> torch.Tensor:
        """window_ids: the prompt's last <= T tokens -> new tokens (B, max_new) on the device."""
        self.generator.manual_seed(seed)
        n0 = self.n0
        self.seq[:, :n0] = torch.tensor(window_ids, dtype=torch.long, device=self.seq.device)
        self.pos.fill_(n0)
        self.logits.copy_(self.prefill(self.seq[:, :n0]))
        for k in range(self.max_new):
            n = n0 + k  # index of the token this step draws
            if n < self.T:
                self.replay("cached", self.cached_step)
            else:
                if n == self.T:  # entering the window phase (n0 <= T, so every run passes here)
                    self.window.copy_(self.seq[:, n - self.T:n])
                self.replay("window", self.window_step)
        return self.seq[:, n0:]

    def replay(self, name: str, fn) -> None:
        graph = self.graphs.get(name)
        if graph is None:
            fn()
        else:
            graph.replay()
