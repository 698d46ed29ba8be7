"""The BytePatchDecode TensorRT plugin and `export --patch-decode plugin` (TensorRT cannot run engines here).

CPU: the exported patch_decode_fused graph (full ONNX check, manifest, node attributes = the plugin's fields), the
bundle still runs on ONNX Runtime through byte_patch, the creator round trip from the node's attributes, the build
methods (shapes with stand-in dimension expressions, as tests/test_trt_plugins.py), the plugin's computation on CPU
tensors, the runtime loop's trt branch with a fake runner whose patch_decode_fused is that computation, and the
refusal under TensorRT-RTX. GPU: enqueue on real device pointers against bgpt.generate_patch."""

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from gpu_marks import gpu_test
from onnx import helper, numpy_helper
from plugin_descs import Expr, ExprBuilder, dynamic_desc, tensor_desc

from bytedeploy.checkpoint import load_model, save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import trt_build as tb
from bytedeploy.exporters.bgpt import FUSED
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.models.sampling import make_generator
from bytedeploy.plugins import trt_plugins
from bytedeploy.plugins.patch_decode import PLUGIN_FIELDS, PatchDecoder, byte_decoder_weights, plugin_fields_of
from bytedeploy.plugins.trt_plugins import BytePatchDecodePlugin, BytePatchDecodePluginCreator, plugin_fields
from bytedeploy.registry import get_family
from bytedeploy.runtimes import bgpt as bgpt_loop
from bytedeploy.runtimes.ort import OrtRunner
from bytedeploy.sampling import SamplingConfig

trt = trt_plugins.trt
needs_trt = pytest.mark.skipif(trt is None, reason="TensorRT's Python module (tensorrt / tensorrt_rtx) is missing")
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX is missing")
gpu = gpu_test()

GREEDY = SamplingConfig(temperature=0.0)
SAMPLED = SamplingConfig(top_k=0, top_p=1.0, temperature=2.0, seed=5)  # hot: draws differ from call to call
PROMPT = b"import os\nimport sys\n"  # one whole patch and 5 forced bytes of the next


def tiny_bgpt(seed: int = 0) -> bgpt.Model:
    """An untrained tiny bGPT with weights from N(0, 0.3): peaked byte distributions, no greedy near-ties."""
    torch.manual_seed(seed)
    model = bgpt.Model(bgpt.Config(**bgpt.PRESETS["tiny"]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_decode_plugin")
    model = tiny_bgpt()
    ckpt = save_checkpoint(root / "ckpt", model, "bgpt", model.cfg)
    for precision in ("fp32", "fp16"):
        result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(root / precision), "--precision", precision,
                                          "--patch-decode", "plugin"])
        assert result.exit_code == 0, result.output
    return ckpt, root / "fp32", root / "fp16"


def fused_node(bundle) -> onnx.NodeProto:
    (node,) = onnx.load(str(bundle.graph_path(FUSED))).graph.node
    return node


def fields_from_node(node) -> dict[str, np.ndarray]:
    """The node's attributes as TensorRT's ONNX parser passes them to the creator (seen with TensorRT-RTX's parser:
    INT -> INT32, FLOAT -> FLOAT32, the weights TENSOR -> its FLOAT32 values); the parser-only attributes left out."""
    fields = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.name in PLUGIN_FIELDS:
            fields[a.name] = numpy_helper.to_array(value) if a.name == "weights" else \
                np.array([value], dtype=PLUGIN_FIELDS[a.name])
    return fields


def create(fields: dict[str, np.ndarray]) -> BytePatchDecodePlugin:
    return BytePatchDecodePluginCreator().create_plugin("patch_decode", plugin_fields(fields),
                                                        None if trt is None else trt.TensorRTPhase.BUILD)


# ---- export ----------------------------------------------------------------------------------------------------

