"""Numerics across backends: eager PyTorch vs the bundle's graphs on ONNX Runtime (and TensorRT where present).

Each family's exporter module provides

    verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]

one case per graph call (the prefill, then each decode step fed the eager caches of the step before), with the
outputs eager PyTorch computes for it. ``verify`` runs every case on every requested backend and compares.

The eager model runs in the bundle's precision (``model.half()`` for an fp16 bundle, as the exporter traced it),
so a case checks the graph against the computation it was exported from. Outputs are compared with polygraphy's
SimpleCompareFunc, element by element: an element fails when it is off by more than atol AND by more than
rtol * |eager value|. Default tolerances by bundle precision (TOLERANCES):

    fp32  atol = rtol = 1e-4   (same arithmetic; kernels differ only in summation order)
    fp16  atol = rtol = 2e-2   (half-precision rounding, which kernels differ in where they round)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# bundle precision -> (atol, rtol); the defaults of `bytedeploy verify`
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2)}
EAGER = "eager"


@dataclass
class VerifyCase:
    graph: str  # bundle graph name
    label: str  # row label in the table: "prefill", "decode 3", ...
    feeds: dict[str, np.ndarray]  # graph input name -> value
    expected: dict[str, np.ndarray]  # graph output name -> eager PyTorch value


@dataclass
class Row:
    case: str
    output: str
    backend: str
    max_abs: float
    max_rel: float
    passed: bool


def tolerance_help() -> str:
    return (", ".join(f"{p} atol={a:g} rtol={r:g}" for p, (a, r) in TOLERANCES.items())
            + "; BitNet is looser, see the table's header")


def verify(checkpoint, bundle, backends: list[str], decode_steps: int = 32, batch_size: int = 2,
           atol: float | None = None, rtol: float | None = None, seed: int = 0) -> bool:
    """Compare every verify case of the family on every backend with eager PyTorch; print the table.

    Returns False when any output of any case differs beyond the tolerances (default: TOLERANCES by the bundle's
    precision). A backend that cannot run here (no onnxruntime-gpu, no TensorRT engines) gets one skipped row with
    the reason; UserError when none of the requested backends can run."""
    import torch

    from bytedeploy.checkpoint import load_model
    from bytedeploy.errors import UserError
    from bytedeploy.exporters import family_exporter
    from bytedeploy.exporters.bundle import load_bundle
    from bytedeploy.runner import BUNDLE_BACKENDS as BACKENDS

    if not backends:
        raise UserError(f"no backend to verify; choose from {', '.join(BACKENDS)}")
    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if decode_steps < 0 or batch_size < 1:
        raise UserError("--decode-steps must be >= 0 and --batch-size >= 1")
    bundle = load_bundle(bundle)
    model, cfg, ckpt = load_model(checkpoint, "cpu")
    check_same_model(ckpt, cfg, bundle)
    exporter = family_exporter(bundle.family)
    if not hasattr(exporter, "verify_cases"):
        raise UserError(f"verifying {bundle.family} bundles is not implemented in this build")
    if bundle.precision == "fp16":
        model = model.half()
    # a family's exporter may state its own (BitNet: activation rounding flips, see exporters/bitnet.py)
    default_atol, default_rtol = getattr(exporter, "VERIFY_TOLERANCES", TOLERANCES)[bundle.precision]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    with torch.no_grad():
        cases = exporter.verify_cases(model, cfg, bundle, batch_size, decode_steps, seed)

    rows, skipped = [], []
    for backend in backends:
        try:
            actual = run_cases(bundle, backend, cases)
        except (UserError, ImportError) as e:
            skipped.append((backend, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        rows += compare(cases, actual, backend, atol, rtol)
    print_table(rows, skipped, bundle, atol, rtol)
    if not rows:
        raise UserError(f"none of the backends {', '.join(backends)} can run here (see the skipped rows above)")
    return all(r.passed for r in rows)


def check_same_model(ckpt, cfg, bundle) -> None:
    from bytedeploy.config import config_to_dict
    from bytedeploy.errors import UserError

    if ckpt.family != bundle.family:
        raise UserError(f"checkpoint {ckpt.path} is {ckpt.family}; bundle {bundle.path} is {bundle.family}")
    if json.loads(json.dumps(config_to_dict(cfg))) != bundle.model_config:
        raise UserError(f"checkpoint {ckpt.path} and bundle {bundle.path} have different model configs")


def run_cases(bundle, backend: str, cases: list[VerifyCase]) -> list[dict[str, np.ndarray]]:
    """Every case on one backend -> its outputs (the names each case expects) as numpy arrays."""
    from bytedeploy.errors import UserError
    from bytedeploy.runner import BundleModel

    runner = BundleModel(bundle, backend).graph_runner
    results = []
    for case in cases:
        out = runner.run(case.graph, case.feeds)
        missing = [name for name in case.expected if name not in out]
        if missing:
            raise UserError(f"graph {case.graph} on {backend} returned no output {missing[0]!r}")
        results.append({name: np.array(runner.to_numpy(out[name])) for name in case.expected})
    return results


def compare(cases: list[VerifyCase], actual: list[dict], backend: str, atol: float, rtol: float) -> list[Row]:
    """polygraphy's comparator: each case is one iteration, the backend against eager (rtol relative to eager)."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    results = RunResults()
    results.append((EAGER, [IterationResult(c.expected, runner_name=EAGER) for c in cases]))
    results.append((backend, [IterationResult(a, runner_name=backend) for a in actual]))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(results, comparisons=[(1, 0)],
                                               compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    per_case = accuracy[0][(backend, EAGER)]
    rows = []
    for case, outputs in zip(cases, per_case):
        for name in case.expected:
            r = outputs[name]
            rows.append(Row(case.label, name, backend, r.max_absdiff, r.max_reldiff, bool(r)))
    return rows


def print_table(rows: list[Row], skipped: list[tuple[str, str]], bundle, atol: float, rtol: float) -> None:
    import click

    click.echo(f"{bundle.family} bundle {bundle.path} ({bundle.precision}) vs eager PyTorch; "
               f"atol={atol:g} rtol={rtol:g} (an element fails beyond both)")
    width = max([len("case")] + [len(r.case) for r in rows])
    out_width = max([len("output")] + [len(r.output) for r in rows])
    click.echo(f"{'case':<{width}}  {'output':<{out_width}}  {'backend':<8}  {'max abs diff':>12}  "
               f"{'max rel diff':>12}  result")
    for r in rows:
        click.echo(f"{r.case:<{width}}  {r.output:<{out_width}}  {r.backend:<8}  {r.max_abs:>12.3e}  "
                   f"{r.max_rel:>12.3e}  {'pass' if r.passed else 'FAIL'}")
    for backend, reason in skipped:
        click.echo(f"{'(all)':<{width}}  {'':<{out_width}}  {backend:<8}  {'skipped:':>12}  {reason}")
    for backend in dict.fromkeys(r.backend for r in rows):
        mine = [r for r in rows if r.backend == backend]
        failed = sum(not r.passed for r in mine)
        click.echo(f"{backend}: {len(mine) - failed}/{len(mine)} outputs within tolerance, "
                   f"max abs diff {max(r.max_abs for r in mine):.3e}"
                   + (f"; {failed} FAILED" if failed else ""))
