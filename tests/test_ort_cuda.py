"""The bundle loops on ONNX Runtime's CUDA provider (GPU; skipped without onnxruntime-gpu and a GPU): every family's
greedy output equals the CPU provider's and eager's, the step graphs run as captured CUDA graphs (one per bound call,
captured once and replayed across generate calls), seeded sampling repeats, fp16 bundles run, and the batched
session gives offline generate's rows."""

from __future__ import annotations

import onnxruntime
import pytest
import torch
from test_bgpt_batch import run_session

from bytedeploy.exporters import export
from bytedeploy.generation import GenerateRequest
from bytedeploy.runner import open_model
from bytedeploy.sampling import SamplingConfig

needs_ort_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs a CUDA GPU and onnxruntime-gpu")
pytestmark = [pytest.mark.gpu, needs_ort_cuda]
GREEDY = SamplingConfig(temperature=0.0)
FAMILIES = ("char-gpt2", "bitnet", "sigma-gpt", "bgpt", "bfn")
STEP_GRAPHS = {"char-gpt2": {"decode"}, "bitnet": {"decode"}, "sigma-gpt": {"decode"},
               "bgpt": {"byte_patch_greedy", "patch_decode"}, "bfn": {"step_greedy"}}


def request(family: str, batch_size: int = 2, sampling: SamplingConfig = GREEDY) -> GenerateRequest:
    options = {"n_steps": 6} if family == "bfn" else {}
    return GenerateRequest(b"def f(x):", 0 if family == "bfn" else 24, batch_size, sampling, options)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_on_cuda_equals_cpu_and_eager_with_captured_graphs(tiny_bundles, family):
    ckpt, bundle = tiny_bundles[family]
    cuda, cpu = open_model(bundle, "ort-cuda"), open_model(bundle, "ort")
    expected = open_model(ckpt, "eager", device="cpu").generate(request(family)).outputs
    assert cpu.generate(request(family)).outputs == expected
    first = cuda.generate(request(family)).outputs
    runner = cuda.graph_runner
    assert runner.cuda_graph_errors == {} and STEP_GRAPHS[family] <= runner.capturing
    captured = dict(runner.graph_ids)
    assert first == expected and cuda.generate(request(family)).outputs == expected
    assert runner.graph_ids == captured  # the second call replayed the first call's graphs


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_on_cuda_repeats(tiny_bundles, family):
    model = open_model(tiny_bundles[family][1], "ort-cuda")
    sampled = request(family, 3, SamplingConfig(temperature=0.9, top_k=8, top_p=0.9, seed=5))
    first = model.generate(sampled).outputs
    assert model.generate(sampled).outputs == first and len(set(first)) > 1


@pytest.mark.parametrize("family", ["char-gpt2", "bgpt", "bfn"])
def test_fp16_bundle_runs_on_cuda(tiny_bundles, tmp_path, family):
    ckpt, _ = tiny_bundles[family]
    bundle = export(ckpt, tmp_path / "fp16", precision="fp16")
    result = open_model(bundle.path, "ort-cuda").generate(request(family))
    assert result.n_new > 0 and all(result.outputs)


@pytest.mark.parametrize("family", ["char-gpt2", "bgpt"])
def test_batched_session_on_cuda_gives_offline_rows(tiny_bundles, family):
    model = open_model(tiny_bundles[family][1], "ort-cuda")
    requests = [GenerateRequest(p, 12, 1, GREEDY, {}) for p in (b"", b"a", b"import ", b"def f(x):", b"xyz")]
    expected = [model.generate(r).outputs[0] for r in requests]
    got = run_session(model.session(4), requests, join_at=[0, 0, 1, 2, 4])
    assert [got[i] for i in range(len(requests))] == expected
