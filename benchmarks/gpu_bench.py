"""Every family's `bytedeploy bench` on a GPU machine, in one command: the committed results of issue 5.

    python -m bytedeploy.benchmarks.gpu_bench --out benchmarks/results/bench-h200.json

For each family, in a process of its own: a checkpoint of its benchmark preset after 30 training steps on the GPU
(speed does not depend on the weights; the steps make a tokenizer, and logits less tied than at initialisation),
an fp32 bundle exported from it for the ONNX Runtime rows, then one `bytedeploy bench` run over eager-reference,
eager, native (and burst for sigma-GPT, native+compile for bGPT, ort-cuda when onnxruntime-gpu is importable) at
batch 1 and 64, greedy, prompt 'import os\\n', the median of 3 timed calls. Every speed-up is against
eager-reference measured in the same run. Writes one JSON with every family's result and a PNG per family beside
it (<out>-<family>.png).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bytedeploy.bench import BenchConfig, run_bench, summary_lines, write_plot
from bytedeploy.sampling import SamplingConfig

# family: (preset, new tokens per row, generate options, extra backends)
FAMILIES = {
    "bgpt": ("base", 256, {}, ["native+compile"]),
    "char-gpt2": ("toy", 100, {}, []),
    "sigma-gpt": ("small", 200, {}, ["burst"]),
    "bitnet": ("small", 128, {}, []),
    "bfn": ("small", 48, {"n_steps": 100}, []),
}


def has_ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_checkpoint(family: str, preset: str, out: Path) -> Path:
    """A few optimizer steps of the preset on the GPU: a complete checkpoint (weights, config, tokenizer) whose
    logits are less tied than at initialisation, so that greedy outputs of the backends can be compared."""
    cmd = [sys.executable, "-m", "bytedeploy.cli", "train", family, "--preset", preset, "--steps", "30",
           "--batch-size", "2", "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "1", "--first-mb", "2",
           "--device", "cuda", "-o", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def bench_family(family: str, root: Path, batch_sizes: list[int], repeats: int, ort_cuda: bool,
                 only: list[str] | None = None, dtype: str = "float32") -> dict:
    from bytedeploy.exporters import export

    preset, max_new, options, extra = FAMILIES[family]
    ckpt = make_checkpoint(family, preset, root / family)
    backends = ["eager-reference", "eager", "native", *extra] + (["ort-cuda"] if ort_cuda else [])
    backends = [b for b in backends if only is None or b in only]
    bundle = None
    if "ort-cuda" in backends:
        bundle = root / f"{family}-bundle"
        t0 = time.perf_counter()
        export(ckpt, bundle, {"float32": "fp32", "float16": "fp16"}.get(dtype, "fp32"))
        print(f"{family}: exported {bundle} in {time.perf_counter() - t0:.1f} s", flush=True)
    bc = BenchConfig(backends, batch_sizes, max_new, b"import os\n", repeats, 1, str(bundle) if bundle else None,
                     "cuda", dtype, dict(options), SamplingConfig(temperature=0.0))
    result = run_bench(str(ckpt), bc, echo=lambda line: print(f"{family}: {line}", flush=True))
    result["preset"] = preset
    result["command"] = (f"bytedeploy bench CKPT --backends {','.join(backends)} --batch-sizes "
                         f"{','.join(map(str, batch_sizes))} --max-new {max_new} --repeats {repeats} "
                         f"--reference-max-batch 1 --dtype {dtype}"
                         + "".join(f" --option {k}={v}" for k, v in options.items())
                         + (" --bundle BUNDLE" if bundle else ""))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for all families' results")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=None, help="comma-separated subset of the backends [default: all]")
    parser.add_argument("--dtype", default="float32", help="the models' dtype for every backend [float32]")
    parser.add_argument("--one", action="store_true", help="(internal) bench the one family in this process")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_bench needs a CUDA GPU")
    out = Path(args.out)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            only = args.backends.split(",") if args.backends else None
            result = bench_family(args.families, Path(tmp), sizes, args.repeats, has_ort_cuda(), only, args.dtype)
        out.write_text(json.dumps(result, default=str) + "\n")
        return
    doc = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__, "ort_cuda": has_ort_cuda(),
           "note": __doc__.split("\n\n")[2].replace("\n", " "), "results": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for family in args.families.split(","):
        # one process per family: peak memory and allocator state are the family's own
        part = out.with_name(f".{out.stem}-{family}.part.json")
        subprocess.run([sys.executable, "-m", "bytedeploy.benchmarks.gpu_bench", "--one", "--families", family,
                        "--out", str(part), "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats),
                        "--dtype", args.dtype]
                       + (["--backends", args.backends] if args.backends else []),
                       check=True)
        result = json.loads(part.read_text())
        part.unlink()
        doc["results"][family] = result
        print("\n".join(summary_lines(result)), flush=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # after each family: nothing lost
        print(write_plot(result, out.with_name(f"{out.stem}-{family}.png")), flush=True)


if __name__ == "__main__":
    main()
