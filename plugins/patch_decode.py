"""Fused bGPT patch decoding: from a patch feature, the whole patch (16 bytes) on the GPU in one CUDA graph replay.

The byte-level decoder runs one token per step over a static KV cache of patch_size slots: step 0 reads the patch
feature at position 0, step i the byte drawn at step i - 1 at position i; each step's logits are drawn on the
device (bytedeploy.sampling.sample: top-k, top-p, temperature, exponential race, a seeded CUDA Philox generator
registered with the graph) with no host synchronisation. Forced bytes (a prompt's partial last patch) replace the
draw at steps i < n_forced; a row that emitted 256 (end of content) keeps emitting 256, as in
bgpt.generate_patch. The patch_size steps are captured as one graph, so a patch costs one replay.

Greedy output equals bgpt.generate_patch (which prefills the feature and forced bytes in one pass; here every
input is its own step: the same computation up to float rounding). Seeded sampling is reproducible but draws a
different stream than eager: the draw happens at forced steps too (and is discarded), keeping the graph static.

    decoder = PatchDecoder(model, batch_size, sampling, generator)   # captures
    patch = decoder(feature, forced)                                   # (B, C), (B, k) -> (B, patch_size)

``ByteDecoder`` is the byte-level decoder alone (what PatchDecoder reads of a bgpt.Model), and
``byte_decoder_weights`` / ``byte_decoder_from_weights`` turn it into one flat float32 vector and back: how the
BytePatchDecode TensorRT plugin (plugins/trt_plugins.py) carries the weights as one plugin field.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.runtimes.native import capture, fused_blocks, gpt2_step, weight_states
from bytedeploy.sampling import SamplingConfig

SPECIAL = 256  # bgpt.SPECIAL: end of content / padding
N_SYMBOLS = 257  # bgpt.N_SYMBOLS


class ByteDecoder(nn.Module):
    """bgpt.Model's byte-level decoder, same parameter names: byte_wte, byte_decoder (positions 0..P), lm_head tied
    to byte_wte. Its parameters() order is the flat weight layout: byte_wte.weight, byte_decoder.wpe.weight, then
    per block h.i: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj (weight, bias each), then
    byte_decoder.ln_f (weight, bias); lm_head.weight is byte_wte.weight, stored once."""

    def __init__(self, patch_size: int, n_embd: int, n_layer: int, n_head: int):
        super().__init__()
        self.cfg = SimpleNamespace(patch_size=patch_size, n_embd=n_embd, byte_n_layer=n_layer, byte_n_head=n_head)
        self.byte_wte = nn.Embedding(N_SYMBOLS, n_embd)
        self.byte_decoder = GPT2Stack(GPT2StackConfig(n_layer, n_head, n_embd, patch_size + 1))
        self.lm_head = nn.Linear(n_embd, N_SYMBOLS, bias=False)
        self.lm_head.weight = self.byte_wte.weight


# The BytePatchDecode plugin's fields, name -> dtype (the exporter writes them as the ONNX node's attributes:
# int32 -> INT, float32 -> FLOAT, weights -> a 1-D float32 TENSOR). One flat weights field rather than one per
# tensor: TensorRT's ONNX parser passes only the attributes the creator lists, and that list cannot depend on
# the number of layers.
PLUGIN_FIELDS = {"patch_size": np.int32, "n_embd": np.int32, "byte_n_layer": np.int32, "byte_n_head": np.int32,
                 "top_k": np.int32, "top_p": np.float32, "temperature": np.float32, "seed": np.int32,
                 "weights": np.float32}


def plugin_fields_of(model, sampling: SamplingConfig) -> dict[str, np.ndarray]:
    """A bgpt.Model's byte decoder and the sampling settings -> the BytePatchDecode fields (1-D arrays)."""
    cfg = model.cfg
    values = {"patch_size": cfg.patch_size, "n_embd": cfg.n_embd, "byte_n_layer": cfg.byte_n_layer,
              "byte_n_head": cfg.byte_n_head, "top_k": sampling.top_k, "top_p": sampling.top_p,
              "temperature": sampling.temperature, "seed": sampling.seed}
    fields = {name: np.array([v], dtype=PLUGIN_FIELDS[name]) for name, v in values.items()}
    fields["weights"] = byte_decoder_weights(model)
    return fields


def byte_decoder_weights(model) -> np.ndarray:
    """A bgpt.Model (or ByteDecoder) -> its byte decoder's parameters as one float32 vector (ByteDecoder's layout)."""
    cfg = model.cfg
    with torch.device("meta"):  # only the names and order
        names = [n for n, _ in ByteDecoder(cfg.patch_size, cfg.n_embd, cfg.byte_n_layer, cfg.byte_n_head)
                 .named_parameters()]
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().float().reshape(-1).cpu() for n in names]).numpy()


