"""`bytedeploy bench`: generation speed of a checkpoint or an exported bundle on every backend x batch size, in one
run.

For each backend and batch size: one untimed warm-up call (it also captures the native backend's CUDA graphs),
then `repeats` timed calls; the row keeps the median. A row reports

  latency_ms_per_token  seconds per decode step (a step makes one token, or byte, for every row of the batch)
  latency_ms_per_patch  bGPT: seconds per patch_size new bytes of a row (not per patch stepped: the native loop's
                        first patch prefills the prompt's forced bytes and its last decodes only the bytes asked for)
  tokens_per_s          new tokens of the whole batch per second (the throughput)
  peak_gpu_memory_mb    torch.cuda.max_memory_allocated over the row's calls (reset per row; PyTorch's allocator
                        only: ONNX Runtime and TensorRT allocate their own memory)
  speedup_vs_eager_reference   tokens_per_s over eager-reference's at the same batch size, measured in this run.
                        eager-reference generates the rows of a batch one after another, so its throughput does
                        not grow with the batch: above --reference-max-batch it is not run and the speed-up uses
                        its largest measured batch (speedup_basis says which)
  matches_eager_reference / matches_eager   the outputs are identical (greedy decoding, the default); on a bundle,
                        matches_<backend>: identical to the first bundle backend of --backends that ran

The run also records host_op_us: the host's time to issue one small torch op on the device (the median of three
batches of 2,000 in-place adds, before the rows and after them). The eager loops issue hundreds of such ops per
token and are bound by the host, so it is there to tell a slow host from a fast one when speed-ups over
eager-reference are compared across runs.

Backends: eager-reference, eager, burst (sigma-GPT), native (runtimes/native.py), native+compile (bGPT: native with
torch.compile inside the graphs), and on an exported bundle (--bundle) ort, ort-cuda, trt. A row that cannot run
here is kept with status "skipped" and the reason; nothing crashes the run.

Given a bundle instead of a checkpoint, the rows are the bundle backends' only, and the run imports no torch (a
deploy install has none): no host_op_us, no peak GPU memory, no bound.

Every checkpoint row gets ms_per_step (a step reads the weights once: bGPT's is a patch, BFN's a denoising step,
the others' a token or pass) and, on a GPU, the share of its bound (bytedeploy/bounds.py): the larger of the weight
bytes per step over the copy bandwidth measured at the start of the run and the launch floor (one CUDA graph replay
of an empty kernel), over the measured time per step. result["bound"] holds the weight bytes, the bandwidth and the
launch floor (null on the CPU). --profile adds a torch.profiler view of the native row at batch 1 (row["profile"]:
kernels and host time per step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from bytedeploy.errors import UserError
from bytedeploy.generation import MAX_NEW, GenerateRequest, GenerateResult
from bytedeploy.runner import BUNDLE_BACKENDS, BundleModel, CheckpointModel, is_bundle
from bytedeploy.sampling import SamplingConfig

CHECKPOINT_BACKENDS = ("eager-reference", "eager", "burst", "native", "native+compile")
CHECKPOINT_DEFAULT, BUNDLE_DEFAULT = "eager-reference,eager,native", "ort"  # --backends when not given
DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes of the checkpoint backends
DEFAULT_MAX_NEW = 256  # new tokens per row unless --max-new says, or fewer where the model's context holds fewer


@dataclass
class BenchConfig:
    backends: list[str] = field(default_factory=lambda: CHECKPOINT_DEFAULT.split(","))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    max_new: int | None = None  # None: DEFAULT_MAX_NEW, or what the model's context leaves (fitting_max_new)
    prompt: bytes = b"import os\n"
    repeats: int = 3
    reference_max_batch: int = 8
    bundle: str | None = None
    device: str | None = None  # default: cuda when available
    dtype: str = "float32"
    options: dict = field(default_factory=dict)  # family request options (ext, n_steps, order, ...)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    profile: bool = False  # torch.profiler view of the native row at batch 1 (bounds.profile_call)

    def __post_init__(self):
        unknown = [b for b in self.backends if b not in CHECKPOINT_BACKENDS + BUNDLE_BACKENDS]
        if unknown or not self.backends:
            raise UserError(f"unknown backend {unknown[0] if unknown else '(none)'}; choose from "
                            f"{', '.join(CHECKPOINT_BACKENDS + BUNDLE_BACKENDS)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("--batch-sizes needs batch sizes >= 1")
        if not (self.max_new is None or 1 <= self.max_new <= MAX_NEW) or self.repeats < 1:
            raise UserError(f"--max-new must be in 1..{MAX_NEW} and --repeats >= 1")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")


def machine_name() -> str:
    """The GPU (or CPU) that results were measured on, with the torch version; every benchmark names it so."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def host_op_us(device, ops: int = 2000) -> float:
    """Microseconds per small in-place op issued from this host on device (median of three batches of ops): what
    bounds the eager loops, which issue hundreds of such ops per token."""
    import torch

    x = torch.zeros(1, device=device)
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / ops * 1e6)
    return sorted(times)[1]


