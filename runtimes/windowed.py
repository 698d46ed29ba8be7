"""The token families' loop on a bundle's step graphs (exporters/onnx_graphs.py: prefill, decode, sample), shared by
char GPT-2 and BitNet, and the device state it runs on (TokenSteps, which sigma-GPT's loop and the batched session
use too).

The same algorithm as the families' eager generate_cached: the prompt's last `context` tokens are one prefill; while
the context has room each new token is one decode step; once it is full the window slides by one token per step and
is re-prefilled from position 0 (absolute positions make every cached entry stale). Everything a step touches stays
on the runner's device: the static KV caches (allocated once at the context's length), the tokens so far (seq) and
each row's position. A greedy step is one bound decode call (its argmax goes into seq); a sampling step adds one
bound sample call, whose uniforms the loop draws from np.random.default_rng(seed), one per row and token, as the
numpy sampler would (bytedeploy.sampling), so CPU and CUDA runs draw the same tokens. The host reads the tokens once
at the end (or when a stepwise reader asks, or to slide the window). Greedy output equals eager whenever the argmax
does.
"""

from __future__ import annotations

import numpy as np

from bytedeploy.generation import stepwise
from bytedeploy.sampling import SamplingConfig

MAX_WORKSPACES = 4  # device states a runner keeps for reuse (each holds KV caches of the full context)


def sampling_arrays(samplings: list[SamplingConfig]) -> dict[str, np.ndarray]:
    """The sample graph's settings inputs, one row per sampling config."""
    return {"temperature": np.array([s.temperature for s in samplings], dtype=np.float32),
            "top_k": np.array([s.top_k for s in samplings], dtype=np.int64),
            "top_p": np.array([s.top_p for s in samplings], dtype=np.float32)}


def cache_shapes(bundle, graph: str, batch_size: int, length: int) -> list[tuple[str, tuple, np.dtype]]:
    """(name, shape, dtype) of the graph's static caches past_k.i / past_v.i at batch_size and length."""
    out = []
    for t in bundle.graph(graph).inputs:
        if t.name.startswith(("past_k.", "past_v.")):
            _, heads, _, head_dim = t.shape
            out.append((t.name, (batch_size, heads, length, head_dim), np.dtype(t.dtype)))
    return out


def workspace(runner, key, make):
    """runner.workspace(key, make), keeping at most MAX_WORKSPACES."""
    spaces = runner.workspaces
    if key not in spaces and len(spaces) >= MAX_WORKSPACES:
        del spaces[next(iter(spaces))]
    return runner.workspace(key, make)


