"""What bGPT's first- and last-patch graphs save: native generate() of bGPT base at batch 1, greedy, 256 bytes after
'import os\\n' (10 forced bytes in the first patch, a last patch of 10 bytes), in three variants in one process:

    current      the runner as it is (BgptRunner.edge_graph)
    no-prefill   the first patch steps its forced bytes one at a time (the last patch as current)
    before       every patch is the whole patch graph (the code before the edge graphs)

    python -m bytedeploy.benchmarks.experiments.bgpt_edges --out benchmarks/results/h200-bgpt-edges.json

Random init (speed does not depend on the weights). The variants take turns, in rounds; each round times `calls`
generate() calls per variant after two untimed ones, and keeps the median. All three variants must give the same
output.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bytedeploy.bench import machine_name, write_json
from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.registry import get_family
from bytedeploy.runtimes import native_bgpt
from bytedeploy.sampling import SamplingConfig

CURRENT = native_bgpt.BgptRunner.edge_graph
VARIANTS = {
    "current": CURRENT,
    "no-prefill": lambda runner, n_prefilled, n_bytes, step: CURRENT(runner, 0, n_bytes, step),
    "before": lambda runner, n_prefilled, n_bytes, step: CURRENT(runner, 0, runner.out.size(2), True),
}


def time_variants(model, cfg, request: GenerateRequest, rounds: int, calls: int) -> dict:
    """-> {variant: [median ms of each round]}; asserts that every variant's output equals the current one's."""
    times, outputs = {v: [] for v in VARIANTS}, {}
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for variant, edge_graph in VARIANTS.items():
                    native_bgpt.BgptRunner.edge_graph = edge_graph
                    for _ in range(2):
                        native_bgpt.generate(model, cfg, request)
                    results = [native_bgpt.generate(model, cfg, request) for _ in range(calls)]
                    outputs[variant] = results[0].outputs
                    times[variant].append(1e3 * statistics.median(r.seconds for r in results))
    finally:
        native_bgpt.BgptRunner.edge_graph = CURRENT
    assert all(out == outputs["current"] for out in outputs.values()), "a variant changed the output"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=11)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bgpt_edges needs a CUDA GPU")
    cfg = build_model_config(get_family("bgpt"), "base", {})
    request = GenerateRequest(b"import os\n", 256, 1, SamplingConfig(temperature=0.0), {})
    doc = {"machine": machine_name(), "command": "python -m bytedeploy.benchmarks.experiments.bgpt_edges",
           "rounds": args.rounds, "calls": args.calls, "new_bytes": request.max_new, "prompt": "import os\\n",
           "results": {}}
    for name in args.dtypes.split(","):
        torch.manual_seed(0)
        model = bgpt.Model(cfg).cuda().to(getattr(torch, name)).eval()
        times = time_variants(model, cfg, request, args.rounds, args.calls)
        doc["results"][name] = {v: {"round_ms": ms, "median_ms": statistics.median(ms),
                                    "bytes_per_s": request.max_new / statistics.median(ms) * 1e3}
                                for v, ms in times.items()}
        for v, ms in times.items():
            print(f"{name} {v:10s}: rounds {', '.join(f'{m:.3f}' for m in ms)} ms; median "
                  f"{statistics.median(ms):.3f} ms, {request.max_new / statistics.median(ms) * 1e3:,.0f} bytes/s",
                  flush=True)
        del model
        torch.cuda.empty_cache()
    write_json(doc, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
