"""TensorRT engines: TensorRT-RTX (CPU, ahead of time) parses and builds every plugin-free graph of every exported
family with the optimization profiles the config implies; plugin graphs are refused under it; the TensorRT runner's
checks (engine metadata, profile ranges, missing GPU or TensorRT) refuse with one line. Nothing here executes an
engine: TensorRT-RTX does not run on the H100/H200 machines and full TensorRT is not installable here."""

import importlib
import json
import sys
import types

import onnx
import onnx.helper as oh
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import EXPORTERS
from bytedeploy.exporters import trt_build as tb
from bytedeploy.exporters.bundle import GraphSpec, TensorSpec, load_bundle, write_manifest
from bytedeploy.exporters.onnx_graphs import export_graph, layer_caches, stacked
from bytedeploy.registry import get_family
from bytedeploy.runtimes import trt as rt

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx)")

BLOCK = 16  # context of the hand-made graph
RTX = ("tensorrt_rtx", trt_rtx.__version__)


class TinyDecoder(torch.nn.Module):
    """Embedding, L attention layers over a stacked KV cache (L, B, H, T, D), head: the exporters' conventions."""

    def __init__(self, vocab=32, dim=16, heads=2, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)
        self.heads = heads

    def forward(self, ids, past_k, past_v):
        x = self.emb(ids)
        B, T, C = x.shape
        caches = layer_caches(past_k, past_v)
        for qkv, cache in zip(self.qkv, caches):
            q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in qkv(x).split(C, 2))
            k, v = cache.update(0, k, v)
            x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return (self.head(x), *stacked(caches))


def tiny_bundle(folder):
    """A one-graph bundle (decode with dynamic batch, seq and past axes) written by export_graph."""
    torch.manual_seed(0)
    ids, past = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, 2, 3, 8)
    cache, present = {1: "batch", 3: "past"}, {1: "batch", 3: "total"}
    graph = export_graph(TinyDecoder(), "decode", (ids, past, past.clone()), folder, ["ids", "past_k", "past_v"],
                         ["logits", "present_k", "present_v"],
                         {"ids": {0: "batch", 1: "seq"}, "past_k": cache, "past_v": cache, "logits": {0: "batch"},
                          "present_k": present, "present_v": present}, 18)
    return write_manifest(folder, "char-gpt2", {"block_size": BLOCK}, [graph], 18, "fp32")


