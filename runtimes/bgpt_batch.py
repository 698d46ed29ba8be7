"""Continuous batching for a bGPT checkpoint (eager and native backends): every row's next patch in one batched
call, each row at its own patch position. The session protocol is bytedeploy.runner's.

A step takes every row's input patch, the patch it made at the step before, through the patch-level decoder (each
row's keys written at the row's own position, attending over the row's own past: a per-row mask) and decodes the
row's next patch from the feature that comes out: the byte-level decoder's steps for all rows in lockstep (it
restarts at every patch, so rows never differ in byte position; a row's first patch begins with its prompt's
partial last patch, forced bytes). A request joins in the next step: its prompt's last whole patch becomes its input
patch, and the patches before it, if any, go through the patch decoder into its slot of the batch's KV caches (one
batched prefill for the requests of a step with prompts of the same length); most prompts shorter than a patch are
the extension's patch alone and need no prefill. A row leaves when it emits the end mark (256), has its max_new
bytes, or reaches the context's end, as in bgpt.generate_cached; it is in no step after the one that makes its last
possible patch.

Sampling: each row keeps its own settings and seed. A greedy row takes the argmax, so its output equals generate()'s
(up to the float rounding of batched kernels, which leaves tokens unchanged unless two logits tie). A sampled row
draws from a counter-based generator keyed by (seed, the row's byte count) (draw_rows), so a request gives the same
output alone or in a full batch; not generate()'s sampled output, which comes from one torch.Generator per call.
A step whose rows are all greedy decodes with PatchDecoder (the native runtime's byte loop, its fused kernels where
they apply; forced bytes counted per row); one with a sampled row with sample_patch.

native (CUDA): the batched step is captured as a CUDA graph per (capacity, all rows greedy?, forced bytes?),
capacities the powers of two up to max_rows. A row keeps its slot for its life, a new row takes the lowest free
slot, and a step runs the smallest capacity that holds the highest slot in use. At capacity 1 the patch decoder's
step is runtimes.native's gpt2_step (the fused decode kernels). A joining row's prefill is a captured graph too, one
per prompt length and number of rows joining together (eager, its few hundred small kernels cost the host several
milliseconds). step() joins the rows added since the last call, launches a step and then reads the step before it,
so that the host's work (joins, outputs) overlaps the GPU's: a step's output is reported by the next call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, RowUpdate
from bytedeploy.models import bgpt
from bytedeploy.plugins.patch_decode import PatchDecoder
from bytedeploy.runtimes.native import attention_bias, cache_attention, capture, gpt2_step, step_mask
from bytedeploy.runtimes.native_bgpt import MAX_PREFILL_GRAPHS
from bytedeploy.sampling import SamplingConfig

SPECIAL = bgpt.SPECIAL
MASK32 = 0xFFFFFFFF


@dataclass(eq=False)  # hashed by identity, as the KVCache it stands for (decode_kernels keeps state per cache)
class CacheView:
    """The first rows of a KV cache (what runtimes.native's steps read of a bytedeploy.kv_cache.KVCache)."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class Row:
    slot: int
    max_new: int  # bytes at most (0: no limit but the context)
    patches_left: int  # patches it may still generate (bgpt.plan_generation's max_patches, less those made)
    greedy: bool
    joining: tuple | None = None  # (prompt patches, forced tail, sampling) until it joins, in the next step() call
    to_launch: int = 0  # steps it is still in: patches_left less those in flight
    first: bool = False  # its first patch, which begins with forced bytes, is not launched yet
    skip: int = 0  # forced bytes in front of its first patch's results (its prompt's partial last patch)
    output: bytearray = field(default_factory=bytearray)


@dataclass
class Launched:
    """A step in flight: its rows (id, slot) and where its patches arrive on the host."""

    rows: list[tuple[int, int]]
    patches: torch.Tensor  # (capacity, P), written by a non-blocking copy
    copied: torch.cuda.Event | None  # recorded after the copy (CUDA)


class BatchedBgptSession:
    def __init__(self, runner, max_rows: int):
        model, cfg = runner.model, runner.config
        if cfg.task != "generate":
            raise UserError("this checkpoint is a bGPT classifier; it cannot generate")
        self.model, self.cfg, self.max_rows = model, cfg, max_rows
        device = model.byte_wte.weight.device
        self.device, self.use_graphs = device, runner.backend == "native"
        N, P, R = cfg.n_patches, cfg.patch_size, max_rows
        self.patch_caches = model.patch_decoder.make_caches(R, N)
        self.byte_caches = model.byte_decoder.make_caches(R, P)
        self.pos = torch.zeros(R, dtype=torch.long, device=device)  # each row's slot for its input patch
        self.patch = torch.full((R, P), SPECIAL, dtype=torch.long, device=device)  # a step's input, then its output
        self.forced = torch.zeros(R, P, dtype=torch.long, device=device)  # bytes that begin a row's first patch
        self.n_forced = torch.zeros(R, dtype=torch.long, device=device)
        # per-row sampling: settings, seed and the count of bytes drawn (draw_rows' counter)
        self.greedy = torch.ones(R, dtype=torch.bool, device=device)
        self.top_k = torch.zeros(R, dtype=torch.long, device=device)
        self.top_p = torch.ones(R, dtype=torch.float32, device=device)
        self.temperature = torch.ones(R, dtype=torch.float32, device=device)
        self.seed = torch.zeros(R, dtype=torch.long, device=device)
        self.drawn = torch.zeros(R, dtype=torch.long, device=device)
        self.positions = torch.arange(N, device=device)
        self.byte_slots = [torch.full((1,), i, dtype=torch.long, device=device) for i in range(P)]
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        self.byte_masks = [causal[i:i + 1].clone() for i in range(P)]
        # two host buffers, pinned on CUDA: a step's patches arrive in one while the other's are read
        self.host = [torch.empty(R, P, dtype=torch.long, pin_memory=device.type == "cuda") for _ in range(2)]
        self.in_flight: Launched | None = None
        self.rows: dict[int, Row] = {}
        self.next_row = 0
        self.views = {}  # capacity -> (byte decoder's, patch decoder's) CacheViews of the first rows, made once
        self.decoders = {}  # capacity -> the PatchDecoder of all-greedy batches
        self.graphs = {}  # (capacity, all rows greedy?, forced bytes?) -> captured step
        self.prefills = {}  # (prefilled patches T, rows) -> (prompts (rows, T, P), slots (rows,), prefill, graph)
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, request: GenerateRequest) -> int:
        """The request's plan (a UserError now if it has none) and a slot; it joins at the next step."""
        prompt, tail, max_patches = bgpt.plan_generation(self.cfg, request)
        used = {r.slot for r in self.rows.values()}
        slot = next((s for s in range(self.max_rows) if s not in used), None)
        if slot is None:
            raise RuntimeError(f"the session is full ({self.max_rows} rows)")
        row_id, self.next_row = self.next_row, self.next_row + 1
        self.rows[row_id] = Row(slot, request.max_new, max_patches, request.sampling.greedy,
                                joining=(prompt, tail, request.sampling), to_launch=max_patches)
        return row_id

    @torch.no_grad()
    def step(self) -> list[RowUpdate]:
        """The rows added since the last call join the batch (their prefill, which the GPU runs after the step in
        flight), one patch is launched for every row, new ones included, and the patches of the step before are
        read (in flight meanwhile, so that the GPU does not wait on this host work). -> the updates of the step
        before: a step's output is reported by the next call."""
        by_length = {}  # prompt patches -> the joining rows
        for row in self.rows.values():
            if row.joining is not None:
                by_length.setdefault(len(row.joining[0]), []).append(row)
        for rows in by_length.values():
            self.join(rows)
        launched = self.launch()
        updates = self.collect(self.in_flight) if self.in_flight else []
        self.in_flight = launched
        return updates

    def launch(self) -> Launched | None:
        """The step of every row that has joined and may make another patch (a row whose last possible patch is in
        flight stays out: no step is spent on it while its end is read)."""
        rows = [(row_id, row) for row_id, row in self.rows.items() if row.joining is None and row.to_launch > 0]
        if not rows:
            return None
        capacity = self.capacity(max(row.slot for _, row in rows) + 1)
        self.run_step(capacity, all(row.greedy for _, row in rows), any(row.first for _, row in rows))
        for _, row in rows:
            row.first, row.to_launch = False, row.to_launch - 1
        patches = self.host[0][:capacity]
        self.host.reverse()
        patches.copy_(self.patch[:capacity], non_blocking=True)
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        return Launched([(row_id, row.slot) for row_id, row in rows], patches, copied)

    def collect(self, launched: Launched) -> list[RowUpdate]:
        """A launched step's patches into its rows' outputs (rows that ended or left since are skipped)."""
        if launched.copied is not None:
            launched.copied.synchronize()
        patches = launched.patches.numpy()
        return [self.advance(row_id, patches[slot]) for row_id, slot in launched.rows if row_id in self.rows]

    def join(self, rows: list[Row]) -> None:
        """Rows whose prompts have the same number T of whole patches join: the prompt's last patch is the row's input
        patch at slot T - 1 and the T - 1 before it are prefilled into their slots of the patch decoder's caches
        (bgpt.generate_cached's prefill, batched); the first patch's forced bytes and the row's sampling settings.
        Their values cross to the device in two copies (one of integers, one of floats), not one per buffer: each
        copy costs the host tens of microseconds, on the path of a joining request's first byte."""
        T, P = len(rows[0].joining[0]), self.cfg.patch_size
        # per row: slot, input patch (P), forced bytes (P), their count, greedy, top_k, seed
        ints = np.zeros((len(rows), 2 * P + 5), dtype=np.int64)
        floats = np.zeros((len(rows), 2), dtype=np.float32)  # top_p, temperature
        for i, row in enumerate(rows):
            prompt, tail, sampling = row.joining
            ints[i, 0], ints[i, 1:1 + P] = row.slot, prompt[-1]
            ints[i, 1 + P:1 + P + len(tail)], ints[i, 1 + 2 * P] = tail, len(tail)
            ints[i, 2 + 2 * P:] = sampling.greedy, sampling.top_k, sampling.seed
            floats[i] = sampling.top_p, sampling.temperature
            row.first, row.skip = len(tail) > 0, len(tail)
        ints, floats = self.to_device(ints, torch.long), self.to_device(floats, torch.float32)
        slots = ints[:, 0]
        if T > 1:
            self.prefill(rows, T - 1, slots)
        self.patch.index_copy_(0, slots, ints[:, 1:1 + P])
        self.forced.index_copy_(0, slots, ints[:, 1 + P:1 + 2 * P])
        self.n_forced.index_copy_(0, slots, ints[:, 1 + 2 * P])
        self.greedy.index_copy_(0, slots, ints[:, 2 + 2 * P].bool())
        self.top_k.index_copy_(0, slots, ints[:, 3 + 2 * P])
        self.seed.index_copy_(0, slots, ints[:, 4 + 2 * P])
        self.top_p.index_copy_(0, slots, floats[:, 0])
        self.temperature.index_copy_(0, slots, floats[:, 1])
        # index_fill_, not pos[slots] = T: a Python number in an indexed assignment is copied to the device from
        # pageable memory, which waits for the step in flight (half the serving model process's time on an H100)
        self.pos.index_fill_(0, slots, T - 1)
        self.drawn.index_fill_(0, slots, 0)
        for row in rows:
            row.joining = None

    def prefill(self, rows: list[Row], T: int, slots: torch.Tensor) -> None:
        """The rows' first T prompt patches through the patch decoder into slots 0..T-1 of their caches."""
        prompts = np.stack([row.joining[0][:T] for row in rows])
        if self.use_graphs:
            return self.prefill_graphed(prompts, [row.slot for row in rows])
        caches = self.model.patch_decoder.make_caches(len(rows), T)
        self.model.encode_patches(self.to_device(prompts, torch.long), caches, 0)
        for big, small in zip(self.patch_caches, caches):
            big.k[slots, :, :T] = small.k
            big.v[slots, :, :T] = small.v

    def to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        """Host values on the session's device without waiting for the GPU (a copy from pinned memory, which
        torch's host allocator keeps until the copy has run): a join must not stall the step in flight."""
        host = torch.as_tensor(np.asarray(values), dtype=dtype)
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def prefill_graphed(self, prompts: np.ndarray, slots: list[int]) -> None:
        """Rows' prompt patches (n, T, P) through the patch decoder into their slots' keys and values, in one replay of
        a CUDA graph per (T, rows rounded up to a power of two), captured at its first use (its warm-up run is these
        rows'). The rows past n repeat the first one: the same values written twice to its slot."""
        n, T = len(slots), prompts.shape[1]
        size = self.capacity(n)
        if (T, size) not in self.prefills:
            if len(self.prefills) == MAX_PREFILL_GRAPHS:
                del self.prefills[next(iter(self.prefills))]
            prompt_in = torch.empty(size, T, self.cfg.patch_size, dtype=torch.long, device=self.device)
            slot_in = torch.zeros(size, dtype=torch.long, device=self.device)
            caches = self.model.patch_decoder.make_caches(size, T)

            def run() -> None:
                self.model.encode_patches(prompt_in, caches, 0)
                for big, small in zip(self.patch_caches, caches):
                    big.k[:, :, :T].index_copy_(0, slot_in, small.k)
                    big.v[:, :, :T].index_copy_(0, slot_in, small.v)

            self.prefills[T, size] = (prompt_in, slot_in, run, None)
        prompt_in, slot_in, run, graph = self.prefills[T, size]
        padded = [*range(n), *[0] * (size - n)]
        prompt_in.copy_(self.to_device(prompts[padded], torch.long))
        slot_in.copy_(self.to_device([slots[i] for i in padded], torch.long))
        with torch.cuda.device(self.device):
            if graph is None:
                self.prefills[T, size] = (prompt_in, slot_in, run, capture(run, pool=self.pool))
            else:
                graph.replay()

    def advance(self, row_id: int, patch: np.ndarray) -> RowUpdate:
        """The row's new patch (its forced bytes left out) into its output; the row leaves when it is done."""
        row = self.rows[row_id]
        before = len(row.output)
        patch, row.skip = patch[row.skip:], 0
        end = np.flatnonzero(patch == SPECIAL)
        new = patch[:end[0]] if len(end) else patch
        if row.max_new:
            new = new[:row.max_new - len(row.output)]
        row.output += bytes(new.astype(np.uint8).tolist())
        row.patches_left -= 1  # plan_generation's budget ends at the context's end too
        done = len(end) or row.patches_left <= 0 or 0 < row.max_new <= len(row.output)
        if done:
            del self.rows[row_id]
        return RowUpdate(row_id, bytes(row.output[before:]), done=bool(done),
                         output=bytes(row.output) if done else None)

    def cancel(self, row: int) -> None:
        self.rows.pop(row, None)

    def capacity(self, n: int) -> int:
        c = 1
        while c < n:
            c *= 2
        return min(c, self.max_rows)

    def run_step(self, capacity: int, greedy: bool, forced: bool) -> None:
        if capacity not in self.views:  # made here, outside any capture: state the captured steps keep reading
            self.views[capacity] = tuple([CacheView(c.k[:capacity], c.v[:capacity]) for c in caches]
                                         for caches in (self.byte_caches, self.patch_caches))
        if greedy and capacity not in self.decoders:
            self.decoders[capacity] = PatchDecoder(self.model, capacity, SamplingConfig(temperature=0.0),
                                                   use_graph=False, forced_per_row=True)
        if not self.use_graphs:
            return self.patch_step(capacity, greedy, forced)
        key = (capacity, greedy, forced)
        with torch.cuda.device(self.device):  # the scheduler's thread has its own current device
            if key in self.graphs:
                self.graphs[key].replay()
            else:  # capture's warm-up run is this step
                self.graphs[key] = capture(lambda: self.patch_step(*key), pool=self.pool)

    def patch_step(self, capacity: int, greedy: bool, forced: bool) -> None:
        """For rows [0, capacity), each at its own position: the patch decoder's step on the input patch, then the
        new patch from its feature, beginning with each row's forced bytes (forced: some row has them). When every
        row is greedy the patch is PatchDecoder's (the native runtime's byte loop: its fused kernels where they
        apply), else sample_patch's, with each row's settings."""
        model, cfg, C = self.model, self.cfg, capacity
        byte_caches, patch_caches = self.views[C]
        slots = self.pos[:C].clamp(max=cfg.n_patches - 1)  # an empty slot's keeps counting: kept in bounds
        feature = rows_step(model.patch_decoder, model.embed_patches(self.patch[:C, None]), patch_caches, slots,
                            self.positions)[:, -1]
        self.pos[:C] += 1
        if not greedy:
            return self.sample_patch(C, feature, byte_caches)
        decoder = self.decoders[C]
        decoder.feature.copy_(feature)
        if forced:
            decoder.forced.copy_(self.forced[:C])
            decoder.n_forced.copy_(self.n_forced[:C])
        decoder.decode()
        self.patch[:C] = decoder.patch
        if forced:
            decoder.n_forced.zero_()
            self.n_forced[:C] = 0

    def sample_patch(self, C: int, feature: torch.Tensor, byte_caches) -> None:
        """PatchDecoder.decode's byte loop with each row's forced bytes, sampling settings and generator."""
        model = self.model
        x = feature[:, None]
        seen = torch.zeros(C, dtype=torch.bool, device=self.device)
        for i in range(self.cfg.patch_size):
            h = gpt2_step(model.byte_decoder, x, byte_caches, self.byte_slots[i], self.byte_masks[i])
            logits = model.lm_head(h)[:, -1]
            token = self.draw(logits, C)
            token = torch.where(self.n_forced[:C] > i, self.forced[:C, i], token).masked_fill(seen, SPECIAL)
            seen = seen | (token == SPECIAL)
            self.patch[:C, i] = token
            x = model.byte_wte(token)[:, None]
        self.n_forced[:C] = 0

    def draw(self, logits: torch.Tensor, C: int) -> torch.Tensor:
        token = draw_rows(logits, self.top_k[:C], self.top_p[:C], self.temperature[:C], self.seed[:C],
                          self.drawn[:C])
        self.drawn[:C] += 1
        return torch.where(self.greedy[:C], logits.argmax(-1), token)


