"""The bound of a generation step on the GPU, each bench row's share of it, and the native step profile (issue 22).
Torch side: `bytedeploy bench` imports it for a checkpoint only.

  bound per step   max(weight bytes per step / copy bandwidth, graph replays per step x launch floor)
  share of bound   bound per step / measured time per step (1: the step runs at its bound)

A step reads every weight once for the whole batch (STEPS says what a step is per family): bGPT's is a patch (the
patch decoder once, the byte decoder and its LM head once per byte), measured as bench's latency_ms_per_patch (per
patch_size new bytes of a row); the Bayesian-flow LM's a denoising step over the whole sequence (n_steps of them and
the final draw); sigma-GPT's a pass (a token, fewer per token in burst sampling); char GPT-2's and BitNet's a token.
Weights count once each (a tied LM head and embedding once, whole); a table read by lookup only counts the rows one
batch row gathers. Float weights count in the row's dtype; BitNet's BitLinear weights at their packed size (2 bits a
weight and a float32 scale, what the W2A8 kernel reads), whichever route the row ran. KV-cache and activation reads
are left out.

copy bandwidth: one device-to-device copy of a COPY_BYTES buffer, the median of COPY_REPEATS, as bytes read plus
bytes written per second. launch floor: one CUDA graph replay of a graph holding one tiny kernel, the time per replay
of LAUNCH_REPLAYS replays back to back (the median of three such runs): every native loop replays one graph per step.

The step profile (bench --profile): after every timed row, an untimed call of the native backend at batch 1 (its
graphs captured) and one under torch.profiler, per step: what the GPU ran (kernels, copies and memsets: count, time,
the heaviest by name) and the host's time, which is the call's wall time less the time spent in CUDA calls that wait
for the device (synchronizations and copies).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from bytedeploy.runner import BUNDLE_BACKENDS

COPY_BYTES = 2**30
COPY_REPEATS = 5
LAUNCH_REPLAYS = 2000
GRAPH_REPLAYS_PER_STEP = 1
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2}  # torch dtypes, bundle precisions
PROFILE_TOP = 10  # kernels listed by time in a step profile
STEPS = {
    "bgpt": "a patch (patch_size new bytes of a row)",
    "char-gpt2": "a token",
    "bitnet": "a token",
    "sigma-gpt": "a pass: a token, or a batched pass of burst sampling",
    "bfn": "a denoising step over the whole sequence (and the final draw)",
}


@dataclass
class StepWeights:
    """The weights one step reads: float_elements parameters in the row's float dtype, packed_bytes in a fixed format
    (BitNet's 2-bit weights and their float32 scales)."""

    float_elements: int
    packed_bytes: int = 0

    def nbytes(self, dtype: str) -> int:
        return self.float_elements * FLOAT_BYTES[dtype] + self.packed_bytes


def numel(*modules: torch.nn.Module) -> int:
    """Parameter elements of the modules, a parameter shared between them (tied) once."""
    params = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in params.values())


def step_weights(model, family: str) -> dict[str, StepWeights]:
    """{"step": the weights one step of the family reads}; bGPT adds its two decoders' steps."""
    if family == "bgpt":
        return bgpt_weights(model)
    C = model.cfg.n_embd
    if family == "char-gpt2":  # the token and position tables: a row each
        return {"step": StepWeights(numel(model) - numel(model.wte, model.transformer.wpe) + 2 * C)}
    if family == "sigma-gpt":  # two half rows of the position table; the token table is the tied LM head, whole
        return {"step": StepWeights(numel(model) - numel(model.transformer.wpe) + C)}
    if family == "bitnet":
        return {"step": bitnet_weights(model)}
    if family == "bfn":  # every position's distribution times the whole token table, and every other weight
        return {"step": StepWeights(numel(model))}
    raise ValueError(f"no step weights for family {family!r}")


def bgpt_weights(model) -> dict[str, StepWeights]:
    """A patch: the patch decoder's step (P gathered rows of the patch embedding, its bias and a position row) and P
    byte decoder steps (the LM head is the tied byte table, whole, and a position row)."""
    P, C = model.cfg.patch_size, model.cfg.n_embd
    patch_step = numel(model.patch_decoder.h, model.patch_decoder.ln_f) + P * C + C + C
    byte_step = numel(model.byte_decoder.h, model.byte_decoder.ln_f, model.lm_head) + C
    return {"step": StepWeights(patch_step + P * byte_step), "patch_decoder_step": StepWeights(patch_step),
            "byte_decoder_step": StepWeights(byte_step)}


