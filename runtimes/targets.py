"""Deploy targets and memory planning: where a bundle goes, and what fits there. Imports no torch.

TARGETS is the one table of named targets that `doctor`, `build --target` and `pack --target` read: the Jetson
modules (compute capability and memory from NVIDIA's specifications, and the share of that memory a model may use:
a Jetson's CPU, GPU and operating system share one memory), a GPU server and a plain CPU machine.

The memory plan of a bundle at batch B and context L (tokens; patches for bGPT), in bytes:

    weights    the initializers and Constant tensors of every graph file. Each ONNX Runtime session and each
               TensorRT engine holds its own copy, so weights that two graphs share count twice, as they load.
    cache      KV caches, layers x 2 x B x heads x length x head_dim x element size for each attention stack (bGPT:
               the patch-level decoder over L patches and the byte-level decoder over patch_size + 1 bytes); the
               Bayesian-flow LM has none, but carries its (B, L, K) belief. Counted twice: a step holds the cache it
               reads and the one it returns (neither runner updates a cache in place).
    workspace  an estimate of the activations, B x L x (8 x width + heads x L + vocab) elements: the largest block's
               live tensors at a full-context prefill (residual stream, QKV and MLP hidden, 8 x width; attention
               scores, heads x L; logits, vocab). ONNX Runtime's and TensorRT's memory planners reuse buffers from
               block to block, so one block's worth. Plus RUNTIME_BYTES for the runtime itself.

The element size is the bundle's precision (fp32: 4 bytes, fp16: 2). None of this was measured on a Jetson.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from bytedeploy.errors import UserError

GiB = 1 << 30
# The CUDA context, the TensorRT or ONNX Runtime libraries and the Python process: an allowance, not a measurement.
RUNTIME_BYTES = GiB // 2
PLANNED_MAX_BATCH = 64  # the largest batch a planned TensorRT profile gets unless --max-batch asks for more
ELEMENT_BYTES = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class Target:
    name: str
    title: str
    platform: str  # "jetson", "x86_64-cuda" or "cpu": which onnxruntime package the pack installs
    onnxruntime: str  # that package
    onnxruntime_index: str | None = None  # the pip index that has it, where PyPI does not
    compute_capability: str | None = None  # None: any GPU (TensorRT engines are built on the device)
    memory: int | None = None  # bytes; None: the machine's own
    usable_share: float | None = None  # of memory, for the model; the rest stays with the OS and other processes
    parts: tuple[str, ...] = ()  # module part numbers in the device tree's "compatible" (p3767-0003)

    @property
    def usable_memory(self) -> int | None:
        return None if self.memory is None else int(self.memory * self.usable_share)


# Memory and compute capability: NVIDIA's module data sheets (Jetson Orin Nano Series DS-11105-001: 4GB 64-bit and
# 8GB 128-bit LPDDR5; Jetson Orin NX Series DS-10712-001: 8GB and 16GB 128-bit LPDDR5; Jetson AGX Orin Series
# DS-10662-001: 32GB and 64GB 256-bit LPDDR5) and the Jetson Thor page (nvidia.com/en-us/autonomous-machines/
# embedded-systems/jetson-thor: Jetson T5000, 128 GB 256-bit LPDDR5X). Orin is compute capability 8.7 (sm_87).
# Thor was sm_101 up to CUDA 12.9; CUDA 13.0 renumbered it sm_110 (CUDA 13.0 release notes: "SM101 has been
# renumbered as SM110"), so it is 11.0 here, as JetPack 7's CUDA 13 reports it.
# Module part numbers (p3767-0000 Orin NX 16GB, -0001 NX 8GB, -0003 Nano 8GB, -0004 Nano 4GB, -0005 the Nano
# developer kit's 8GB; p3701-0004 AGX Orin 32GB, -0005 64GB) are those of NVIDIA's device trees; other modules of a
# family are told apart by their memory.
# Usable share: a headless JetPack with the CUDA libraries loaded keeps roughly 1-1.5 GB for itself; the shares
# leave that, and more headroom on the small modules. A judgement, not a measurement.
JETPACK6_ORT = "https://pypi.jetson-ai-lab.io/jp6/cu126"  # NVIDIA's Jetson AI Lab index: JetPack 6, CUDA 12.6
JETPACK7_ORT = "https://pypi.jetson-ai-lab.io/sbsa/cu130"  # JetPack 7 (Thor), CUDA 13.0
_ORIN = dict(platform="jetson", onnxruntime="onnxruntime-gpu", onnxruntime_index=JETPACK6_ORT, compute_capability="8.7")
TARGETS = {t.name: t for t in (
    Target("orin-nano-4gb", "Jetson Orin Nano 4GB", memory=4 * GiB, usable_share=0.6, parts=("p3767-0004",), **_ORIN),
    Target("orin-nano-8gb", "Jetson Orin Nano 8GB", memory=8 * GiB, usable_share=0.7,
           parts=("p3767-0003", "p3767-0005"), **_ORIN),
    Target("orin-nx-8gb", "Jetson Orin NX 8GB", memory=8 * GiB, usable_share=0.7, parts=("p3767-0001",), **_ORIN),
    Target("orin-nx-16gb", "Jetson Orin NX 16GB", memory=16 * GiB, usable_share=0.8, parts=("p3767-0000",), **_ORIN),
    Target("agx-orin-32gb", "Jetson AGX Orin 32GB", memory=32 * GiB, usable_share=0.85, parts=("p3701-0004",),
           **_ORIN),
    Target("agx-orin-64gb", "Jetson AGX Orin 64GB", memory=64 * GiB, usable_share=0.9, parts=("p3701-0005",),
           **_ORIN),
    Target("agx-thor", "Jetson AGX Thor (T5000)", platform="jetson", onnxruntime="onnxruntime-gpu",
           onnxruntime_index=JETPACK7_ORT, compute_capability="11.0", memory=128 * GiB, usable_share=0.9),
    Target("x86-gpu", "x86_64 server with an NVIDIA GPU", platform="x86_64-cuda", onnxruntime="onnxruntime-gpu"),
    Target("cpu", "any machine, ONNX Runtime on the CPU", platform="cpu", onnxruntime="onnxruntime"),
)}
# Device-tree model words -> the family of Jetson targets, for modules whose part number is not in the table.
JETSON_FAMILIES = {"Orin Nano": "orin-nano-", "Orin NX": "orin-nx-", "AGX Orin": "agx-orin-", "Thor": "agx-thor"}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def jetson_target(model: str, compatible: str, memory: int | None) -> Target | None:
    """The Jetson target of a device tree (model and compatible strings) and its total memory; None if unknown."""
    for t in TARGETS.values():
        if any(part in compatible for part in t.parts):
            return t
    prefix = next((p for words, p in JETSON_FAMILIES.items() if words in model), None)
    if prefix is None:
        return None
    family = sorted((t for t in TARGETS.values() if t.name.startswith(prefix)), key=lambda t: t.memory)
    # MemTotal is a little below the module's memory (firmware carve-outs): the smallest module it fits
    return next((t for t in family if memory is None or memory <= t.memory), family[-1])


# ---- sizes ------------------------------------------------------------------------------------------------------

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GiB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB', '8G' (binary), '8GB' (decimal, 10^9), '512MiB', '1.5g', '4096' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if m is None or (m.group(3) and not m.group(2)):
        raise UserError(f"cannot read the size {text!r}: write it like 8GiB, 8GB, 512MiB or 1.5G")
    number, unit, binary, b = m.groups()
    scale = UNITS[unit] if binary or not b else 1000 ** " kmgt".index(unit or " ")
    return int(float(number) * scale)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---- the model's shape, from its config ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Stack:
    """One attention stack with a KV cache."""
    layers: int
    heads: int
    head_dim: int
    length: int | None = None  # a fixed cache length; None: the context


@dataclass(frozen=True)
class ModelShape:
    context: int  # the longest sequence the graphs take (tokens; patches for bGPT)
    width: int
    heads: int
    vocab: int
    stacks: tuple[Stack, ...] = ()
    belief: int = 0  # BFN: the K of its (B, L, K) belief
    fixed_context: bool = False  # the graphs have one sequence length (BFN)


def gpt_shape(cfg: dict, context_key: str = "block_size") -> ModelShape:
    width, heads = cfg["n_embd"], cfg["n_head"]
    return ModelShape(cfg[context_key], width, heads, cfg["vocab_size"],
                      (Stack(cfg["n_layer"], heads, width // heads),))


def bgpt_shape(cfg: dict) -> ModelShape:
    width = cfg["n_embd"]
    patches = Stack(cfg["n_layer"], cfg["n_head"], width // cfg["n_head"])
    byte_heads = cfg["byte_n_head"]
    bytes_ = Stack(cfg["byte_n_layer"], byte_heads, width // byte_heads, cfg["patch_size"] + 1)
    return ModelShape(cfg["n_patches"], width, cfg["n_head"], 257, (patches, bytes_))


def bfn_shape(cfg: dict) -> ModelShape:
    return ModelShape(cfg["seq_len"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], belief=cfg["vocab_size"],
                      fixed_context=True)


SHAPES = {"bgpt": bgpt_shape, "bitnet": gpt_shape, "sigma-gpt": gpt_shape, "char-gpt2": gpt_shape,
          "bfn": bfn_shape}


def model_shape(family: str, cfg: dict) -> ModelShape:
    if family not in SHAPES:
        raise UserError(f"no memory model for family {family!r}")
    try:
        return SHAPES[family](cfg)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise UserError(f"the {family} model config lacks what the memory plan needs: {e!r}") from None


# ---- weights ------------------------------------------------------------------------------------------------------

def tensor_bytes(t) -> int:
    """Bytes of an ONNX TensorProto's data, without loading external data."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        length = {e.key: e.value for e in t.external_data}.get("length")
        if length is not None:
            return int(length)
    elif t.raw_data:
        return len(t.raw_data)
    bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else \
        8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return math.ceil(math.prod(t.dims) * bits / 8)


