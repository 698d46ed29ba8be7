"""DDP training scaling: one training run per GPU count under torchrun (NCCL), its throughput per GPU, the scaling
efficiency against the fewest GPUs, and the loss curves.

    python -m bytedeploy.benchmarks.ddp_scaling --family bgpt --preset base --gpus 1,2,4,8 --dtype bfloat16 \
        --out benchmarks/results/h100x8-ddp.json

Each count runs `bytedeploy train` (the CLI users run) under `torchrun --standalone --nproc_per_node N` for --steps
steps, all with the same global batch: --batch-size rows per GPU per micro-step and grad_accum = global batch /
(batch size x N), the global batch being batch size x the largest count unless --global-batch says otherwise. Every
GPU does the same work per micro-step at every count, so the runs differ in how many GPUs share a step and in how
often gradients are all-reduced (once per step). The training loop draws each step's rows from (seed, step) alone
and every rank trains on its slices, so every count trains on the same rows at every step.

Throughput is the median, over the steps after the first --skip (CUDA and NCCL set-up, allocator warm-up), of the
loop's own rate per step: the targets (bytes for bGPT and BitNet) of all ranks over the step's wall time, the GPU
synchronised. Per GPU = that / N; efficiency = per-GPU throughput on N / per-GPU throughput on the fewest GPUs
(equivalently the speed-up over the fewest, divided by the ratio of GPU counts). Loss curves: each run's per-step
training loss and its eval loss at the start and the end; `loss_rel_diff_max` / `_median` compare the curve with
the fewest GPUs' step by step (the same rows; bf16 autocast and the order of sums make them differ within noise).

NCCL's NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): on the shared hosts it can put the GPUs out of service. --device cpu runs the same with CPU
processes and gloo (CI runs it on a tiny model in tests/test_ddp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bytedeploy.bench import machine_name
from bytedeploy.checkpoint import read_checkpoint
from bytedeploy.registry import get_family

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PRECISION = {"bfloat16": "bf16", "float32": "fp32"}


def train_command(a: argparse.Namespace, gpus: int, grad_accum: int, out: Path) -> list[str]:
    sets = [arg for kv in a.set for arg in ("--set", kv)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            "-m", "bytedeploy.cli", "train", a.family, "--preset", a.preset, "--data", a.data, *sets,
            "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--grad-accum", str(grad_accum),
            "--lr", str(a.lr), "--warmup", str(a.warmup), "--eval-every", "0", "--eval-batches", str(a.eval_batches),
            "--ckpt-every", "0", "--precision", PRECISION[a.dtype], "--seed", str(a.seed), "--device", a.device,
            "--no-progress", "-o", str(out)]


def run_environment(device: str, gpus: int) -> dict[str, str]:
    env = dict(os.environ, **NO_MULTICAST)
    if device == "cpu":  # gloo on CPU processes, sharing the cores
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // gpus)))
    return env


def run_count(a: argparse.Namespace, gpus: int, grad_accum: int, unit: str) -> dict:
    """Train on `gpus` processes; -> the run's figures and curves, read back from its checkpoint."""
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run(train_command(a, gpus, grad_accum, out), env=run_environment(a.device, gpus),
                              capture_output=True, text=True, timeout=a.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode:
            log = (proc.stdout + proc.stderr)[-4000:]
            sys.exit(f"the run on {gpus} processes failed (exit {proc.returncode}):\n{log}")
        meta = read_checkpoint(out).meta
    history, train_config = meta["history"], meta["train_config"]
    assert meta["world_size"] == gpus and meta["step"] == a.steps, (meta["world_size"], meta["step"])
    rates = [rate for step, rate in history["targets_per_s"] if step > a.skip] or \
        [rate for _, rate in history["targets_per_s"]]
    return {"gpus": gpus, "batch_size": train_config["batch_size"], "grad_accum": train_config["grad_accum"],
            "global_batch": train_config["batch_size"] * train_config["grad_accum"] * gpus,
            f"{unit}s_per_s": statistics.median(rates), "wall_s": wall,
            "loss": history["loss"], "eval": history["eval"]}


def compare(runs: list[dict], unit: str) -> None:
    """Per-GPU throughput, efficiency and loss differences against the first (fewest GPUs) run, in place."""
    base, rate = runs[0], f"{unit}s_per_s"
    for run in runs:
        diffs = [abs(x - y) / abs(y) for (_, x), (_, y) in zip(run["loss"], base["loss"], strict=True)]
        run.update({
            f"{rate}_per_gpu": run[rate] / run["gpus"], "speedup": run[rate] / base[rate],
            "efficiency": (run[rate] / run["gpus"]) / (base[rate] / base["gpus"]),
            "loss_rel_diff_max": max(diffs), "loss_rel_diff_median": statistics.median(diffs),
            "eval_end_rel_diff": abs(run["eval"][-1][1] - base["eval"][-1][1]) / abs(base["eval"][-1][1]),
        })


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True)
    p.add_argument("--preset", default="base")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts (CPU processes with --device cpu), e.g. 1,2,4,8")
    p.add_argument("--dtype", choices=sorted(PRECISION), default=None,
                   help="autocast dtype [default: bfloat16 on CUDA, float32 on the CPU]")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=8, help="rows per GPU per micro-step")
    p.add_argument("--global-batch", type=int, default=None,
                   help="rows per step, the same at every count [default: batch size x the largest count]")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="builtin:stdlib")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", default=None, help="write the JSON here (also printed)")
    a = p.parse_args(argv)

    counts = sorted({int(n) for n in a.gpus.split(",")})
    global_batch = a.global_batch or a.batch_size * counts[-1]
    if counts[0] < 1 or any(global_batch % (a.batch_size * n) for n in counts):
        p.error(f"the global batch {global_batch} must be a multiple of --batch-size x each count in {counts}")
    if a.device == "cuda" and counts[-1] > torch.cuda.device_count():
        p.error(f"{counts[-1]} GPUs asked for, {torch.cuda.device_count()} visible")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    unit = get_family(a.family).UNIT

    runs = []
    for n in counts:
        runs.append(run_count(a, n, global_batch // (a.batch_size * n), unit))
        print(f"{n} x {a.device}: {runs[-1][f'{unit}s_per_s'] / n:,.0f} {unit}s/s per process, "
              f"{runs[-1]['wall_s']:.0f} s", file=sys.stderr)
    compare(runs, unit)
    result = {"machine": machine_name(), "family": a.family, "preset": a.preset, "device": a.device,
              "backend": "nccl" if a.device == "cuda" else "gloo", "dtype": a.dtype, "steps": a.steps, "skip": a.skip,
              "batch_size_per_gpu": a.batch_size, "global_batch": global_batch, "data": a.data, "sets": a.set,
              "environment": NO_MULTICAST, "command": "python -m bytedeploy.benchmarks.ddp_scaling " +
              " ".join(argv if argv is not None else sys.argv[1:]), "runs": runs}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