def bitnet_weights(model) -> StepWeights:
    """Every BitLinear's weight packed (models.bitlinear.IntWeights: 4 weights a byte, a float32 scale); the norms'
    gains, the LM head and a row of the token table in float (and the full-precision twin's weights: mode fp)."""
    from bytedeploy.models.bitlinear import FP_MODE, BitLinear

    layers = [m for m in model.modules() if isinstance(m, BitLinear) and m.mode != FP_MODE]
    packed = sum(m.out_features * -(-m.in_features // 4) + 4 for m in layers)
    latent = sum(m.weight.numel() for m in layers)
    return StepWeights(numel(model) - latent - numel(model.tok_emb) + model.cfg.n_embd, packed)


def steps_per_call(family: str, cfg, batch_size: int, new: int, passes: int) -> float:
    """Steps of one generate call that made new tokens over the batch (GenerateResult.n_new) in passes
    (GenerateResult.passes)."""
    if family == "bgpt":
        return max(new / batch_size, 1) / cfg.patch_size
    if family == "bfn":
        return max(passes, 1)  # n_steps + 1, each over the whole batch
    if family == "sigma-gpt":
        return max(passes / batch_size, 1)  # summed over the rows
    return max(new / batch_size, 1)


# ----------------------------------------------------------------------------------------------- the machine


def copy_bandwidth(device, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of nbytes (less where the device has
    less than four times that free), the median of repeats after one warm-up copy."""
    free, _ = torch.cuda.mem_get_info(device)
    n = min(nbytes, free // 4) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 4 * n / statistics.median(seconds[1:])


def launch_floor_us(device, replays: int = LAUNCH_REPLAYS) -> float:
    """Microseconds per replay of a CUDA graph of one tiny kernel, replayed back to back (median of three runs)."""
    from bytedeploy.runtimes.native import capture

    x = torch.zeros(1, device=device)
    graph = capture(lambda: x.add_(1.0))
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(times)


def measure_machine(device) -> dict:
    """The bound's machine figures on a CUDA device (its current stream records the events)."""
    with torch.cuda.device(device):
        return {"copy_bandwidth_bytes_per_s": copy_bandwidth(device), "launch_floor_us": launch_floor_us(device)}


# ----------------------------------------------------------------------------------------------- bench rows


def add_bound(result: dict, model, cfg, machine: dict | None, bundle_precision: str | None = None) -> None:
    """result["bound"] and, per row that ran, ms_per_step and (with machine, measure_machine's on a GPU) its bound
    and share of it. Rows of bundle backends count float weights in bundle_precision."""
    family, dtype = result["family"], result["dtype"]
    weights = step_weights(model, family)

    def bound_ms(row_dtype: str) -> float:
        return 1e3 * max(weights["step"].nbytes(row_dtype) / machine["copy_bandwidth_bytes_per_s"],
                         GRAPH_REPLAYS_PER_STEP * machine["launch_floor_us"] * 1e-6)

    bound = {"step": STEPS[family], "graph_replays_per_step": GRAPH_REPLAYS_PER_STEP,
             **{f"weight_bytes_per_{name}": w.nbytes(dtype) for name, w in weights.items()},
             "copy_bandwidth_bytes_per_s": None, "launch_floor_us": None, "bound_ms_per_step": None,
             "note": "copy bandwidth: bytes read + bytes written per second of a device-to-device copy of "
                     f"{COPY_BYTES / 2**30:g} GiB; share_of_bound = bound_ms_per_step / ms_per_step; weights only "
                     "(KV caches and activations excluded); bytedeploy/bounds.py says how each is counted"}
    if machine:
        bound.update(machine, bound_ms_per_step=bound_ms(dtype))
        weight_s = weights["step"].nbytes(dtype) / machine["copy_bandwidth_bytes_per_s"]
        launch_s = GRAPH_REPLAYS_PER_STEP * machine["launch_floor_us"] * 1e-6
        bound["bound_by"] = "weights" if weight_s >= launch_s else "launch"
    result["bound"] = bound
    for row in result["rows"]:
        if row["status"] != "ok":
            continue
        steps = steps_per_call(family, cfg, row["batch_size"], row["new"], row.get("passes", 0))
        row["ms_per_step"] = 1e3 * row["seconds"] / steps
        if machine:
            row_dtype = bundle_precision if row["backend"] in BUNDLE_BACKENDS else dtype
            row["bound_ms_per_step"] = bound_ms(row_dtype)
            row["share_of_bound"] = row["bound_ms_per_step"] / row["ms_per_step"]


# ----------------------------------------------------------------------------------------------- step profile


def busy_us(spans) -> float:
    """The time at least one kernel ran: the union of (start, end, ...) spans (kernels of several streams overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop, *_ in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def profile_call(call, family: str, cfg, batch_size: int) -> dict:
    """call() -> GenerateResult, run once under torch.profiler -> per step: kernels, kernel time, the heaviest
    kernels, and the host's time (wall time less the CUDA calls that wait for the device: synchronizations and
    copies)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()  # the CPU (tests): no kernels, no waits

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        res = call()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    steps = steps_per_call(family, cfg, batch_size, res.n_new, res.passes)
    events = prof.events()
    kernels = {}  # name -> (count, microseconds)
    spans = set()  # (start, end, name): the profiler can report a CUDA graph's kernel twice
    wait_us = 0.0
    for e in events:
        us = e.time_range.elapsed_us()
        if e.device_type == DeviceType.CUDA:
            span = (e.time_range.start, e.time_range.end, e.name)
            if span in spans:
                continue
            spans.add(span)
            count, total = kernels.get(e.name, (0, 0.0))
            kernels[e.name] = (count + 1, total + us)
        elif e.name.startswith("cuda") and ("Synchronize" in e.name or "Memcpy" in e.name):
            wait_us += us
    top = sorted(kernels.items(), key=lambda item: -item[1][1])[:PROFILE_TOP]
    return {
        "batch_size": batch_size, "steps": steps, "wall_ms_per_step": wall_us / 1e3 / steps,
        "host_ms_per_step": (wall_us - wait_us) / 1e3 / steps,
        "kernels_per_step": sum(n for n, _ in kernels.values()) / steps,
        "kernel_ms_per_step": sum(us for _, us in kernels.values()) / 1e3 / steps,
        "busy_ms_per_step": busy_us(spans) / 1e3 / steps,
        "top_kernels": [{"name": name[:120], "per_step": n / steps, "ms_per_step": us / 1e3 / steps}
                        for name, (n, us) in top],
        "note": "one call after the timed ones, under torch.profiler (its overhead included in the host time); "
                "kernel time sums the kernels, busy time is their union (kernels launched with programmatic "
                "dependent launch overlap the one before: their sum can exceed the wall time)",
    }