def host_name() -> str:
    """The machine a bundle was measured on, without torch: its CPU and onnxruntime with its execution providers."""
    import onnxruntime

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (onnxruntime "
            f"{onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())})")


def run_bench(path: str, bc: BenchConfig, echo=print) -> dict:
    """path: a checkpoint, or an exported bundle -> the result dict (rows, machine, ...); writes nothing."""
    return run_bundle_bench(path, bc, echo) if is_bundle(path) else run_checkpoint_bench(path, bc, echo)


def run_bundle_bench(path: str, bc: BenchConfig, echo=print) -> dict:
    """The bundle backends' rows, torch-free; outputs compared between the bundle backends that ran."""
    from bytedeploy.exporters.bundle import load_bundle

    if bc.bundle:
        raise UserError(f"--bundle goes with a checkpoint; {path} is a bundle already")
    not_bundle = [b for b in bc.backends if b not in BUNDLE_BACKENDS]
    if not_bundle:
        raise UserError(f"{', '.join(not_bundle)}: checkpoint backends; a bundle runs on {', '.join(BUNDLE_BACKENDS)}")
    bundle = load_bundle(path)
    cfg = bundle.family_config()
    options = {"assets": str(bundle.assets), **bc.options}
    bc = fit_max_new(bc, bundle.family, cfg, options)
    result = {
        "command": "bytedeploy bench", "bundle": str(path), "family": bundle.family, "machine": host_name(),
        "dtype": bundle.precision, "bitlinear": bundle.bitlinear, "model_config": bundle.model_config,
        "max_new": bc.max_new, "prompt": bc.prompt.decode("utf-8", errors="replace"), "repeats": bc.repeats,
        "sampling": dataclasses.asdict(bc.sampling), "options": dict(bc.options), "rows": [],
    }
    runners = {}
    run_rows(result, bc, options, lambda backend, batch_size: "",
             lambda backend, request: call(runners, lambda: BundleModel(bundle, backend), backend, request), echo,
             cuda=False)
    ran = [r["backend"] for r in result["rows"] if r["status"] == "ok"]
    add_derived(result, cfg, bc, bases=ran[:1])
    return result


