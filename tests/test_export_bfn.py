"""Bayesian-flow LM bundle: the step graphs pass the ONNX checker, ORT equals eager PyTorch step by step (fp32
and fp16, the update noise computed in the graph), and the ORT sampler gives eager's greedy tokens with the same
seed, keeping the conditioned positions, its state on the runner's device."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model
from bytedeploy.cli import cli
from bytedeploy.exporters import bfn as bfn_export
from bytedeploy.exporters.bundle import MIN_OPSET, load_bundle
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bfn
from bytedeploy.runtimes import bfn as bfn_runtime
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.runtimes.ort import OrtRunner
from bytedeploy.sampling import SamplingConfig

# fp32: ORT and torch run the same float32 ops in different orders: measured max differences 4e-7 on the logits
# and 4e-6 on log theta (values down to about -60); tolerance atol 1e-5 + rtol 1e-5.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# fp16: the network runs in half precision; the belief update stays float32, so updated_log_theta keeps fp32's
# tolerance. Logits against fp32 eager: measured max difference 4e-4 (|logits| <= ~1 here); tolerance 1e-2 + 1e-2.
FP16_LOGITS_TOL = dict(atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BFN (tokenizer + model trained through the CLI for a few steps) and its fp32 and fp16 bundles."""
    root = tmp_path_factory.mktemp("bfn")
    ckpt = root / "ckpt"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "bfn", "--preset", "tiny", "--steps", "10", "--first-mb", "0.2",
                                 "--eval-every", "0", "--eval-batches", "1", "--no-progress", "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    for precision in ("fp32", "fp16"):
        result = runner.invoke(cli, ["export", str(ckpt), "-o", str(root / precision), "--precision", precision])
        assert result.exit_code == 0, result.output
        assert "2 graphs (step_greedy, step)" in result.output
    model, cfg, _ = load_model(ckpt)
    return model.eval(), cfg, ckpt, load_bundle(root / "fp32"), load_bundle(root / "fp16")


def test_step_graph_passes_the_full_onnx_check(trained):
    model, cfg, _, bundle, bundle16 = trained
    for b in (bundle, bundle16):
        for name, inputs in (("step_greedy", bfn_export.STATE_INPUTS),
                             ("step", [*bfn_export.STATE_INPUTS, "u", "temperature", "top_k", "top_p"])):
            path = b.graph_path(name)
            onnx.checker.check_model(str(path), full_check=True)
            graph = onnx.load(str(path)).graph
            assert [i.name for i in graph.input] == inputs
            assert [o.name for o in graph.output] == bfn_export.OUTPUTS
        assert b.opset >= MIN_OPSET and b.family == "bfn" and b.extra["seq_len"] == cfg.seq_len
        spec = {t.name: t for t in b.graphs["step"].inputs + b.graphs["step"].outputs}
        assert spec["log_theta"].shape == ["batch", cfg.seq_len, cfg.vocab_size]
        assert spec["logits"].shape == ["batch", cfg.seq_len, cfg.vocab_size]
        assert spec["log_theta_out"].dtype == "float32" and spec["keys"].shape == ["batch", 2]
        assert spec["tokens_out"].shape == ["batch", cfg.seq_len] and spec["tokens_out"].dtype == "int64"
    assert (bundle.assets / "tokenizer.model").is_file()
    fp16_weights = [t for t in onnx.load(str(bundle16.graph_path("step"))).graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16_weights) > 10  # the network really is half precision


def run_cases(bundle, cases):
    runner = OrtRunner(bundle)
    return [{k: runner.to_numpy(v) for k, v in runner.run(c.graph, c.feeds).items()} for c in cases]


@pytest.mark.parametrize("batch_size", [1, 3])  # the graph was traced at batch 2: the batch axis is dynamic
def test_ort_equals_eager_for_32_steps_fp32(trained, batch_size):
    model, cfg, _, bundle, _ = trained
    cases = bfn_export.verify_cases(model, cfg, bundle, batch_size, 32, seed=batch_size)
    assert len(cases) == 33 and (cases[-1].feeds["t"] == 1.0).all()
    assert (cases[0].feeds["alpha"] == 0.0).all() and (cases[1].feeds["alpha"] > 0).all()
    runner = OrtRunner(bundle)
    for case in cases:
        got = {k: runner.to_numpy(v) for k, v in runner.run(case.graph, case.feeds).items()}
        for name, expected in case.expected.items():
            np.testing.assert_allclose(got[name], expected, **FP32_TOL, err_msg=f"{case.label} {name}")
        fixed, ids = case.feeds["fixed"], case.feeds["ids"]  # greedy's tokens: the argmax, the conditioning kept
        np.testing.assert_array_equal(got["tokens_out"], np.where(fixed, ids, case.expected["logits"].argmax(-1)))
    # the belief really moved: the last step's is far from uniform, and conditioned positions saw their ids
    theta = np.exp(cases[-1].expected["log_theta_out"])
    assert theta.max() > 10 / cfg.vocab_size


