"""The deployment bundle: a folder of ONNX graphs, tokenizer assets and a manifest, bundle.json.

    BUNDLE/
      bundle.json      family, model config, graphs with their input/output names and shapes, opset, precision,
                       bitlinear mode, bytedeploy version, sha256 of every other file, and manifest_sha256: the
                       sha256 of its own content (canonical JSON without that field)
      onnx/NAME.onnx   one file per graph (its weights in NAME.onnx.data beside it past 2 GB)
      assets/          the checkpoint's tokenizer files, copied as they are
      engines/         TensorRT engines, when `bytedeploy build` has run (not in the manifest)

Every later stage (ONNX Runtime, verify, TensorRT build) opens a bundle through ``load_bundle``, which refuses,
with one line naming the problem, a bundle from another version, an edited bundle.json, a missing or edited file, a
path that leads outside the bundle folder, a graph whose ONNX file disagrees with its manifest entry (input and
output names, types and fixed sizes, the layers, heads and vocabulary the model config states, the precision), a
graph whose opset is too old, and a custom op this version does not implement.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import bytedeploy
from bytedeploy.errors import UserError
from bytedeploy.staging import replace_dir, set_default_modes, staging_dir

MANIFEST = "bundle.json"
MANIFEST_DIGEST = "manifest_sha256"  # the field of bundle.json that holds the sha256 of the rest of it
FORMAT = "bytedeploy-bundle"
FORMAT_VERSION = 3  # 2: bundle.json covers itself (manifest_sha256); 3: static-cache step graphs (onnx_graphs)
MIN_OPSET = 18
DEFAULT_OPSET = 18
CUSTOM_DOMAIN = "bytedeploy"
# Custom ops this version implements (ONNX Runtime custom op in plugins/, TensorRT plugin of the same name,
# version and namespace): op type -> version.
CUSTOM_OPS = {"BitLinear": 1, "BytePatchDecode": 1}
PRECISIONS = ("fp32", "fp16")
GRAPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # engines/NAME.engine is named after it
LAYER_CACHE = re.compile(r"(past|present)_[kv]\.\d+")  # one layer's static KV cache (exporters/onnx_graphs.py)
FOLDERS = ("assets", "engines")  # read by the runtimes beside the manifest's files


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints for fixed axes, strings for dynamic ones ("batch", "past", ...)
    dtype: str  # numpy dtype name: float32, float16, int64, ...


@dataclass
class GraphSpec:
    name: str  # "prefill", "decode", "byte_patch", ...
    file: str  # relative to the bundle folder
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    custom_ops: list[str] = field(default_factory=list)  # "bytedeploy::BitLinear", ...
    # The graph with ONNX Runtime's contrib-op fusions (exporters/ort_fusions.py), same inputs and outputs: what
    # the ONNX Runtime backends run; TensorRT runs `file`. None: every backend runs `file`.
    ort_file: str | None = None

    @staticmethod
    def from_dict(d: dict) -> GraphSpec:
        return GraphSpec(d["name"], d["file"], [TensorSpec(**t) for t in d["inputs"]],
                         [TensorSpec(**t) for t in d["outputs"]], list(d.get("custom_ops", [])), d.get("ort_file"))

    @property
    def files(self) -> list[str]:
        return [self.file] if self.ort_file is None else [self.file, self.ort_file]


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
        from bytedeploy.registry import family_config_class

        return config_from_dict(family_config_class(self.family), self.model_config, what=f"{self.family} config")


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
    write_manifest_doc(folder, doc)
    return bundle


def manifest_digest(doc: dict) -> str:
    """sha256 of a manifest's content without its own digest field, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in doc.items() if k != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest_doc(folder: Path, doc: dict) -> None:
    """Write bundle.json with its manifest_sha256."""
    doc = {**doc, MANIFEST_DIGEST: manifest_digest(doc)}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")