def bitlinear_bundle(folder, declare_custom_op=True):
    """A bundle whose graph holds a bytedeploy::BitLinear node (as --bitlinear plugin exports)."""
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])
    nodes = [oh.make_node("Relu", ["x"], ["h"], name="norm"),
             oh.make_node("BitLinear", ["h"], ["y"], name="layers.0.attn.q", domain="bytedeploy")]
    model = oh.make_model(oh.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("bytedeploy", 1)])
    (folder / "onnx").mkdir(parents=True)
    onnx.save(model, str(folder / "onnx" / "prefill.onnx"))
    spec = GraphSpec("prefill", "onnx/prefill.onnx", [TensorSpec("x", ["batch", 8], "float32")],
                     [TensorSpec("y", ["batch", 8], "float32")],
                     ["bytedeploy::BitLinear"] if declare_custom_op else [])
    return write_manifest(folder, "bitnet", {"block_size": BLOCK}, [spec], 18, "fp32", "plugin")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny bundle and its engines (RTX), built once: max batch 4, the full context."""
    bundle = tiny_bundle(tmp_path_factory.mktemp("trt") / "bundle")
    return bundle, tb.build_engines(bundle, None, "fp16", 4, None, None, False)


# ---- building with TensorRT-RTX ----------------------------------------------------------------------------------

def test_rtx_builds_engine_with_profile_and_metadata(built):
    bundle, metas = built
    engine, meta_path = tb.engine_paths(bundle.path / "engines", "decode")
    assert engine.stat().st_size > 0 and json.loads(meta_path.read_text()) == metas["decode"]
    meta = metas["decode"]
    assert (meta["builder"], meta["module"], meta["tensorrt_version"]) == ("tensorrt_rtx", "tensorrt_rtx",
                                                                           trt_rtx.__version__)
    assert meta["compute_capability"] == "ahead-of-time, no GPU"
    assert meta["graph_sha256"] == bundle.files["onnx/decode.onnx"] and meta["plugins"] == []
    # strongly typed: the engine computes in the bundle's fp32 whatever --precision asked for
    assert (meta["precision"], meta["requested_precision"], meta["timing_cache"]) == ("fp32", "fp16", None)
    assert meta["profile"] == {
        "ids": {"min": [1, 1], "opt": [3, 9], "max": [4, BLOCK]},
        "past_k": {"min": [2, 1, 2, 0, 8], "opt": [2, 3, 2, 8, 8], "max": [2, 4, 2, BLOCK - 1, 8]},
        "past_v": {"min": [2, 1, 2, 0, 8], "opt": [2, 3, 2, 8, 8], "max": [2, 4, 2, BLOCK - 1, 8]},
    }
    assert not [p for p in engine.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_existing_engines_kept_unless_force_or_changed(built, tmp_path, capsys):
    bundle, _ = built
    out = tmp_path / "engines"
    tb.build_engines(bundle, out, "fp32", 4, None, None, False)
    engine = out / "decode.engine"
    engine.write_bytes(b"marker")  # a rebuild would overwrite it
    tb.build_engines(bundle, out, "fp32", 4, None, None, False)
    assert engine.read_bytes() == b"marker" and "kept" in capsys.readouterr().out
    tb.build_engines(bundle, out, "fp32", 4, 8, None, False)  # other profile: rebuilt
    meta = json.loads((out / "decode.json").read_text())
    assert engine.read_bytes() != b"marker" and meta["profile"]["ids"]["max"] == [4, 8]
    engine.write_bytes(b"marker")
    tb.build_engines(bundle, out, "fp32", 4, 8, None, True)
    assert engine.read_bytes() != b"marker"


def test_plugin_graph_refused_under_rtx(tmp_path):
    bundle = bitlinear_bundle(tmp_path / "b")
    with pytest.raises(UserError, match=r"graph 'prefill' uses bytedeploy::BitLinear: TensorRT-RTX has no plugin"):
        tb.build_engines(bundle, None, "fp16", 2, None, None, False)
    assert not (tmp_path / "b" / "engines").exists()


def test_parser_error_names_graph_and_node(tmp_path):
    bundle = bitlinear_bundle(tmp_path / "b", declare_custom_op=False)  # a node TensorRT-RTX cannot import
    with pytest.raises(UserError) as e:
        tb.build_engines(bundle, None, "fp32", 2, None, None, False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TensorRT cannot parse graph 'prefill': node layers.0.attn.q (BitLinear)")


def family_checkpoint(family, folder):
    fam = get_family(family)
    cfg = fam.Config(**fam.PRESETS["tiny"])
    if getattr(cfg, "vocab_size", 1) == 0:  # set from a corpus when training
        cfg.vocab_size = 16
    torch.manual_seed(0)
    return save_checkpoint(folder, fam.Model(cfg), family, cfg)


def family_available(family):
    try:
        importlib.import_module(EXPORTERS[family])
        return True
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("family", list(EXPORTERS))
def test_cli_builds_every_graph_of_exported_tiny_bundles(family, tmp_path):
    if not family_available(family):
        pytest.skip(f"no exporter for {family} in this build yet")
    runner = CliRunner()
    ckpt = family_checkpoint(family, tmp_path / "ckpt")
    result = runner.invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "bundle")
    context = next(bundle.model_config[k] for k in tb.CONTEXT_KEYS if k in bundle.model_config)
    max_len = context // 2
    result = runner.invoke(cli, ["build", str(bundle.path), "--max-batch", "3", "--max-len", str(max_len)])
    assert result.exit_code == 0, result.output
    for spec in bundle.graphs.values():
        engine, meta_path = tb.engine_paths(bundle.path / "engines", spec.name)
        assert engine.stat().st_size > 0, spec.name
        meta = json.loads(meta_path.read_text())
        assert meta["graph_sha256"] == bundle.files[spec.file]
        for t in spec.inputs:
            ranges = meta["profile"][t.name]
            for axis, lo, opt, hi in zip(t.shape, ranges["min"], ranges["opt"], ranges["max"]):
                assert lo <= opt <= hi, (spec.name, t.name)
                if isinstance(axis, int):
                    assert lo == hi == axis
                elif axis == "batch":
                    assert (lo, hi) == (1, 3)
                elif axis.startswith("past"):
                    assert (lo, hi) == (0, max_len - 1)
                else:
                    assert (lo, hi) == (1, max_len), (spec.name, t.name, axis)


# ---- profile rules, module choice ---------------------------------------------------------------------------

def test_profile_rules_and_limits(built):
    bundle, _ = built
    assert tb.context_length(bundle, None) == BLOCK and tb.context_length(bundle, 8) == 8
    with pytest.raises(UserError, match=r"--max-len 17 is outside 1..16"):
        tb.context_length(bundle, 17)
    with pytest.raises(UserError, match=r"no TensorRT profile rule for dynamic axis 'heads'"):
        tb.axis_range("heads", "decode", bundle, 4, BLOCK)
    bgpt = types.SimpleNamespace(family="bgpt", model_config={"n_patches": 64, "patch_size": 16}, extra={})
    assert tb.axis_range("past", "patch_decode", bgpt, 4, 64) == tb.AxisRange(0, 32, 63)
    assert tb.axis_range("length", "patch_decode", bgpt, 4, 64) == tb.AxisRange(1, 33, 64)  # static caches


def test_module_choice_and_missing_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # a stub package
    assert tb.import_tensorrt()[1] == "tensorrt_rtx"
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(UserError, match=r'no TensorRT found .*pip install "bytedeploy\[trt\]".*\[trt-rtx\]'):
        tb.import_tensorrt()


def test_full_tensorrt_without_gpu_refused(built, monkeypatch):
    monkeypatch.setattr(tb, "import_tensorrt", lambda: (trt_rtx, "tensorrt"))
    monkeypatch.setattr(tb, "cuda_compute_capability", lambda: None)
    with pytest.raises(UserError, match="full TensorRT builds engines on a CUDA GPU and none is visible"):
        tb.build_engines(built[0], None, "fp16", 2, None, None, False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TensorRT-RTX's timing cache calls are no-ops
def test_full_tensorrt_branch_through_the_rtx_bindings(built, tmp_path, monkeypatch):
    """The full-TensorRT path (timing cache read and written, compute capability, precision flags, plugin
    registration) run through the TensorRT-RTX bindings, which share the TensorRT 10 API: checks the calls and
    the metadata, not TensorRT itself."""
    monkeypatch.setattr(tb, "import_tensorrt", lambda: (trt_rtx, "tensorrt"))
    monkeypatch.setattr(tb, "cuda_compute_capability", lambda: "9.0")
    monkeypatch.setattr(tb, "default_library", lambda: tmp_path / "no-library.so")  # the Python plugins
    out, cache = tmp_path / "engines", tmp_path / "timing.cache"
    meta = tb.build_engines(built[0], out, "fp32", 2, None, cache, False)["decode"]
    assert cache.is_file() and meta["timing_cache"] == str(cache)
    assert meta["plugin_library"] is None  # a graph without plugins
    assert (meta["module"], meta["compute_capability"], meta["precision"]) == ("tensorrt", "9.0", "fp32")
    tb.build_engines(built[0], out, "fp32", 2, None, cache, True)  # reads the cache it wrote
    with pytest.raises(UserError, match=r"this TensorRT \(.*\) has no bf16 builder flag"):
        tb.build_engines(built[0], out, "bf16", 2, None, cache, True)
    # the BitLinear creator is registered and the parser reaches it: this node carries no in/out features
    with pytest.raises(UserError, match=r"cannot parse graph 'prefill': node layers.0.attn.q \(BitLinear\): .*plugin"):
        tb.build_engines(bitlinear_bundle(tmp_path / "b"), None, "fp32", 2, None, None, False)
    assert trt_rtx.get_plugin_registry().get_creator("BitLinear", "1", "bytedeploy") is not None


class FakeRegistry:
    """TensorRT's plugin registry as register_plugins uses it: load_library, get_creator."""

    def __init__(self, loads: bool = True):
        self.loads, self.libraries, self.creators = loads, [], set()

    def load_library(self, path):
        self.libraries.append(path)
        if not self.loads:
            return None
        self.creators |= {("BitLinear", "1", "bytedeploy"), ("BytePatchDecode", "1", "bytedeploy")}
        return object()

    def get_creator(self, name, version, namespace):
        return (name, version, namespace) if (name, version, namespace) in self.creators else None


