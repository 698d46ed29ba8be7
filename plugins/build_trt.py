"""Build libbytedeploy_trt_plugins.so: bytedeploy's TensorRT plugins (BitLinear, BytePatchDecode) as a C++ library.

    python -m bytedeploy.plugins.build_trt                      # -> plugins/trt/build/libbytedeploy_trt_plugins.so
    python -m bytedeploy.plugins.build_trt --arch 87 -o /opt/bytedeploy     # Jetson Orin only

The sources are plugins/trt/ (one file per plugin, common.h, and plugins.cpp with the library's getCreators and
setLoggerFinder); plugins/trt/CMakeLists.txt builds the same library with CMake. nvcc compiles them against
TensorRT's headers only: the library does not link libnvinfer (TensorRT loads it: ``trtexec --dynamicPlugins``,
``IPluginRegistry::loadLibrary``, LD_PRELOAD for Triton's TensorRT backend) and links the CUDA runtime statically.

Headers: --tensorrt-include, else $TensorRT_INCLUDE_DIR, else $TENSORRT_ROOT/include, else where the TensorRT packages
put them (/usr/include/<arch>-linux-gnu: x86_64 and JetPack's aarch64). nvcc: --nvcc, else $CUDACXX, else
$CUDA_HOME/bin/nvcc, else nvcc on PATH, else /usr/local/cuda/bin/nvcc. Targets: sm_87 (Orin), sm_90 (H100/H200)
and sm_110 (Thor), those this nvcc knows, as machine code, plus PTX of the newest for later GPUs. The default
output, plugins/trt/build/, is where `bytedeploy build` and the TensorRT runner look when no library is named.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bytedeploy.errors import UserError

LIBRARY = "libbytedeploy_trt_plugins.so"
SOURCES = ("bitlinear.cu", "byte_patch_decode.cu", "plugins.cpp")
DEFAULT_ARCHS = ("87", "90", "110")
HEADER = "NvInferRuntime.h"


def source_dir() -> Path:
    return Path(__file__).resolve().parent / "trt"


def default_library() -> Path:
    """Where the library is built by default, and looked for beside the package."""
    return source_dir() / "build" / LIBRARY


def find_nvcc(explicit: str | None = None) -> str:
    if explicit:
        if Path(explicit).is_file():
            return explicit
        raise UserError(f"nvcc not found at {explicit}")
    candidates = [os.environ.get("CUDACXX"),
                  os.environ.get("CUDA_HOME") and str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"),
                  shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise UserError("nvcc not found (set --nvcc, CUDACXX or CUDA_HOME, or put it on PATH): install the CUDA toolkit")


def find_tensorrt_include(explicit: str | None = None) -> Path:
    """The folder holding TensorRT's NvInferRuntime.h."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        env_dir, root = os.environ.get("TensorRT_INCLUDE_DIR"), os.environ.get("TENSORRT_ROOT")
        candidates = [Path(p) for p in (env_dir, root and str(Path(root) / "include")) if p]
        candidates += [Path(f"/usr/include/{platform.machine()}-linux-gnu"), Path("/usr/include")]
    for folder in candidates:
        if (folder / HEADER).is_file():
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise UserError(f"TensorRT's headers ({HEADER}) are not in {where}: install TensorRT's development package "
                    "or pass --tensorrt-include / set TensorRT_INCLUDE_DIR")


def known_archs(nvcc: str) -> set[str]:
    """The compute capabilities this nvcc compiles for ("87", "90", ...)."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return {line.strip().removeprefix("compute_") for line in out.split() if line.startswith("compute_")}


def gencode_flags(archs: list[str]) -> list[str]:
    """Machine code for each arch, PTX for the newest."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(archs, key=int)
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in (result.stderr + result.stdout).splitlines() if "error" in line.lower()]
        raise UserError(f"{Path(command[0]).name} failed: {(errors or [result.stderr.strip()])[0][:400]}")


def build(out: str | Path | None = None, archs=DEFAULT_ARCHS, tensorrt_include: str | None = None,
          nvcc: str | None = None, echo=print) -> Path:
    """Compile the sources (in parallel) and link the library into out (a folder; default plugins/trt/build).
    Returns the library's path."""
    nvcc = find_nvcc(nvcc)
    include = find_tensorrt_include(tensorrt_include)
    known = known_archs(nvcc)
    chosen = [a for a in archs if a in known]
    skipped = [a for a in archs if a not in known]
    if not chosen:
        raise UserError(f"this nvcc compiles for none of sm_{', sm_'.join(archs)} (it knows {sorted(known, key=int)})")
    if skipped:
        echo(f"note: this nvcc has no sm_{', sm_'.join(skipped)}; building for sm_{', sm_'.join(chosen)}")
    out = Path(out) if out is not None else default_library().parent
    objects = out / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-isystem", str(include),
             "-I", str(source_dir()), *gencode_flags(chosen)]
    compiles = [[nvcc, *flags, "-c", str(source_dir() / s), "-o", str(objects / f"{s}.o")] for s in SOURCES]
    with ThreadPoolExecutor(len(compiles)) as pool:
        list(pool.map(run, compiles))
    library = out / LIBRARY
    # --no-undefined: every symbol resolves without TensorRT's libraries (the CUDA runtime is linked statically)
    run([nvcc, "-shared", "-o", str(library), *(str(objects / f"{s}.o") for s in SOURCES), "-ldl",
         "-Xlinker", "--no-undefined"])
    echo(f"built {library} (sm_{', sm_'.join(chosen)} + PTX, TensorRT headers from {include})")
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default=None, help=f"output folder [default: {default_library().parent}]")
    parser.add_argument("--arch", action="append", default=None,
                        help=f"compute capability without the dot, repeatable [default: {' '.join(DEFAULT_ARCHS)}]")
    parser.add_argument("--tensorrt-include", default=None, help="folder with TensorRT's NvInferRuntime.h")
    parser.add_argument("--nvcc", default=None, help="the nvcc to use")
    args = parser.parse_args(argv)
    try:
        build(args.out, tuple(args.arch or DEFAULT_ARCHS), args.tensorrt_include, args.nvcc)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
