"""`bytedeploy doctor [BUNDLE]`: what this machine is and what it can run. Imports no torch.

Every file it reads (the Jetson release and device tree, /proc, the CUDA toolkit's version.json) and the
nvidia-smi it runs are looked up under a root folder, BYTEDEPLOY_SYSROOT (default /), so that tests can describe a
Jetson or a GPU server with a fake one. The GPU comes from nvidia-smi's query output; without nvidia-smi (a Jetson
Orin has none) from the Jetson targets table and the filesystem. Python packages are found by their metadata,
without importing them (onnxruntime alone is imported, for its execution providers).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bytedeploy.errors import UserError
from bytedeploy.runtimes.targets import TARGETS, format_bytes, jetson_target

SYSROOT_ENV = "BYTEDEPLOY_SYSROOT"
# distribution name -> module name, for the report
PACKAGES = {"onnxruntime": "onnxruntime", "onnxruntime-gpu": "onnxruntime", "onnxruntime-extensions":
            "onnxruntime_extensions", "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx", "torch": "torch",
            "triton": "triton", "numpy": "numpy", "onnx": "onnx"}
CHECKPOINT_BACKENDS = ("eager-reference", "eager", "native", "native+compile")
# Jetson Linux (L4T) release -> JetPack (NVIDIA's JetPack archive); other releases show the JetPack major
JETPACK = {"35.4.1": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4", "36.3": "6.0", "36.4": "6.1", "36.4.3": "6.2",
           "36.4.4": "6.2.1", "38.2": "7.0"}
JETPACK_MAJOR = {"35": "5", "36": "6", "38": "7"}
SMI_QUERY = ["--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"]


# ---- this machine -------------------------------------------------------------------------------------------------

def sysroot() -> Path:
    return Path(os.environ.get(SYSROOT_ENV) or "/")


def read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(errors="replace")
    except OSError:
        return None


@dataclass
class Gpu:
    name: str
    compute_capability: str | None
    memory: int | None  # bytes (a Jetson's: the shared system memory)
    driver: str | None
    cuda: str | None  # the driver's CUDA version (nvidia-smi), else the installed toolkit's
    source: str  # "nvidia-smi", "jetson" or "/proc/driver/nvidia"


@dataclass
class Jetson:
    model: str  # the device tree's model string
    target: str | None  # the TARGETS name of its module
    l4t: str | None  # Jetson Linux release, "36.4.3"
    jetpack: str | None


@dataclass
class Machine:
    platform: str
    arch: str
    python: str
    memory: int | None  # MemTotal
    jetson: Jetson | None
    gpus: list[Gpu]
    gpu_problem: str | None  # why no GPU was found, when nvidia-smi says so
    packages: dict[str, str | None]
    ort_providers: list[str] = field(default_factory=list)


def meminfo_total(root: Path) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", read(root, "proc/meminfo") or "", re.M)
    return int(m.group(1)) * 1024 if m else None


def l4t_release(root: Path) -> str | None:
    """'# R36 (release), REVISION: 4.3, ...' in /etc/nv_tegra_release -> '36.4.3'."""
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", read(root, "etc/nv_tegra_release") or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_of(l4t: str) -> str | None:
    trimmed = re.sub(r"(\.0)+$", "", l4t)
    if trimmed in JETPACK:
        return JETPACK[trimmed]
    major = JETPACK_MAJOR.get(l4t.split(".")[0])
    return f"{major}.x" if major else None


def find_jetson(root: Path, memory: int | None) -> Jetson | None:
    model = (read(root, "proc/device-tree/model") or "").strip("\0\n ")
    l4t = l4t_release(root)
    if "Jetson" not in model and l4t is None:
        return None
    target = jetson_target(model, read(root, "proc/device-tree/compatible") or "", memory)
    return Jetson(model or "unknown Jetson", target.name if target else None, l4t, jetpack_of(l4t) if l4t else None)


def toolkit_cuda(root: Path) -> str | None:
    try:
        return json.loads(read(root, "usr/local/cuda/version.json") or "")["cuda"]["version"]
    except (ValueError, KeyError, TypeError):
        return None


def nvidia_smi(root: Path) -> str | None:
    """nvidia-smi on PATH, with each PATH folder taken under root."""
    path = os.pathsep.join(str(root / d.lstrip("/")) for d in os.environ.get("PATH", "").split(os.pathsep) if d)
    return shutil.which("nvidia-smi", path=path)


def run_smi(smi: str, args: list[str]) -> str:
    try:
        out = subprocess.run([smi, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"nvidia-smi did not run: {e}") from None
    if out.returncode != 0:
        why = (out.stdout + out.stderr).strip().splitlines()
        raise RuntimeError(f"nvidia-smi failed: {why[0] if why else f'exit status {out.returncode}'}")
    return out.stdout


def smi_gpus(smi: str) -> list[Gpu]:
    cuda = re.search(r"CUDA Version\s*:\s*(\S+)", run_smi(smi, ["-q"]))
    gpus = []
    for line in run_smi(smi, SMI_QUERY).strip().splitlines():
        name, cc, mib, driver = (f.strip() for f in line.split(","))
        memory = int(float(mib)) << 20 if re.fullmatch(r"[\d.]+", mib) else None
        gpus.append(Gpu(name, cc if re.fullmatch(r"\d+\.\d+", cc) else None, memory, driver,
                        cuda.group(1) if cuda else None, "nvidia-smi"))
    return gpus


def proc_gpus(root: Path) -> list[Gpu]:
    """The kernel driver's view, when nvidia-smi is missing: names and driver version, no compute capability."""
    version = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", read(root, "proc/driver/nvidia/version") or "")
    gpus = []
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        name = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.M)
        gpus.append(Gpu(name.group(1).strip() if name else "NVIDIA GPU", None, None,
                        version.group(1) if version else None, toolkit_cuda(root), "/proc/driver/nvidia"))
    return gpus


