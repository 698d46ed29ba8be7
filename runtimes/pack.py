"""`bytedeploy pack BUNDLE --target NAME -o FILE.tar.gz`: one artifact to copy to a device; `bytedeploy unpack`.

    NAME/                       the archive's one top folder (FILE's name without .tar.gz)
      run                       POSIX sh: on first start checks SHA256SUMS, makes a virtual environment, installs
                                requirements.txt and the wheel, and builds TensorRT engines where TensorRT is
                                importable; then runs `bytedeploy generate` on the bundle with its arguments
                                (`run serve ...`: `bytedeploy serve`)
      requirements.txt          the torch-free runtime's requirements, with the target platform's onnxruntime
      wheels/bytedeploy-*.whl   bytedeploy itself (pure Python), built from the installed package's source tree
      bundle/                   the bundle: bundle.json and the files it lists (engines are built on the device)
      SHA256SUMS                sha256 of every other member, in `sha256sum --check` format

Directories are 0755, files 0644 (run 0755), owned by uid 0, whatever the modes on this machine. On the device,
`tar -xzf FILE && NAME/run --prompt ...`, or `bytedeploy unpack FILE`, which refuses members that would land
outside the target folder (tarfile's data filter) and checks the checksums before anything is in place.
Imports no torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import bytedeploy
from bytedeploy.cli_common import check_writable_parent
from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import MANIFEST, load_bundle, sha256_of
from bytedeploy.runtimes.targets import Target, bundle_plan, choose_profile, format_bytes, get_target
from bytedeploy.staging import replace_dir, staging_dir

CHECKSUMS = "SHA256SUMS"
SUFFIXES = (".tar.gz", ".tgz")
RUN_SCRIPT = r"""#!/bin/sh
# Run the bytedeploy pack @NAME@ (target @TARGET@) on this machine:
#   ./run [generate options]    e.g. ./run --prompt "def " --max-new 64
#   ./run serve [serve options] e.g. ./run serve --port 8000
# The first start checks SHA256SUMS, makes the virtual environment, installs requirements.txt and the bytedeploy
# wheel, and where TensorRT is importable builds the engines (bytedeploy build --target @TARGET@). Every start then
# runs `bytedeploy generate` (or `serve`) on the bundle, on the backend the first start chose: trt where the engines
# built, else ort-cuda where onnxruntime has CUDA, else ort.
#   BYTEDEPLOY_VENV=DIR    the virtual environment to use, made when missing [default: venv beside this script]
#   BYTEDEPLOY_WHEELS=DIR  install only from the wheels in DIR, without a package index (offline)
#   BYTEDEPLOY_BACKEND=B   ort, ort-cuda or trt instead of the first start's choice
#   PYTHON=python3         the Python that makes the virtual environment
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${BYTEDEPLOY_VENV:-$here/venv}
py=$venv/bin/python
bytedeploy=$venv/bin/bytedeploy  # not python -m, which would import a bytedeploy folder in the current directory
stamp=$venv/.bytedeploy-pack-@PACK_ID@

# set-up output goes to stderr: stdout is the generated text
pip_install() {
    if [ -n "${BYTEDEPLOY_WHEELS:-}" ]; then
        "$py" -m pip install --disable-pip-version-check --no-index --find-links "$BYTEDEPLOY_WHEELS" "$@" >&2
    else
        "$py" -m pip install --disable-pip-version-check "$@" >&2
    fi
}

