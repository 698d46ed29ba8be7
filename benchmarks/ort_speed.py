"""ONNX Runtime vs eager vs eager-reference generation on the CPU, for every family with an exporter and a runtime.

    python -m bytedeploy.benchmarks.ort_speed --out benchmarks/results/cpu-ort.json    # + cpu-ort.png beside it

Per family: train the tiny preset for a few steps on a small folder of standard-library files (through the CLI, so
the checkpoint carries its tokenizer), export an fp32 bundle (BitNet: --bitlinear qdq), then time greedy generation
at batch 1 and batch 8 with the checkpoint's eager-reference and eager backends and the bundle's ORT loop, in one
run. Each backend gets one untimed warm-up call, then the best wall-clock time of --repeats calls (the call least
disturbed by other load on the machine; the load average before and after is recorded). The ORT loop
runs as bytedeploy.runtimes.generate runs it (make_runner + the family loop) with one runner kept across the calls,
so session creation is part of the warm-up, not of the timing. Tokens/s = new tokens over the whole batch / seconds;
each backend's speed-up is its tokens/s over eager-reference's in the same run. Families whose exporter or runtime
module is not there are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bytedeploy.bench import machine_name
from bytedeploy.exporters import EXPORTERS
from bytedeploy.generation import GenerateRequest
from bytedeploy.runtimes import LOOPS
from bytedeploy.sampling import SamplingConfig

BACKENDS = ("eager-reference", "eager", "ort")
# What each family generates: prompt, new tokens (0 = the family's default) and request options.
SETTINGS = {
    "bgpt": dict(prompt="import os\n", max_new=128, options={"ext": "py"}),
    "bitnet": dict(prompt="import os\n", max_new=64, options={}),
    "sigma-gpt": dict(prompt="import os\n", max_new=48, options={}),
    "bfn": dict(prompt="import os\n", max_new=0, options={}),  # the rest of the 32-token sequence, 100 steps
    "char-gpt2": dict(prompt="import os\n", max_new=48, options={}),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import onnxruntime

    return {"name": f"{cpu_model()}: {machine_name()}, onnxruntime {onnxruntime.__version__}",
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ort_intra_op_threads": "ONNX Runtime default (one per physical core)", "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def missing_modules(family: str) -> list[str]:
    """The family's exporters/<module>.py and runtimes/<module>.py that are not there (yet)."""
    return [f"{name.split('.')[1]}/{name.split('.')[2]}.py" for name in (EXPORTERS[family], LOOPS[family])
            if importlib.util.find_spec(name) is None]