def jetson_gpu(root: Path, jetson: Jetson, memory: int | None) -> Gpu:
    target = TARGETS.get(jetson.target)
    name = f"{target.title} GPU (integrated)" if target else "Jetson GPU (integrated)"
    return Gpu(name, target.compute_capability if target else None, memory,
               f"L4T R{jetson.l4t}" if jetson.l4t else None, toolkit_cuda(root), "jetson")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for dist, module in PACKAGES.items():
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            # a Jetson's TensorRT comes from JetPack's apt packages, sometimes without Python package metadata
            found = dist == module and importlib.util.find_spec(module) is not None
            versions[dist] = "present (version unknown)" if found else None
    return versions


def ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def inspect_machine(root: Path | None = None) -> Machine:
    root = root or sysroot()
    memory = meminfo_total(root)
    jetson = find_jetson(root, memory)
    gpus, problem = [], None
    smi = nvidia_smi(root)
    if smi:
        try:
            gpus = smi_gpus(smi)
        except RuntimeError as e:
            problem = str(e)
    if not gpus:
        gpus = [jetson_gpu(root, jetson, memory)] if jetson else proc_gpus(root)
    return Machine(platform.platform(), platform.machine(), platform.python_version(), memory, jetson, gpus,
                   problem, package_versions(), ort_providers())


# ---- what runs here -------------------------------------------------------------------------------------------------

@dataclass
class BackendCheck:
    backend: str
    runs: bool | None  # None: does not apply to a bundle
    detail: str


def ort_gpu_hint(machine: Machine) -> str:
    if machine.jetson:
        jp = (machine.jetson.jetpack or "?").split(".")[0]
        target = TARGETS.get(machine.jetson.target)
        index = target.onnxruntime_index if target else None
        where = f"pip install onnxruntime-gpu --extra-index-url {index}" if index else \
            "see https://elinux.org/Jetson_Zoo#ONNX_Runtime"
        return f"install NVIDIA's onnxruntime-gpu for JetPack {jp} (not on PyPI): {where}"
    return "pip uninstall onnxruntime && pip install onnxruntime-gpu"


def check_ort(machine: Machine, bundle) -> BackendCheck:
    ort = machine.packages.get("onnxruntime") or machine.packages.get("onnxruntime-gpu")
    if not ort:
        return BackendCheck("ort", False, "onnxruntime is not installed: pip install onnxruntime")
    plugin = bundle is not None and any("bytedeploy::BitLinear" in g.custom_ops for g in bundle.graphs.values())
    if plugin and not machine.packages.get("onnxruntime-extensions"):
        return BackendCheck("ort", False, "the BitLinear custom op needs onnxruntime-extensions: "
                                          "pip install onnxruntime-extensions")
    return BackendCheck("ort", True, f"onnxruntime {ort}, CPUExecutionProvider")