def test_fused_graph_passes_the_full_check_and_carries_the_fields(exported):
    ckpt, fp32, fp16 = exported
    model, cfg, _ = load_model(ckpt)
    doc = json.loads((fp32 / "bundle.json").read_text())
    assert [g["name"] for g in doc["graphs"]] == ["patch_prefill", "patch_decode", "byte_patch_greedy", "byte_patch",
                                                  FUSED]
    assert doc["graphs"][4]["custom_ops"] == ["bytedeploy::BytePatchDecode"]
    assert all(g["custom_ops"] == [] for g in doc["graphs"][:4])
    assert doc["extra"] == {"patch_decode": "plugin", "patch_decode_sampling":
                            {"top_k": 0, "top_p": 1.0, "temperature": 0.0, "seed": 0}}
    for folder, float_type in ((fp32, "float32"), (fp16, "float16")):
        bundle = load_bundle(folder)
        spec = bundle.graphs[FUSED]
        assert [(t.name, t.shape, t.dtype) for t in spec.inputs] == [
            ("feature", ["batch", cfg.n_embd], float_type), ("forced", ["batch", cfg.patch_size], "int32"),
            ("n_forced", [1], "int32")]
        assert [(t.name, t.shape, t.dtype) for t in spec.outputs] == [("patch", ["batch", cfg.patch_size], "int32")]
        onnx.checker.check_model(str(bundle.graph_path(FUSED)), full_check=True)
        node = fused_node(bundle)
        assert (node.domain, node.op_type, list(node.input), list(node.output)) == (
            "bytedeploy", "BytePatchDecode", ["feature", "forced", "n_forced"], ["patch"])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["plugin_namespace"], attrs["plugin_version"]) == (b"bytedeploy", b"1")
        assert {k: attrs[k] for k in ("patch_size", "n_embd", "byte_n_layer", "byte_n_head", "top_k", "seed")} == {
            "patch_size": 16, "n_embd": 128, "byte_n_layer": 2, "byte_n_head": 4, "top_k": 0, "seed": 0}
        assert (attrs["top_p"], attrs["temperature"]) == (1.0, 0.0)
        weights = numpy_helper.to_array(attrs["weights"])
        reference = model if folder == fp32 else load_model(ckpt)[0].half()
        assert weights.dtype == np.float32 and np.array_equal(weights, byte_decoder_weights(reference))


def test_patch_decode_flag_is_for_bgpt_only(tmp_path):
    fam = get_family("bitnet")
    cfg = fam.Config(**fam.PRESETS["tiny"])
    ckpt = save_checkpoint(tmp_path / "ckpt", fam.Model(cfg), "bitnet", cfg)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--patch-decode", "plugin"])
    assert result.exit_code == 1 and not (tmp_path / "b").exists()
    assert result.output.strip() == "Error: --patch-decode applies to bgpt checkpoints; this one is bitnet"


def test_ort_keeps_byte_patch_and_equals_eager(exported):
    pytest.importorskip("onnxruntime_extensions")  # a dependency; absent only where installed without deps
    ckpt, fp32, _ = exported
    model, cfg, _ = load_model(ckpt)
    bundle = load_bundle(fp32)
    request = GenerateRequest(PROMPT, max_new=60, batch_size=3, sampling=GREEDY, options={"ext": "py"})
    runner = OrtRunner(bundle)
    ort = bgpt_loop.generate(bundle, runner, request)
    assert ort.outputs == bgpt.generate(model, cfg, request, "eager").outputs
    assert FUSED not in runner.sessions and "byte_patch_greedy" in runner.sessions
    with pytest.raises(UserError, match=r"no ONNX Runtime implementation of bytedeploy::BytePatchDecode"):
        runner.session(FUSED)


@needs_rtx
def test_tensorrt_rtx_refuses_the_fused_graph(exported):
    bundle = load_bundle(exported[1])
    with pytest.raises(UserError, match=r"^graph 'patch_decode_fused' uses bytedeploy::BytePatchDecode: TensorRT-RTX "
                                        r"has no plugin layers; export without --patch-decode, or build with full "
                                        r"TensorRT on a GPU machine$"):
        tb.build_engines(bundle, None, "fp32", 2, None, None, False)
    assert not (bundle.path / "engines").exists()


# ---- the plugin object -----------------------------------------------------------------------------------------

