"""The deployment bundle: a folder of ONNX graphs, tokenizer assets and a manifest, bundle.json.

    BUNDLE/
      bundle.json      family, model config, graphs with their input/output names and shapes, opset, precision,
                       bitlinear mode, bytedeploy version, sha256 of every other file
      onnx/NAME.onnx   one file per graph (its weights in NAME.onnx.data beside it past 2 GB)
      assets/          the checkpoint's tokenizer files, copied as they are

Every later stage (ONNX Runtime, verify, TensorRT build) opens a bundle through ``load_bundle``, which refuses,
with one line naming the problem, a bundle from another version, a missing or edited file, a graph whose opset is
too old, and a custom op this version does not implement.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bytedeploy
from bytedeploy.errors import UserError

MANIFEST = "bundle.json"
FORMAT = "bytedeploy-bundle"
FORMAT_VERSION = 1
MIN_OPSET = 18
DEFAULT_OPSET = 18
CUSTOM_DOMAIN = "bytedeploy"
# Custom ops this version implements (ONNX Runtime custom op in plugins/, TensorRT plugin of the same name,
# version and namespace): op type -> version.
CUSTOM_OPS = {"BitLinear": 1, "BytePatchDecode": 1}
PRECISIONS = ("fp32", "fp16")


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints for fixed axes, strings for dynamic ones ("batch", "past", ...)
    dtype: str  # numpy dtype name: float32, float16, int64, ...


@dataclass
class GraphSpec:
    name: str  # "prefill", "decode", "byte_step", ...
    file: str  # relative to the bundle folder
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    custom_ops: list[str] = field(default_factory=list)  # "bytedeploy::BitLinear", ...

    @staticmethod
    def from_dict(d: dict) -> GraphSpec:
        return GraphSpec(d["name"], d["file"], [TensorSpec(**t) for t in d["inputs"]],
                         [TensorSpec(**t) for t in d["outputs"]], list(d.get("custom_ops", [])))


@dataclass
class Bundle:
    path: Path
    family: str
    model_config: dict
    graphs: dict[str, GraphSpec]
    opset: int
    precision: str  # fp32 | fp16
    bitlinear: str | None  # "qdq" | "plugin" for BitNet, None elsewhere
    version: str  # the bytedeploy version that wrote it
    files: dict[str, str]  # relative path -> sha256
    extra: dict = field(default_factory=dict)  # family-specific facts a runtime needs (fixed lengths, ...)

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise UserError(f"bundle {self.path} has no graph {name!r}; it has {', '.join(self.graphs)}")
        return self.graphs[name]

    def graph_path(self, name: str) -> Path:
        return self.path / self.graph(name).file

    def input_dtype(self, graph: str, name: str):
        """numpy dtype of one graph input, from the manifest."""
        import numpy as np

        for t in self.graph(graph).inputs:
            if t.name == name:
                return np.dtype(t.dtype)
        raise UserError(f"bundle {self.path}: graph {graph!r} has no input {name!r}")

    @property
    def assets(self) -> Path:
        return self.path / "assets"

    def family_config(self):
        """The family's Config dataclass filled from the manifest."""
        from bytedeploy.config import config_from_dict
        from bytedeploy.registry import get_family

        return config_from_dict(get_family(self.family).Config, self.model_config, what=f"{self.family} config")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_of(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, family: str, model_config: dict, graphs: list[GraphSpec], opset: int,
                   precision: str, bitlinear: str | None = None, extra: dict | None = None) -> Bundle:
    """Hash every file already in folder and write bundle.json; returns the Bundle."""
    bundle = Bundle(folder, family, model_config, {g.name: g for g in graphs}, opset, precision, bitlinear,
                    bytedeploy.__version__, bundle_files(folder), extra or {})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": family, "model_config": model_config,
           "graphs": [asdict(g) for g in graphs], "opset": opset, "precision": precision, "bitlinear": bitlinear,
           "bytedeploy_version": bundle.version, "files": bundle.files, "extra": bundle.extra}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return bundle