def run_checkpoint_bench(checkpoint: str, bc: BenchConfig, echo=print) -> dict:
    import torch

    from bytedeploy import bounds
    from bytedeploy.checkpoint import load_model
    from bytedeploy.registry import get_family
    from bytedeploy.training import resolve_device

    device = resolve_device(bc.device or "auto")
    model, cfg, ckpt = load_model(checkpoint, device)
    model = model.to(getattr(torch, bc.dtype))
    fam = get_family(ckpt.family)
    options = {"assets": str(ckpt.assets), **bc.options}
    bc = fit_max_new(bc, ckpt.family, cfg, options)
    result = {
        "command": "bytedeploy bench", "checkpoint": str(checkpoint), "family": ckpt.family,
        "machine": machine_name(), "device": str(device), "dtype": bc.dtype,
        "parameters": sum(p.numel() for p in model.parameters()), "model_config": dataclasses.asdict(cfg),
        "max_new": bc.max_new, "prompt": bc.prompt.decode("utf-8", errors="replace"), "repeats": bc.repeats,
        "sampling": dataclasses.asdict(bc.sampling), "options": {k: v for k, v in bc.options.items()},
        "host_op_us": [host_op_us(device)], "rows": [],
    }
    machine = bounds.measure_machine(device) if device.type == "cuda" else None
    bundle, bundle_error = None, "no --bundle given (ort / ort-cuda / trt run an exported bundle)"
    if bc.bundle:
        from bytedeploy.exporters.bundle import load_bundle

        bundle, bundle_error = load_bundle(bc.bundle), ""
        if bundle.family != ckpt.family:
            raise UserError(f"checkpoint {checkpoint} is a {ckpt.family} model; bundle {bc.bundle} is {bundle.family}")
    runners = {}

    def open_runner(backend: str):
        if backend in BUNDLE_BACKENDS:
            return BundleModel(bundle, backend)
        return CheckpointModel(model, cfg, ckpt, backend)

    def run_call(backend: str, request: GenerateRequest) -> GenerateResult:
        return call(runners, lambda: open_runner(backend), backend, request)

    run_rows(result, bc, options,
             lambda backend, batch_size: skip_reason(fam, ckpt.family, backend, batch_size, bc, device, bundle_error),
             run_call, echo, cuda=device.type == "cuda")
    result["host_op_us"].append(host_op_us(device))
    if bc.profile:
        profile_native(result, bc, options, run_call, ckpt.family, cfg)
    add_derived(result, cfg, bc, bases=("eager-reference", "eager"))
    bounds.add_bound(result, model, cfg, machine, bundle.precision if bundle else None)
    return result


def run_rows(result: dict, bc: BenchConfig, options: dict, skip_reason, call, echo, cuda: bool) -> None:
    """One row per batch size x backend into result["rows"]: skip_reason(backend, batch_size) -> "" or why not,
    call(backend, request) -> GenerateResult."""
    for batch_size in bc.batch_sizes:
        for backend in bc.backends:
            row = {"backend": backend, "batch_size": batch_size}
            reason = skip_reason(backend, batch_size)
            if reason:
                row.update(status="skipped", reason=reason)
            else:
                request = GenerateRequest(bc.prompt, bc.max_new, batch_size, bc.sampling, dict(options))
                row.update(measure(lambda r, b=backend: call(b, r), request, bc.repeats, cuda))
            result["rows"].append(row)
            echo(format_row(row))


def profile_native(result: dict, bc: BenchConfig, options: dict, call, family: str, cfg) -> None:
    """row["profile"] of the native row at batch 1 (bounds.profile_call): an untimed call (the runner of the last row
    measured may have replaced its graphs), then one under torch.profiler. After every timed row: the profiler may
    leave CUPTI attached to the process, which slows kernel launches."""
    from bytedeploy.bounds import profile_call

    request = GenerateRequest(bc.prompt, bc.max_new, 1, bc.sampling, dict(options))
    for row in result["rows"]:
        if row["status"] == "ok" and row["backend"] == "native" and row["batch_size"] == 1:
            try:
                call("native", request)
                row["profile"] = profile_call(lambda: call("native", request), family, cfg, 1)
            except Exception as e:  # a profiler that cannot run here leaves a note, never a crash
                row["profile"] = {"error": one_line(e)}


def fit_max_new(bc: BenchConfig, family: str, cfg, options: dict) -> BenchConfig:
    """bc with max_new set: DEFAULT_MAX_NEW or what the model's context leaves; a --max-new that does not fit is
    refused."""
    room = fitting_max_new(family, cfg, bc.prompt, options)
    if bc.max_new is None:
        return dataclasses.replace(bc, max_new=min(DEFAULT_MAX_NEW, room or DEFAULT_MAX_NEW))
    if room is not None and bc.max_new > room:
        raise UserError(f"--max-new {bc.max_new} does not fit this {family} model: its context leaves room for "
                        f"{room} new tokens after the prompt")
    return bc


