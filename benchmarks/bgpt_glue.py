"""bGPT's glue between its two decoders: torch kernels vs the two fused kernels, KV prefetch off / on (GPU).

    python -m bytedeploy.benchmarks.bgpt_glue [--out JSON]

For float32 and bfloat16 bGPT-base weights (random init; speed does not depend on them), three native runners in
one process, so that every variant uses the same autotuned kernel configurations:

  torch     BgptRunner.patch_then_step_torch: PatchDecoder.decode, then about twenty torch kernels (masking, the
            patch embedding, positions, masks, the final LayerNorm) around the fused blocks of the patch decoder
  fused     BgptRunner.patch_then_step_fused: embed_patch and patch_feature (decode_kernels), every kernel a PDL
            launch; decode_kernels.PREFETCH_KV off
  fused+pf  the same with qkv_attention's prefetch of the cached keys and values into L2

Each runner generates 16 greedy patches (the outputs must be equal), then its CUDA graph (one patch) is replayed 40
times, in six interleaved rounds; the median and the fastest round per variant are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bytedeploy.bench import machine_name
from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.plugins import decode_kernels
from bytedeploy.registry import get_family
from bytedeploy.runtimes.native_bgpt import BgptRunner
from bytedeploy.sampling import SamplingConfig

VARIANTS = {"torch": ("patch_then_step_torch", False), "fused": ("patch_then_step_fused", False),
            "fused+pf": ("patch_then_step_fused", True)}


def runner_for(model, glue: str, prefetch: bool) -> BgptRunner:
    """A runner whose captured patch step is the given glue method, with the prefetch setting at capture."""
    fused_glue = BgptRunner.patch_then_step_fused
    saved = decode_kernels.PREFETCH_KV
    BgptRunner.patch_then_step_fused = getattr(BgptRunner, glue)
    decode_kernels.PREFETCH_KV = prefetch
    try:
        return BgptRunner(model, 1, SamplingConfig(temperature=0.0))
    finally:
        BgptRunner.patch_then_step_fused = fused_glue
        decode_kernels.PREFETCH_KV = saved


def compare(dtype: torch.dtype, rounds: int = 6, replays: int = 40) -> dict:
    cfg = build_model_config(get_family("bgpt"), "base", {})
    torch.manual_seed(0)
    model = bgpt.Model(cfg).cuda().to(dtype).eval()
    prompt, tail, _ = bgpt.plan_generation(cfg, GenerateRequest(b"import os\n", 256))
    runners, outputs = {}, {}
    with torch.no_grad():
        for name, (glue, prefetch) in VARIANTS.items():
            runners[name] = runner_for(model, glue, prefetch)
            outputs[name] = runners[name].run(prompt, tail, 16, 0)[0].clone()
        times = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(replays):
                    runner.graph.replay()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / replays * 1e3)
    same = all(torch.equal(outputs["torch"], o) for o in outputs.values())
    row = {"dtype": str(dtype).removeprefix("torch."), "outputs_equal": same,
           "ms_per_patch_median": {n: statistics.median(t) for n, t in times.items()},
           "ms_per_patch_min": {n: min(t) for n, t in times.items()}}
    print(f"{row['dtype']}: outputs equal: {same}; " + "; ".join(
        f"{n} {statistics.median(t):.3f} ms (min {min(t):.3f})" for n, t in times.items()), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bgpt_glue needs a CUDA GPU")
    rows = [compare(dtype) for dtype in (torch.float32, torch.bfloat16)]
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "bgpt_glue", "machine": machine_name(),
                                              "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
