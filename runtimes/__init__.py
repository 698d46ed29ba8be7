"""bytedeploy.runtimes: sampling loops over exported bundles.

A runner executes one bundle graph by name: ``runner.run(graph, feeds, outputs) -> {output name: value}`` with values
that can be fed back as inputs (KV caches stay on the device), ``runner.bind(graph, feeds, outputs, capture)`` for a
call whose inputs and outputs are bound once (a loop's step; on ort-cuda a CUDA graph), ``value``, ``zeros`` and
``write`` for the buffers a loop keeps on the device, ``workspace`` to keep them across generate calls, and
``to_numpy`` for what the loop reads on the host. OrtRunner (ort.py) and TrtRunner (trt.py) implement it. Each family
has one loop module, runtimes/<family>.py, providing

    generate(bundle, runner, request: GenerateRequest) -> GenerateResult

written once against the runner interface; runtimes/bundle_session.py batches requests over the same state.
"""

from __future__ import annotations

from bytedeploy.errors import UserError
from bytedeploy.registry import family_module

BACKENDS = ("ort", "ort-cuda", "trt")
LOOPS = {
    "bgpt": "bytedeploy.runtimes.bgpt",
    "bitnet": "bytedeploy.runtimes.bitnet",
    "sigma-gpt": "bytedeploy.runtimes.sigma_gpt",
    "bfn": "bytedeploy.runtimes.bfn",
    "char-gpt2": "bytedeploy.runtimes.char_gpt2",
}


def make_runner(bundle, backend: str):
    if backend == "ort":
        from bytedeploy.runtimes.ort import OrtRunner

        return OrtRunner(bundle, "cpu")
    if backend == "ort-cuda":
        from bytedeploy.runtimes.ort import OrtRunner

        return OrtRunner(bundle, "cuda")
    if backend == "trt":
        from bytedeploy.runtimes.trt import TrtRunner

        return TrtRunner(bundle)
    raise UserError(f"unknown bundle backend {backend!r}; choose {', '.join(BACKENDS)}")


def family_loop(family: str):
    return family_module(LOOPS, family, f"no runtime loop for family {family!r}")


def generate(bundle, request, backend: str = "ort"):
    """Run the family's sampling loop on the bundle with the backend's runner."""
    return family_loop(bundle.family).generate(bundle, make_runner(bundle, backend), request)