def write_corpus(folder: Path, kilobytes: int) -> Path:
    """The first standard-library modules (sorted by name) up to about `kilobytes`: a small, offline corpus."""
    folder.mkdir(parents=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        shutil.copy(path, folder / path.name)
        total += path.stat().st_size
        if total >= kilobytes * 1000:
            break
    return folder


def train_checkpoint(family: str, data: Path, out: Path, steps: int) -> None:
    from bytedeploy.cli import cli

    cli.main(["train", family, "--preset", "tiny", "--data", str(data), "--steps", str(steps), "--eval-every", "0",
              "--eval-batches", "1", "--no-progress", "-o", str(out)], standalone_mode=False)


def timed(call, repeats: int):
    """One untimed warm-up, then the best wall-clock seconds of `repeats` calls; -> (last result, seconds)."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
    return result, min(times)


def bench_family(family: str, work: Path, data: Path, steps: int, batch_sizes: list[int], repeats: int) -> dict:
    from bytedeploy.checkpoint import load_model
    from bytedeploy.exporters import export
    from bytedeploy.registry import get_family
    from bytedeploy.runtimes import family_loop, make_runner

    fam = get_family(family)
    ckpt, bundle_dir = work / f"{family}-ckpt", work / f"{family}-bundle"
    train_checkpoint(family, data, ckpt, steps)
    bitlinear = "qdq" if family == "bitnet" else None
    bundle = export(ckpt, bundle_dir, "fp32", bitlinear)
    model, cfg, _ = load_model(ckpt, "cpu")
    model.eval()
    runner = make_runner(bundle, "ort")
    loop = family_loop(family)
    setting = SETTINGS[family]
    result = {"preset": "tiny", "train_steps": steps, "bundle": {"precision": "fp32", "bitlinear": bitlinear,
                                                                  "graphs": list(bundle.graphs)},
              "parameters": sum(p.numel() for p in model.parameters()), "prompt": setting["prompt"],
              "max_new": setting["max_new"], "runs": []}
    for batch_size in batch_sizes:
        request = GenerateRequest(setting["prompt"].encode(), setting["max_new"], batch_size,
                                  SamplingConfig(temperature=0.0), {"assets": str(ckpt / "assets"),
                                                                    **setting["options"]})
        calls = {"eager-reference": lambda r=request: fam.generate(model, cfg, r, "eager-reference"),
                 "eager": lambda r=request: fam.generate(model, cfg, r, "eager"),
                 "ort": lambda r=request: loop.generate(bundle, runner, r)}
        rows, outputs = {}, {}
        for backend in BACKENDS:
            res, seconds = timed(calls[backend], repeats)
            outputs[backend] = res.outputs
            rows[backend] = {"new": res.n_new, "unit": res.unit, "seconds": seconds, "per_s": res.n_new / seconds,
                             "loop_seconds": res.seconds, "passes": res.passes}
        for backend, row in rows.items():
            row["speedup_vs_eager_reference"] = row["per_s"] / rows["eager-reference"]["per_s"]
            row["same_output_as_eager"] = outputs[backend] == outputs["eager"]
        result["runs"].append({"batch_size": batch_size, "backends": rows,
                               "output_head": outputs["ort"][0][:60].decode("utf-8", errors="replace")})
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f, r in result["families"].items() if "runs" in r]
    batch_sizes = result["settings"]["batch_sizes"]
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5 + 1.6 * len(families), 4.5), squeeze=False)
    width = 0.8 / len(BACKENDS)
    for ax, batch_size in zip(axes[0], batch_sizes):
        for j, backend in enumerate(BACKENDS):
            xs, ys, ups = [], [], []
            for i, family in enumerate(families):
                run = next(r for r in result["families"][family]["runs"] if r["batch_size"] == batch_size)
                xs.append(i + (j - (len(BACKENDS) - 1) / 2) * width)
                ys.append(run["backends"][backend]["per_s"])
                ups.append(run["backends"][backend]["speedup_vs_eager_reference"])
            bars = ax.bar(xs, ys, width, label=backend)
            if backend != "eager-reference":
                for bar, up in zip(bars, ups):
                    ax.annotate(f"{up:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the legend above the bars
        ax.set_xticks(range(len(families)), families)
        ax.set_title(f"batch {batch_size}")
        ax.set_ylabel("new units / s, log (tokens, chars or bytes)")
    axes[0][0].legend(fontsize=8)
    skipped = [f for f, r in result["families"].items() if "runs" not in r]
    note = f"; not run: {', '.join(skipped)}" if skipped else ""
    fig.suptitle(f"greedy generation, tiny presets, fp32 (speed-up over eager-reference){note}\n"
                 f"{result['machine']['name']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(SETTINGS), help="comma-separated families")
    p.add_argument("--steps", type=int, default=20, help="training steps of each tiny model")
    p.add_argument("--data-kb", type=int, default=400, help="size of the standard-library training corpus")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per backend (best), after one warm-up")
    p.add_argument("--out", default=None, help="write the JSON here and the PNG plot beside it (also printed)")
    a = p.parse_args()
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    result = {"benchmark": "ort-cpu", "machine": machine(),
              "settings": {"batch_sizes": batch_sizes, "repeats": a.repeats, "train_steps": a.steps,
                           "sampling": "greedy (temperature 0)", "data_kb": a.data_kb,
                           "timing": "best wall-clock of the repeats, after one warm-up"},
              "target": "ort >= 2x eager-reference tokens/s on the CPU", "families": {}}
    result["machine"]["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_corpus(Path(tmp) / "corpus", a.data_kb)
        for family in a.families.split(","):
            missing = missing_modules(family)
            if missing:
                result["families"][family] = {"skipped": f"not written yet: {', '.join(missing)}"}
                continue
            try:
                result["families"][family] = bench_family(family, Path(tmp), data, a.steps, batch_sizes,
                                                          a.repeats)
            except Exception as e:  # one family's failure is reported, the others still run
                traceback.print_exc()
                result["families"][family] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["summary"] = {
        f"{family} batch {run['batch_size']}": round(run["backends"]["ort"]["speedup_vs_eager_reference"], 2)
        for family, r in result["families"].items() if "runs" in r for run in r["runs"]}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
