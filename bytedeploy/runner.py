"""One way to open and run a model, for every command (generate, bench, verify, serve).

    model = open_model("runs/bgpt", "eager", device="cpu")      # a checkpoint: the family's loops, torch
    model = open_model("deploy/bgpt", "ort")                    # a bundle: ONNX Runtime / TensorRT, no torch
    result = model.generate(GenerateRequest(b"import ", max_new=64))
    session = model.session(max_rows=8)                         # continuous batching, below

A checkpoint runs on its family's own loops (eager-reference, eager; sigma-gpt's burst) and on the native GPU
runtime (native; native+compile for bGPT); a bundle on ort, ort-cuda or trt (and burst for sigma-gpt: its burst
loop on ONNX Runtime). Here a path becomes a model and a backend name its loop, for every command: a checkpoint
backend is added in CheckpointModel, a bundle backend in runtimes.make_runner (its graph runner). This module imports
no torch: a checkpoint's side imports it when a checkpoint is opened.

The session protocol (continuous batching; the scheduler of `bytedeploy serve` sees a model only through it):

    row = session.add(request)    the request (its own sampling and seed; batch_size is 1) joins at the next step
    updates = session.step()      every row advances one step (a token; bGPT: a patch; a BFN sampling step) ->
                                  one RowUpdate per row: the output bytes it added, and whether it is done (a
                                  session may report a step at its next call, to overlap host and device work)
    session.cancel(row)           the row leaves now (its client went away, a stop sequence appeared)
    len(session)                  how many rows are in the batch

A row's output, streamed and final, equals what generate() gives for the same request. Sessions:

  StepSession       (here) any family on any backend: each row is its own batch-1 loop, advanced one step at a
                    time through the loop's stepwise generator (bytedeploy.generation.stepwise); a loop that is not
                    stepwise runs whole in one step. Correct batching semantics, no batched model calls. The rows'
                    generators run interleaved on one model (one graph runner): a loop's state must be its own
                    call's, never shared through the model or runner between calls that may overlap.
  BatchedBgptSession  (runtimes/bgpt_batch.py) bGPT on eager and native: every row's patch in one batched call,
                    rows at their own patch positions.
  bundle sessions   (runtimes/bundle_session.py) char GPT-2, BitNet, sigma-GPT and bGPT bundles on ort, ort-cuda and
                    trt: every row's token (bGPT: patch) in one batched call of the step graphs, rows at their own
                    positions in static KV caches.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from bytedeploy.errors import UserError
from bytedeploy.generation import MAX_NEW, GenerateRequest, GenerateResult, RowUpdate, run_steps
from bytedeploy.runtimes import BACKENDS as BUNDLE_BACKENDS  # runtimes.make_runner makes their graph runners

NATIVE_BACKENDS = ("native", "native+compile")  # runtimes/native.py: CUDA graphs over the checkpoint's model
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Limits:
    """What one request may ask of the model, in its tokens (bytes for bGPT and BitNet, characters for char GPT-2
    and sigma-GPT, sentencepiece pieces for the Bayesian-flow LM)."""

    max_prompt: int
    max_new: int
    unit: str


def family_limits(family: str, cfg, unit: str) -> Limits:
    if family == "bgpt":  # the prompt fills patches after the BOS patch; new patches go up to the context's end
        return Limits(cfg.max_bytes, (cfg.n_patches - 1) * cfg.patch_size, unit)
    if family == "bfn":  # prompt and new tokens share one sequence
        return Limits(cfg.seq_len - 1, cfg.seq_len - 1, unit)
    if family == "sigma-gpt":  # prompt and new characters share one context
        return Limits(cfg.block_size, cfg.block_size, unit)
    return Limits(cfg.block_size, MAX_NEW, unit)  # a sliding window: no end but generation.MAX_NEW


def is_bundle(path) -> bool:
    from bytedeploy.exporters.bundle import MANIFEST

    return (Path(path) / MANIFEST).is_file()


def open_model(path, backend: str | None = None, device: str = "auto", dtype: str = "float32") -> ModelRunner:
    """A checkpoint or bundle folder with a backend [default: eager for a checkpoint, ort for a bundle] -> its
    ModelRunner. device and dtype apply to checkpoints (a bundle's device is its backend's)."""
    if is_bundle(path):
        from bytedeploy.exporters.bundle import load_bundle

        return BundleModel(load_bundle(path), backend or "ort")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    import torch

    from bytedeploy.checkpoint import load_model
    from bytedeploy.training import resolve_device

    model, cfg, ckpt = load_model(path, resolve_device(device))
    return CheckpointModel(model.to(getattr(torch, dtype)), cfg, ckpt, backend or "eager")


@dataclass(eq=False)
class ModelCard:
    """What is known of an opened model without running it: enough to check and count a request. A ModelRunner is
    one; card() is a copy without the model, which serve's HTTP process holds while the model runs in its own."""

    family: str
    label: str  # how the backend is named in reports
    path: Path
    assets: Path
    limits: Limits

    def card(self) -> ModelCard:
        return ModelCard(self.family, self.label, self.path, self.assets, self.limits)

    def count_tokens(self, data: bytes) -> int:
        """Tokens of the model's unit in data (a prompt or an output)."""
        if self.limits.unit == "char":
            return len(data.decode("utf-8", errors="replace"))
        if self.family == "bfn":
            return len(self.sentencepiece.encode(data.decode("utf-8", errors="replace")))
        return len(data)

    def check(self, request: GenerateRequest) -> None:
        """UserError when the request is beyond the model's limits (the family's own checks follow when it runs)."""
        limits = self.limits
        n_prompt = self.count_tokens(request.prompt)
        if n_prompt > limits.max_prompt:
            raise UserError(f"the prompt has {n_prompt} {limits.unit}s; this model takes at most {limits.max_prompt}")
        if request.max_new > limits.max_new:
            raise UserError(f"{request.max_new} new {limits.unit}s asked for; this model makes at most "
                            f"{limits.max_new}")

    @functools.cached_property
    def sentencepiece(self):
        """The Bayesian-flow LM's tokenizer, from the model's assets."""
        from bytedeploy.families.bfn import request_tokenizer

        return request_tokenizer(GenerateRequest(options={"assets": str(self.assets)}))


