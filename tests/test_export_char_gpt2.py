"""Char GPT-2 bundles: ONNX checker, ONNX Runtime vs eager (prefill + 32 decode steps), greedy generation through
ORT identical to eager past the context length, the unknown symbol, fp16.

Tolerances: fp32 graphs vs eager fp32 |d| <= 5e-5 + 1e-4 |ref| (measured ~6e-6 on logits of magnitude ~9);
fp16 graphs vs eager fp32 |d| <= 5e-2 + 2e-2 |ref| (measured ~1e-2)."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import load_model, save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.exporters.char_gpt2 import verify_cases
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import char_gpt2
from bytedeploy.runtimes import generate as generate_on
from bytedeploy.runtimes.ort import OrtRunner
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

FP32 = dict(atol=5e-5, rtol=1e-4)
FP16 = dict(atol=5e-2, rtol=2e-2)
GREEDY = SamplingConfig(temperature=0.0)
TEXT = "def main():\n    return [x for x in range(10)]\n"


def make_checkpoint(path, unknown_bias: float = 0.0):
    """Tiny preset (context 64), untrained random weights large enough that greedy logits are far from ties."""
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = char_gpt2.Config(**char_gpt2.PRESETS["tiny"], vocab_size=tokenizer.vocab_size)
    model = char_gpt2.Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
        model.lm_head.bias[tokenizer.unknown_id] += unknown_bias
    return save_checkpoint(path, model, "char-gpt2", cfg, assets={char_gpt2.TOKENIZER_FILE: tokenizer.to_json()})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("char_gpt2_export")
    ckpt = make_checkpoint(tmp / "ckpt")
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp / "fp32")])
    assert result.exit_code == 0, result.output
    export(ckpt, tmp / "fp16", precision="fp16")
    model, cfg, _ = load_model(ckpt)
    return tmp, ckpt, model.eval(), cfg


def compare(bundle, cases, tol, feed_dtype=np.float32):
    runner = OrtRunner(bundle)
    for case in cases:
        feeds = {k: v.astype(feed_dtype) if v.dtype.kind == "f" else v for k, v in case.feeds.items()}
        out = runner.run(case.graph, feeds)
        for name, expected in case.expected.items():
            got = runner.to_numpy(out[name]).astype(np.float32)
            np.testing.assert_allclose(got, expected, **tol, err_msg=f"{case.label} {name}")


def test_bundle_graphs_pass_the_full_onnx_check(setup):
    tmp, _, _, cfg = setup
    for precision in ("fp32", "fp16"):
        bundle = load_bundle(tmp / precision)
        assert bundle.family == "char-gpt2" and bundle.precision == precision and set(bundle.graphs) == {
            "prefill", "decode"}
        for name in bundle.graphs:
            onnx.checker.check_model(str(bundle.graph_path(name)), full_check=True)
        decode = bundle.graphs["decode"]
        assert [t.name for t in decode.inputs] == ["idx", "position", "past_k", "past_v"]
        assert decode.inputs[2].shape == [cfg.n_layer, "batch", cfg.n_head, "past", cfg.n_embd // cfg.n_head]


def test_ort_equals_eager_for_prefill_and_32_decode_steps(setup):
    tmp, _, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    cases = verify_cases(model, cfg, bundle, batch_size=2, decode_steps=32, seed=0)
    assert [c.graph for c in cases] == ["prefill"] + ["decode"] * 32
    compare(bundle, cases, FP32)
    # the prefill's sequence and batch axes are dynamic: one character, and a full context at batch 3
    runner = OrtRunner(bundle)
    for idx in (np.array([[5]]), np.random.default_rng(1).integers(1, cfg.vocab_size, (3, cfg.block_size))):
        expected = model.logits(torch.from_numpy(idx))[:, -1].detach().numpy()
        np.testing.assert_allclose(runner.to_numpy(runner.run("prefill", {"idx": idx})["logits"]), expected, **FP32)


def test_greedy_generation_through_ort_is_eager_past_the_context(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp32")
    request = GenerateRequest(b"def ", 100, 2, GREEDY, {"assets": str(ckpt / "assets")})  # 104 > context 64
    ort = generate_on(bundle, request, "ort")
    assert ort.outputs == char_gpt2.generate(model, cfg, request, "eager").outputs
    assert ort.outputs == char_gpt2.generate(model, cfg, request, "eager-reference").outputs
    assert ort.n_new == 200 and all(len(o.decode()) == 100 for o in ort.outputs)
    # the same through the CLI: a bundle path runs on ORT
    args = ["generate", "--prompt", "def ", "--max-new", "100", "--temperature", "0"]
    by_bundle = CliRunner().invoke(cli, [*args[:1], str(tmp / "fp32"), *args[1:]])
    by_ckpt = CliRunner().invoke(cli, [*args[:1], str(ckpt), *args[1:]])
    assert by_bundle.exit_code == 0 and by_ckpt.exit_code == 0, by_bundle.output + by_ckpt.output
    assert by_bundle.stdout == by_ckpt.stdout == ort.outputs[0].decode() + "\n"


def test_unknown_symbol_is_never_sampled_through_ort(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", unknown_bias=30.0)  # the unknown symbol's logit is the highest
    bundle = export(ckpt, tmp_path / "bundle")
    for sampling in (GREEDY, SamplingConfig(temperature=1.0, seed=3)):
        result = generate_on(bundle, GenerateRequest(b"x", 80, 2, sampling, {}), "ort")
        assert all(len(o.decode()) == 80 and set(o.decode()) <= set(TEXT) for o in result.outputs)


def test_fp16_bundle_is_close_to_eager_fp32(setup):
    tmp, ckpt, model, cfg = setup
    bundle = load_bundle(tmp / "fp16")
    assert bundle.graphs["decode"].inputs[2].dtype == "float16"
    compare(bundle, verify_cases(model, cfg, bundle, 2, 32, seed=0), FP16, feed_dtype=np.float16)
    result = generate_on(bundle, GenerateRequest(b"def ", 80, 2, GREEDY, {}), "ort")
    assert all(len(o.decode()) == 80 and set(o.decode()) <= set(TEXT) for o in result.outputs)
