"""Native loop of bGPT: one CUDA graph replay per patch.

The graph holds the fused patch decode (bytedeploy.plugins.patch_decode.PatchDecoder.decode: the patch's byte
steps) and then the patch decoder's step on the new patch, whose last hidden state is the next patch's feature.
Rows that are done (emitted 256) get all-256 patches, as in bgpt.generate_cached. A run's first and last patches
have graphs of their own (BgptRunner.edge_graph): the first prefills the prompt's forced bytes with the feature in
one pass, the last decodes only the bytes asked for and no patch decoder step after it. The host reads one flag per
patch (all rows done?), one patch late so that the next replay is already queued, and otherwise only launches
replays. The prompt's prefill through the patch decoder is a captured graph as well (one per prompt length; a
prompt of one or two patches runs through the fused kernels a patch at a time, as generated patches do). At
batch <= decode_kernels.MAX_ROWS both decoders' steps run the fused Triton kernels
(plugins/decode_kernels.py); options["compile"] = True runs them through torch.compile (Inductor's fused kernels)
instead. With the fused kernels the glue between the two decoders is two kernels too
(decode_kernels.embed_patch: the new patch's bookkeeping and embedding; decode_kernels.patch_feature: the final
LayerNorm, the byte decoder's first input, the positions), so that every kernel of a patch is a PDL launch.
"""

from __future__ import annotations

import time

import torch

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models import bgpt
from bytedeploy.models.sampling import make_generator
from bytedeploy.plugins.patch_decode import SPECIAL, PatchDecoder
from bytedeploy.runtimes.native import cached_runner, capture, gpt2_step, sampling_key, step_mask, sync

MAX_PREFILL_GRAPHS = 8  # captured prompt prefills kept per runner (one per prompt length), the oldest dropped first
MAX_EDGE_GRAPHS = 16  # captured first / last patch graphs kept per runner besides the patch graph, the oldest first
# Prompts of at most this many patches are prefilled one patch at a time in the fused kernels rather than by the
# torch forward pass. bGPT base, float32, H200, GPU time of the captured prefill: 1 patch 0.295 ms fused vs 0.634 ms
# torch, 2 patches 0.464 vs 0.827; 4 patches 0.847 vs 0.778, 8 patches 1.650 vs 1.102 (the torch pass wins)
FUSED_PREFILL_MAX_PATCHES = 2