def test_creator_round_trip_from_the_node_attributes(exported):
    node = fused_node(load_bundle(exported[1]))
    fields = fields_from_node(node)
    assert set(fields) == set(PLUGIN_FIELDS)
    plugin = create(fields)
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == ("BytePatchDecode", "bytedeploy",
                                                                                    "1")
    assert (plugin.patch_size, plugin.n_embd, plugin.n_layer, plugin.n_head) == (16, 128, 2, 4)
    assert plugin.sampling == GREEDY and plugin.num_outputs == 1
    serialized = trt_plugins.read_fields(plugin.get_fields_to_serialize())
    assert set(serialized) == set(PLUGIN_FIELDS)
    for name, value in fields.items():
        assert serialized[name].dtype == PLUGIN_FIELDS[name] and np.array_equal(serialized[name], value), name
    again = create(serialized)
    assert np.array_equal(again.fields["weights"], fields["weights"]) and again.sampling == plugin.sampling
    for copy in (plugin.clone(), plugin.attach_to_context(None)):
        assert copy is not plugin and np.shares_memory(copy.fields["weights"], plugin.fields["weights"])
    assert plugin.get_capability_interface(None) is plugin and plugin.get_workspace_size([], []) == 0


def test_creator_rejects_missing_or_inconsistent_fields():
    fields = plugin_fields_of(tiny_bgpt(), GREEDY)
    with pytest.raises(ValueError, match=r"missing fields \['weights'\]"):
        create({k: v for k, v in fields.items() if k != "weights"})
    with pytest.raises(ValueError, match="weights has 431871 values, the byte decoder of this config has 431872"):
        create({**fields, "weights": fields["weights"][1:]})
    with pytest.raises(ValueError, match="bad byte decoder config"):
        create({**fields, "byte_n_head": np.array([3], np.int32)})


@needs_trt
def test_register_plugins_registers_both_creators():
    assert trt_plugins.register_plugins() == ["bytedeploy::BitLinear", "bytedeploy::BytePatchDecode"]
    creator = trt.get_plugin_registry().get_creator("BytePatchDecode", "1", "bytedeploy")
    assert creator is not None and creator.name == "BytePatchDecode"
    assert {f.name for f in creator.field_names} == set(PLUGIN_FIELDS)


@pytest.fixture(scope="module")
def plugin():
    return create(plugin_fields_of(tiny_bgpt(), GREEDY))


def test_output_shape_and_type(plugin):
    batch = Expr(symbol="batch")
    inputs = [[batch, Expr(constant=128)], [batch, Expr(constant=16)], [Expr(constant=1)]]
    (out,) = plugin.get_output_shapes(inputs, [], ExprBuilder())
    assert len(out) == 2 and out[0] is batch and out[1].constant == 16
    types = ["HALF", "INT32", "INT32"]
    if trt is not None:
        types = [getattr(trt.DataType, t) for t in types]
    assert [t.name for t in plugin.get_output_data_types(types)] == ["INT32"]


def test_supported_formats(plugin):
    def io(feature="FLOAT", forced="INT32", n_forced="INT32", patch="INT32", fmt="LINEAR"):
        return [dynamic_desc(feature, [-1, 128], fmt), dynamic_desc(forced, [-1, 16]), dynamic_desc(n_forced, [1]),
                dynamic_desc(patch, [-1, 16])]

    for dtype in ("FLOAT", "HALF"):
        assert all(plugin.supports_format_combination(pos, io(dtype), 3) for pos in range(4))
    assert not plugin.supports_format_combination(0, io("INT32"), 3)
    assert not plugin.supports_format_combination(1, io(forced="FLOAT"), 3)
    assert not plugin.supports_format_combination(2, io(n_forced="HALF"), 3)
    assert not plugin.supports_format_combination(3, io(patch="FLOAT"), 3)
    assert not plugin.supports_format_combination(0, io(fmt="CHW4"), 3)


def test_configure_and_shape_change_check_dims(plugin):
    good = [dynamic_desc("FLOAT", [-1, 128]), dynamic_desc("INT32", [-1, 16]), dynamic_desc("INT32", [1])]
    out = [dynamic_desc("INT32", [-1, 16])]
    plugin.configure_plugin(good, out)
    plugin.on_shape_change([tensor_desc("FLOAT", [3, 128]), tensor_desc("INT32", [3, 16]),
                            tensor_desc("INT32", [1])], [tensor_desc("INT32", [3, 16])])
    for bad in ([dynamic_desc("FLOAT", [-1, 64])] + good[1:], [good[0], dynamic_desc("INT32", [-1, 8]), good[2]],
                good[:2] + [dynamic_desc("INT32", [2])], [dynamic_desc("FLOAT", [2, 128]),
                                                          dynamic_desc("INT32", [3, 16]), good[2]]):
        with pytest.raises(ValueError, match="BytePatchDecode plugin"):
            plugin.configure_plugin(bad, out)