def check_ort_cuda(machine: Machine, bundle) -> BackendCheck:
    cpu = check_ort(machine, bundle)
    if not cpu.runs:
        return BackendCheck("ort-cuda", False, cpu.detail)
    if not machine.gpus:
        return BackendCheck("ort-cuda", False, f"no NVIDIA GPU found{gpu_problem(machine)}")
    if "CUDAExecutionProvider" not in machine.ort_providers:
        return BackendCheck("ort-cuda", False,
                            f"this onnxruntime has no CUDAExecutionProvider; {ort_gpu_hint(machine)}")
    return BackendCheck("ort-cuda", True, f"CUDAExecutionProvider on {machine.gpus[0].name} (if its CUDA and cuDNN "
                                          "libraries load; BYTEDEPLOY_ORT_LOG=2 shows why not)")


def gpu_problem(machine: Machine) -> str:
    return f" ({machine.gpu_problem})" if machine.gpu_problem else ""


def check_trt(machine: Machine, bundle, engines: Path | None) -> BackendCheck:
    from bytedeploy.exporters.trt_build import import_tensorrt

    if not machine.gpus:
        return BackendCheck("trt", False, f"no NVIDIA GPU found{gpu_problem(machine)}")
    gpu = machine.gpus[0]
    hint = "JetPack's TensorRT (apt install python3-libnvinfer)" if machine.jetson else 'pip install "bytedeploy[trt]"'
    try:
        trt, module = import_tensorrt()
    except UserError as e:
        return BackendCheck("trt", False, f"{e}; on this machine: {hint}")
    from bytedeploy.runtimes.trt import RTX_UNSUPPORTED_COMPUTE_CAPABILITIES, check_engine_meta

    if module == "tensorrt_rtx" and (machine.jetson or gpu.compute_capability in RTX_UNSUPPORTED_COMPUTE_CAPABILITIES):
        return BackendCheck("trt", False, f"only TensorRT-RTX is installed, and it does not run on {gpu.name}; "
                                          f"install full TensorRT: {hint}")
    version = f"{module} {trt.__version__}"
    if bundle is None:
        return BackendCheck("trt", True, f"{version} on {gpu.name}: builds and runs engines")
    if gpu.compute_capability is None:
        return BackendCheck("trt", False, f"{version}, but the GPU's compute capability is unknown here, so the "
                                          "engines cannot be checked")
    from bytedeploy.exporters.trt_build import read_engine_meta

    folder = engines or bundle.path / "engines"
    try:
        for graph in bundle.graphs:
            check_engine_meta(read_engine_meta(folder, graph), graph, bundle, folder, module, trt.__version__,
                              gpu.compute_capability)
    except UserError as e:
        return BackendCheck("trt", False, str(e))
    return BackendCheck("trt", True, f"{version}, engines in {folder} built for this GPU ({gpu.compute_capability})")


def check_backends(machine: Machine, bundle=None, engines: Path | None = None) -> list[BackendCheck]:
    checks = [check_ort(machine, bundle), check_ort_cuda(machine, bundle), check_trt(machine, bundle, engines)]
    if bundle is None:
        return checks
    if bundle.family == "sigma-gpt":
        ort = checks[0]
        checks.append(BackendCheck("burst", ort.runs, f"burst sampling on ONNX Runtime: {ort.detail}"))
    checks += [BackendCheck(b, None, "a checkpoint backend; a bundle runs on ort, ort-cuda or trt")
               for b in CHECKPOINT_BACKENDS]
    return checks


# ---- the report -----------------------------------------------------------------------------------------------------

def open_bundle(path: str | Path):
    """BUNDLE or BUNDLE/engines -> (Bundle, engines folder or None)."""
    from bytedeploy.exporters.bundle import MANIFEST, load_bundle

    path = Path(path)
    if not (path / MANIFEST).is_file() and (path.parent / MANIFEST).is_file():
        return load_bundle(path.parent), path
    return load_bundle(path), None


