"""Continuous batching on a bundle (ort, ort-cuda, trt): every row's next token (bGPT: patch) in one batched call of
the family's step graphs, each row at its own position. The session protocol is bytedeploy.runner's.

The batch is the loops' device state (runtimes/windowed.TokenSteps, runtimes/bgpt.PatchSteps) at batch size
max_rows, one row slot per request, the session's own (apart from the generate calls' states), made once (on
ort-cuda its steps are CUDA graphs captured once). Each row keeps its own position (the graphs take positions per
row), sampling settings (the sample graph's inputs per row) and generator: its uniforms come from
np.random.default_rng(its seed), a draw per token (bGPT: a patch's worth per patch) as its own generate() call at
batch 1 draws them, so a row's output equals generate()'s for the same request alone, greedy or sampled (up to the
rounding of batched kernels, which changes a token only at a near-tie).

A step: the running rows advance together (TokenSteps.step / a byte_patch and a patch_decode call); the host reads
the new tokens; rows that finished leave; then the rows added since the last step join: their prompts go through
the prefill graph into their slots (rows input) and, for token families, their first token is drawn from its logits.
A char GPT-2 or BitNet row whose window is full re-prefills its window alone, as generate() does. Slots of finished
or empty rows run along with garbage that no row reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bytedeploy.families import bgpt, bitnet, char_gpt2, sigma_gpt
from bytedeploy.generation import GenerateRequest, RowUpdate
from bytedeploy.runtimes.bgpt import PatchSteps
from bytedeploy.runtimes.windowed import TokenSteps, sampling_arrays
from bytedeploy.sampling import SamplingConfig

FAMILIES = ("char-gpt2", "bitnet", "sigma-gpt", "bgpt")


def make_session(model, max_rows: int):
    """The batched session for a bytedeploy.runner.BundleModel; None where there is none (its StepSession then)."""
    if model.family not in FAMILIES or getattr(model, "burst", False):
        return None
    kind = BgptSession if model.family == "bgpt" else TokenSession
    return kind(model.bundle, model.graph_runner, max_rows)


@dataclass
class Row:
    slot: int
    sampling: SamplingConfig
    rng: np.random.Generator
    max_new: int
    tokens: list[int]  # the row's sequence so far (token families: prompt window first; sigma-GPT: generation order)
    n_prompt: int
    render: object  # tokens -> the output bytes so far
    joining: bool = True
    extra: dict = field(default_factory=dict)  # sigma-GPT: its orders
    sent: int = 0  # output bytes reported so far

    @property
    def n_new(self) -> int:
        return len(self.tokens) - self.n_prompt

    def draw(self, size=None):
        return self.rng.random(size).astype(np.float32) if size else np.float32(self.rng.random())


class Session:
    """Slots, rows and the protocol's bookkeeping; the families' sessions below do the steps."""

    def __init__(self, bundle, runner, max_rows: int):
        self.bundle, self.runner, self.max_rows = bundle, runner, max_rows
        self.cfg = bundle.family_config()
        self.rows: dict[int, Row] = {}
        self.next_row = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, request: GenerateRequest) -> int:
        used = {r.slot for r in self.rows.values()}
        slot = next((s for s in range(self.max_rows) if s not in used), None)
        if slot is None:
            raise RuntimeError(f"the session is full ({self.max_rows} rows)")
        row = self.plan(request, slot)
        row_id, self.next_row = self.next_row, self.next_row + 1
        self.rows[row_id] = row
        return row_id

    def cancel(self, row: int) -> None:
        self.rows.pop(row, None)

    def update(self, row_id: int, done: bool) -> RowUpdate:
        row = self.rows[row_id]
        text = row.render(row)
        new, row.sent = text[row.sent:], len(text)
        if done:
            del self.rows[row_id]
        return RowUpdate(row_id, new, done=done, output=text if done else None)

    def settings(self) -> list[SamplingConfig]:
        by_slot = {r.slot: r.sampling for r in self.rows.values()}
        return [by_slot.get(s, SamplingConfig(temperature=0.0)) for s in range(self.max_rows)]


class TokenSession(Session):
    """char GPT-2, BitNet and sigma-GPT's ordered loop on TokenSteps."""

    def __init__(self, bundle, runner, max_rows: int):
        super().__init__(bundle, runner, max_rows)
        self.sigma = bundle.family == "sigma-gpt"
        self.context = self.cfg.block_size
        self.seq_len = self.context + 1
        self.state = TokenSteps(bundle, runner, max_rows, self.seq_len, self.context)
        self.seq = np.zeros((max_rows, self.seq_len), dtype=np.int64)  # the device's seq as last read or written
        self.orders = np.zeros((max_rows, self.seq_len), dtype=np.int64)
        if self.bundle.family == "char-gpt2":
            self.tokenizer = char_gpt2.load_tokenizer({"assets": str(bundle.assets)})
        elif self.sigma:
            self.tokenizer = sigma_gpt.load_tokenizer({"assets": str(bundle.assets)})

    def plan(self, request: GenerateRequest, slot: int) -> Row:
        s = request.sampling
        rng = np.random.default_rng(s.seed)
        if self.sigma:
            prompt, n_new = sigma_gpt.plan_prompt(self.cfg, self.tokenizer, request)
            orders = sigma_gpt.generation_orders(len(prompt), n_new, 1, request.options.get("order", "left-to-right"),
                                                 s.seed)[0]
            return Row(slot, s, rng, n_new, list(prompt), len(prompt), self.render_sigma, extra={"orders": orders})
        if self.bundle.family == "char-gpt2":
            ids, max_new = char_gpt2.prompt_ids(request, self.tokenizer), request.max_new or char_gpt2.DEFAULT_MAX_NEW
            render = lambda row: self.tokenizer.decode(row.tokens[row.n_prompt:]).encode("utf-8")
        else:
            ids, max_new = list(request.prompt or bitnet.EMPTY_PROMPT), request.max_new or bitnet.DEFAULT_MAX_NEW
            render = lambda row: bytes(row.tokens[row.n_prompt:])
        window = ids[-self.context:]
        return Row(slot, s, rng, max_new, list(window), len(window), render)

    def render_sigma(self, row: Row) -> bytes:
        P, n = row.n_prompt, len(row.tokens)
        L = P + row.max_new
        seq, filled = np.zeros((1, L), dtype=np.int64), np.zeros((1, L), dtype=bool)
        seq[0, row.extra["orders"][:n]] = row.tokens
        filled[0, row.extra["orders"][:n]] = True
        return self.tokenizer.decode(sigma_gpt.filled_prefix(seq, filled, P)[0]).encode("utf-8")

    def step(self) -> list[RowUpdate]:
        state, updates = self.state, []
        running = {i: r for i, r in self.rows.items() if not r.joining}
        on_device = {i: r for i, r in running.items() if len(r.tokens) <= self.context}
        if on_device:
            sampled = any(not r.sampling.greedy for r in on_device.values())
            u = np.zeros(self.max_rows, dtype=np.float32)
            for r in on_device.values():
                u[r.slot] = r.draw() if not r.sampling.greedy else 0
            state.step(u if sampled else None)
            self.seq = state.read()
            for r in on_device.values():
                r.tokens.append(int(self.seq[r.slot, len(r.tokens)]))
        prefill = [r for i, r in self.rows.items() if r.joining or i not in on_device]
        if prefill:
            state.set_sampling(self.settings())
            for r in prefill:
                self.prefill_row(r)
            pos = np.zeros(self.max_rows, dtype=np.int64)
            for r in self.rows.values():
                pos[r.slot] = min(len(r.tokens) - 1, self.seq_len - 1)
            self.runner.write(state.seq, self.seq)
            state.set_positions(pos)
            if self.sigma:
                self.runner.write(state.extra["orders"], self.orders)
        for row_id, r in list(self.rows.items()):
            updates.append(self.update(row_id, r.n_new >= r.max_new))
        return updates

    def prefill_row(self, r: Row) -> None:
        """A joining row's prompt, or a full window's last tokens, through the prefill graph into its slot, then its
        next token drawn from the logits (the sample graph on that one row)."""
        window = np.array(r.tokens[-self.context:], dtype=np.int64)[None]
        feeds = {}
        if self.sigma:
            orders = r.extra["orders"]
            self.orders[r.slot, :len(orders)] = orders
            feeds = {"here": orders[None, :len(r.tokens)], "following": orders[None, 1:len(r.tokens) + 1]}
        logits = self.state.prefill(window, np.array([r.slot]), feeds)
        seq = np.zeros((1, window.shape[1] + 1), dtype=np.int64)
        out = self.runner.run("sample", {"logits": logits, "u": np.array([r.draw() if not r.sampling.greedy else 0],
                                                                          dtype=np.float32),
                                         **sampling_arrays([r.sampling]), "seq": seq,
                                         "pos": np.array([window.shape[1]])})
        r.tokens.append(int(self.runner.to_numpy(out["seq_out"])[0, -1]))
        r.joining = False
        n = min(len(r.tokens), self.seq_len)
        self.seq[r.slot] = 0
        self.seq[r.slot, :n] = r.tokens[-n:] if len(r.tokens) > self.context else r.tokens[:n]


