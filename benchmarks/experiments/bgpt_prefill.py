"""bGPT base prompt prefill on the GPU: one patch at a time in the fused decode kernels vs the torch forward pass.

    python -m bytedeploy.benchmarks.experiments.bgpt_prefill --out benchmarks/results/h200-bgpt-prefill.json

Float32, batch 1, random init (speed does not depend on the weights). For T = 1, 2, 4 and 8 prompt patches: the GPU
time of the captured prefill (runtimes.native_bgpt.BgptRunner.prefill; median of 25 replays after 5), with
FUSED_PREFILL_MAX_PATCHES at 0 (the torch pass) and 8 (fused). Then whole generate() calls (prompt 'import os\\n':
one patch and 10 forced bytes, 256 bytes, greedy) with the limit at 0 and 4. This is what set
native_bgpt.FUSED_PREFILL_MAX_PATCHES.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch

from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.registry import get_family
from bytedeploy.runtimes import native, native_bgpt
from bytedeploy.sampling import SamplingConfig


def prefill_ms(model, prompt: np.ndarray, limit: int) -> float:
    native_bgpt.FUSED_PREFILL_MAX_PATCHES = limit
    runner = native_bgpt.BgptRunner(model, 1, SamplingConfig(temperature=0.0))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(30):
        start.record()
        runner.prefill(prompt)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bgpt_prefill needs a CUDA GPU")
    cfg = build_model_config(get_family("bgpt"), "base", {})
    torch.manual_seed(0)
    model = bgpt.Model(cfg).cuda().eval()
    saved = native_bgpt.FUSED_PREFILL_MAX_PATCHES
    doc = {"machine": f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})", "prefill_ms": {},
           "generate_ms": {}}
    try:
        with torch.no_grad():
            for T in (1, 2, 4, 8):
                prompt = np.random.default_rng(T).integers(0, 256, (T, cfg.patch_size))
                for limit, name in ((0, "torch"), (8, "fused")):
                    doc["prefill_ms"][f"T={T} {name}"] = ms = prefill_ms(model, prompt, limit)
                    print(f"prefill of {T} patches, {name}: {ms:.3f} ms", flush=True)
            request = GenerateRequest(b"import os\n", 256, 1, SamplingConfig(temperature=0.0), {})
            for limit in (0, 4):
                native_bgpt.FUSED_PREFILL_MAX_PATCHES = limit
                model.__dict__.pop(native.RUNNERS_ATTRIBUTE, None)  # a new runner: its own prefill graphs
                native_bgpt.generate(model, cfg, request)
                calls = [native_bgpt.generate(model, cfg, request).seconds * 1e3 for _ in range(7)]
                doc["generate_ms"][f"generate limit={limit}"] = calls
                print(f"generate(), limit {limit}: {[round(c, 2) for c in calls]} ms", flush=True)
    finally:
        native_bgpt.FUSED_PREFILL_MAX_PATCHES = saved
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
