"""BitNet bundles: both BitLinear modes (qdq = standard ONNX with INT4 weights, plugin = bytedeploy::BitLinear)
pass the full ONNX check, run in ONNX Runtime on the CPU and equal the integer reference (prefill + 32 decode
steps); greedy generation through ORT equals the eager backend; fp16 bundles run; the custom op and the qdq
expansion equal bitlinear_int exactly on single-node graphs."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import bitnet as bitnet_export
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bitnet, char_gpt2
from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary
from bytedeploy.plugins.ort_ops import model_for_ort
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.runtimes.ort import OrtRunner, make_session
from bytedeploy.sampling import SamplingConfig
from bytedeploy.verify import verify

# fp32: every BitLinear is bit-exact (the single-node tests); the norms, rotary and attention around it run the same
# float32 ops in other orders (measured max differences 6e-6 on logits up to ~10, 2e-7 on the caches). Tolerance
# atol = rtol = 1e-5 (FP32_TOL), except for activation rounding flips (exporters/bitnet.py's docstring: an x s a few
# ulps from a .5 rounds differently, as it does between two eager runs): a flipped case must stay within FLIP_TOL
# (measured up to 1.7e-2 on logits, 2.9e-3 on caches) and at most 1 case in 10 may flip (measured: 4 of 40
# prefills and 4 of 320 decode steps, batch 3).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
FLIP_TOL = dict(atol=5e-2, rtol=1e-4)
# fp16 bundles against eager in half precision (weights, caches, rotary and attention in fp16, the norms and the
# BitLinear integer path in float32 in both): measured max differences 4.3e-2 on logits up to ~10, 5e-3 on caches.
FP16_TOL = dict(atol=1e-1, rtol=2e-2)
GREEDY = SamplingConfig(temperature=0.0)
MODES = ("qdq", "plugin")


def make_model() -> bitnet.Model:
    """The tiny preset with a trained-looking spread: N(0, 1) embeddings and LM head (logits far from ties, so
    greedy decoding does not hinge on float rounding) and norm gains in [0.5, 1.5]."""
    torch.manual_seed(0)
    cfg = bitnet.Config(**bitnet.PRESETS["tiny"])
    model = bitnet.Model(cfg)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.25)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """-> (model, cfg, checkpoint path, {(mode, precision): Bundle})."""
    root = tmp_path_factory.mktemp("bitnet")
    model = make_model()
    ckpt = save_checkpoint(root / "ckpt", model, "bitnet", model.cfg)
    out = {}
    for mode, precision in [("qdq", "fp32"), ("plugin", "fp32"), ("qdq", "fp16"), ("plugin", "fp16")]:
        export(ckpt, root / f"{mode}-{precision}", precision, mode if mode == "plugin" else None)
        out[mode, precision] = load_bundle(root / f"{mode}-{precision}")
    return model, model.cfg, ckpt, out


def int_reference(model: bitnet.Model) -> bitnet.Model:
    ref = bitnet.Model(model.cfg).eval()
    ref.load_state_dict(model.state_dict())
    return ref.set_inference_int(True)


# ----------------------------------------------------------------------------------------------- graphs


def test_both_modes_pass_the_full_onnx_check(bundles):
    model, cfg, _, out = bundles
    qdq, plugin = out["qdq", "fp32"], out["plugin", "fp32"]
    assert (qdq.bitlinear, qdq.opset) == ("qdq", 21)  # INT4 DequantizeLinear: the opset is raised and recorded
    assert (plugin.bitlinear, plugin.opset) == ("plugin", 18)
    n_bitlinear = 7 * cfg.n_layer
    for bundle in out.values():
        caches = [f"past_{kv}.{i}" for kv in "kv" for i in range(cfg.n_layer)]
        for name in ("prefill", "decode"):
            path = bundle.graph_path(name)
            onnx.checker.check_model(str(path), full_check=True)
            graph = onnx.load(str(path))
            assert [i.name for i in graph.graph.input] == (["tokens", "rows"] if name == "prefill" else
                                                           ["seq", "pos"]) + caches
            ops = [(n.domain, n.op_type) for n in graph.graph.node]
            if bundle.bitlinear == "plugin":
                assert bundle.graphs[name].custom_ops == ["bytedeploy::BitLinear"]
                assert ops.count(("bytedeploy", "BitLinear")) == n_bitlinear
                assert {(o.domain, o.version) for o in graph.opset_import} >= {("bytedeploy", 1)}
                node = next(n for n in graph.graph.node if n.op_type == "BitLinear")
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                packed = next(t for t in graph.graph.initializer if t.name == node.input[1])
                assert attrs == {"in_features": cfg.n_embd, "out_features": cfg.n_embd,  # the TRT plugin's fields
                                 "plugin_namespace": b"bytedeploy", "plugin_version": b"1"}  # how TRT finds it
                assert packed.data_type == TensorProto.UINT8 and list(packed.dims) == [cfg.n_embd, cfg.n_embd // 4]
            else:
                assert bundle.graphs[name].custom_ops == [] and all(d == "" for d, _ in ops)
                assert ops.count(("", "DequantizeLinear")) == n_bitlinear
                int4 = [t for t in graph.graph.initializer if t.data_type == TensorProto.INT4]
                assert len(int4) == n_bitlinear
                values = numpy_helper.to_array(int4[0])
                assert set(np.unique(values).tolist()) <= {-1, 0, 1}
    spec = {t.name: t for t in plugin.graphs["decode"].inputs + plugin.graphs["decode"].outputs}
    assert spec["past_k.0"].shape == spec["present_k.0"].shape == ["batch", cfg.n_head, "length", cfg.head_dim]
    assert spec["logits"].shape == ["batch", 256]
    assert qdq.graphs["sample"].custom_ops == plugin.graphs["sample"].custom_ops == []


# ----------------------------------------------------------------------------------------------- numerics


def run_cases(bundle, cases):
    runner = OrtRunner(bundle)
    return [{k: runner.to_numpy(v) for k, v in runner.run(c.graph, c.feeds).items()} for c in cases]


def assert_matches_integer_reference(cases, results):
    """Every case within FLIP_TOL, and all but at most 1 in 10 within FP32_TOL (see the tolerances above)."""
    flipped = []
    for case, got in zip(cases, results):
        for name, expected in case.expected.items():
            np.testing.assert_allclose(got[name], expected, **FLIP_TOL, err_msg=f"{case.label} {name}")
        if not all(np.allclose(got[name], expected, **FP32_TOL) for name, expected in case.expected.items()):
            flipped.append(case.label)
    assert len(flipped) <= max(1, len(cases) // 10), f"beyond the fp32 tolerance: {flipped}"


@pytest.mark.parametrize("mode", MODES)
def test_bundle_equals_the_integer_reference_for_prefill_and_32_decode_steps(bundles, mode):
    model, cfg, _, out = bundles
    bundle = out[mode, "fp32"]
    cases = bitnet_export.verify_cases(model, cfg, bundle, 3, 32, seed=1)  # traced at batch 2: batch is dynamic
    assert [c.label for c in cases[:2]] == ["prefill", "decode 1"] and len(cases) == 33
    assert_matches_integer_reference(cases, run_cases(bundle, cases))
    # the cases' expectations are the model's own integer path (bitnet.Model.logits, the shared KVCache)
    ref = int_reference(model)
    ids = torch.from_numpy(cases[0].feeds["tokens"])
    caches = ref.make_caches(3, 64)
    prefill = ref.logits(ids, caches, 0)[:, -1]
    torch.testing.assert_close(torch.from_numpy(cases[0].expected["logits"]), prefill, atol=1e-5, rtol=1e-5)
    n = ids.size(1)
    step = ref.logits(torch.from_numpy(cases[1].feeds["seq"][:, n:n + 1]), caches, n)[:, -1]
    torch.testing.assert_close(torch.from_numpy(cases[1].expected["logits"]), step, atol=1e-5, rtol=1e-5)


def test_verify_command_passes_on_both_modes(bundles, capsys):
    _, _, ckpt, out = bundles
    assert verify(ckpt, out["qdq", "fp32"].path, ["ort"], decode_steps=4, batch_size=2)
    assert verify(ckpt, out["plugin", "fp32"].path, ["ort"], decode_steps=4, batch_size=2)
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.parametrize("mode", MODES)
def test_fp16_bundle_runs_within_the_stated_tolerance(bundles, mode):
    model, cfg, _, out = bundles
    bundle = out[mode, "fp16"]
    assert bundle.graphs["decode"].inputs[2].dtype == "float16"
    cases = bitnet_export.verify_cases(copy.deepcopy(model).half(), cfg, bundle, 2, 8, seed=2)
    for case, got in zip(cases, run_cases(bundle, cases)):
        for name, expected in case.expected.items():
            assert got[name].dtype == np.float16
            np.testing.assert_allclose(got[name].astype(np.float32), expected.astype(np.float32), **FP16_TOL,
                                       err_msg=f"{case.label} {name}")


@pytest.mark.parametrize("mode", MODES)
def test_greedy_generation_through_ort_equals_eager(bundles, mode):
    """A 100-byte prompt and 40 new bytes: the 128-byte window slides, so the loop's re-prefill path runs too."""
    model, cfg, _, out = bundles
    prompt = bytes(range(32, 132))
    request = GenerateRequest(prompt, 40, 2, GREEDY)
    got = generate_on(out[mode, "fp32"], request, "ort")
    eager = bitnet.generate(model, cfg, request, "eager")  # the fake-quant path, as `generate CKPT` runs it
    integer = bitnet.generate(int_reference(model), cfg, request, "eager")
    assert got.outputs == eager.outputs == integer.outputs
    assert len(got.outputs) == 2 and len(got.outputs[0]) == 40 and got.n_new == 80
    assert len(set(got.outputs[0])) > 3  # not a degenerate repetition