def byte_decoder_size(patch_size: int, n_embd: int, n_layer: int, n_head: int) -> int:
    """Number of float32 values in the flat weight vector."""
    with torch.device("meta"):
        return sum(p.numel() for p in ByteDecoder(patch_size, n_embd, n_layer, n_head).parameters())


def byte_decoder_from_weights(patch_size: int, n_embd: int, n_layer: int, n_head: int, weights: np.ndarray,
                              device="cpu", dtype=torch.float32) -> ByteDecoder:
    """The inverse of byte_decoder_weights: an eval-mode ByteDecoder on device in dtype, without gradients."""
    module = ByteDecoder(patch_size, n_embd, n_layer, n_head)
    flat = torch.tensor(np.asarray(weights, dtype=np.float32))  # a copy: the module never aliases the field
    nn.utils.vector_to_parameters(flat, module.parameters())
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class PatchDecoder:
    """Static buffers: feature (B, C) in, forced (B, P) and n_forced () in, patch (B, P) out. forced_per_row: n_forced
    is (B,), a count per row (a batch whose rows start their first patches at different steps)."""

    def __init__(self, model, batch_size: int, sampling: SamplingConfig, generator: torch.Generator | None = None,
                 use_graph: bool = True, compile: bool = False, forced_per_row: bool = False):
        cfg = model.cfg
        P, C = cfg.patch_size, cfg.n_embd
        device, dtype = model.byte_wte.weight.device, model.byte_wte.weight.dtype
        self.model, self.B, self.P, self.sampling = model, batch_size, P, sampling
        self.generator = generator if generator is not None else make_generator(sampling.seed, device)
        self.caches = model.byte_decoder.make_caches(batch_size, P)
        self.feature = torch.zeros(batch_size, C, dtype=dtype, device=device)
        self.forced = torch.zeros(batch_size, P, dtype=torch.long, device=device)
        self.n_forced = torch.zeros(batch_size if forced_per_row else (), dtype=torch.long, device=device)
        self.patch = torch.full((batch_size, P), SPECIAL, dtype=torch.long, device=device)
        # one slot tensor and mask row per step: constants of the graph (and stable inputs for torch.compile)
        self.slots = [torch.full((1,), i, dtype=torch.long, device=device) for i in range(P)]
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        self.masks = [causal[i:i + 1].clone() for i in range(P)]
        self.byte_step = self._byte_step
        if compile:
            self.byte_step = torch.compile(self._byte_step, dynamic=False)
        # the fused Triton blocks and byte selection (plugins/decode_kernels.py) where gpt2_step would use them
        self.fused = not compile and fused_blocks(self.feature[:, None])
        if self.fused:  # the rows that emitted the end mark, each step's input, the greedy selection's counters,
            # and what a step's selection writes for the next one (decode_kernels.NextStep)
            from bytedeploy.plugins.decode_kernels import NextStep, first_block_qkv

            self.seen = torch.zeros(batch_size, dtype=torch.bool, device=device)
            self.x = [torch.zeros(batch_size, C, dtype=dtype, device=device) for _ in range(P)]
            self.select_counts = torch.zeros(batch_size, dtype=torch.int32, device=device)
            self.first_qkv = first_block_qkv(model.byte_decoder, model.byte_wte.weight)
            self.first_qkv_states = self.first_block_weight_states()
            self.next_steps = [NextStep(self.x[i + 1], self.first_qkv[i],
                                        torch.zeros(batch_size, 3 * C, dtype=dtype, device=device))
                               for i in range(P - 1)] + [None]
        self.graph = capture(self.decode, self.generator) if use_graph else None

    def _byte_step(self, x: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One input (B, 1, C) at slot -> logits (B, 257)."""
        h = gpt2_step(self.model.byte_decoder, x, self.caches, slot, mask)
        return self.model.lm_head(h)[:, -1]

    def decode(self, n_steps: int | None = None, n_prefilled: int = 0) -> None:
        """The whole patch into self.patch: patch_size byte steps, capturable (no host synchronisation). n_steps < P:
        only the patch's first n_steps bytes, the rest SPECIAL (a run's last patch, of which fewer bytes were
        asked for). n_prefilled (at most n_forced, and 0 with counts per row): that many forced bytes go through the
        byte decoder with the feature in one pass (prefill_forced) instead of a step each."""
        if self.fused:
            return self.decode_fused(n_steps=n_steps, n_prefilled=n_prefilled)
        model, k = self.model, n_prefilled
        x = self.feature[:, None]
        seen = torch.zeros(self.B, dtype=torch.bool, device=x.device)
        n_steps = self.P if n_steps is None else n_steps
        for i in range(k, n_steps):
            if k and i == k:
                h, seen = self.prefill_forced(k)
                logits = model.lm_head(model.byte_decoder.ln_f(h))
            else:
                logits = self.byte_step(x, self.slots[i], self.masks[i])
            token = sample(logits, self.sampling, self.generator)
            token = torch.where(self.n_forced > i, self.forced[:, i], token)
            token = token.masked_fill(seen, SPECIAL)
            seen = seen | (token == SPECIAL)
            self.patch[:, i].copy_(token)
            if i + 1 < n_steps:
                x = model.byte_wte(token)[:, None]
        if n_steps < self.P:
            self.patch[:, n_steps:].fill_(SPECIAL)

    def prefill_forced(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch's first k + 1 inputs, the feature and its k forced bytes, through the byte decoder's blocks in
        one pass (as bgpt.generate_patch does), writing cache slots 0..k, and the forced bytes into the patch ->
        (the hidden state (B, C) at slot k, before ln_f, from which byte k is drawn; the rows whose forced bytes
        hold the end mark)."""
        model, stack = self.model, self.model.byte_decoder
        forced = self.forced[:, :k]
        x = torch.cat([self.feature[:, None], model.byte_wte(forced)], 1) + stack.wpe.weight[:k + 1]
        for block, cache in zip(stack.h, self.caches):
            x = block(x, cache, 0)
        self.patch[:, :k].copy_(forced)
        return x[:, -1], (forced == SPECIAL).any(-1)

    def prepare(self) -> None:
        """The fused path's start of a patch: no row has emitted the end mark yet; the first input is the feature
        at position 0."""
        self.seen.zero_()
        torch.add(self.feature, self.model.byte_decoder.wpe.weight[0].detach(), out=self.x[0])  # (no grad)

    def decode_fused(self, prepared: bool = False, n_steps: int | None = None, n_prefilled: int = 0) -> None:
        """decode with the fused kernels: per byte step the blocks (four kernels each), then LayerNorm + LM head and
        the byte's selection, forcing, end-mark bookkeeping, next input and the next step's first-block q, k, v
        (NextStep: a table lookup, so that the next step's first block starts at its attention): one kernel when
        greedy (the argmax in the head's last program), else the head, the draw (torch) and the selection.
        prepared: the caller has already done prepare() (bGPT's native loop does it in the kernel that ends the
        previous patch). n_steps, n_prefilled: as in decode."""
        from bytedeploy.plugins.decode_kernels import blocks_step, head_select_byte, ln_linear, select_byte

        model, stack, k = self.model, self.model.byte_decoder, n_prefilled
        n_steps = self.P if n_steps is None else n_steps
        if not prepared:
            self.prepare()
        for i in range(k, n_steps):
            if k and i == k:
                h, seen = self.prefill_forced(k)
                self.seen.copy_(seen)
            else:
                first_qkv = self.next_steps[i - 1].qkv if i else None
                h = blocks_step(stack, self.x[i], self.caches, self.slots[i], self.masks[i], first_qkv)
            if self.sampling.greedy:
                head_select_byte(h, stack.ln_f, model.lm_head, self.select_counts, self.forced, self.n_forced,
                                 self.seen, self.patch, i, model.byte_wte.weight, stack.wpe.weight, SPECIAL,
                                 self.next_steps[i])
                continue
            logits = ln_linear(h, stack.ln_f, model.lm_head)
            token = sample(logits, self.sampling, self.generator)
            select_byte(logits, token, self.forced, self.n_forced, self.seen, self.patch, i, model.byte_wte.weight,
                        stack.wpe.weight, SPECIAL, self.next_steps[i])
        if n_steps < self.P:
            self.patch[:, n_steps:].fill_(SPECIAL)

    def run(self) -> None:
        if self.graph is None:
            self.decode()
        else:
            self.graph.replay()

    def first_block_weight_states(self) -> list:
        """native.weight_states of the weights the first-block QKV table is made from."""
        stack = self.model.byte_decoder
        states = []
        for module in (self.model.byte_wte, stack.wpe, stack.h[0].ln_1, stack.h[0].attn.c_attn):
            weight_states(module, states)
        return states

    def refresh_first_qkv(self) -> None:
        """Remake the first-block QKV table in place (captured kernels keep reading the same buffer) if the weights
        it is made from changed in place since. (bGPT's native runner makes a new PatchDecoder instead.)"""
        states = self.first_block_weight_states()
        if states != self.first_qkv_states:
            from bytedeploy.plugins.decode_kernels import first_block_qkv

            self.first_qkv.copy_(first_block_qkv(self.model.byte_decoder, self.model.byte_wte.weight))
            self.first_qkv_states = states

    def __call__(self, feature: torch.Tensor, forced: torch.Tensor | None = None,
                 n_forced: torch.Tensor | None = None) -> torch.Tensor:
        """feature (B, C), forced (B, k) bytes that begin the patch (forced_per_row: the first n_forced (B,) of each
        row's) -> a copy of the patch (B, P)."""
        if self.fused:
            self.refresh_first_qkv()
        k = 0 if forced is None else forced.size(1)
        self.feature.copy_(feature)
        if k:
            self.forced[:, :k] = forced
        if n_forced is None:
            self.n_forced.fill_(k)
        else:
            self.n_forced.copy_(n_forced)
        self.run()
        return self.patch.clone()

