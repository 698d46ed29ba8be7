"""The decode kernels' configs for bGPT base on this GPU, timed where they run: whole-patch graph replays.

    python -m bytedeploy.benchmarks.experiments.bgpt_config_sweep --out benchmarks/results/h200-bgpt-config-sweep.json

batch 1, random init (speed does not depend on the weights), --dtype (float32). With the pinned configs off
(decode_kernels.PINNED_CONFIGS), the autotuner picks a config per kernel key as usual; then a coordinate descent,
key by key, tries every config of that key that the autotuner's prune keeps, with the others held, each timed as the
median GPU time of 20 replays of the native runner's patch graph (a fresh runner per candidate, so that the graph
holds it), and keeps the fastest. Prints the result as entries for decode_kernels.PINNED_CONFIGS and writes them
with every timing to one JSON. This set the H200's entries: float32 from the session script the module was made
from, bfloat16 from the module itself (--dtype bfloat16, h200-bgpt-config-sweep-bf16.json).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bytedeploy.bench import machine_name, write_json
from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.plugins import decode_kernels
from bytedeploy.registry import get_family
from bytedeploy.runtimes.native_bgpt import BgptRunner
from bytedeploy.sampling import SamplingConfig


def replay_ms(model, prompt, tail, replays: int) -> float:
    """Median GPU time of one patch's graph replay of a fresh runner (after a 4-patch run and 3 warm-up replays)."""
    with torch.no_grad():
        runner = BgptRunner(model, 1, SamplingConfig(temperature=0.0))
        runner.run(prompt, tail, 4, 0)
        for _ in range(3):
            runner.graph.replay()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def kept_configs(tuner, key: tuple) -> list:
    """The configs the autotuner's prune keeps for this key: the weight tile within ~64 registers per thread, and
    for qkv_attention BLOCK_N dividing the head size (the same rules, on the key's shape)."""
    shape = dict(zip(tuner.keys, key))
    K = shape.get("K", shape.get("C"))  # the input width: ln_linear and qkv_attention's K, head_select's C
    block_k = 1 << (K - 1).bit_length()
    kept = [c for c in tuner.configs if c.kwargs["BLOCK_N"] * block_k <= 64 * 32 * c.num_warps]
    if "D" in shape:
        kept = [c for c in kept if shape["D"] % c.kwargs["BLOCK_N"] == 0]
    return kept


def config_name(config) -> str:
    return f"{config.kwargs['BLOCK_N']}/{config.num_warps}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bgpt_config_sweep needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    decode_kernels.PINNED_CONFIGS = {}  # every key autotunes, and the sweep overrides the autotuner's cache
    cfg = build_model_config(get_family("bgpt"), "base", {})
    torch.manual_seed(0)
    model = bgpt.Model(cfg).cuda().to(dtype).eval()
    prompt, tail, _ = bgpt.plan_generation(cfg, GenerateRequest(b"import os\n", 256))
    tuners = {"ln_linear": decode_kernels._ln_linear_tuned, "head_select": decode_kernels._head_select_tuned,
              "qkv_attention": decode_kernels._qkv_attention_tuned}
    autotuned_ms = replay_ms(model, prompt, tail, 40)
    print(f"{args.dtype}: autotuned {autotuned_ms:.4f} ms per patch", flush=True)
    sweeps = []
    for kernel, tuner in tuners.items():
        for key in list(tuner.cache):
            picked = tuner.cache[key]
            times = {}
            for config in kept_configs(tuner, key):
                tuner.cache[key] = config
                try:
                    times[config_name(config)] = replay_ms(model, prompt, tail, 20)
                except Exception as error:  # a config this key cannot take (e.g. out of resources)
                    times[config_name(config)] = f"{type(error).__name__}"
            timed = {name: ms for name, ms in times.items() if isinstance(ms, float)}
            best = min(timed, key=timed.get)
            tuner.cache[key] = next(c for c in tuner.configs if config_name(c) == best)
            shape = list(key[:len(tuner.keys)])  # Triton appends the tensors' dtypes to the named keys
            sweeps.append({"kernel": kernel, "key": shape, "autotuned": config_name(picked), "best": best,
                           "ms_per_patch": times})
            print(f"  {kernel} {tuple(shape)}: autotuned {config_name(picked)}, best {best}: "
                  f"{ {n: round(t, 4) if isinstance(t, float) else t for n, t in times.items()} }", flush=True)
    swept_ms = replay_ms(model, prompt, tail, 40)
    print(f"{args.dtype}: after the sweep {swept_ms:.4f} ms per patch (autotuned {autotuned_ms:.4f})")
    props = torch.cuda.get_device_properties(0)
    print(f"PINNED_CONFIGS[({props.major}, {props.minor}, {props.multi_processor_count})] entries:")
    for sweep in sweeps:
        block_n, num_warps = sweep["best"].split("/")
        print(f"    ({sweep['kernel']!r}, {tuple(sweep['key'])}, torch.{args.dtype}): ({block_n}, {num_warps}),")
    doc = {"machine": machine_name(), "torch": torch.__version__, "dtype": args.dtype,
           "gpu_kind": [props.major, props.minor, props.multi_processor_count],
           "autotuned_ms_per_patch": autotuned_ms, "swept_ms_per_patch": swept_ms, "sweeps": sweeps}
    write_json(doc, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