class ModelRunner(ModelCard):
    """An opened model: its card (family, label, limits, ...), backend, generate(request), session(max_rows) and its
    stepwise loop. Subclasses set the card's fields themselves."""

    backend: str
    config: object  # the family's Config
    trained: dict  # what its training run recorded of its data (bGPT's conversion, ...): {} when unknown

    def steps(self, request: GenerateRequest):
        """The request's stepwise generator (bytedeploy.generation.stepwise) -> GenerateResult when it ends."""
        raise NotImplementedError

    def generate(self, request: GenerateRequest) -> GenerateResult:
        return run_steps(self.steps(request))

    def session(self, max_rows: int):
        """A batch session (the protocol in the module docstring) of at most max_rows rows."""
        return StepSession(self, max_rows)


def whole_call(loop, *args):
    """A loop that is not stepwise as a stepwise generator of one step: the whole call."""
    return loop(*args)
    yield  # unreachable: makes this a generator


def loop_steps(loop, *args):
    """The stepwise generator of loop(*args); one whole call for a loop that is not stepwise."""
    return loop.steps(*args) if hasattr(loop, "steps") else whole_call(loop, *args)


class BundleModel(ModelRunner):
    """A bundle on ONNX Runtime (ort, ort-cuda) or TensorRT (trt): the family's loop in runtimes/<family>.py over one
    graph runner, kept for the model's life (sessions and engines are made on first use)."""

    def __init__(self, bundle, backend: str):
        from bytedeploy.registry import FACTS, family_module, unknown_family
        from bytedeploy.runtimes import family_loop, make_runner

        self.bundle = bundle
        self.family, self.path, self.assets = bundle.family, Path(bundle.path), bundle.assets
        burst = backend == "burst" and self.family == "sigma-gpt"  # the burst loop on the bundle's graphs, in ORT
        runtime = "ort" if burst else backend
        if runtime not in BUNDLE_BACKENDS:
            raise UserError(f"a bundle runs on {', '.join(BUNDLE_BACKENDS)}"
                            f"{' (and burst for sigma-gpt)' if self.family == 'sigma-gpt' else ''}; "
                            f"{backend!r} needs the checkpoint")
        self.backend, self.burst = backend, burst
        self.label = f"burst on {runtime}" if burst else runtime
        self.loop = family_loop(self.family)
        self.config, self.trained = self.bundle.family_config(), self.bundle.extra
        facts = family_module(FACTS, self.family, unknown_family(self.family))
        self.limits = family_limits(self.family, self.config, facts.UNIT)
        self.graph_runner = make_runner(self.bundle, runtime)

    def steps(self, request: GenerateRequest):
        if self.burst:
            request = dataclasses.replace(request, options=dict(request.options, burst=True))
        return loop_steps(self.loop.generate, self.bundle, self.graph_runner, request)

    def session(self, max_rows: int):
        from bytedeploy.runtimes.bundle_session import make_session

        session = make_session(self, max_rows)
        return StepSession(self, max_rows) if session is None else session