def rows_step(stack, embeds: torch.Tensor, caches, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """layers.GPT2Stack for one new input per row, embeds (B, 1, C), each written at its own cache slot (B,) and
    attending over the cache up to it -> hidden (B, 1, C). One row is runtimes.native.gpt2_step (its fused kernels
    where they apply)."""
    B = embeds.size(0)
    if B == 1:
        return gpt2_step(stack, embeds, caches, slots, step_mask(positions, slots))
    x = embeds + stack.wpe(slots)[:, None]
    bias = attention_bias(positions[None] <= slots[:, None], x.dtype)[:, None, None]  # (B, 1, 1, L)
    rows = torch.arange(B, device=x.device)
    for block, cache in zip(stack.h, caches):
        x = x + rows_attention(block.attn, block.ln_1(x), cache, rows, slots, bias)
        x = x + block.mlp(block.ln_2(x))
    return stack.ln_f(x)


def rows_attention(attn, x: torch.Tensor, cache, rows: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor):
    """runtimes.native.attention_step with row b's new key and value written at slots[b]."""
    B, _, C = x.shape
    H = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, 1, H, C // H).transpose(1, 2) for t in (q, k, v))
    cache.k[rows, :, slots] = k[:, :, 0].to(cache.k.dtype)
    cache.v[rows, :, slots] = v[:, :, 0].to(cache.v.dtype)
    y = cache_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), bias)
    return attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values < 2^32; the multiplier keeps products below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & MASK32
    return (x >> 16) ^ x


def uniform_rows(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) uniforms in (0, 1), a function of each row's (seed, counter) and the column only."""
    key = mix32((seed & MASK32) ^ mix32(counter & MASK32))
    bits = mix32(key[:, None] ^ mix32(torch.arange(n, device=seed.device) + 0x9E3779B9))
    return (bits.to(torch.float64) + 0.5).div(2.0**32).to(torch.float32)


def draw_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor,
              seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """bytedeploy.models.sampling.sample with settings per row (B,): top-k (0 = off), then top-p on what survives,
    then temperature; the exponential race draws with uniform_rows(seed, counter)."""
    logits = logits.float()
    V = logits.size(-1)
    ranked, _ = logits.sort(-1, descending=True)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    logits = logits.masked_fill(logits < ranked.gather(1, (k - 1)[:, None]), float("-inf"))
    ranked, order = logits.sort(-1, descending=True)
    probs = ranked.softmax(-1)
    drop_ranked = (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep the token that crosses top_p
    logits = logits.masked_fill(torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked), float("-inf"))
    probs = (logits / temperature.clamp(min=1e-8)[:, None]).softmax(-1)
    race = -uniform_rows(seed, counter, V).log()
    return (probs / race).argmax(-1)