def test_the_plugin_library_is_loaded_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "_loaded_libraries", {})
    registry = FakeRegistry()
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    spec = GraphSpec("prefill", "onnx/prefill.onnx", [], [], ["bytedeploy::BitLinear"])
    library = tmp_path / "libbytedeploy_trt_plugins.so"
    for _ in range(2):
        tb.register_plugins(trt, spec, library)
    assert registry.libraries == [str(library)]
    other = FakeRegistry(loads=False)
    trt = types.SimpleNamespace(get_plugin_registry=lambda: other)
    with pytest.raises(UserError, match=r"TensorRT could not load the plugin library .*libbytedeploy_trt_plugins.so"):
        tb.register_plugins(trt, spec, tmp_path / "libbytedeploy_trt_plugins.so.2")


def test_build_refuses_a_missing_plugin_library_in_one_line(built, tmp_path):
    result = CliRunner().invoke(cli, ["build", str(built[0].path), "--plugins", str(tmp_path / "none.so")])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: plugin library {tmp_path / 'none.so'} does not exist; build it with "
                                     "`python -m bytedeploy.plugins.build_trt`")


def test_engines_are_rebuilt_when_the_plugin_library_changes(built):
    meta = built[1]["decode"]
    assert tb.is_current(meta, dict(meta))
    assert not tb.is_current({**meta, "plugin_library": "python"},
                             {**meta, "plugin_library": {"path": "/lib.so", "sha256": "0" * 64}})