def fitting_max_new(family: str, cfg, prompt: bytes, options: dict) -> int | None:
    """The most new tokens a row may ask for where the family samples inside one context and refuses more: sigma-GPT's
    block_size, what the Bayesian-flow LM's sequence leaves after the prompt. None for the others: bGPT stops at its
    context's end, char GPT-2 and BitNet slide their window on."""
    if family == "sigma-gpt":
        return cfg.block_size
    if family == "bfn":
        from bytedeploy.families import bfn

        request = GenerateRequest(prompt, 0, 1, options=options)
        new = bfn.build_sequence(cfg, request, bfn.request_tokenizer(request))[2]
        return new.stop - new.start
    return None


def skip_reason(fam, family: str, backend: str, batch_size: int, bc: BenchConfig, device, bundle_error: str) -> str:
    if backend in BUNDLE_BACKENDS:
        return bundle_error
    if backend.startswith("native"):
        if device.type != "cuda":
            return "the native backend needs a CUDA GPU"
        if backend == "native+compile" and family != "bgpt":
            return "native+compile is implemented for bgpt"
        return ""
    if backend not in fam.BACKENDS:
        return f"{family} has no backend {backend}"
    if backend == "eager-reference" and batch_size > bc.reference_max_batch:
        return (f"eager-reference runs the rows of a batch one after another; not run above batch "
                f"{bc.reference_max_batch} (--reference-max-batch)")
    return ""


def call(runners: dict, open_runner, backend: str, request: GenerateRequest) -> GenerateResult:
    """One generate call on the backend's bytedeploy.runner.ModelRunner, opened (open_runner()) on first use and kept
    for the whole run: a bundle's sessions (or engines) are made in the untimed warm-up call, not in the timed ones."""
    if backend not in runners:
        runners[backend] = open_runner()
    return runners[backend].generate(request)