class StagedBundle:
    """Write a bundle into a temporary folder beside out; on success it replaces out, on failure out is untouched.

        with StagedBundle(out, force) as folder:
            ... write folder/onnx/*.onnx, folder/assets/*, then write_manifest(folder, ...)

    Replacing a bundle keeps what export did not write there (engines/ from `bytedeploy build`, the user's own
    files): every file the old manifest does not list moves into the new bundle, at the same place.
    """

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        self.carried: list[str] = []  # files of the old bundle folder that export did not write
        if self.out.exists():
            if not (self.out / MANIFEST).is_file():
                raise UserError(f"{self.out} exists and is not a bundle; choose another output folder")
            if not force:
                raise UserError(f"bundle {self.out} exists; pass --force to replace it")
            self.carried = files_not_in_manifest(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        self.tmp = staging_dir(self.out)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.swap_in()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def swap_in(self) -> None:
        """Move the carried files into the new bundle, then the new bundle into place; on any failure the moved
        files go back, so the old bundle folder is as it was."""
        clash = next((rel for rel in self.carried if (self.tmp / rel).exists()), None)
        if clash is not None:
            raise UserError(f"{self.out / clash} is not part of the old bundle, and the new export writes that "
                            f"file; move it away and export again")
        set_default_modes(self.tmp)
        moved = []
        try:
            for rel in self.carried:
                (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.out / rel, self.tmp / rel)
                moved.append(rel)
            replace_dir(self.tmp, self.out)
        except BaseException:
            for rel in reversed(moved):
                os.replace(self.tmp / rel, self.out / rel)
            raise


def files_not_in_manifest(folder: Path) -> list[str]:
    """Files (and links) in a bundle folder that its manifest does not list: what export did not write."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot tell the bundle's files from others in {folder}: its {MANIFEST} is unreadable "
                        f"({type(e).__name__}); move the folder away or choose another output folder") from None
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in listed]


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
    if doc.get(MANIFEST_DIGEST) != manifest_digest(doc):
        raise UserError(f"bundle {path}: {MANIFEST} was edited after export (its {MANIFEST_DIGEST} does not match "
                        "its content): export the bundle again")
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
    check_paths(bundle)
    if check_files:
        check_integrity(bundle)
        for g in bundle.graphs.values():
            check_graph(bundle, g)
    return bundle


def inside(bundle: Bundle, rel, what: str) -> Path:
    """bundle.path / rel, refused in one line unless it stays inside the bundle folder: a relative path without
    '..' that no symlink leads out of."""
    if not isinstance(rel, str) or not rel or "\\" in rel or PurePosixPath(rel).is_absolute() \
            or ".." in PurePosixPath(rel).parts:
        raise UserError(f"bundle {bundle.path}: {what} {rel!r} is not a relative path inside the bundle folder")
    path = bundle.path / rel
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = None
    if resolved is None or not resolved.is_relative_to(bundle.path.resolve()):
        raise UserError(f"bundle {bundle.path}: {what} {rel} leads outside the bundle folder (a symlink)")
    return path


def check_paths(bundle: Bundle) -> None:
    """Every path the manifest names, and everything in the folders the runtimes read, stays inside the bundle."""
    for rel in bundle.files:
        inside(bundle, rel, "file")
    for g in bundle.graphs.values():
        if not GRAPH_NAME.fullmatch(g.name):
            raise UserError(f"bundle {bundle.path}: graph name {g.name!r} is not a plain name (letters, digits, _-.)")
        for rel in g.files:
            inside(bundle, rel, f"graph {g.name!r} file")
    for folder in FOLDERS:
        root = bundle.path / folder
        if root.is_symlink() or root.exists():
            inside(bundle, folder, "folder")
            for p in root.rglob("*"):
                inside(bundle, p.relative_to(bundle.path).as_posix(), "file")


def check_integrity(bundle: Bundle) -> None:
    for g in bundle.graphs.values():
        for rel in g.files:
            if rel not in bundle.files:
                raise UserError(f"bundle {bundle.path}: graph {g.name!r} file {rel} is not in the manifest")
    for rel, digest in bundle.files.items():
        p = bundle.path / rel
        if not p.is_file():
            raise UserError(f"bundle {bundle.path} is missing {rel}")
        if sha256_of(p) != digest:
            raise UserError(f"bundle {bundle.path}: {rel} was modified after export (sha256 mismatch)")


def check_graph(bundle: Bundle, g: GraphSpec) -> None:
    """The graph's ONNX files (the standard one and its ONNX Runtime variant) against its manifest entry."""
    for rel in g.files:
        check_graph_file(bundle, g, rel)


def check_graph_file(bundle: Bundle, g: GraphSpec, file: str) -> None:
    """One ONNX file of a graph against its manifest entry: opset and custom ops, external data inside the bundle,
    input and output names, element types and fixed sizes, the sizes the model config states and the precision.
    Reads the graph without its external weights."""
    import onnx

    path = bundle.path / file
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"bundle {bundle.path}: {file} is not an ONNX model ({type(e).__name__})") from None
    check_graph_opset_and_ops(path, model)
    used = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == CUSTOM_DOMAIN})
    if used != sorted(set(g.custom_ops)):
        raise UserError(f"bundle {bundle.path}: graph {g.name!r} uses the custom ops {used or 'none'}; the manifest "
                        f"says {g.custom_ops or 'none'}")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if ".." in PurePosixPath(location).parts or PurePosixPath(location).is_absolute():
                raise UserError(f"bundle {bundle.path}: graph {g.name!r} keeps weights at {location!r}, outside "
                                "the bundle folder")
            rel = (PurePosixPath(file).parent / location).as_posix()
            inside(bundle, rel, f"graph {g.name!r} external data")
            if rel not in bundle.files:
                raise UserError(f"bundle {bundle.path}: graph {g.name!r} external data {rel} is not in the manifest")
    initializers = {t.name for t in model.graph.initializer}
    for kind, specs, values in (("inputs", g.inputs, model.graph.input), ("outputs", g.outputs, model.graph.output)):
        values = [v for v in values if v.name not in initializers]
        if [v.name for v in values] != [t.name for t in specs]:
            raise UserError(f"bundle {bundle.path}: graph {g.name!r} {kind} are {[v.name for v in values]} in "
                            f"{file}; the manifest says {[t.name for t in specs]}")
        for spec, value in zip(specs, values):
            dtype, dims = onnx_type(value)
            if dtype != spec.dtype or len(dims) != len(spec.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(dims, spec.shape)):
                raise UserError(f"bundle {bundle.path}: graph {g.name!r} {spec.name} is {dtype} {dims} in {file}; "
                                f"the manifest says {spec.dtype} {spec.shape}")
    layer_caches = [t.name for t in g.outputs if LAYER_CACHE.fullmatch(t.name) and t.name.startswith("present_k")]
    n_layer = bundle.model_config.get("n_layer")
    if layer_caches and isinstance(n_layer, int) and len(layer_caches) != n_layer:
        raise UserError(f"bundle {bundle.path}: model_config says n_layer = {n_layer}, but graph {g.name!r} has the "
                        f"caches of {len(layer_caches)} layers ({layer_caches[0]} .. {layer_caches[-1]})")
    for spec in g.inputs + g.outputs:
        for axis, field_name, size in config_sizes(bundle.family, g.name, spec.name, bundle.model_config):
            if -len(spec.shape) <= axis < len(spec.shape) and isinstance(spec.shape[axis], int) \
                    and spec.shape[axis] != size:
                raise UserError(f"bundle {bundle.path}: model_config says {field_name} = {size}, but graph "
                                f"{g.name!r} has {spec.name} of shape {spec.shape}")
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer) or any(
        t.dtype == "float16" for t in g.inputs + g.outputs)
    if half != (bundle.precision == "fp16") and (half or model.graph.initializer):
        raise UserError(f"bundle {bundle.path}: precision is {bundle.precision}, but graph {g.name!r} computes in "
                        f"{'float16' if half else 'float32'}")