# ---- the computation on CPU tensors, and the runtime loop's trt branch -----------------------------------------

def plugin_patch(plugin, feature, forced, k):
    """Run the plugin's computation on torch tensors as enqueue does on TensorRT's buffers: forced (B, k) padded
    to the patch, int32 in and out."""
    B, P = feature.size(0), plugin.patch_size
    padded = torch.zeros(B, P, dtype=torch.int32, device=feature.device)
    padded[:, :k] = forced
    patch = torch.full((B, P), -1, dtype=torch.int32, device=feature.device)
    plugin.decode(feature, padded, torch.tensor([k], dtype=torch.int32, device=feature.device), patch)
    return patch


def eager_patch(model, feature, forced, sampling=GREEDY):
    caches = model.byte_decoder.make_caches(feature.size(0), model.cfg.patch_size)
    with torch.no_grad():
        return bgpt.generate_patch(model, feature, forced, caches, sampling, make_generator(0, feature.device))


def test_plugin_computation_on_cpu_equals_generate_patch():
    model = tiny_bgpt()
    plugin = create(plugin_fields_of(model, GREEDY))
    g = torch.Generator().manual_seed(1)
    for B in (1, 3):
        feature = torch.randn(B, model.cfg.n_embd, generator=g)
        for k in (0, 3):
            forced = torch.randint(0, 256, (B, k), generator=g)
            assert torch.equal(plugin_patch(plugin, feature, forced, k).long(), eager_patch(model, feature, forced))
    assert len(plugin.decoders) == 2  # one PatchDecoder per batch size, one rebuilt byte decoder
    assert len(plugin.modules) == 1


def test_seeded_sampling_repeats_with_a_fresh_plugin():
    fields = plugin_fields_of(tiny_bgpt(), SAMPLED)
    feature = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    plugin = create(fields)
    first, second = (plugin_patch(plugin, feature, feature[:, :0], 0) for _ in range(2))
    assert not torch.equal(first, second)  # the generator's stream continues from call to call
    for fresh in (create(fields), plugin.attach_to_context(None)):
        assert torch.equal(plugin_patch(fresh, feature, feature[:, :0], 0), first)


class FakeTrtRunner:
    """A runner named "trt": the bundle's ONNX graphs on ONNX Runtime (its runner interface, calls counted),
    patch_decode_fused as the plugin's computation on CPU tensors."""

    name = "trt"

    def __init__(self, bundle):
        self.ort = OrtRunner(bundle)
        self.plugin = create(fields_from_node(fused_node(bundle)))
        self.calls = {}

    def __getattr__(self, name):  # value, zeros, write, workspace(s), to_numpy: ONNX Runtime's
        return getattr(self.ort, name)

    def count(self, graph: str) -> None:
        self.calls[graph] = self.calls.get(graph, 0) + 1

    def bind(self, graph: str, feeds: dict, outputs: dict, capture: bool = False):
        call = self.ort.bind(graph, feeds, outputs)
        return lambda: (self.count(graph), call())[1]

    def run(self, graph: str, feeds: dict, outputs: dict | None = None) -> dict:
        self.count(graph)
        if graph != FUSED:
            return self.ort.run(graph, feeds, outputs)
        feature, forced, n_forced = (torch.from_numpy(np.ascontiguousarray(self.ort.to_numpy(feeds[n])))
                                     for n in ("feature", "forced", "n_forced"))
        assert feature.shape == (forced.size(0), 128) and forced.dtype == n_forced.dtype == torch.int32
        patch = torch.empty_like(forced)
        self.plugin.decode(feature, forced, n_forced, patch)
        return {"patch": patch.numpy()}


