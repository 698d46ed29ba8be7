"""Time the BitLinear W2A8 kernel against fp16 F.linear and the integer reference, all in one run (GPU).

    python -m bytedeploy.benchmarks.bitlinear_kernels --out benchmarks/results/h100-bitlinear.json

For each weight shape (N, K) and token count M: ternary weights (packed 2-bit for the kernel, the same values times
beta in fp16 for F.linear), fp16 activations. Every kernel is checked bitwise against bitlinear_int first.

Timing: each method is captured in a CUDA graph that calls it once on each of R weight copies, R chosen so the
copies together take 3x the GPU's L2 cache: every call reads its weights from DRAM, as a model whose weights do not
fit in L2 does, and launch overhead on the host is out of the picture (decode loops replay CUDA graphs too). After
warm-up replays, each replay is timed with CUDA events; the time of one call is the median replay time / R. The
integer reference (bitlinear_int: unpacking plus a float64 matmul) is timed with events around eager calls. Ratios
compare times measured in this same run. Achieved bandwidth = weight bytes read per call / time per call.

PDL (plugins/pdl.py, sm_90+): the graph chains R calls, so with PDL each call's first weight loads overlap the previous
call's tail, as they would between the kernels of a decode step; x is still read only after the previous kernel has
finished (the batch path: the quantization kernel waits first thing, the GEMM after its first weight loads). w2a8_us is
with PDL where the GPU has it, w2a8_no_pdl_us the same measurement with pdl.ENABLED off (PDL is a constexpr kernel
argument, so that is a separately compiled kernel launched without the PDL attribute; the autotuner's key does not
include it, so both use the config tuned with PDL on).

Each row names the autotune config that won (kernel_config) and the autotuner's own timings of its candidates
(autotune_us). With --all-configs every candidate is also forced in turn and timed the same way as the kernel
(graph_us_per_config), so a row shows whether the autotuner's pick is also the fastest in a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary

SHAPES = [(4096, 4096)]  # (out_features N, in_features K)
TOKENS = [1, 16, 64]


def time_graph(calls, replays: int, warmup: int = 3) -> float:
    """Median microseconds of one call: a CUDA graph of all `calls` (one per weight copy), replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile / autotune outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def time_eager(call, reps: int, warmup: int = 2) -> float:
    """Median microseconds of one eager call (events around each call)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def copies_for(bytes_per_copy: int, l2_bytes: int) -> int:
    return max(2, min(256, math.ceil(3 * l2_bytes / bytes_per_copy)))


def tuner_for(M: int):
    from bytedeploy.plugins import bitlinear_kernels as bk

    return bk._gemv_tuned if M <= bk.GEMV_MAX_TOKENS else bk._gemm_tuned


def tuned_config(M: int) -> str:
    return str(getattr(tuner_for(M), "best_config", None))


def autotune_timings(M: int, top: int = 8) -> dict:
    """The autotuner's own measurements of its candidates for the last key it tuned (median microseconds, timed as
    plugins/tuning.py says: a CUDA graph of back-to-back calls, weights in L2), fastest first."""
    timings = getattr(tuner_for(M), "configs_timings", None) or {}
    ranked = sorted(timings.items(), key=lambda item: item[1][0] if isinstance(item[1], (list, tuple)) else item[1])
    return {str(config): round(1000 * (t[0] if isinstance(t, (list, tuple)) else t), 3) for config, t in ranked[:top]}


def bench_all_configs(x, packed, beta, packed_copies, replays: int) -> dict:
    """Every autotune candidate forced in turn, timed like the kernel (CUDA graph over the weight copies) and
    checked bitwise: {config: microseconds or an error}, fastest first."""
    from bytedeploy.plugins import bitlinear_kernels as bk

    (M, K), N = x.shape, packed.size(0)
    kind, configs = ("gemv", bk._GEMV_CONFIGS) if M <= bk.GEMV_MAX_TOKENS else ("gemm", bk._GEMM_CONFIGS)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ref = bitlinear_int(x, packed, beta, K).to(x.dtype)
    times = {}
    for config in configs:
        bk.FORCED_CONFIG[kind] = config
        try:
            if not torch.equal(bk.bitlinear_w2a8(x, packed, beta, K), ref):
                times[str(config)] = "NOT EXACT"
                continue
            times[str(config)] = round(time_graph([lambda w=w: bk.bitlinear_w2a8(x, w, beta, K, out=out)
                                                   for w in packed_copies], replays), 3)
        except Exception as e:  # a config this GPU cannot compile (resources): recorded, not fatal
            times[str(config)] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            bk.FORCED_CONFIG.pop(kind, None)
    return dict(sorted(times.items(), key=lambda item: item[1] if isinstance(item[1], float) else float("inf")))


def bench_shape(N: int, K: int, tokens: list[int], replays: int, l2_bytes: int,
                all_configs: bool = False) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    w_int = torch.randint(-1, 2, (N, K), generator=gen, dtype=torch.int8)
    beta = torch.tensor([0.0213], dtype=torch.float32, device=dev)
    packed = pack_ternary(w_int).to(dev)
    w_fp16 = (w_int.float() * beta.cpu()).half().to(dev)
    packed_bytes, fp16_bytes = packed.numel(), w_fp16.numel() * 2
    packed_copies = [packed.clone() for _ in range(copies_for(packed_bytes, l2_bytes))]
    fp16_copies = [w_fp16.clone() for _ in range(copies_for(fp16_bytes, l2_bytes))]
    rows = []
    for M in tokens:
        x = torch.randn(M, K, generator=gen).half().to(dev)
        row = {"N": N, "K": K, "M": M, **bench_tokens(x, packed, beta, packed_copies, fp16_copies, replays)}
        if all_configs:
            row["graph_us_per_config"] = bench_all_configs(x, packed, beta, packed_copies, replays)
            fastest = next(iter(row["graph_us_per_config"]))
            row["graph_fastest_config"] = fastest
            row["autotune_agrees_with_graph_timing"] = fastest == row["kernel_config"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(f"{N}x{K} M={M}: w2a8 {row['w2a8_us']} us ({row['speedup_vs_fp16']}x fp16), without PDL "
              f"{row['w2a8_no_pdl_us']} us ({row['speedup_vs_fp16_no_pdl']}x), fp16 {row['fp16_linear_us']} us",
              flush=True)
    return rows


def time_graph_without_pdl(calls, replays: int) -> float:
    """time_graph with PDL turned off (the kernels launch as they would before sm_90)."""
    from bytedeploy.plugins import pdl

    enabled = pdl.ENABLED
    pdl.ENABLED = False
    try:
        return time_graph(calls, replays)
    finally:
        pdl.ENABLED = enabled


def bench_tokens(x, packed, beta, packed_copies, fp16_copies, replays: int) -> dict:
    from bytedeploy.plugins.bitlinear_kernels import bitlinear_w2a8

    (M, K), N = x.shape, packed.size(0)
    exact = torch.equal(bitlinear_w2a8(x, packed, beta, K), bitlinear_int(x, packed, beta, K).to(x.dtype))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    calls = [lambda w=w: bitlinear_w2a8(x, w, beta, K, out=out) for w in packed_copies]
    ours = time_graph(calls, replays)
    ours_no_pdl = time_graph_without_pdl(calls, replays)
    fp16 = time_graph([lambda w=w: F.linear(x, w) for w in fp16_copies], replays)
    reference = time_eager(lambda: bitlinear_int(x, packed, beta, K), reps=10)
    ours_eager = time_eager(lambda: bitlinear_w2a8(x, packed, beta, K, out=out), reps=50)
    packed_bytes, fp16_bytes = packed.numel(), fp16_copies[0].numel() * 2
    return {
        "exact_vs_reference": exact, "kernel_config": tuned_config(M), "autotune_us": autotune_timings(M),
        "w2a8_us": round(ours, 3), "w2a8_no_pdl_us": round(ours_no_pdl, 3), "fp16_linear_us": round(fp16, 3),
        "int_reference_us": round(reference, 1), "w2a8_eager_launch_us": round(ours_eager, 3),
        "speedup_vs_fp16": round(fp16 / ours, 3), "speedup_vs_fp16_no_pdl": round(fp16 / ours_no_pdl, 3),
        "speedup_vs_int_reference": round(reference / ours, 1),
        "w2a8_weight_bytes": packed_bytes, "fp16_weight_bytes": fp16_bytes,
        "w2a8_GBps": round(packed_bytes / ours / 1e3, 1), "fp16_GBps": round(fp16_bytes / fp16 / 1e3, 1),
        "weight_copies": {"w2a8": len(packed_copies), "fp16": len(fp16_copies)},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['N']}x{r['K']}\nM={r['M']}" for r in rows]
    series = [("w2a8 kernel", "w2a8_us"), ("w2a8 without PDL", "w2a8_no_pdl_us"), ("fp16 F.linear", "fp16_linear_us"),
              ("int reference", "int_reference_us")]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4.5))
    width = 0.2
    for s, (name, key) in enumerate(series):
        xs = [i + (s - 1.5) * width for i in range(len(rows))]
        bars = ax.bar(xs, [r[key] for r in rows], width, label=name)
        if key == "w2a8_us":
            for bar, r in zip(bars, rows):
                ax.annotate(f"{r['speedup_vs_fp16']:.1f}x vs fp16", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("microseconds per call (median, log scale)")
    ax.set_title(f"BitLinear W2A8 vs fp16 — {result['gpu']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h100-bitlinear.json"))
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="comma-separated NxK (out x in features)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts M")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--all-configs", action="store_true",
                        help="also time every autotune candidate (forced, CUDA graph) and record them per row")
    args = parser.parse_args(argv)

    from bytedeploy.plugins.bitlinear_kernels import missing_requirement

    problem = missing_requirement(torch.device("cuda"))
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 1
    import triton

    props = torch.cuda.get_device_properties(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(m) for m in args.tokens.split(",")]
    result = {
        "benchmark": "bitlinear_kernels", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "triton": triton.__version__, "l2_cache_bytes": props.L2_cache_size,
        "command": "python -m bytedeploy.benchmarks.bitlinear_kernels " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
        "timing": "CUDA graph of one call per weight copy (copies = 3x L2), 3 warm-up replays, median of "
                  f"{args.replays} event-timed replays / copies; int reference: median of 10 eager calls",
        "rows": [],
    }
    for N, K in shapes:
        result["rows"] += bench_shape(N, K, tokens, args.replays, props.L2_cache_size, args.all_configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
