"""libbytedeploy_trt_plugins.so, the TensorRT plugins as a C++ library (plugins/trt/), without TensorRT's libraries.

CPU (CI): the library builds with nvcc against TensorRT's headers (one arch), links nothing of TensorRT and exports
getCreators / setLoggerFinder. The C++ harness (plugins/trt/harness.cpp) loads it with dlopen, takes the creators
from getCreators and creates each plugin from the attributes of a node `bytedeploy export` really wrote (a tiny
BitNet with --bitlinear plugin, a tiny bGPT with --patch-decode plugin): identity, declared fields, output types,
formats, symbolic output shapes, dims checks, workspace, the serialized fields (equal to the node's attributes), and
the plugins recreated from them, cloned and attached. GPU: the harness enqueues on device buffers for batch 1, 3
and 64 (and more shapes), against bitlinear_int (bitwise) and bgpt.generate_patch (greedy).

Headers: $TensorRT_INCLUDE_DIR, else ../shared/third_party/tensorrt-10.13/include beside the checkout; the tests
skip without headers or nvcc."""

import copy
import ctypes
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from gpu_marks import gpu_test
from test_patch_decode_plugin import tiny_bgpt

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import trt_build as tb
from bytedeploy.exporters.bundle import CUSTOM_OPS, load_bundle
from bytedeploy.models import bgpt, bitnet
from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary
from bytedeploy.plugins import build_trt
from bytedeploy.plugins.patch_decode import PLUGIN_FIELDS
from bytedeploy.plugins.trt_harness import Harness, HarnessError, node_fields, read_fields
from bytedeploy.sampling import SamplingConfig

SHARED_HEADERS = Path(__file__).resolve().parents[2] / "shared" / "third_party" / "tensorrt-10.13" / "include"
GREEDY = SamplingConfig(temperature=0.0)


def aligned(nbytes: int) -> int:
    return 256 * math.ceil(nbytes / 256)  # the plugins' workspace regions start on 256 bytes


gpu = gpu_test()


def tensorrt_include() -> str:
    for folder in (os.environ.get("TensorRT_INCLUDE_DIR"), SHARED_HEADERS):
        if folder and (Path(folder) / build_trt.HEADER).is_file():
            return str(folder)
    pytest.skip("TensorRT's headers are not here (set TensorRT_INCLUDE_DIR)")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The library, for this machine's GPU or else one arch (what CI needs: that it compiles and links)."""
    include = tensorrt_include()
    try:
        build_trt.find_nvcc()
    except UserError:
        pytest.skip("nvcc is not installed")
    arch = "".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "90"
    return build_trt.build(tmp_path_factory.mktemp("trt_lib"), (arch,), include, echo=lambda line: None)


@pytest.fixture(scope="module")
def harness(library, tmp_path_factory):
    return Harness.build(tmp_path_factory.mktemp("harness"), library, tensorrt_include())


def exported_node(checkpoint: Path, folder: Path, flags: list[str], graph: str, op: str) -> onnx.NodeProto:
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "-o", str(folder), *flags])
    assert result.exit_code == 0, result.output
    nodes = onnx.load(str(load_bundle(folder).graph_path(graph))).graph.node
    return next(n for n in nodes if n.domain == "bytedeploy" and n.op_type == op)