class TokenSteps:
    """A token family's state on the device for batch_size rows of seq_len tokens, caches of `length` slots, and the
    decode and sample calls bound to it. decode[p] reads positions pos[p] and writes pos[1 - p]; sample[p] draws at
    pos[1 - p], after decode[p]; `parity` says which pair is next. extra: the decode graph's other inputs, buffers
    like seq (sigma-GPT's orders)."""

    def __init__(self, bundle, runner, batch_size: int, seq_len: int, length: int):
        self.runner, self.batch_size, self.seq_len = runner, batch_size, seq_len
        B = batch_size
        self.caches = {name: runner.zeros(shape, dtype) for name, shape, dtype in
                       cache_shapes(bundle, "decode", B, length)}
        self.present = {name.replace("past", "present"): value for name, value in self.caches.items()}
        self.seq = runner.zeros((B, seq_len), np.int64)
        self.pos = [runner.zeros((B,), np.int64), runner.zeros((B,), np.int64)]
        vocab = bundle.graph("decode").outputs[0].shape[-1]
        self.logits = runner.zeros((B, vocab), bundle.input_dtype("sample", "logits"))
        self.u = runner.zeros((B,), np.float32)
        self.settings = {name: runner.value(a) for name, a in sampling_arrays([SamplingConfig()] * B).items()}
        self.extra = {t.name: runner.zeros((B, seq_len), t.dtype) for t in bundle.graph("decode").inputs
                      if t.name not in ("seq", "pos") and t.name not in self.caches}
        self.decode = [runner.bind("decode", {"seq": self.seq, "pos": self.pos[p], **self.extra, **self.caches},
                                   {"logits": self.logits, "seq_out": self.seq, "pos_out": self.pos[1 - p],
                                    **self.present}, capture=True) for p in (0, 1)]
        self.sample = [runner.bind("sample", self.sample_feeds(self.logits, self.pos[1 - p]), {"seq_out": self.seq},
                                   capture=True) for p in (0, 1)]
        self.parity = 0

    def sample_feeds(self, logits, pos) -> dict:
        return {"logits": logits, "u": self.u, **self.settings, "seq": self.seq, "pos": pos}

    def set_sampling(self, samplings: list[SamplingConfig]) -> None:
        for name, a in sampling_arrays(samplings).items():
            self.runner.write(self.settings[name], a)

    def prefill(self, tokens: np.ndarray, rows: np.ndarray, feeds: dict | None = None):
        """The prefill graph on tokens (b, S) into cache rows `rows` -> its logits (b, V) (a runner value)."""
        out = self.runner.run("prefill", {"tokens": tokens, "rows": rows, **(feeds or {}), **self.caches},
                              self.present)
        return out["logits"]

    def first_token(self, logits, u: np.ndarray | None) -> None:
        """A token per row from logits (B, V) written at the next decode's positions (one unbound sample call)."""
        if u is not None:
            self.runner.write(self.u, u)
        self.runner.run("sample", self.sample_feeds(logits, self.pos[self.parity]), {"seq_out": self.seq})

    def step(self, u: np.ndarray | None) -> None:
        """One token per row: decode (its argmax) and, given uniforms u, sample."""
        p = self.parity
        self.decode[p]()
        if u is not None:
            self.runner.write(self.u, u)
            self.sample[p]()
        self.parity = 1 - p

    def set_positions(self, pos: np.ndarray) -> None:
        self.runner.write(self.pos[self.parity], np.asarray(pos, dtype=np.int64))

    def read(self) -> np.ndarray:
        return np.asarray(self.runner.to_numpy(self.seq))


def token_steps(bundle, runner, batch_size: int, seq_len: int, length: int) -> TokenSteps:
    return workspace(runner, ("tokens", batch_size, seq_len, length),
                     lambda: TokenSteps(bundle, runner, batch_size, seq_len, length))


@stepwise
def generate_windowed(bundle, runner, context: int, ids: list[int], max_new: int, sampling: SamplingConfig,
                      batch_size: int) -> np.ndarray:
    """-> new tokens (batch_size, max_new). Stepwise: one token per step."""
    rng = np.random.default_rng(sampling.seed)
    draw = (lambda: None) if sampling.greedy else (lambda: rng.random(batch_size).astype(np.float32))
    B = batch_size
    window = ids[-context:]
    n0 = len(window)
    state = token_steps(bundle, runner, B, n0 + max_new, context)
    state.set_sampling([sampling] * B)
    host = np.zeros((B, n0 + max_new), dtype=np.int64)
    host[:, :n0] = window
    runner.write(state.seq, host)
    rows = np.arange(B)
    logits = state.prefill(host[:, :n0], rows)
    n = n0  # tokens in seq
    for i in range(max_new):
        if logits is not None:  # after a prefill: the next token comes from its logits
            state.set_positions(np.full(B, n))
            state.first_token(logits, draw())
            logits = None
        else:
            state.step(draw())
        n += 1
        if i + 1 == max_new:
            break
        yield lambda n=n: state.read()[:, n0:n]
        if n > context:  # the window slid: every position moved, so the cache is stale; prefill it again
            logits = state.prefill(state.read()[:, n - context:n], rows)
    return state.read()[:, n0:n]