class StagedBundle:
    """Write a bundle into a temporary folder beside out; on success it replaces out, on failure out is untouched.

        with StagedBundle(out, force) as folder:
            ... write folder/onnx/*.onnx, folder/assets/*, then write_manifest(folder, ...)
    """

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        if self.out.exists():
            if not (self.out / MANIFEST).is_file():
                raise UserError(f"{self.out} exists and is not a bundle; choose another output folder")
            if not force:
                raise UserError(f"bundle {self.out} exists; pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return False


def load_bundle(path: str | Path, check_files: bool = True) -> Bundle:
    """Open a bundle; one-line UserError for anything a runtime should not run."""
    path = Path(path)
    manifest = path / MANIFEST
    if not path.exists():
        raise UserError(f"bundle not found: {path}")
    if not manifest.is_file():
        raise UserError(f"not a bytedeploy bundle (no {MANIFEST}): {path}")
    try:
        doc = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt bundle manifest {manifest}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"not a bytedeploy bundle: {manifest} has no format {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION or doc.get("bytedeploy_version") != bytedeploy.__version__:
        raise UserError(f"bundle {path} was written by bytedeploy {doc.get('bytedeploy_version')} "
                        f"(bundle format {doc.get('format_version')}); this is bytedeploy {bytedeploy.__version__} "
                        f"(format {FORMAT_VERSION}): export it again")
    try:
        bundle = Bundle(path, doc["family"], doc["model_config"],
                        {g["name"]: GraphSpec.from_dict(g) for g in doc["graphs"]}, int(doc["opset"]),
                        doc["precision"], doc.get("bitlinear"), doc["bytedeploy_version"], dict(doc["files"]),
                        dict(doc.get("extra", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"corrupt bundle manifest {manifest}: missing or bad field {e}") from None
    if bundle.precision not in PRECISIONS or not isinstance(bundle.model_config, dict):
        raise UserError(f"corrupt bundle manifest {manifest}: precision {bundle.precision!r} (fp32 or fp16) and "
                        "model_config (a mapping) are required")
    bundle.family_config()  # an unknown family or a bad model config: one-line UserError here, not in a runtime
    if bundle.opset < MIN_OPSET:
        raise UserError(f"bundle {path} uses opset {bundle.opset}; bytedeploy needs opset {MIN_OPSET} or newer")
    for g in bundle.graphs.values():
        for op in g.custom_ops:
            domain, _, op_type = op.partition("::")
            if domain != CUSTOM_DOMAIN or op_type not in CUSTOM_OPS:
                raise UserError(f"bundle graph {g.name!r} uses custom op {op!r}, which this bytedeploy does not "
                                f"implement (known: {', '.join(f'{CUSTOM_DOMAIN}::{o}' for o in CUSTOM_OPS)})")
    if check_files:
        check_integrity(bundle)
    return bundle


def check_integrity(bundle: Bundle) -> None:
    for g in bundle.graphs.values():
        if g.file not in bundle.files:
            raise UserError(f"bundle {bundle.path}: graph {g.name!r} file {g.file} is not in the manifest")
    for rel, digest in bundle.files.items():
        p = bundle.path / rel
        if not p.is_file():
            raise UserError(f"bundle {bundle.path} is missing {rel}")
        if sha256_of(p) != digest:
            raise UserError(f"bundle {bundle.path}: {rel} was modified after export (sha256 mismatch)")


def check_graph_opset_and_ops(path: Path, model) -> None:
    """Check one loaded onnx.ModelProto against the bundle rules (opset, custom ops); one-line UserError."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < MIN_OPSET:
            raise UserError(f"{path}: opset {imp.version}; bytedeploy needs opset {MIN_OPSET} or newer")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft") and not (
                node.domain == CUSTOM_DOMAIN and node.op_type in CUSTOM_OPS):
            raise UserError(f"{path}: unknown custom op {node.domain}::{node.op_type}")