class BgptSession(Session):
    """bGPT on PatchSteps: a patch per row per step; joiners' prompts prefilled at the end of a step."""

    def __init__(self, bundle, runner, max_rows: int):
        super().__init__(bundle, runner, max_rows)
        self.state = PatchSteps(bundle, runner, max_rows)
        P = self.cfg.patch_size
        self.forced = np.zeros((max_rows, P), dtype=np.int64)
        self.n_forced = np.zeros(max_rows, dtype=np.int64)
        self.pos = np.zeros(max_rows, dtype=np.int64)

    def plan(self, request: GenerateRequest, slot: int) -> Row:
        prompt, tail, max_patches = bgpt.plan_generation(self.cfg, request)
        row = Row(slot, request.sampling, np.random.default_rng(request.sampling.seed), request.max_new, [], 0,
                  self.render)
        row.extra = {"prompt": prompt, "tail": tail, "patches_left": max_patches, "done": False}
        return row

    @staticmethod
    def render(row: Row) -> bytes:
        out = bgpt.patches_to_bytes(np.array(row.tokens, dtype=np.int64))
        return out[:row.max_new] if row.max_new else out

    def step(self) -> list[RowUpdate]:
        state, P, updates = self.state, self.cfg.patch_size, []
        running = {i: r for i, r in self.rows.items() if not r.joining}
        if running:
            sampled = any(not r.sampling.greedy for r in running.values())
            u = np.zeros((self.max_rows, P), dtype=np.float32)
            for r in running.values():
                if not r.sampling.greedy:
                    u[r.slot] = r.draw(P)
            patches = state.bytes(u if sampled else None)
            for row_id, r in running.items():
                patch = patches[r.slot, self.n_forced[r.slot]:]
                r.tokens += patch.tolist()
                r.extra["patches_left"] -= 1
                self.pos[r.slot] += 1
                done = (patch == bgpt.SPECIAL).any() or r.extra["patches_left"] <= 0 \
                    or self.pos[r.slot] >= self.cfg.n_patches or 0 < r.max_new <= len(self.render(r))
                updates.append(self.update(row_id, bool(done)))
            state.decode_patch()
            self.n_forced[[r.slot for r in running.values()]] = 0
        joining = [r for r in self.rows.values() if r.joining]
        for r in joining:
            prompt, tail = r.extra["prompt"], r.extra["tail"]
            state.prefill(prompt[None], np.array([r.slot]))
            self.forced[r.slot] = 0
            self.forced[r.slot, :len(tail)] = tail
            self.n_forced[r.slot], self.pos[r.slot], r.joining = len(tail), len(prompt), False
        if joining or running:
            self.runner.write(state.forced, self.forced)
            self.runner.write(state.n_forced, self.n_forced)
            self.runner.write(state.pos[state.parity], self.pos)
            state.set_sampling(self.settings())
        return updates
