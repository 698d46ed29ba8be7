"""bGPT export: the bundle's graphs pass the ONNX checker, ONNX Runtime matches eager PyTorch for the prefill,
32 patch decode steps and two teacher-forced byte patches (fp32 and fp16), and generation through ORT gives the eager
backend's bytes."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model, save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import bgpt as bgpt_export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bgpt
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.sampling import SamplingConfig
from bytedeploy.verify import run_cases

FP32_TOL = 1e-4  # atol = rtol: same arithmetic, kernels differ in summation order (seen: < 5e-6)
FP16_TOL = 2e-2  # atol = rtol: half-precision rounding (seen: < 4e-3)
PROMPT = b"import os\nimport sys\n"  # one whole patch and 5 forced bytes of the next


def save_tiny_bgpt(path, seed: int = 0, **overrides):
    """An untrained tiny bGPT whose weights are redrawn from N(0, 0.3), so that byte distributions are peaked and
    greedy decoding has no near-ties (GPT-2's init gives near-uniform logits)."""
    cfg = bgpt.Config(**dict(bgpt.PRESETS["tiny"], **overrides))
    torch.manual_seed(seed)
    model = bgpt.Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return save_checkpoint(path, model, "bgpt", cfg)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bgpt_export")
    ckpt = save_tiny_bgpt(root / "ckpt")
    runner = CliRunner()
    for precision in ("fp32", "fp16"):
        result = runner.invoke(cli, ["export", str(ckpt), "-o", str(root / precision), "--precision", precision])
        assert result.exit_code == 0, result.output
    return ckpt, root / "fp32", root / "fp16"


def test_bundle_manifest_and_onnx_checker(exported):
    ckpt, fp32, fp16 = exported
    doc = json.loads((fp32 / "bundle.json").read_text())
    assert doc["family"] == "bgpt" and doc["precision"] == "fp32" and doc["opset"] >= 18
    names = ["patch_prefill", "patch_decode", "byte_patch_greedy", "byte_patch"]
    assert [g["name"] for g in doc["graphs"]] == names
    assert set(doc["files"]) == {f"onnx/{g}.onnx" for g in names}
    decode = {t["name"]: t for t in doc["graphs"][1]["inputs"]}
    assert decode["past_k.0"]["shape"] == ["batch", 4, "length", 32]  # one layer's static cache (B, H, T, D)
    assert len([n for n in decode if n.startswith("past_")]) == 2 * 3  # the patch decoder's 3 layers
    byte_patch = {t["name"]: t for t in doc["graphs"][3]["inputs"]}
    assert byte_patch["feature"]["shape"] == ["batch", 128] and byte_patch["u"]["shape"] == ["batch", 16]
    for folder, dtype in ((fp32, onnx.TensorProto.FLOAT), (fp16, onnx.TensorProto.FLOAT16)):
        bundle = load_bundle(folder)
        for name in bundle.graphs:
            path = bundle.graph_path(name)
            onnx.checker.check_model(str(path), full_check=True)
            model = onnx.load(str(path))
            assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) >= 18
            feature = next(o for o in model.graph.output if o.name in ("feature", "feature_out", "logits"))
            assert feature.type.tensor_type.elem_type == dtype