@pytest.fixture(scope="module")
def bitlinear_node(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet")
    cfg = bitnet.Config(**bitnet.PRESETS["tiny"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", bitnet.Model(cfg), "bitnet", cfg)
    return exported_node(ckpt, root / "bundle", ["--bitlinear", "plugin"], "prefill", "BitLinear")


@pytest.fixture(scope="module")
def patch_decode_node(tmp_path_factory):
    root = tmp_path_factory.mktemp("bgpt")
    model = tiny_bgpt()
    ckpt = save_checkpoint(root / "ckpt", model, "bgpt", model.cfg)
    return model, exported_node(ckpt, root / "bundle", ["--patch-decode", "plugin"], "patch_decode_fused",
                                "BytePatchDecode")


# ---- the library ----------------------------------------------------------------------------------------------

def test_library_loads_without_tensorrt_and_exports_the_entry_points(library):
    lib = ctypes.CDLL(str(library))  # links no libnvinfer: the build used --no-undefined, and it loads here
    assert lib.getCreators and lib.setLoggerFinder
    assert not hasattr(lib, "_ZN10bytedeploy16bitLinearCreatorEv")  # everything else is hidden


def test_library_registers_itself_on_load_only_when_asked(harness):
    """As Triton's TensorRT backend loads it (dlopen alone), with BYTEDEPLOY_TRT_PLUGINS_REGISTER=1: both creators go
    to the process's TensorRT plugin registry (here the harness's stand-in for getPluginRegistry)."""
    assert harness.register() == {"registered": [["BitLinear", "bytedeploy"], ["BytePatchDecode", "bytedeploy"]]}


def test_build_errors_are_one_line(tmp_path, capsys):
    assert build_trt.main(["--tensorrt-include", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"Error: TensorRT's headers (NvInferRuntime.h) are not in {tmp_path}")
    with pytest.raises(UserError, match="nvcc not found at /nowhere/nvcc"):
        build_trt.find_nvcc("/nowhere/nvcc")
    assert build_trt.gencode_flags(["87", "90"])[-2:] == ["-gencode", "arch=compute_90,code=compute_90"]


def test_plugin_benchmark_refuses_an_unknown_plugin_in_one_line(tmp_path, capsys):
    from bytedeploy.benchmarks import trt_plugins

    assert trt_plugins.main(["--out", str(tmp_path / "x.json"), "--plugins", "BitLinear,bitlinear"]) == 2
    assert capsys.readouterr().err == ("Error: unknown plugin bitlinear; --plugins takes BitLinear and "
                                       "BytePatchDecode\n")
    assert not (tmp_path / "x.json").exists()


def test_build_finds_the_library_beside_the_package_or_the_named_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "default_library", lambda: tmp_path / "absent.so")
    assert tb.plugin_library() is None
    assert tb.library_record(None) == "python"
    built = tmp_path / "lib.so"
    built.write_bytes(b"library")
    monkeypatch.setattr(tb, "default_library", lambda: built)
    assert tb.plugin_library() == built
    record = tb.library_record(built)
    assert record["path"] == str(built) and len(record["sha256"]) == 64
    assert tb.plugin_library(built) == built.resolve()
    with pytest.raises(UserError, match=r"plugin library .*missing.so does not exist; build it with"):
        tb.plugin_library(tmp_path / "missing.so")


# ---- the plugins from exported nodes ----------------------------------------------------------------------------

def test_bitlinear_from_the_exported_node(harness, bitlinear_node, tmp_path):
    fields = node_fields(bitlinear_node)
    assert sorted(fields) == ["in_features", "out_features"]
    K, N = int(fields["in_features"][0]), int(fields["out_features"][0])
    report = harness.check("BitLinear", fields, ["HALF", "UINT8", "FLOAT", "HALF"],
                           [f"batch,seq,{K}", f"{N},{-(-K // 4)}", "1"], tmp_path)
    assert [(c["name"], c["version"], c["namespace"]) for c in report["creators"]] == [
        (op, str(version), "bytedeploy") for op, version in CUSTOM_OPS.items()]
    assert report["creators"][0]["fields"] == ["in_features", "out_features"]
    assert report["registered_on_load"] == 0  # only with BYTEDEPLOY_TRT_PLUGINS_REGISTER=1
    plugin = report["plugin"]
    assert (plugin["name"], plugin["version"], plugin["namespace"]) == ("BitLinear", "1", "bytedeploy")
    assert plugin["capabilities"] == [True, True, True] and plugin["outputs"] == 1
    assert plugin["output_types"] == {"FLOAT": "FLOAT", "HALF": "HALF"}
    assert plugin["output_shape"] == ["batch", "seq", N]
    assert plugin["formats"] == [["FLOAT", "HALF"], ["UINT8"], ["FLOAT"], ["HALF"]]  # y: x's type
    assert plugin["non_linear_accepted"] == [False] * 4
    assert (plugin["configure"], plugin["configure_wrong_dims"]) == (0, -1)
    tokens, groups = 64 * 64, 4 * math.ceil(K / 64)  # the batch path's int8 rows: whole chunks of 64 inputs
    assert plugin["workspace_at_max"] == aligned(tokens * groups * 16) + aligned(tokens * 4)  # and the scales
    serialized = read_fields(tmp_path / "serialized")
    assert {k: v.tolist() for k, v in serialized.items()} == {k: v.tolist() for k, v in fields.items()}
    assert all(v.dtype == np.int32 for v in serialized.values())
    assert plugin["recreated_fields_equal"] and plugin["clone_fields_equal"] and plugin["attached_fields_equal"]


def test_bitlinear_takes_int64_fields_and_names_a_missing_one(harness, tmp_path):
    fields = {"in_features": np.array([100], np.int64), "out_features": np.array([37], np.int64)}
    report = harness.check("BitLinear", fields, ["FLOAT", "UINT8", "FLOAT", "FLOAT"], ["3,100", "37,25", "1"],
                           tmp_path / "a")
    assert report["plugin"]["output_shape"] == [3, 37]
    assert report["plugin"]["workspace_at_max"] == 0  # 3 tokens: the GEMV path, no workspace
    assert read_fields(tmp_path / "a" / "serialized")["in_features"].tolist() == [100]
    with pytest.raises(HarnessError, match="cannot create BitLinear plugin harness: BitLinear: missing field "
                                           "out_features"):
        harness.check("BitLinear", {"in_features": fields["in_features"]}, ["FLOAT"] * 4, ["1", "1", "1"],
                      tmp_path / "b")


def test_byte_patch_decode_from_the_exported_node(harness, patch_decode_node, tmp_path):
    model, node = patch_decode_node
    fields = node_fields(node)
    assert sorted(fields) == sorted(PLUGIN_FIELDS)  # the node lists its attributes by name
    cfg = model.cfg
    report = harness.check("BytePatchDecode", fields, ["FLOAT", "INT32", "INT32", "INT32"],
                           [f"batch,{cfg.n_embd}", f"batch,{cfg.patch_size}", "1"], tmp_path)
    assert report["creators"][1]["fields"] == list(PLUGIN_FIELDS)
    plugin = report["plugin"]
    assert (plugin["name"], plugin["version"], plugin["namespace"]) == ("BytePatchDecode", "1", "bytedeploy")
    assert plugin["capabilities"] == [True, True, True] and plugin["outputs"] == 1
    assert plugin["output_types"] == {"FLOAT": "INT32", "HALF": "INT32"}
    assert plugin["output_shape"] == ["batch", cfg.patch_size]
    assert plugin["formats"] == [["FLOAT", "HALF"], ["INT32"], ["INT32"], ["INT32"]]
    assert plugin["non_linear_accepted"] == [False] * 4
    assert (plugin["configure"], plugin["configure_wrong_dims"]) == (0, -1)
    B, C, L, P = 64, cfg.n_embd, cfg.byte_n_layer, cfg.patch_size  # x, qkv, attention, MLP, logits, K, V, flags
    counts = [B * C, 3 * B * C, B * C, 4 * B * C, B * 257, L * B * P * C, L * B * P * C, B]
    assert plugin["workspace_at_max"] == sum(aligned(4 * n) for n in counts)
    serialized = read_fields(tmp_path / "serialized")
    assert list(serialized) == list(PLUGIN_FIELDS)
    for name, value in fields.items():
        assert serialized[name].dtype == PLUGIN_FIELDS[name] and np.array_equal(serialized[name], value), name
    assert plugin["recreated_fields_equal"] and plugin["clone_fields_equal"] and plugin["attached_fields_equal"]


def test_byte_patch_decode_refuses_sampling_and_bad_weights(harness, patch_decode_node, tmp_path):
    fields = node_fields(patch_decode_node[1])
    io = (["FLOAT", "INT32", "INT32", "INT32"], ["batch,128", "batch,16", "1"])
    sampled = {**fields, "temperature": np.array([0.8], np.float32), "top_k": np.array([40], np.int32)}
    with pytest.raises(HarnessError, match=r"cannot create BytePatchDecode plugin harness: the C\+\+ library decodes "
                                           r"greedily only \(temperature 0 or top_k 1\); this node asks for top_k 40"):
        harness.check("BytePatchDecode", sampled, *io, tmp_path / "a")
    top_1 = {**sampled, "top_k": np.array([1], np.int32)}  # greedy whatever the temperature
    assert harness.check("BytePatchDecode", top_1, *io, tmp_path / "b")["plugin"]["outputs"] == 1
    short = {**fields, "weights": fields["weights"][1:]}
    with pytest.raises(HarnessError, match="weights has 431871 values, the byte decoder of this config has 431872"):
        harness.check("BytePatchDecode", short, *io, tmp_path / "c")


# ---- GPU: enqueue on device buffers ------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("lead,K,N,dtype", [
    ((1,), 4096, 4096, torch.float16), ((3,), 4096, 4096, torch.float16), ((64,), 4096, 4096, torch.float16),
    ((16,), 4096, 4096, torch.float16), ((5,), 256, 130, torch.float32), ((2, 10), 100, 37, torch.float32),
    ((64,), 100, 37, torch.float16), ((1,), 100, 37, torch.float32), ((3,), 11008, 96, torch.float16),
    ((64,), 11008, 96, torch.float32)])
def test_bitlinear_enqueue_equals_bitlinear_int(harness, tmp_path, lead, K, N, dtype):
    g = torch.Generator().manual_seed(K + N + len(lead))
    x = (torch.randn(*lead, K, generator=g) * 3).to(dtype)
    packed = pack_ternary(torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8))
    scale = torch.tensor([0.031])
    expected = bitlinear_int(x.cuda(), packed.cuda(), scale.cuda(), K).to(dtype).cpu().numpy()
    fields = {"in_features": np.array([K], np.int32), "out_features": np.array([N], np.int32)}
    (y,), report = harness.run("BitLinear", fields, [x.numpy(), packed.numpy(), scale.numpy()],
                               [(expected.dtype, expected.shape)], tmp_path)
    assert report["repeat_equal"]
    differ = y != expected
    assert not differ.any(), f"{differ.sum()} of {y.size} outputs differ, first at {np.argwhere(differ)[0]}"