class CheckpointModel(ModelRunner):
    """A checkpoint's model (torch, loaded by load_model) run by its family's loops or the native GPU runtime."""

    def __init__(self, model, cfg, ckpt, backend: str):
        from bytedeploy.registry import get_family

        fam = get_family(ckpt.family)
        available = tuple(fam.BACKENDS) + NATIVE_BACKENDS
        if backend not in available:
            raise UserError(f"{ckpt.family} has no backend {backend!r}; available: {', '.join(available)}")
        if backend == "native+compile" and ckpt.family != "bgpt":
            raise UserError("native+compile is implemented for bgpt; use --backend native")
        self.model, self.config, self.checkpoint, self.family_module = model, cfg, ckpt, fam
        self.family, self.backend, self.label = ckpt.family, backend, backend
        self.path, self.assets, self.trained = ckpt.path, ckpt.assets, ckpt.meta.get("data_options", {})
        self.limits = family_limits(self.family, cfg, fam.UNIT)

    def steps(self, request: GenerateRequest):
        options = dict(request.options, assets=str(self.assets))
        backend = self.backend
        if options.pop("burst", False):
            if self.family != "sigma-gpt" or backend not in ("eager", "eager-reference", "burst"):
                raise UserError("burst sampling is a sigma-gpt option of the eager backends")
            backend = "burst"
        if backend in NATIVE_BACKENDS:
            from bytedeploy.runtimes.native import generate as generate_native

            if backend == "native+compile":
                options["compile"] = True
            request = dataclasses.replace(request, options=options)
            return loop_steps(generate_native, self.model, self.config, self.family, request)
        request = dataclasses.replace(request, options=options)
        return loop_steps(self.family_module.generate, self.model, self.config, request, backend)

    def session(self, max_rows: int):
        if self.family == "bgpt" and self.backend in ("eager", "native"):
            from bytedeploy.runtimes.bgpt_batch import BatchedBgptSession

            return BatchedBgptSession(self, max_rows)
        return StepSession(self, max_rows)


# ----------------------------------------------------------------------------------------------- sessions


@dataclass
class StepRow:
    steps: object  # the row's stepwise generator
    sent: int = 0  # output bytes reported so far


class StepSession:
    """Continuous batching over any ModelRunner: each row is its own batch-1 call of the model's stepwise loop,
    advanced one step per session step (see the module docstring)."""

    def __init__(self, model: ModelRunner, max_rows: int):
        self.model, self.max_rows = model, max_rows
        self.active: dict[int, StepRow] = {}
        self.next_row = 0

    def __len__(self) -> int:
        return len(self.active)

    def add(self, request: GenerateRequest) -> int:
        if len(self.active) >= self.max_rows:
            raise RuntimeError(f"the session is full ({self.max_rows} rows)")
        row, self.next_row = self.next_row, self.next_row + 1
        self.active[row] = StepRow(self.model.steps(dataclasses.replace(request, batch_size=1)))
        return row

    def step(self) -> list[RowUpdate]:
        updates = []
        for row, state in list(self.active.items()):
            try:
                read = next(state.steps)
            except StopIteration as stop:
                output = stop.value.outputs[0]
                updates.append(RowUpdate(row, output[state.sent:], done=True, output=output))
                del self.active[row]
            except Exception as e:  # noqa: BLE001 - one row's failure is reported on that row; the others go on
                updates.append(RowUpdate(row, done=True, error=e))
                del self.active[row]
            else:
                so_far = read()[0]
                updates.append(RowUpdate(row, so_far[state.sent:]))
                state.sent = len(so_far)
        return updates

    def cancel(self, row: int) -> None:
        state = self.active.pop(row, None)
        if state is not None:
            state.steps.close()
