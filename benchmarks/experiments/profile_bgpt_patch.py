"""Where one native bGPT-base patch spends its time (GPU): graph replay time, then the kernels of one patch.

    python -m bytedeploy.benchmarks.experiments.profile_bgpt_patch

For float32 and bfloat16 weights (random init; speed does not depend on the weights): the native runner's CUDA
graph (16 byte-decoder steps, sampling, one patch-decoder step) replayed 20 times after 3 warm-up replays, without
and with programmatic dependent launch (plugins/pdl.py), then
the same patch run uncaptured under torch.profiler: kernel count, kernel time and the heaviest kernels.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.plugins import pdl
from bytedeploy.registry import get_family
from bytedeploy.runtimes.native_bgpt import BgptRunner
from bytedeploy.sampling import SamplingConfig


def profile_patch(dtype: torch.dtype, replays: int = 20, top: int = 14, use_pdl: bool = True) -> None:
    pdl.ENABLED = use_pdl
    cfg = build_model_config(get_family("bgpt"), "base", {})
    torch.manual_seed(0)
    model = bgpt.Model(cfg).cuda().to(dtype).eval()
    with torch.no_grad():
        runner = BgptRunner(model, 1, SamplingConfig(temperature=0.0))
        prompt, tail, _ = bgpt.plan_generation(cfg, GenerateRequest(b"import os\n", 256))
        runner.run(prompt, tail, 4, 0)
        for _ in range(3):
            runner.graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(replays):
            runner.graph.replay()
        torch.cuda.synchronize()
        print(f"{dtype}, PDL {'on' if use_pdl else 'off'}: graph replay "
              f"{(time.perf_counter() - t0) / replays * 1e3:.3f} ms per patch", flush=True)
        pdl.ENABLED = True
        if not use_pdl:
            return
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.patch_then_step()
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_time_total > 0)
    print(f"  one patch uncaptured: {kernels} kernels, {sum(e.device_time_total for e in events) / 1e3:.3f} ms "
          "of kernel time")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"   {e.device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:100]}")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_bgpt_patch needs a CUDA GPU")
    for dtype in (torch.float32, torch.bfloat16):
        profile_patch(dtype, use_pdl=False)
        profile_patch(dtype)


if __name__ == "__main__":
    main()