class BgptRunner:
    """Static buffers: out (B, n_patches, P) generated patches; done (B,); pos (1,) the patch decoder's slot of the
    next patch; index (1,) the next patch's row in out; plus the PatchDecoder's feature / forced / patch."""

    def __init__(self, model, batch_size: int, sampling, compile: bool = False):
        cfg = model.cfg
        device = model.byte_wte.weight.device
        N, P = cfg.n_patches, cfg.patch_size
        self.model, self.N = model, N
        self.generator = make_generator(sampling.seed, device)
        self.decoder = PatchDecoder(model, batch_size, sampling, self.generator, use_graph=False, compile=compile)
        self.caches = model.patch_decoder.make_caches(batch_size, N)
        self.out = torch.full((batch_size, N, P), SPECIAL, dtype=torch.long, device=device)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.all_done = torch.zeros((), dtype=torch.bool, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = torch.arange(N, device=device)
        if self.decoder.fused:  # the patch decoder's slot (min(pos, N - 1)) and input, written by embed_patch
            self.slot = torch.zeros(1, dtype=torch.long, device=device)
            self.patch_x = torch.zeros(batch_size, cfg.n_embd, dtype=self.decoder.feature.dtype, device=device)
        # a run's host inputs, copied in one go: the prompt's patches (up to N), the forced tail bytes (up to P), k
        self.inputs_host = torch.zeros(N * P + P + 1, dtype=torch.long).pin_memory()
        self.inputs = torch.zeros(N * P + P + 1, dtype=torch.long, device=device)
        self.inputs_copied = torch.cuda.Event()
        self.done_host = torch.zeros(N, dtype=torch.bool).pin_memory()  # all_done after each patch, read late
        self.done_events = [torch.cuda.Event() for _ in range(N)]
        self.patch_step = self._patch_step
        if compile:
            self.patch_step = torch.compile(self._patch_step, dynamic=False)
        self.graph = capture(self.patch_then_step, self.generator)
        self.prefill_graphs = {}  # prompt patches T -> (static prompt (B, T, P), its captured prefill)
        # (forced bytes prefilled, bytes decoded, patch decoder step after?) -> a run's first or last patch, captured
        self.edge_graphs = {(0, self.out.size(2), True): self.graph}

    def _patch_step(self, patch: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The new patch (B, P) at the patch decoder's slot -> its feature (B, C)."""
        embeds = self.model.embed_patches(patch[:, None])
        return gpt2_step(self.model.patch_decoder, embeds, self.caches, slot, step_mask(self.positions, slot))[:, -1]

    def prefill(self, prompt, tail=()) -> None:
        """A run's start on the GPU: the state reset (out, done, index, pos = len(prompt)), the forced tail bytes
        set, and the prompt's patches (T, P) through the patch decoder: its cache and the first patch's feature.
        One CUDA graph per prompt length, captured at its first use, reading the prompt and tail from one copy of
        the host's inputs: eager, these few hundred small kernels cost the host several milliseconds, more than a
        dozen patches of generation, and the reset's launches would keep the GPU waiting for the host too."""
        B, T, k = self.done.size(0), len(prompt), len(tail)
        N, P = self.N, self.out.size(2)
        self.inputs_copied.synchronize()  # the previous run's copy has read the pinned buffer
        self.inputs_host[:T * P] = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        self.inputs_host[N * P:N * P + k] = torch.as_tensor(tail, dtype=torch.long)
        self.inputs_host[-1] = k
        self.inputs.copy_(self.inputs_host, non_blocking=True)
        self.inputs_copied.record()
        if T not in self.prefill_graphs:
            if len(self.prefill_graphs) == MAX_PREFILL_GRAPHS:  # each holds its own memory pool
                del self.prefill_graphs[next(iter(self.prefill_graphs))]
            buffer = torch.empty(B, T, P, dtype=torch.long, device=self.done.device)

            def start() -> None:
                self.out.fill_(SPECIAL)
                self.done.zero_()
                self.index.zero_()
                self.pos.fill_(T)
                self.decoder.forced.copy_(self.inputs[N * P:N * P + P].expand(B, P))
                self.decoder.n_forced.copy_(self.inputs[-1])
                buffer.copy_(self.inputs[:T * P].view(1, T, P).expand(B, T, P))
                if self.decoder.fused and T <= FUSED_PREFILL_MAX_PATCHES:
                    self.decoder.feature.copy_(self.encode_fused(buffer))
                else:
                    self.decoder.feature.copy_(self.model.encode_patches(buffer, self.caches, 0)[:, -1])
                if self.decoder.fused:  # the patches' graph expects it done (patch_feature does it after a step)
                    self.decoder.prepare()

            self.prefill_graphs[T] = capture(start)  # its warm-up run executes: real inputs already
        self.prefill_graphs[T].replay()

    def encode_fused(self, patches: torch.Tensor) -> torch.Tensor:
        """A short prompt's patches (B, T, P) through the patch decoder one at a time, in the fused kernels (as the
        patches generated after them) -> the last one's feature (B, C)."""
        from bytedeploy.plugins.decode_kernels import blocks_step

        stack = self.model.patch_decoder
        embeds = self.model.embed_patches(patches)
        for t in range(patches.size(1)):
            x = embeds[:, t] + stack.wpe.weight[t]
            h = blocks_step(stack, x, self.caches, self.positions[t:t + 1], None)
        return stack.ln_f(h)

    def patch_then_step(self, n_prefilled: int = 0, n_bytes: int | None = None, step: bool = True) -> None:
        """One patch and the patch decoder's step on it (what the graph holds); the arguments: see edge_graph."""
        if self.decoder.fused:
            self.patch_then_step_fused(n_prefilled, n_bytes, step)
        else:
            self.patch_then_step_torch(n_prefilled, n_bytes, step)

    def edge_graph(self, n_prefilled: int, n_bytes: int, step: bool) -> torch.cuda.CUDAGraph:
        """The graph of a patch that differs from the others: a run's first patch prefills its n_prefilled forced
        bytes with the feature in one pass (PatchDecoder.prefill_forced); its last one decodes only the first n_bytes
        asked for, with no patch decoder step after it (step False: nothing would read that feature). Captured at its
        first use. Capture runs it once (its warm-up), so the caller captures before a run's prefill, which resets
        what the warm-up touched."""
        key = (n_prefilled, n_bytes, step)
        if key not in self.edge_graphs:
            if len(self.edge_graphs) > MAX_EDGE_GRAPHS:  # each holds its own memory pool; the patch graph stays
                del self.edge_graphs[next(k for k in self.edge_graphs if self.edge_graphs[k] is not self.graph)]
            self.edge_graphs[key] = capture(lambda: self.patch_then_step(*key), self.generator)
        return self.edge_graphs[key]

    def patch_then_step_torch(self, n_prefilled: int = 0, n_bytes: int | None = None, step: bool = True) -> None:
        """The patch (PatchDecoder.decode), then torch glue around gpt2_step (which runs the fused blocks where
        they apply): about twenty small kernels that are not PDL launches."""
        self.decoder.decode(n_bytes, n_prefilled)
        patch = self.decoder.patch.masked_fill(self.done[:, None], SPECIAL)
        self.out.index_copy_(1, self.index.clamp(max=self.N - 1), patch[:, None])
        self.done.logical_or_((patch == SPECIAL).any(-1))
        self.all_done.copy_(self.done.all())
        if not step:
            return
        # after the context's last patch the step is never used: clamping keeps the warm-up and it in bounds
        self.decoder.feature.copy_(self.patch_step(patch, self.pos.clamp(max=self.N - 1)))
        self.pos.add_(1)
        self.index.add_(1)

    def patch_then_step_fused(self, n_prefilled: int = 0, n_bytes: int | None = None, step: bool = True) -> None:
        """patch_then_step in the fused kernels only: the patch (prepared by the previous patch_feature or the
        prefill), embed_patch, the patch decoder's blocks, patch_feature."""
        from bytedeploy.plugins.decode_kernels import blocks_step, embed_patch, patch_feature

        model, decoder, stack = self.model, self.decoder, self.model.patch_decoder
        decoder.decode_fused(prepared=True, n_steps=n_bytes, n_prefilled=n_prefilled)
        embed_patch(decoder.patch, self.done, self.out, self.all_done, self.index, self.pos, self.slot,
                    model.patch_embedding, stack.wpe.weight, self.patch_x, SPECIAL)
        if not step:
            return
        h = blocks_step(stack, self.patch_x, self.caches, self.slot, None)
        patch_feature(h, stack.ln_f, decoder.feature, model.byte_decoder.wpe.weight, decoder.x[0], decoder.seen,
                      self.pos, self.index)

    def run(self, prompt, tail, max_patches: int, seed: int, last_bytes: int | None = None
            ) -> tuple[torch.Tensor, int]:
        """-> (generated patches (B, n, P) with the forced tail bytes still in front, n). last_bytes: of the last
        patch (max_patches - 1) only these first bytes are asked for [all]."""
        k, P = len(tail), self.out.size(2)
        last_bytes = last_bytes or P
        graphs = [self.edge_graph(k, last_bytes if max_patches == 1 else P, max_patches > 1)]
        if max_patches > 1:
            graphs += [self.graph] * (max_patches - 2) + [self.edge_graph(0, last_bytes, False)]
        self.generator.manual_seed(seed)
        self.prefill(prompt, tail)
        n = 0
        for j in range(max_patches):
            graphs[j].replay()
            self.done_host[j].copy_(self.all_done, non_blocking=True)
            self.done_events[j].record()
            n = j + 1
            if j == 0 and k:
                self.decoder.n_forced.fill_(0)
            if len(prompt) + j + 1 >= self.N:
                break
            # the one host check per patch, one patch behind: patch j is already queued when patch j - 1's flag is
            # read, so the GPU never waits for the host; a patch queued after the last one is dropped
            if j >= 1:
                self.done_events[j - 1].synchronize()
                if bool(self.done_host[j - 1]):
                    n = j
                    break
        return self.out[:, :n], n


def last_patch_bytes(cfg, request: GenerateRequest, tail, max_patches: int) -> int:
    """How many bytes of the run's last patch are asked for: those that reach max_new (the forced tail bytes count
    in the first patch), or the whole patch where the context ends first or max_new is 0 (no limit)."""
    wanted = request.max_new + len(tail) - (max_patches - 1) * cfg.patch_size
    return wanted if request.max_new and 0 < wanted < cfg.patch_size else cfg.patch_size


def generate(model, cfg, request: GenerateRequest) -> GenerateResult:
    if cfg.task != "generate":
        raise UserError("this checkpoint is a classifier; use 'bytedeploy eval' to classify files")
    prompt, tail, max_patches = bgpt.plan_generation(cfg, request)
    B, compile = request.batch_size, bool(request.options.get("compile", False))
    sync()
    t0 = time.perf_counter()
    key = ("bgpt", B, sampling_key(request.sampling), compile)
    runner = cached_runner(model, key, lambda: BgptRunner(model, B, request.sampling, compile))
    patches, n = runner.run(prompt, tail, max_patches, request.sampling.seed, last_patch_bytes(cfg, request, tail,
                                                                                              max_patches))
    rows = patches.reshape(B, -1)[:, len(tail):].cpu().numpy()
    outs = [bgpt.patches_to_bytes(r) for r in rows]
    sync()
    seconds = time.perf_counter() - t0
    if request.max_new:
        outs = [o[:request.max_new] for o in outs]
    return GenerateResult(outs, sum(len(o) for o in outs), seconds, bgpt.UNIT,
                          extra={"patches": n, "captured": runner.captured_now, "graphs": ["patch"],
                                 "compile": compile})