def test_generate_cli_on_a_bundle_equals_eager(bundles):
    _, _, ckpt, out = bundles
    runner = CliRunner()
    args = ["--prompt", "def f(x):", "--max-new", "24", "--temperature", "0"]
    on_bundle = runner.invoke(cli, ["generate", str(out["qdq", "fp32"].path), *args])
    on_ckpt = runner.invoke(cli, ["generate", str(ckpt), *args, "--backend", "eager"])
    assert on_bundle.exit_code == 0 and on_ckpt.exit_code == 0, on_bundle.output + on_ckpt.output
    assert on_bundle.stdout == on_ckpt.stdout and len(on_bundle.stdout) >= 24  # the sample (speed goes to stderr)


# ----------------------------------------------------------------------------------------------- the op itself


def single_node_graph(K: int, N: int, x_type: int, packed: np.ndarray, beta: float) -> bytes:
    node = helper.make_node("BitLinear", ["x", "packed_weight", "weight_scale"], ["y"], domain="bytedeploy",
                            in_features=K, out_features=N)
    graph = helper.make_graph(
        [node], "bitlinear", [helper.make_tensor_value_info("x", x_type, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", x_type, ["batch", "seq", N])],
        [numpy_helper.from_array(packed, "packed_weight"),
         numpy_helper.from_array(np.array([beta], dtype=np.float32), "weight_scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("bytedeploy", 1)])


@pytest.mark.parametrize("x_dtype", [np.float32, np.float16])
def test_custom_op_and_qdq_expansion_equal_bitlinear_int_exactly(tmp_path, x_dtype):
    K, N = 13, 7  # K not a multiple of 4: the padded last byte
    g = torch.Generator().manual_seed(0)
    w_int = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    packed = pack_ternary(w_int)
    x = (torch.randn(2, 5, K, generator=g) * torch.logspace(-2, 1, 5)[None, :, None]).to(torch.from_numpy(
        np.zeros(0, x_dtype)).dtype)
    expected = bitlinear_int(x, packed, 0.0371, K).to(x.dtype).numpy()
    x_type = TensorProto.FLOAT if x_dtype == np.float32 else TensorProto.FLOAT16
    proto = single_node_graph(K, N, x_type, packed.numpy(), 0.0371)
    path = tmp_path / "plugin.onnx"
    onnx.save(proto, str(path))
    sess = make_session(path, custom_ops=True)
    np.testing.assert_array_equal(sess.run(None, {"x": x.numpy()})[0], expected)

    bitnet_export.expand_bitlinear_nodes(proto)
    proto = bitnet_export.convert_opset(proto, bitnet_export.QDQ_OPSET)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x.numpy()})[0], expected)


def test_model_for_ort_leaves_graphs_without_custom_ops_alone_and_refuses_unknown_ones(bundles, tmp_path):
    path = bundles[3]["qdq", "fp32"].graph_path("decode")
    assert model_for_ort(path) == str(path)
    proto = single_node_graph(8, 4, TensorProto.FLOAT, np.zeros((4, 2), np.uint8), 1.0)
    proto.graph.node[0].op_type = "BytePatchDecode"
    onnx.save(proto, str(tmp_path / "other.onnx"))
    with pytest.raises(UserError, match="no ONNX Runtime implementation of bytedeploy::BytePatchDecode"):
        make_session(tmp_path / "other.onnx", custom_ops=True)


def rtx_only() -> bool:
    from bytedeploy.exporters.trt_build import import_tensorrt

    try:
        return import_tensorrt()[1] == "tensorrt_rtx"
    except UserError:
        return False


@pytest.mark.skipif(not rtx_only(), reason="needs tensorrt_rtx (and no full TensorRT)")
def test_tensorrt_rtx_builds_the_qdq_bundle_and_refuses_the_plugin_one(bundles, tmp_path):
    from bytedeploy.exporters.trt_build import build_engines

    out = bundles[3]
    metas = build_engines(out["qdq", "fp32"], tmp_path / "qdq", "fp32", 2, 32)
    assert set(metas) == {"prefill", "decode", "sample"} and (tmp_path / "qdq" / "decode.engine").stat().st_size > 0
    with pytest.raises(UserError, match="no plugin layers"):
        build_engines(out["plugin", "fp32"], tmp_path / "plugin", "fp32", 2, 32)


# ----------------------------------------------------------------------------------------------- errors


def test_bitlinear_on_a_non_bitnet_checkpoint_is_a_one_line_error(tmp_path):
    cfg = char_gpt2.Config(**char_gpt2.PRESETS["tiny"], vocab_size=16)
    ckpt = save_checkpoint(tmp_path / "ckpt", char_gpt2.Model(cfg), "char-gpt2", cfg)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--bitlinear", "plugin"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: --bitlinear applies to bitnet checkpoints; this one is "
                                                  "char-gpt2"]
    assert not (tmp_path / "b").exists()