def graph_weight_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                 if a.type == onnx.AttributeProto.TENSOR]
    return sum(tensor_bytes(t) for t in [*model.graph.initializer, *constants])


# ---- the plan -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    batch: int
    context: int
    weights: int
    cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.workspace

    def summary(self) -> str:
        return (f"{format_bytes(self.total)}: weights {format_bytes(self.weights)}, cache {format_bytes(self.cache)}, "
                f"workspace {format_bytes(self.workspace)}")


@dataclass(frozen=True)
class MemoryPlan:
    family: str
    precision: str
    shape: ModelShape
    weights: int

    @property
    def element(self) -> int:
        return ELEMENT_BYTES[self.precision]

    def estimate(self, batch: int, context: int) -> Estimate:
        s, e = self.shape, self.element
        kv = sum(st.layers * 2 * st.heads * (st.length or context) * st.head_dim for st in s.stacks)
        cache = 2 * batch * (kv + context * s.belief) * e
        activations = batch * context * (8 * s.width + s.heads * context + s.vocab) * e
        return Estimate(batch, context, self.weights, cache, activations + RUNTIME_BYTES)

    def contexts(self) -> list[int]:
        """The context lengths a plan table shows: the model's context and up to three halvings of it."""
        c = self.shape.context
        if self.shape.fixed_context:
            return [c]
        return sorted({max(1, c >> i) for i in range(4)})

    def largest_batch(self, context: int, budget: int, cap: int) -> int:
        """The largest batch <= cap whose estimate at this context fits the budget; 0 if not even batch 1."""
        fixed = self.estimate(0, context).total
        per_row = self.estimate(1, context).total - fixed
        return max(0, min(cap, (budget - fixed) // per_row)) if budget >= fixed else 0

    def largest_context(self, budget: int, limit: int) -> int:
        """The longest context <= limit at which batch 1 fits; 0 if none does."""
        lengths = [limit] if self.shape.fixed_context else range(limit, 0, -1)
        return next((c for c in lengths if self.estimate(1, c).total <= budget), 0)


def bundle_plan(bundle) -> MemoryPlan:
    """The memory plan of a loaded Bundle."""
    weights = sum(graph_weight_bytes(bundle.graph_path(name)) for name in bundle.graphs)
    return MemoryPlan(bundle.family, bundle.precision, model_shape(bundle.family, bundle.model_config), weights)


def choose_profile(plan: MemoryPlan, budget: int, max_batch: int | None = None,
                   max_len: int | None = None) -> Estimate:
    """The largest profile that fits the budget: the longest context (up to max_len), then the largest batch at it
    (up to max_batch, else PLANNED_MAX_BATCH). UserError, in one line, when batch 1 does not fit."""
    limit = plan.shape.context if max_len is None or plan.shape.fixed_context else min(max_len, plan.shape.context)
    context = plan.largest_context(budget, limit)
    if context == 0:
        smallest = plan.estimate(1, 1 if not plan.shape.fixed_context else limit)
        raise UserError(f"the {plan.family} bundle does not fit {format_bytes(budget)} even at batch 1: it needs "
                        f"{smallest.summary()}")
    batch = plan.largest_batch(context, budget, max_batch or PLANNED_MAX_BATCH)
    return plan.estimate(batch, context)


def check_build_gpu(target: Target) -> None:
    """TensorRT builds an engine for the GPU it runs on: refuse a target this machine's GPU is not."""
    from bytedeploy.exporters.trt_build import cuda_compute_capability, import_tensorrt

    if target.platform == "cpu":
        raise UserError(f"target {target.name} has no GPU: there are no TensorRT engines to build for it")
    if target.compute_capability is None:
        return
    _, module = import_tensorrt()
    if module == "tensorrt_rtx":
        raise UserError(f"TensorRT-RTX engines do not run on a {target.title}: build with its own TensorRT "
                        "(JetPack's), on the device (the run script of `bytedeploy pack` does it on first start)")
    here = cuda_compute_capability()
    if here != target.compute_capability:
        raise UserError(f"target {target.name} is compute capability {target.compute_capability} and this GPU is "
                        f"{here or 'absent'}; TensorRT builds engines on the GPU they run on: build on the "
                        f"{target.title} (the run script of `bytedeploy pack` does it on first start)")


def plan_build(bundle, target: Target | None, max_memory: int | None, max_batch: int | None,
               max_len: int | None) -> tuple[Estimate, str] | None:
    """`bytedeploy build --target/--max-memory`: the largest profile that fits (max_batch and max_len are upper
    bounds) and a line saying so; None without a memory budget. Checks first that the target's GPU is this one."""
    if target is not None:
        check_build_gpu(target)
    budgets = {f"--max-memory {format_bytes(max_memory)}": max_memory} if max_memory is not None else {}
    if target is not None and target.usable_memory is not None:
        budgets[f"{target.name}: {target.usable_share:.0%} of {format_bytes(target.memory)}"] = target.usable_memory
    if not budgets:
        return None
    source, budget = min(budgets.items(), key=lambda kv: kv[1])
    best = choose_profile(bundle_plan(bundle), budget, max_batch, max_len)
    return best, (f"memory plan in {format_bytes(budget)} ({source}): profiles up to batch {best.batch} and "
                  f"context {best.context}, estimated {best.summary()}")