@pytest.mark.parametrize("prompt", [PROMPT, b"0123456789abcdef"])  # with and without forced tail bytes
def test_trt_branch_makes_one_fused_call_per_patch(exported, prompt):
    ckpt, fp32, _ = exported
    model, cfg, _ = load_model(ckpt)
    bundle = load_bundle(fp32)
    runner = FakeTrtRunner(bundle)
    request = GenerateRequest(prompt, max_new=60, batch_size=3, sampling=GREEDY, options={"ext": "py"})
    result = bgpt_loop.generate(bundle, runner, request)
    assert result.outputs == bgpt.generate(model, cfg, request, "eager").outputs
    n_patches = runner.calls[FUSED]
    assert "byte_patch_greedy" not in runner.calls and n_patches > 1
    # patch_decode after every patch, but the last one when every row has ended
    assert runner.calls["patch_prefill"] == 1 and runner.calls["patch_decode"] in (n_patches - 1, n_patches)


def test_fused_branch_choice(exported):
    bundle = load_bundle(exported[1])
    trt_runner, ort_runner = SimpleNamespace(name="trt"), SimpleNamespace(name="ort")
    assert bgpt_loop.use_fused(bundle, trt_runner, GREEDY)
    assert bgpt_loop.use_fused(bundle, trt_runner, SamplingConfig(top_k=1, seed=9))  # greedy too
    assert not bgpt_loop.use_fused(bundle, trt_runner, SAMPLED)  # not what the graph bakes in
    assert not bgpt_loop.use_fused(bundle, ort_runner, GREEDY)
    without = SimpleNamespace(graphs={k: v for k, v in bundle.graphs.items() if k != FUSED}, extra=bundle.extra)
    assert not bgpt_loop.use_fused(without, trt_runner, GREEDY)


# ---- GPU: enqueue on device pointers ---------------------------------------------------------------------------

def enqueue(plugin, feature, forced, k):
    """plugin.enqueue on the tensors' device pointers, on a side stream, as TensorRT calls it."""
    B, P = feature.size(0), plugin.patch_size
    padded = torch.zeros(B, P, dtype=torch.int32, device="cuda")
    padded[:, :k] = forced
    n_forced = torch.tensor([k], dtype=torch.int32, device="cuda")
    patch = torch.full((B, P), -1, dtype=torch.int32, device="cuda")
    float_type = "HALF" if feature.dtype == torch.float16 else "FLOAT"
    input_desc = [tensor_desc(float_type, feature.shape), tensor_desc("INT32", padded.shape),
                  tensor_desc("INT32", [1])]
    output_desc = [tensor_desc("INT32", patch.shape)]
    plugin.on_shape_change(input_desc, output_desc)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    plugin.enqueue(input_desc, output_desc, [feature.data_ptr(), padded.data_ptr(), n_forced.data_ptr()],
                   [patch.data_ptr()], 0, stream.cuda_stream)
    stream.synchronize()
    return patch


@gpu
def test_enqueue_equals_generate_patch_greedy():
    model = tiny_bgpt().cuda()
    plugin = create(plugin_fields_of(model, GREEDY)).attach_to_context(None)
    g = torch.Generator().manual_seed(1)
    for B in (1, 3):
        feature = torch.randn(B, model.cfg.n_embd, generator=g).cuda()
        for k in (0, 3):
            forced = torch.randint(0, 256, (B, k), generator=g).cuda()
            assert torch.equal(enqueue(plugin, feature, forced, k).long(), eager_patch(model, feature, forced))


@gpu
def test_enqueue_in_float16_equals_patch_decoder():
    model = tiny_bgpt().cuda().half()
    plugin = create(plugin_fields_of(model, GREEDY)).attach_to_context(None)
    feature = torch.randn(3, model.cfg.n_embd, generator=torch.Generator().manual_seed(1)).cuda().half()
    forced = torch.randint(0, 256, (3, 3), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        reference = PatchDecoder(model, 3, GREEDY, use_graph=False)(feature, forced)
    assert torch.equal(enqueue(plugin, feature, forced, 3).long(), reference)


@gpu
def test_enqueue_seeded_sampling_repeats_with_a_fresh_plugin():
    fields = plugin_fields_of(tiny_bgpt(), SAMPLED)
    feature = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).cuda()
    no_forced = torch.zeros(3, 0, dtype=torch.long, device="cuda")
    plugin = create(fields).attach_to_context(None)
    first, second = (enqueue(plugin, feature, no_forced, 0) for _ in range(2))
    assert not torch.equal(first, second)
    assert torch.equal(enqueue(create(fields).attach_to_context(None), feature, no_forced, 0), first)