def onnx_type(value) -> tuple[str, list]:
    """An ONNX graph input or output -> (numpy dtype name, dims: ints for fixed sizes, names for the others)."""
    import onnx

    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    return dtype, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]


def config_sizes(family: str, graph: str, tensor: str, config: dict) -> list[tuple[int, str, int]]:
    """(axis, config field, size) for the axes of one graph tensor that the model config fixes: the KV caches' heads
    and head size, the logits' vocabulary, bGPT's patch size and width, the Bayesian-flow LM's sequence and
    vocabulary (check_graph counts the caches' layers)."""
    def value(name: str) -> int | None:
        v = config.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    sizes = []
    if LAYER_CACHE.fullmatch(tensor):  # one layer's static cache (B, H, T, D)
        sizes = [(1, "n_head", value("n_head"))]
        if value("n_embd") and value("n_head"):
            sizes.append((3, "n_embd / n_head", value("n_embd") // value("n_head")))
    elif tensor == "logits" or (family == "bfn" and tensor in ("log_theta", "log_theta_out")):
        sizes = [(-1, "vocab_size", value("vocab_size"))]
        if family == "bfn":
            sizes.append((1, "seq_len", value("seq_len")))
    elif family == "bgpt" and tensor in ("patches", "patch", "forced"):
        sizes = [(-1, "patch_size", value("patch_size"))]
    elif family == "bgpt" and tensor in ("feature", "feature_out"):
        sizes = [(-1, "n_embd", value("n_embd"))]
    return [(axis, name, size) for axis, name, size in sizes if size is not None]


def check_graph_opset_and_ops(path: Path, model) -> None:
    """Check one loaded onnx.ModelProto against the bundle rules (opset, custom ops); one-line UserError."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < MIN_OPSET:
            raise UserError(f"{path}: opset {imp.version}; bytedeploy needs opset {MIN_OPSET} or newer")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", "com.microsoft") and not (
                node.domain == CUSTOM_DOMAIN and node.op_type in CUSTOM_OPS):
            raise UserError(f"{path}: unknown custom op {node.domain}::{node.op_type}")