@pytest.mark.parametrize("precision, tol", [("fp32", FP32_TOL), ("fp16", FP16_TOL)])
def test_ort_matches_eager_prefill_and_32_decode_steps(exported, precision, tol):
    ckpt, fp32, fp16 = exported
    bundle = load_bundle(fp32 if precision == "fp32" else fp16)
    model, cfg, _ = load_model(ckpt)
    if precision == "fp16":
        model = model.half()
    cases = bgpt_export.verify_cases(model, cfg, bundle, batch_size=2, decode_steps=32, seed=1)
    graphs = [c.graph for c in cases]
    assert graphs.count("patch_prefill") == 1 and graphs.count("patch_decode") == 32
    assert graphs.count("byte_patch_greedy") == 2
    assert cases[1].feeds["past_k.0"].shape == (2, cfg.n_head, cfg.n_patches, cfg.n_embd // cfg.n_head)  # static
    for case, actual in zip(cases, run_cases(bundle, "ort", cases)):
        for name, expected in case.expected.items():
            assert actual[name].dtype == expected.dtype and actual[name].shape == expected.shape
            np.testing.assert_allclose(actual[name].astype(np.float32), expected.astype(np.float32),
                                       atol=tol, rtol=tol, err_msg=f"{case.label} {name}")


def test_greedy_generate_on_ort_equals_eager(exported):
    ckpt, fp32, _ = exported
    model, cfg, _ = load_model(ckpt)
    request = GenerateRequest(PROMPT, max_new=60, batch_size=3, sampling=SamplingConfig(temperature=0.0),
                              options={"ext": "py"})
    eager = bgpt.generate(model, cfg, request, "eager")
    ort = generate_on(load_bundle(fp32), request, "ort")
    assert ort.outputs == eager.outputs and ort.n_new == eager.n_new and ort.unit == "byte"
    assert all(len(o) > 16 for o in ort.outputs)  # more than one patch: patch_decode ran


def test_seeded_sampling_on_ort_is_reproducible(exported):
    """The bundle loop samples inside byte_patch with the loop's numpy uniforms (not eager's torch draws): the same
    seed gives the same bytes run to run, another seed other bytes."""
    _, fp32, _ = exported
    bundle = load_bundle(fp32)
    request = lambda seed: GenerateRequest(PROMPT, max_new=60, batch_size=3, options={"ext": "py"},  # noqa: E731
                                           sampling=SamplingConfig(top_k=40, top_p=0.95, temperature=0.9, seed=seed))
    first = generate_on(bundle, request(3), "ort")
    assert generate_on(bundle, request(3), "ort").outputs == first.outputs
    assert generate_on(bundle, request(4), "ort").outputs != first.outputs
    assert len(set(first.outputs)) == 3 and all(len(o) > 16 for o in first.outputs)  # rows draw apart


def test_greedy_generate_cli_on_bundle(exported, tmp_path):
    ckpt, fp32, _ = exported
    runner = CliRunner()
    args = ["--prompt", PROMPT.decode(), "--ext", "py", "--temperature", "0", "--max-new", "40"]
    eager = runner.invoke(cli, ["generate", str(ckpt), *args, "-o", str(tmp_path / "eager.py")])
    ort = runner.invoke(cli, ["generate", str(fp32), "--backend", "ort", *args, "-o", str(tmp_path / "ort.py")])
    assert eager.exit_code == 0 and ort.exit_code == 0, eager.output + ort.output
    assert (tmp_path / "ort.py").read_bytes() == (tmp_path / "eager.py").read_bytes()
    assert len((tmp_path / "ort.py").read_bytes()) == 40


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="onnxruntime-gpu is installed")
def test_ort_cuda_without_onnxruntime_gpu_is_one_line_error(exported):
    _, fp32, _ = exported
    result = CliRunner().invoke(cli, ["generate", str(fp32), "--backend", "ort-cuda", "--max-new", "4"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "onnxruntime-gpu" in lines[0]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="onnxruntime-gpu is installed")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_ort_cuda_that_falls_back_to_the_cpu_is_one_line_error(exported, monkeypatch):
    """onnxruntime-gpu whose CUDA provider cannot start (a missing CUDA library) quietly runs on the CPU: refused.
    Here a CPU onnxruntime that claims the CUDA provider plays it: its sessions get the CPU provider only."""
    _, fp32, _ = exported
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)
    result = CliRunner().invoke(cli, ["generate", str(fp32), "--backend", "ort-cuda", "--max-new", "4"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "CUDA execution provider did not start" in lines[0], result.output


def test_classifier_export_is_refused(tmp_path):
    ckpt = save_tiny_bgpt(tmp_path / "cls", task="classify", labels=("a", "b"))
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 1 and "classifier" in result.output and not (tmp_path / "bundle").exists()
    model, cfg, _ = load_model(ckpt)
    with pytest.raises(UserError, match="classifier"):
        bgpt_export.verify_cases(model, cfg, None, 1, 1, 0)