def test_ort_fp16_bundle_against_fp32_eager(trained):
    model, cfg, _, _, bundle16 = trained
    cases = bfn_export.verify_cases(model, cfg, bundle16, 2, 8, seed=0)
    for case, got in zip(cases, run_cases(bundle16, cases)):
        np.testing.assert_allclose(got["log_theta_out"], case.expected["log_theta_out"], **FP32_TOL)
        np.testing.assert_allclose(got["logits"], case.expected["logits"], **FP16_LOGITS_TOL, err_msg=case.label)


def test_greedy_ort_generation_equals_eager_and_eager_reference(trained):
    """Greedy tokens depend on the update noise too: every backend computes the same bits from the seed."""
    model, cfg, ckpt, bundle, _ = trained
    options = {"assets": str(ckpt / "assets"), "n_steps": 20}
    greedy = SamplingConfig(temperature=0.0, seed=1)
    request = GenerateRequest(b"import os\n", 12, 2, greedy, options)
    onnx_result = generate_on(bundle, request, "ort")
    assert onnx_result.outputs == bfn.generate(model, cfg, request, "eager").outputs
    assert onnx_result.outputs == bfn.generate(model, cfg, request, "eager-reference").outputs
    assert (onnx_result.n_new, onnx_result.passes, onnx_result.unit) == (24, 21, "token")
    other_seed = generate_on(bundle, GenerateRequest(b"import os\n", 12, 2, SamplingConfig(0.0, seed=2), options),
                             "ort")
    assert other_seed.outputs != onnx_result.outputs  # the noise, not only the argmax, decides greedy tokens
    infill = GenerateRequest(b"", 0, 1, greedy, dict(options, infill=["def ", 4, "(self):\n", 6]))
    text = generate_on(bundle, infill, "ort").outputs
    assert text == bfn.generate(model, cfg, infill, "eager").outputs
    assert text[0].decode().startswith("def ") and "(self):\n" in text[0].decode()


def test_seeded_ort_sampling_is_reproducible(trained):
    _, _, ckpt, bundle, _ = trained
    request = lambda seed: GenerateRequest(  # noqa: E731
        b"import os\n", 12, 2, SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=seed),
        {"assets": str(ckpt / "assets"), "n_steps": 20})
    first = generate_on(bundle, request(2), "ort").outputs
    assert generate_on(bundle, request(2), "ort").outputs == first
    assert generate_on(bundle, request(3), "ort").outputs != first


def test_conditioned_positions_unchanged_and_state_stays_on_the_device(trained):
    _, cfg, _, bundle, _ = trained
    runner = OrtRunner(bundle)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(3, cfg.seq_len))
    fixed = rng.random((3, cfg.seq_len)) < 0.4  # scattered conditioning, different per row
    sampling = SamplingConfig(temperature=1.0, seed=4)
    tokens = bfn_runtime.sample_loop(bundle, runner, ids, fixed, 10, sampling)
    assert (tokens[fixed] == ids[fixed]).all()
    assert len(set(tokens[~fixed].tolist())) > 5  # the free positions really were sampled
    state = runner.workspaces[("flow", 3)]
    assert isinstance(state.log_theta[0], ort.OrtValue) and state.parity == 11 % 2  # 11 calls alternated buffers
    final = runner.to_numpy(state.log_theta[state.parity])
    np.testing.assert_allclose(np.exp(final).sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(final, final[..., :1])  # the belief moved off uniform
    again = bfn_runtime.sample_loop(bundle, runner, ids, fixed, 10, sampling)
    assert runner.workspaces[("flow", 3)] is state and (again == tokens).all()  # the same buffers and bound calls


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_verify_cli_passes(trained, precision):
    pytest.importorskip("polygraphy")
    _, _, ckpt, bundle, bundle16 = trained
    path = (bundle if precision == "fp32" else bundle16).path
    result = CliRunner().invoke(cli, ["verify", str(ckpt), str(path), "--decode-steps", "4"])
    assert result.exit_code == 0, result.output
    assert "ort: 10/10 outputs within tolerance" in result.output
