"""Every family's `bytedeploy bench` on a GPU machine, in one command: the committed GPU results.

    python -m bytedeploy.benchmarks.gpu_bench --out benchmarks/results/h200-bench.json
    python -m bytedeploy.benchmarks.gpu_bench --ort-cuda     # -> benchmarks/results/<machine>-ort-cuda.json

For each family, in a process of its own: a checkpoint of its benchmark preset after 30 training steps on the GPU
(speed does not depend on the weights; the steps make a tokenizer, and logits less tied than at initialisation),
bundles exported from it for the ONNX Runtime rows, then one `bytedeploy bench` run over eager-reference, eager,
native (and burst for sigma-GPT, native+compile for bGPT, ort-cuda when onnxruntime-gpu is importable) at batch 1 and
64, greedy, prompt 'import os\\n', the median of 3 timed calls. Every speed-up is against eager-reference measured in
the same run; every row has its share of the step's bound (result["bound"], bytedeploy/bounds.py), and native at
batch 1 a torch.profiler view of its step (row["profile"], bench --profile). Writes one JSON with every family's
result and a PNG per family beside it (<out>-<family>.png).

--ort-cuda (issue 19): every family's checkpoint and its fp32 and fp16 bundles are made first, in parallel (one
process each); then, per dtype (float32, float16) and family, one bench run of eager, native and ort-cuda
(eager-reference too in float32, at batch 1) at batch 1 and 64, whose rows give ort-cuda's share of native's
tokens/s and its greedy agreement with eager (matches_eager); and a profile of ort-cuda's step at batch 1
(profile_step): graph nodes per step and ONNX Runtime's host time per step, from a run without CUDA graphs with
ONNX Runtime's profiler on, against the step's time with and without CUDA graphs. One JSON per machine
(<machine>-ort-cuda.json, overwritten), written after each family.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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
PRECISIONS = {"float32": "fp32", "float16": "fp16"}
ORT_CUDA_BACKENDS = ["eager-reference", "eager", "native", "ort-cuda"]
RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_STEPS = 50
PREPARED = "prepared.txt"  # in --workdir once every family's checkpoint and bundles are there


def has_ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def machine_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the results files' machine prefix."""
    found = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name)
    return (found.group(1) if found else re.sub(r"\W+", "-", name)).lower()