if [ ! -f "$stamp" ]; then
    if command -v sha256sum >/dev/null 2>&1; then
        (cd "$here" && sha256sum --check --quiet --strict @CHECKSUMS@) || {
            echo "run: files of this pack differ from its @CHECKSUMS@ (above): copy the pack again" >&2
            exit 1
        }
    else
        echo "run: sha256sum not found, so the pack's checksums are not checked" >&2
    fi
    [ -x "$py" ] || "${PYTHON:-python3}" -m venv @VENV_OPTIONS@"$venv"
    pip_install -r "$here/requirements.txt"
    pip_install --no-deps --force-reinstall "$here/@WHEEL@"
    backend=ort
    has_cuda='import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'
    if "$py" -c "$has_cuda" 2>/dev/null; then
        backend=ort-cuda
    fi
    if [ @ENGINES@ = yes ] && "$py" -c 'import tensorrt' 2>/dev/null; then
        if "$bytedeploy" build "$here/bundle" --target @TARGET@ >&2; then
            backend=trt
        else
            echo "run: TensorRT could not build the engines (above): running on $backend" >&2
        fi
    fi
    echo "$backend" >"$stamp"
fi
command=generate
if [ "${1:-}" = serve ]; then
    command=serve
    shift
fi
exec "$bytedeploy" "$command" "$here/bundle" --backend "${BYTEDEPLOY_BACKEND:-$(cat "$stamp")}" "$@"
"""


# ---- bytedeploy's wheel ---------------------------------------------------------------------------------------------

def source_tree() -> Path:
    """The source folder of the installed bytedeploy (pip install -e .): the one its package lives in."""
    root = Path(bytedeploy.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and re.search(r'^name\s*=\s*"bytedeploy"', pyproject.read_text(), re.M)):
        raise UserError("pack builds bytedeploy's wheel from its source tree, and this bytedeploy was not installed "
                        "from one (pip install -e .): pass the wheel with --wheel FILE")
    return root


def build_wheel(out_dir: Path) -> Path:
    """bytedeploy's wheel, built by pip from a copy of the source tree's top-level files and package folders (so
    that no build/ folder from an earlier build, and nothing else of the tree, goes in)."""
    src = source_tree()
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        for p in src.iterdir():
            if p.name.startswith("."):
                continue
            if p.is_file():
                shutil.copy2(p, stage / p.name)
            elif (p / "__init__.py").is_file():
                shutil.copytree(p, stage / p.name, ignore=shutil.ignore_patterns("__pycache__"))
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                 "--disable-pip-version-check", "-q", "-w", str(out_dir), str(stage)],
                                capture_output=True, text=True)
    if result.returncode != 0:
        why = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise UserError(f"pip could not build bytedeploy's wheel from {src}: {why[-1] if why else 'no output'} "
                        "(it needs setuptools: pip install setuptools; or pass --wheel FILE)")
    return wheel_in(out_dir)


def wheel_in(folder: Path) -> Path:
    wheels = sorted(folder.glob("bytedeploy-*.whl"))
    if len(wheels) != 1:
        raise UserError(f"expected one bytedeploy wheel in {folder}, found {len(wheels)}")
    return wheels[0]


def check_wheel(path: Path) -> Path:
    """A given --wheel: bytedeploy's, of this version (the bundle's), pure Python."""
    path = Path(path)
    expected = f"bytedeploy-{bytedeploy.__version__}-py3-none-any.whl"
    if not path.is_file():
        raise UserError(f"wheel not found: {path}")
    if path.name != expected:
        raise UserError(f"--wheel {path.name} is not bytedeploy {bytedeploy.__version__}'s pure-Python wheel "
                        f"({expected})")
    return path


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel that apply without extras."""
    try:
        with zipfile.ZipFile(wheel) as z:
            meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
            if meta is None:
                raise UserError(f"{wheel} has no .dist-info/METADATA: not a wheel")
            doc = Parser().parsestr(z.read(meta).decode())
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"cannot read the wheel {wheel}: {e}") from None
    return [r for r in doc.get_all("Requires-Dist") or [] if "extra ==" not in r]


# ---- the archive's text files -----------------------------------------------------------------------------------

def requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements_text(requirements: list[str], target: Target) -> str:
    lines = [f"# bytedeploy {bytedeploy.__version__} on {target.title} (target {target.name}): the runtime's "
             "requirements, no torch.", "# The run script installs them, then the bytedeploy wheel in wheels/."]
    if target.onnxruntime_index:
        lines += ["# onnxruntime-gpu for a Jetson is not on PyPI: NVIDIA builds it for each JetPack. This index (the",
                  "# Jetson AI Lab's) has the wheels for this target's JetPack; others: "
                  "https://elinux.org/Jetson_Zoo#ONNX_Runtime", f"--extra-index-url {target.onnxruntime_index}"]
    if target.platform == "jetson":
        lines.append("# TensorRT comes with JetPack (python3-libnvinfer): the run script's venv sees the system's "
                     "packages.")
    elif target.platform != "cpu":
        lines.append("# TensorRT is optional: with tensorrt>=10 in the venv the run script builds engines on first "
                     "start.")
    kept = [r for r in requirements if requirement_name(r) not in ("onnxruntime", "onnxruntime-gpu")]
    packages = [*kept, target.onnxruntime]
    tested = [f"{requirement_name(r)} {installed_version(requirement_name(r))}" for r in packages
              if installed_version(requirement_name(r))]
    lines.append(f"# Versions on the machine that made this pack: {', '.join(tested)}.")
    return "\n".join([*lines, *packages]) + "\n"


def run_script(name: str, target: Target, wheel: str, pack_id: str) -> str:
    values = {"NAME": name, "TARGET": target.name, "WHEEL": wheel, "PACK_ID": pack_id, "CHECKSUMS": CHECKSUMS,
              # JetPack installs TensorRT's Python module system-wide
              "VENV_OPTIONS": "--system-site-packages " if target.platform == "jetson" else "",
              "ENGINES": "no" if target.platform == "cpu" else "yes"}
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], RUN_SCRIPT)


# ---- pack -------------------------------------------------------------------------------------------------------

def pack_name(out: Path) -> str:
    suffix = next((s for s in SUFFIXES if out.name.endswith(s)), None)
    if suffix is None or out.name == suffix:
        raise UserError(f"the pack is a gzipped tar file: name it NAME.tar.gz, not {out.name}")
    return out.name[: -len(suffix)]


def bundle_members(bundle) -> list[tuple[str, Path]]:
    return [(f"bundle/{rel}", bundle.path / rel) for rel in [MANIFEST, *sorted(bundle.files)]]


def tar_info(name: str, size: int = 0, mode: int = 0o644, directory: bool = False, mtime: float = 0.0):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode, info.size, info.mtime = (0o755 if directory else mode), size, int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def digest(content: bytes | Path) -> str:
    return hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else sha256_of(content)