def plan_report(bundle, budget: int) -> dict:
    """The memory plan of a bundle in a budget: an estimate per batch and context, and the largest that fits."""
    from bytedeploy.runtimes.targets import PLANNED_MAX_BATCH, bundle_plan, choose_profile

    plan = bundle_plan(bundle)
    batches = [1 << i for i in range(PLANNED_MAX_BATCH.bit_length())]  # 1, 2, 4, ... PLANNED_MAX_BATCH
    estimates = [plan.estimate(b, c) for b in batches for c in plan.contexts()]
    rows = [asdict(e) | {"total": e.total, "fits": e.total <= budget} for e in estimates]
    try:
        best = choose_profile(plan, budget)
        largest = asdict(best) | {"total": best.total}
    except UserError as e:
        largest = {"error": str(e)}
    return {"budget": budget, "family": plan.family, "precision": plan.precision, "weights": plan.weights,
            "batches": batches, "contexts": plan.contexts(), "estimates": rows, "largest": largest}


def doctor_report(bundle_path=None, memory: int | None = None) -> dict:
    if memory is not None and bundle_path is None:
        raise UserError("--memory plans a bundle's memory: give the BUNDLE too")
    bundle, engines = open_bundle(bundle_path) if bundle_path is not None else (None, None)
    machine = inspect_machine()
    report = {"machine": asdict(machine), "bundle": None,
              "backends": [asdict(c) for c in check_backends(machine, bundle, engines)]}
    if bundle is not None:
        report["bundle"] = {"path": str(bundle.path), "family": bundle.family, "precision": bundle.precision,
                            "graphs": list(bundle.graphs)}
    if memory is not None:
        report["memory_plan"] = plan_report(bundle, memory)
    return report


def machine_lines(m: dict) -> list[str]:
    lines = [f"platform   {m['platform']} ({m['arch']}), Python {m['python']}"]
    if m["memory"]:
        lines.append(f"memory     {format_bytes(m['memory'])}")
    j = m["jetson"]
    if j:
        target = TARGETS.get(j["target"])
        module = f"{target.title} (target {target.name})" if target else "module not in the targets table"
        lines.append(f"jetson     {j['model']}: {module}, L4T R{j['l4t'] or '?'}, JetPack {j['jetpack'] or '?'}")
    for g in m["gpus"]:
        mem = f", {format_bytes(g['memory'])}" if g["memory"] else ""
        lines.append(f"gpu        {g['name']}: compute capability {g['compute_capability'] or '?'}{mem}, driver "
                     f"{g['driver'] or '?'}, CUDA {g['cuda'] or '?'} (from {g['source']})")
    if not m["gpus"]:
        lines.append(f"gpu        none found{' (' + m['gpu_problem'] + ')' if m['gpu_problem'] else ''}")
    for dist, version in m["packages"].items():
        if dist.startswith("onnxruntime") and version and dist != "onnxruntime-extensions":
            version += f" ({', '.join(m['ort_providers'])})"
        lines.append(f"{dist:<24} {version or '-'}")
    return lines


def plan_lines(p: dict) -> list[str]:
    head = f"memory plan: {p['family']} {p['precision']} in {format_bytes(p['budget'])} (weights " \
           f"{format_bytes(p['weights'])}; cells: estimated total, ok = fits)"
    width = 16
    lines = [head, "batch  " + "".join(f"{'context ' + str(c):>{width}}" for c in p["contexts"])]
    cells = {(e["batch"], e["context"]): e for e in p["estimates"]}
    for b in p["batches"]:
        row = "".join(f"{format_bytes(cells[b, c]['total']) + (' ok' if cells[b, c]['fits'] else ' --'):>{width}}"
                      for c in p["contexts"])
        lines.append(f"{b:<7}{row}")
    best = p["largest"]
    lines.append(best["error"] if "error" in best else f"largest that fits (batch <= {p['batches'][-1]}): batch "
                 f"{best['batch']} at context {best['context']}, {format_bytes(best['total'])}")
    return lines


def report_lines(report: dict) -> list[str]:
    lines = machine_lines(report["machine"])
    b = report["bundle"]
    lines.append(f"backends for {b['path']} ({b['family']}, {b['precision']}):" if b else "backends:")
    mark = {True: "runs here", False: "no", None: "not applicable"}
    lines += [f"  {c['backend']:<16} {mark[c['runs']]}: {c['detail']}" for c in report["backends"]]
    if "memory_plan" in report:
        lines += plan_lines(report["memory_plan"])
    return lines


def doctor(bundle_path=None, memory: int | None = None, as_json: bool = False) -> str:
    report = doctor_report(bundle_path, memory)
    return json.dumps(report, indent=2) if as_json else "\n".join(report_lines(report))