def make_checkpoint(family: str, preset: str, out: Path) -> Path:
    """A few optimizer steps of the preset on the GPU: a complete checkpoint (weights, config, tokenizer) whose
    logits are less tied than at initialisation, so that greedy outputs of the backends can be compared."""
    cmd = [sys.executable, "-m", "bytedeploy.cli", "train", family, "--preset", preset, "--steps", "30",
           "--batch-size", "2", "--eval-every", "0", "--ckpt-every", "0", "--eval-batches", "1", "--first-mb", "2",
           "--device", "cuda", "-o", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def bundle_path(root: Path, family: str, dtype: str) -> Path:
    return root / f"{family}-{PRECISIONS[dtype]}-bundle"


def prepare(family: str, root: Path, dtypes: list[str], ort_fusions: bool = False) -> None:
    """The family's checkpoint, then its bundles, one export process per dtype (the --prepare step of --ort-cuda)."""
    t0 = time.perf_counter()
    ckpt = make_checkpoint(family, FAMILIES[family][0], root / family)
    exports = [subprocess.Popen([sys.executable, "-m", "bytedeploy.cli", "export", str(ckpt), "-o",
                                 str(bundle_path(root, family, dtype)), "--precision", PRECISIONS[dtype]]
                                + (["--ort-fusions"] if ort_fusions else []),
                                stdout=subprocess.DEVNULL) for dtype in dtypes]
    if any(job.wait() for job in exports):
        sys.exit(f"{family}: an export failed")
    print(f"{family}: checkpoint and {len(dtypes)} bundles in {time.perf_counter() - t0:.1f} s", flush=True)


def bench_family(family: str, root: Path, batch_sizes: list[int], repeats: int, ort_cuda: bool,
                 only: list[str] | None = None, dtype: str = "float32", prepared: bool = False) -> dict:
    from bytedeploy.exporters import export

    preset, max_new, options, extra = FAMILIES[family]
    ckpt = root / family if prepared else make_checkpoint(family, preset, root / family)
    backends = ["eager-reference", "eager", "native", *extra] + (["ort-cuda"] if ort_cuda else [])
    backends = [b for b in backends if only is None or b in only]
    bundle = None
    if "ort-cuda" in backends:
        bundle = bundle_path(root, family, dtype)
        if not prepared:
            t0 = time.perf_counter()
            export(ckpt, bundle, PRECISIONS.get(dtype, "fp32"))
            print(f"{family}: exported {bundle} in {time.perf_counter() - t0:.1f} s", flush=True)
    bc = BenchConfig(backends, batch_sizes, max_new, b"import os\n", repeats, 1, str(bundle) if bundle else None,
                     "cuda", dtype, dict(options), SamplingConfig(temperature=0.0), profile=True)
    result = run_bench(str(ckpt), bc, echo=lambda line: print(f"{family}: {line}", flush=True))
    result["preset"] = preset
    result["command"] = (f"bytedeploy bench CKPT --backends {','.join(backends)} --batch-sizes "
                         f"{','.join(map(str, batch_sizes))} --max-new {max_new} --repeats {repeats} "
                         f"--reference-max-batch 1 --dtype {dtype} --profile"
                         + "".join(f" --option {k}={v}" for k, v in options.items())
                         + (" --bundle BUNDLE" if bundle else ""))
    if bundle is not None and any(r["backend"] == "ort-cuda" and r["status"] == "ok" for r in result["rows"]):
        result["ort_cuda_vs_native"] = share_of_native(result["rows"])
        result["profile"] = profile_step(bundle, family)
    return result


def share_of_native(rows: list[dict]) -> dict:
    """{batch size: ort-cuda tokens/s over native's} from one run's rows."""
    rate = {(r["backend"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["status"] == "ok"}
    return {str(b): rate[("ort-cuda", b)] / rate[("native", b)] for (backend, b) in rate
            if backend == "ort-cuda" and ("native", b) in rate}


def step_state(family: str, bundle, runner):
    """The family loop's device state at batch 1 (runtimes/<family>.py) -> (state, one step, a small host read that
    waits for the device). The step runs on whatever the state holds: its time does not depend on the values."""
    from bytedeploy.runtimes.bfn import FlowSteps
    from bytedeploy.runtimes.bgpt import PatchSteps
    from bytedeploy.runtimes.windowed import TokenSteps

    if family == "bgpt":
        state = PatchSteps(bundle, runner, 1)
        return state, lambda: (state.bytes(None), state.decode_patch()), lambda: runner.to_numpy(state.pos[0])
    if family == "bfn":
        state, keys, zero = FlowSteps(bundle, runner, 1), np.zeros((1, 2), dtype=np.int64), np.zeros(1)
        return state, lambda: state.call(zero, zero, keys, None), lambda: runner.to_numpy(state.inputs["t"])
    context = bundle.family_config().block_size
    state = TokenSteps(bundle, runner, 1, context + 1, context)
    return state, lambda: state.step(None), lambda: runner.to_numpy(state.pos[0])


def profile_step(bundle_dir: Path, family: str) -> dict:
    """ort-cuda's step at batch 1 (a token; bGPT: a patch, byte_patch_greedy then patch_decode; BFN: a step_greedy
    call), as the loop runs it: ms per step with CUDA graphs, ms per step without them (ONNX Runtime's profiler on),
    and from that profile the graph nodes ONNX Runtime ran per step and its host time in them (the nodes' Compute
    calls, which launch their kernels)."""
    from bytedeploy.exporters.bundle import load_bundle
    from bytedeploy.runtimes.ort import OrtRunner

    bundle = load_bundle(bundle_dir)
    out = {"batch_size": 1, "steps_timed": PROFILE_STEPS}
    with tempfile.TemporaryDirectory() as tmp:
        for label, runner in (("cuda_graphs", OrtRunner(bundle, "cuda")),
                              ("no_cuda_graphs", OrtRunner(bundle, "cuda", cuda_graphs=False, profile=tmp))):
            _, step, wait = step_state(family, bundle, runner)
            step()  # the warm-up: captures the CUDA graphs
            wait()
            t0 = time.perf_counter()
            for _ in range(PROFILE_STEPS):
                step()
            wait()
            out[f"ms_per_step_{label}"] = 1e3 * (time.perf_counter() - t0) / PROFILE_STEPS
            if label == "cuda_graphs":
                out.update(captured_graphs=sorted(runner.capturing), cuda_graph_errors=dict(runner.cuda_graph_errors))
            else:
                nodes, host_us = profile_counts(runner, PROFILE_STEPS + 1)
                out.update(nodes_per_step=nodes, host_ms_per_step=host_us / 1e3)
    return out


def profile_counts(runner, runs: int) -> tuple[float, float]:
    """(node events, microseconds in them) per run, over the runner's sessions' profiles."""
    nodes = host = 0.0
    for session in runner.sessions.values():
        events = json.loads(Path(session.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
        nodes += len(kernels)
        host += sum(e.get("dur", 0) for e in kernels)
    return nodes / runs, host / runs


def run_one(args, sizes: list[int]) -> None:
    """--one: bench the one family in this process."""
    only = args.backends.split(",") if args.backends else None
    if args.prepared:
        result = bench_family(args.families, Path(args.prepared), sizes, args.repeats, has_ort_cuda(), only,
                              args.dtype, prepared=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_family(args.families, Path(tmp), sizes, args.repeats, has_ort_cuda(), only, args.dtype)
    Path(args.out).write_text(json.dumps(result, default=str) + "\n")


def child(args, family: str, part: Path, dtype: str, backends: str | None, prepared: Path | None) -> dict:
    """One family's bench in a process of its own (peak memory and allocator state are the family's own)."""
    subprocess.run([sys.executable, "-m", "bytedeploy.benchmarks.gpu_bench", "--one", "--families", family,
                    "--out", str(part), "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats),
                    "--dtype", dtype]
                   + (["--backends", backends] if backends else [])
                   + (["--prepared", str(prepared)] if prepared else []), check=True)
    result = json.loads(part.read_text())
    part.unlink()
    return result


def run_ort_cuda(args, families: list[str]) -> None:
    """--ort-cuda: the bundles first (in parallel), then per dtype and family one bench run and the step profile."""
    name = torch.cuda.get_device_name(0)
    out = Path(args.out) if args.out else RESULTS / f"{machine_slug(name)}-ort-cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtype.split(",") if args.dtype else list(PRECISIONS)
    doc = {"machine": name, "torch": torch.__version__, "onnxruntime": ort_version(), "ort_cuda": has_ort_cuda(),
           "command": "python -m bytedeploy.benchmarks.gpu_bench --ort-cuda", "note": __doc__.split("\n\n")[3]
           .replace("\n", " "), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        if not (root / PREPARED).is_file():
            prepare_all(families, root, dtypes, args.ort_fusions)
        if args.prepare_only:
            return
        for dtype in dtypes:
            backends = ORT_CUDA_BACKENDS if dtype == "float32" else ORT_CUDA_BACKENDS[1:]
            for family in families:
                result = child(args, family, root / f".{family}.part.json", dtype, ",".join(backends), root)
                doc["results"][f"{family} {dtype}"] = result
                print("\n".join(summary_lines(result)), flush=True)
                print(f"{family} {dtype}: ort-cuda / native = {result.get('ort_cuda_vs_native')}; profile "
                      f"{result.get('profile')}", flush=True)
                out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # after each family: nothing lost
    print(f"wrote {out}", flush=True)


def prepare_all(families: list[str], root: Path, dtypes: list[str], ort_fusions: bool = False) -> None:
    """Every family's checkpoint and bundles, in parallel: one process each."""
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fusions = ["--ort-fusions"] if ort_fusions else []
    jobs = [subprocess.Popen([sys.executable, "-m", "bytedeploy.benchmarks.gpu_bench", "--prepare", family,
                              "--out", str(root), "--dtype", ",".join(dtypes), *fusions]) for family in families]
    if any(job.wait() for job in jobs):
        sys.exit("preparing the checkpoints and bundles failed")
    (root / PREPARED).write_text(f"{time.perf_counter() - t0:.1f} s\n")


def ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for all families' results (--ort-cuda: "
                                                    "[benchmarks/results/<machine>-ort-cuda.json])")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default=None, help="comma-separated subset of the backends [default: all]")
    parser.add_argument("--dtype", default=None, help="the models' dtype for every backend [float32]; --ort-cuda: "
                                                      "comma-separated [float32,float16]")
    parser.add_argument("--ort-cuda", action="store_true", help="issue 19's ort-cuda rows (module docstring)")
    parser.add_argument("--one", action="store_true", help="(internal) bench the one family in this process")
    parser.add_argument("--prepare", default=None, help="(internal) make FAMILY's checkpoint and bundles in --out")
    parser.add_argument("--prepared", default=None, help="(internal) the folder --prepare filled")
    parser.add_argument("--workdir", default=None, help="--ort-cuda: keep the checkpoints and bundles here (made "
                                                        "once) [default: a temporary folder]")
    parser.add_argument("--prepare-only", action="store_true", help="--ort-cuda: only make them")
    parser.add_argument("--ort-fusions", action="store_true", help="--ort-cuda: export the bundles with --ort-fusions "
                        "(the ORT rows run the fused graphs; BYTEDEPLOY_ORT_FUSIONS=0 the standard ones)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_bench needs a CUDA GPU")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.prepare:
        return prepare(args.prepare, Path(args.out), args.dtype.split(","), args.ort_fusions)
    if args.ort_cuda:
        return run_ort_cuda(args, args.families.split(","))
    args.dtype = args.dtype or "float32"
    if args.one:
        return run_one(args, sizes)
    if not args.out:
        sys.exit("--out is required")
    out = Path(args.out)
    doc = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__, "ort_cuda": has_ort_cuda(),
           "note": __doc__.split("\n\n")[2].replace("\n", " "), "results": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for family in args.families.split(","):
        result = child(args, family, out.with_name(f".{out.stem}-{family}.part.json"), args.dtype, args.backends,
                       None)
        doc["results"][family] = result
        print("\n".join(summary_lines(result)), flush=True)
        out.write_text(json.dumps(doc, indent=1, default=str) + "\n")  # after each family: nothing lost
        print(write_plot(result, out.with_name(f"{out.stem}-{family}.png")), flush=True)


if __name__ == "__main__":
    main()
