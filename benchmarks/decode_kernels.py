"""The fused GPT-2 decode kernels (plugins/decode_kernels.py) against the torch path, on a GPU.

    python -m bytedeploy.benchmarks.decode_kernels --out benchmarks/results/h200-decode-kernels.json

For GPT-2-small-shaped stacks (char GPT-2 toy: 12 x 768; bGPT's byte decoder: 3 x 768), batch 1, float32 and
bfloat16: one gpt2_step (all blocks, one new token at a middle cache slot) captured as a CUDA graph and replayed
200 times, fused kernels (with and without programmatic dependent launch, plugins/pdl.py) vs the torch path; then
the fused step's kernels under torch.profiler (count and mean device time per kernel name), and the configurations
the autotuner picked per GEMV shape. Writes one JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bytedeploy.bench import machine_name
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig
from bytedeploy.plugins import decode_kernels, pdl
from bytedeploy.runtimes import native

STACKS = {"char-gpt2-toy": (12, 12, 768, 128), "bgpt-byte-decoder": (3, 12, 768, 17)}  # layers, heads, C, slots


def step_time(stack, kernels: str, slot: int, n_slots: int, replays: int = 200, use_pdl: bool = True) -> float:
    """Seconds per replay of one captured gpt2_step at the given slot."""
    native.KERNELS = kernels
    pdl.ENABLED = use_pdl
    B, C = 1, stack.cfg.n_embd
    p = next(stack.parameters())
    caches = stack.make_caches(B, n_slots)
    x = torch.randn(B, 1, C, device=p.device, dtype=p.dtype)
    slot_t = torch.tensor([slot], device=p.device)
    mask = native.step_mask(torch.arange(n_slots, device=p.device), slot_t)
    out = torch.empty(B, 1, C, device=p.device, dtype=p.dtype)
    graph = native.capture(lambda: out.copy_(native.gpt2_step(stack, x, caches, slot_t, mask)), warmup=3)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    pdl.ENABLED = True
    return (time.perf_counter() - t0) / replays


def kernel_profile(stack, slot: int, n_slots: int, steps: int = 5) -> dict:
    native.KERNELS = "auto"
    p = next(stack.parameters())
    caches = stack.make_caches(1, n_slots)
    x = torch.randn(1, 1, stack.cfg.n_embd, device=p.device, dtype=p.dtype)
    slot_t = torch.tensor([slot], device=p.device)
    mask = native.step_mask(torch.arange(n_slots, device=p.device), slot_t)
    native.gpt2_step(stack, x, caches, slot_t, mask)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            native.gpt2_step(stack, x, caches, slot_t, mask)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    return {e.key[:80]: {"per_step": e.count / steps, "mean_us": e.device_time_total / e.count}
            for e in sorted(events, key=lambda e: -e.device_time_total)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernels needs a CUDA GPU")
    doc = {"machine": machine_name(), "torch": torch.__version__, "triton": decode_kernels.triton.__version__,
           "results": []}
    torch.manual_seed(0)
    for name, (n_layer, n_head, n_embd, n_slots) in STACKS.items():
        for dtype in (torch.float32, torch.bfloat16):
            cfg = GPT2StackConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_slots)
            stack = GPT2Stack(cfg).cuda().to(dtype).eval()
            slot = n_slots // 2
            with torch.no_grad():
                fused = step_time(stack, "auto", slot, n_slots)
                fused_no_pdl = step_time(stack, "auto", slot, n_slots, use_pdl=False)
                reference = step_time(stack, "torch", slot, n_slots)
                kernels = kernel_profile(stack, slot, n_slots)
            weight_bytes = sum(p.numel() * p.element_size() for p in stack.h.parameters())
            row = {"stack": name, "dtype": str(dtype).removeprefix("torch."), "layers": n_layer, "n_embd": n_embd,
                   "slot": slot, "fused_us_per_step": fused * 1e6, "fused_no_pdl_us_per_step": fused_no_pdl * 1e6,
                   "torch_us_per_step": reference * 1e6,
                   "speedup": reference / fused, "weight_bytes_per_step": weight_bytes,
                   "fused_bandwidth_tb_s": weight_bytes / fused / 1e12, "kernels": kernels}
            doc["results"].append(row)
            print(f"{name} {row['dtype']}: fused {row['fused_us_per_step']:.1f} us/step (without PDL "
                  f"{row['fused_no_pdl_us_per_step']:.1f}), torch "
                  f"{row['torch_us_per_step']:.1f} us/step ({row['speedup']:.2f}x), "
                  f"{row['fused_bandwidth_tb_s']:.2f} TB/s of weights", flush=True)
            for kname, k in list(kernels.items())[:8]:
                print(f"    {k['per_step']:5.1f} x {k['mean_us']:7.2f} us  {kname}", flush=True)
    tuned = decode_kernels._ln_linear_tuned
    doc["autotuned"] = {str(key): str(cfg) for key, cfg in tuned.cache.items()}
    for key, cfg in doc["autotuned"].items():
        print(f"    {key}: {cfg}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