def measure(run, request: GenerateRequest, repeats: int, cuda: bool) -> dict:
    """cuda: the checkpoint runs on a CUDA device, whose torch allocator's peak memory the row reports."""
    if cuda:
        import torch
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run(request)  # warm-up: lazy initialisation, graph capture
        warmup_seconds = time.perf_counter() - t0
        results = [run(request) for _ in range(repeats)]
    except (Exception, SystemExit) as e:  # a backend missing here is a skipped row, never a crash
        return {"status": "skipped", "reason": one_line(e)}
    res = sorted(results, key=lambda r: r.seconds)[len(results) // 2]
    steps = res.n_new / request.batch_size
    row = {
        "status": "ok", "unit": res.unit, "new": res.n_new, "seconds": res.seconds,
        "seconds_all": [r.seconds for r in results], "warmup_seconds": warmup_seconds,
        "latency_ms_per_token": 1e3 * res.seconds / max(steps, 1), "tokens_per_s": res.per_second,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "outputs_sha": [hash_bytes(o) for o in res.outputs], "output_head": res.outputs[0][:60].decode(
            "utf-8", errors="replace"),
    }
    if res.passes:
        row["passes"] = res.passes
        row["passes_per_token"] = res.passes / max(res.n_new, 1)
    extra = {k: v for k, v in res.extra.items() if isinstance(v, (str, int, float, bool, list))}
    if extra:
        row["extra"] = extra
    return row


def add_derived(result: dict, cfg, bc: BenchConfig, bases) -> None:
    """Speed-ups against eager-reference, output agreement with each of bases (backends) and bGPT's per-patch
    latency."""
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    is_bgpt = result["family"] == "bgpt"
    P = getattr(cfg, "patch_size", 0)
    tail = len(bc.prompt) % P if is_bgpt and P and not bc.options.get("input") else 0
    for row in rows:
        if is_bgpt:
            row_bytes = row["new"] / row["batch_size"]
            row["patches"] = row.get("extra", {}).get("patches") or math.ceil((row_bytes + tail) / P)
            row["latency_ms_per_patch"] = 1e3 * row["seconds"] * P / max(row_bytes, 1)
        for base in bases:
            same = next((r for r in rows if r["backend"] == base and r["batch_size"] == row["batch_size"]), None)
            if same is not None and row["backend"] != base:
                row[f"matches_{base.replace('-', '_')}"] = same["outputs_sha"] == row["outputs_sha"]
        refs = [r for r in rows if r["backend"] == "eager-reference"]
        ref = next((r for r in refs if r["batch_size"] == row["batch_size"]), None)
        if ref is None and refs:
            ref = max(refs, key=lambda r: r["batch_size"])
        if ref is not None:
            row["speedup_vs_eager_reference"] = row["tokens_per_s"] / ref["tokens_per_s"]
            row["speedup_basis"] = f"eager-reference at batch {ref['batch_size']}"


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def hash_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def format_row(row: dict) -> str:
    head = f"{row['backend']:>16} batch {row['batch_size']:>3}: "
    if row["status"] != "ok":
        return head + f"skipped ({row['reason']})"
    mem = f", peak {row['peak_gpu_memory_mb']:.0f} MiB" if row.get("peak_gpu_memory_mb") is not None else ""
    return head + (f"{row['tokens_per_s']:,.1f} {row['unit']}s/s, {row['latency_ms_per_token']:.3f} ms/step"
                   f"{mem}")


def summary_lines(result: dict) -> list[str]:
    host = ", ".join(f"{us:.1f}" for us in result.get("host_op_us", []))
    host = f"; the host {host} us per small op" if host else ""
    lines = [f"{result['family']} on {result['machine']} ({result['dtype']}{host}):"]
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        parts = [f"{row['tokens_per_s']:,.1f} {row['unit']}s/s", f"{row['latency_ms_per_token']:.3f} ms/{row['unit']}"]
        if "latency_ms_per_patch" in row:
            parts.append(f"{row['latency_ms_per_patch']:.3f} ms/patch")
        if "speedup_vs_eager_reference" in row:
            parts.append(f"{row['speedup_vs_eager_reference']:.1f}x eager-reference")
        if "share_of_bound" in row:
            parts.append(f"{100 * row['share_of_bound']:.3g}% of the bound")
        lines.append(f"  {row['backend']:>16} batch {row['batch_size']:>3}: " + ", ".join(parts))
        if "profile" in row:
            lines.append(" " * 20 + profile_line(row["profile"]))
    bound = result.get("bound") or {}
    if bound.get("bound_ms_per_step") is not None:
        lines.append(f"  the bound per step ({bound['step']}): {bound['bound_ms_per_step']:.4f} ms, by "
                     f"{bound['bound_by']}: {bound['weight_bytes_per_step'] / 1e6:,.1f} MB of weights at "
                     f"{bound['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy bandwidth, launch floor "
                     f"{bound['launch_floor_us']:.2f} us")
    return lines


def profile_line(profile: dict) -> str:
    if "error" in profile:
        return f"profile: {profile['error']}"
    heaviest = profile["top_kernels"][0]["name"][:40] if profile["top_kernels"] else "-"
    return (f"profile per step: {profile['kernels_per_step']:.1f} kernels, {profile['kernel_ms_per_step']:.3f} ms "
            f"kernel time ({profile['busy_ms_per_step']:.3f} ms busy), host {profile['host_ms_per_step']:.3f} ms, "
            f"wall {profile['wall_ms_per_step']:.3f} ms (heaviest: {heaviest})")


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_plot(result: dict, path: str | Path) -> str:
    """Throughput, speed-up and (measured on a GPU) share of the bound per backend over the batch sizes; -> a note
    (what was written, or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot not written: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    unit = rows[0]["unit"] if rows else "token"
    panels = [("tokens_per_s", f"{unit}s / s (whole batch)"),
              ("speedup_vs_eager_reference", "speed-up over eager-reference")]
    if any("share_of_bound" in r for r in rows):
        panels.append(("share_of_bound", "share of the bound per step"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    for backend in backends:
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch_size"])
        for ax, (key, _) in zip(axes, panels):
            points = [(r["batch_size"], r[key]) for r in mine if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=backend)
    for ax, (_, label) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['family']} generation, {result['max_new']} new {unit}s, {result['dtype']}\n"
                 f"{result['machine']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