def write_archive(out: Path, name: str, files: dict[str, bytes | Path], digests: dict[str, str],
                  executable: set[str]) -> None:
    """files: path in the pack -> content, or a file to copy. Writes the pack under the folder name, with
    SHA256SUMS from digests, atomically."""
    files = {**files, CHECKSUMS: "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(files)).encode()}
    now = time.time()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(tar_info(name, directory=True, mtime=now))
            made = set()
            for rel, content in sorted(files.items()):
                for d in parents(rel):
                    if d not in made:
                        tar.addfile(tar_info(f"{name}/{d}", directory=True, mtime=now))
                        made.add(d)
                mode = 0o755 if rel in executable else 0o644
                if isinstance(content, bytes):
                    tar.addfile(tar_info(f"{name}/{rel}", len(content), mode, mtime=now), io.BytesIO(content))
                else:
                    with open(content, "rb") as f:
                        tar.addfile(tar_info(f"{name}/{rel}", content.stat().st_size, mode, mtime=now), f)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pack(bundle_path, target_name: str, out, force: bool = False, wheel=None) -> list[str]:
    """Write the pack; returns the lines to print."""
    target = get_target(target_name)
    out = Path(out)
    name = pack_name(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; use --force to overwrite it")
    check_writable_parent(out)
    bundle = load_bundle(bundle_path)
    lines = []
    if target.usable_memory is not None:
        best = choose_profile(bundle_plan(bundle), target.usable_memory)
        lines.append(f"fits {target.title} ({format_bytes(target.usable_memory)} usable): up to batch {best.batch} "
                     f"at context {best.context}, estimated {format_bytes(best.total)}")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = check_wheel(wheel) if wheel is not None else build_wheel(Path(tmp))
        files: dict[str, bytes | Path] = dict(bundle_members(bundle))
        files[f"wheels/{wheel.name}"] = wheel
        files["requirements.txt"] = requirements_text(wheel_requirements(wheel), target).encode()
        digests = {rel: digest(content) for rel, content in files.items()}
        # the run script's stamp in the venv: a pack with other contents installs again
        pack_id = hashlib.sha256("".join(sorted(digests.values())).encode()).hexdigest()[:16]
        files["run"] = run_script(name, target, f"wheels/{wheel.name}", pack_id).encode()
        digests["run"] = digest(files["run"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_archive(out, name, files, digests, {"run"})
    size = out.stat().st_size
    lines.append(f"wrote {out} ({format_bytes(size)}): {bundle.family} bundle, bytedeploy wheel, requirements for "
                 f"{target.name}; on the device: tar -xzf {out.name} && {name}/run --prompt ...")
    return lines


# ---- unpack -------------------------------------------------------------------------------------------------------

def verify_checksums(folder: Path) -> None:
    """Every file in SHA256SUMS is there with its sha256, and no file is there that SHA256SUMS does not list."""
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        raise UserError(f"not a bytedeploy pack: no {CHECKSUMS} in {folder.name}/")
    listed = {}
    for line in sums_file.read_text().splitlines():
        m = re.fullmatch(r"([0-9a-f]{64})  (.+)", line)
        if m is None:
            raise UserError(f"{folder.name}/{CHECKSUMS} has a line that is not 'sha256  path': {line[:60]!r}")
        listed[m.group(2)] = m.group(1)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {CHECKSUMS}
    for rel in sorted(present | set(listed)):
        if rel not in listed:
            raise UserError(f"the pack holds {rel}, which its {CHECKSUMS} does not list")
        if rel not in present:
            raise UserError(f"the pack lacks {rel}, which its {CHECKSUMS} lists")
        if hashlib.sha256((folder / rel).read_bytes()).hexdigest() != listed[rel]:
            raise UserError(f"{rel} in the pack does not match its sha256 in {CHECKSUMS}: copy the pack again")


def unpack(archive, dest=".", force: bool = False) -> Path:
    """Extract a pack into dest/NAME (checked before it is put in place); returns that folder."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise UserError(f"pack not found: {archive}")
    if not hasattr(tarfile, "data_filter"):
        raise UserError(f"unpacking safely needs tarfile's data filter (Python 3.10.12, 3.11.4 or newer); this is "
                        f"Python {sys.version.split()[0]}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            tops = {m.name.split("/")[0] for m in members}
            if len(tops) != 1:
                raise UserError(f"{archive} is not a bytedeploy pack: it has {len(tops)} top-level entries, not one")
            odd = next((m.name for m in members if not (m.isfile() or m.isdir())), None)
            if odd is not None:
                raise UserError(f"{archive}: member {odd!r} is not a file or a folder; a pack holds only those")
            (name,) = tops
            if name in ("", ".", ".."):
                raise UserError(f"{archive} is not a bytedeploy pack: its members are not in one named folder")
            final = dest / name
            if final.exists() and not force:
                raise UserError(f"{final} exists; use --force to replace it")
            dest.mkdir(parents=True, exist_ok=True)
            stage = staging_dir(final)
            try:
                tar.extractall(stage, filter="data")
                verify_checksums(stage / name)
                replace_dir(stage / name, final)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except tarfile.FilterError as e:
        raise UserError(f"{archive}: member {e.tarinfo.name!r} would land outside {dest}: refused") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot unpack {archive}: {e}") from None
    return final