def eager_patch(model, feature, forced):
    caches = model.byte_decoder.make_caches(feature.size(0), model.cfg.patch_size)
    with torch.no_grad():
        return bgpt.generate_patch(model, feature, forced, caches, GREEDY, None).cpu().numpy()


@gpu
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_byte_patch_decode_enqueue_equals_generate_patch(harness, patch_decode_node, tmp_path, batch, dtype):
    """float16: the plugin keeps float16 weights and computes in float32; the reference is the same, in torch."""
    model, node = patch_decode_node
    reference = copy.deepcopy(model).to(dtype).float().cuda()  # the weights rounded as the plugin stores them
    P, C = model.cfg.patch_size, model.cfg.n_embd
    g = torch.Generator().manual_seed(batch)
    feature = torch.randn(batch, C, generator=g).to(dtype)
    for k in (0, 3):
        forced = torch.randint(0, 256, (batch, k), generator=g)
        if k:
            forced[0, -1] = 256  # row 0 ends with its forced bytes: 256 from there on
        padded = np.zeros((batch, P), np.int32)
        padded[:, :k] = forced.numpy()
        (patch,), report = harness.run("BytePatchDecode", node_fields(node),
                                       [feature.numpy(), padded, np.array([k], np.int32)], [(np.int32, (batch, P))],
                                       tmp_path / f"k{k}")
        assert report["repeat_equal"]
        expected = eager_patch(reference, feature.float().cuda(), forced.cuda())
        assert np.array_equal(patch, expected), (k, (patch != expected).sum())