# ---- the runner's checks ---------------------------------------------------------------------------------------

def test_engine_metadata_checks(built):
    bundle, metas = built
    engines = bundle.path / "engines"
    meta = metas["decode"]
    assert rt.check_engine_meta(meta, "decode", bundle, engines, *RTX, "8.9") is meta
    with pytest.raises(UserError, match=r"no TensorRT engine for graph 'decode' .*bytedeploy build"):
        rt.check_engine_meta(None, "decode", bundle, engines, *RTX, "8.9")
    with pytest.raises(UserError, match=r"another export of onnx/decode.onnx"):
        rt.check_engine_meta({**meta, "graph_sha256": "0" * 64}, "decode", bundle, engines, *RTX, "8.9")
    with pytest.raises(UserError, match=r"built with tensorrt_rtx .*; this is tensorrt 10.9.0"):
        rt.check_engine_meta(meta, "decode", bundle, engines, "tensorrt", "10.9.0", "9.0")
    with pytest.raises(UserError, match=r"TensorRT-RTX does not run on this GPU \(compute capability 9.0\)"):
        rt.check_engine_meta(meta, "decode", bundle, engines, *RTX, "9.0")
    full = {**meta, "module": "tensorrt", "tensorrt_version": "10.9.0", "compute_capability": "9.0"}
    assert rt.check_engine_meta(full, "decode", bundle, engines, "tensorrt", "10.9.0", "9.0") is full
    with pytest.raises(UserError, match=r"built for GPU compute capability 9.0; this GPU is 8.0"):
        rt.check_engine_meta(full, "decode", bundle, engines, "tensorrt", "10.9.0", "8.0")
    # the metadata of every graph, read from the engine folder
    assert rt.load_engine_metas(bundle, engines, *RTX, "8.6") == metas


def test_shapes_outside_profile_are_one_line_errors(built):
    meta = built[1]["decode"]
    ok = {"ids": (1, 1), "past_k": (2, 4, 2, 15, 8), "past_v": (2, 4, 2, 15, 8)}
    rt.check_shapes("decode", meta, ok)
    with pytest.raises(UserError) as e:
        rt.check_shapes("decode", meta, {**ok, "past_k": (2, 4, 2, 16, 8)})
    assert str(e.value) == ("graph 'decode' input 'past_k' has shape (2, 4, 2, 16, 8), outside the engine's profile "
                            "(2, 1, 2, 0, 8)..(2, 4, 2, 15, 8) (batch in 1..4, past in 0..15); rebuild with a larger "
                            "--max-batch / --max-len")
    with pytest.raises(UserError, match=r"input 'ids' has shape \(5, 1\), outside"):
        rt.check_shapes("decode", meta, {**ok, "ids": (5, 1)})
    with pytest.raises(UserError, match=r"input 'ids' has shape \(1,\), outside"):
        rt.check_shapes("decode", meta, {**ok, "ids": (1,)})
    with pytest.raises(UserError, match=r"inputs .* do not match the engine's"):
        rt.check_shapes("decode", meta, {"ids": (1, 1)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_trt_runner_without_gpu_is_a_one_line_error(built):
    with pytest.raises(UserError, match=r"the trt backend runs TensorRT engines on a CUDA GPU and the CUDA runtime "
                                        r"sees none \(tensorrt_rtx "):
        rt.TrtRunner(built[0])
