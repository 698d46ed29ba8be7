"""What a generate call asks for and what it returns, for every family and backend."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from bytedeploy.sampling import SamplingConfig

# New tokens (bytes for bGPT) one request may ask for. char GPT-2 and BitNet slide their context window and would
# run on without end; bGPT, sigma-GPT and the Bayesian-flow LM stop at (or refuse past) their context well before.
MAX_NEW = 1 << 16


@dataclass
class GenerateRequest:
    prompt: bytes = b""  # bytes (bGPT) or UTF-8 text (text families) to continue
    max_new: int = 0  # new tokens (bytes for bGPT) at most; 0 = the family's default
    batch_size: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    options: dict = field(default_factory=dict)  # family-specific: bGPT's ext / input / target_ext, ...


@dataclass
class GenerateResult:
    outputs: list[bytes]  # one per batch row, the newly generated content
    n_new: int  # tokens (bytes for bGPT) generated over the whole batch
    seconds: float
    unit: str = "token"
    passes: int = 0  # model forward passes (sigma-GPT burst sampling reports passes per token)
    extra: dict = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class RowUpdate:
    """What one step of a batch session (bytedeploy.runner) did to one row."""

    row: int
    new: bytes = b""  # output bytes this step added (what was given out is never taken back)
    done: bool = False
    output: bytes | None = None  # when done: the whole output, as generate() returns it
    error: Exception | None = None  # the row failed (a UserError: the request's fault); it is done


def stepwise(loop):
    """A sampling loop written as a generator, callable two ways. loop(...) runs it to its end and returns what it
    returns (the offline call). loop.steps(...) is the generator itself, for continuous batching
    (bytedeploy.runner.StepSession): it yields after each step (a token; bGPT: a patch; a BFN sampling step) a
    function that reads the outputs so far (each a prefix of the final one), called only by those who want them,
    so the offline call pays no host transfer for it. The return value is the loop's result. Several calls' generators
    may be stepped in turn on one model: a call's state (caches, positions) must be its own."""

    @functools.wraps(loop)
    def run(*args, **kwargs):
        return run_steps(loop(*args, **kwargs))

    run.steps = loop
    return run


def run_steps(steps):
    """Drive a stepwise loop's generator to its end -> its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def map_steps(steps, finish):
    """Yield from a stepwise loop with each partial read through finish (the post-processing its final value gets,
    so that partial outputs are prefixes of the final ones) -> the loop's return value, unfinished."""
    while True:
        try:
            read = next(steps)
        except StopIteration as stop:
            return stop.value
        yield lambda read=read: finish(read())

